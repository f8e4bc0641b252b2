# -*- test-case-name: tests.test_returnchannel -*-
"""
The return channel's services (R16): the mailbox store, the LMTP
listeners through which the core delivers into it, and the expiry of old
messages; built from C{[lmtp]} and C{[mailbox]} by L{buildReturnChannel}.

The store is a Maildir per account under the state directory, or, with
C{[mailbox] store = "postgresql://..."}, the database every instance
shares (L{msa.mailbox.pgstore}), so that a message delivered into one
instance is fetched from any.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from msa import metrics, tls
from msa.accounts.mailboxes import MailboxDirectory
from msa.accounts.pgstore import connect, describe
from msa.interfaces import IMailboxStore
from msa.lmtp import AddressAllowlist, LMTPFactory, LMTPPolicy
from msa.mailbox import MaildirStore, Quota
from msa.service.config import Config

if TYPE_CHECKING:
    # psycopg (about 10 MB of the daemon's memory) is imported only when
    # [mailbox] store names a database (mailboxStore).
    from msa.mailbox.pgstore import PostgresMailboxStore

__all__ = [
    "EXPIRY_INTERVAL",
    "LMTPListener",
    "ReturnChannel",
    "buildReturnChannel",
    "mailboxStore",
]

log = Logger()

#: Seconds between two sweeps of C{[mailbox] expire_after}.
EXPIRY_INTERVAL = 3600.0


class LMTPListener(Service):
    """
    One LMTP listener that knows whether it listens (for C{/health}): a
    listener that cannot bind fails the start, as C{strports.service} does.

    @ivar port: the listening port, or L{None}.
    """

    def __init__(self, description: str, factory: Any, reactor: Any) -> None:
        self.description = description
        self.endpoint = serverFromString(reactor, description)
        self.factory = factory
        self.port: Any = None

    def privilegedStartService(self) -> None:
        # Bound before twistd drops privileges, as Twisted's own listeners
        # are (and so before the process counts as started).
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        if outcome:
            self.port = outcome[0]

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None


class ReturnChannel(MultiService):
    """
    The mailbox store and its LMTP listeners, as one service.

    @ivar mailboxStore: the L{MaildirStore} or L{PostgresMailboxStore} (the
        POP3 server reads it too).
    @ivar factory: the LMTP listeners' L{LMTPFactory}.
    @ivar listeners: the listener services, for C{/health}.
    @ivar expireAfter: C{[mailbox] expire_after}: seconds a message is kept
        (swept every L{EXPIRY_INTERVAL}), or L{None}.
    """

    def __init__(self, store: IMailboxStore, factory: LMTPFactory) -> None:
        super().__init__()
        self.setName("return-channel")
        self.mailboxStore = store
        self.factory = factory
        self.listeners: list[LMTPListener] = []
        self.expireAfter: float | None = None

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop the listeners, then the store (a database store's threads and
        connections: L{IMailboxStore.close}).
        """
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: self.mailboxStore.close())
        return d

    def healthProblem(self) -> str | None:
        """
        What keeps the core from delivering return messages, or L{None}: a
        listener that is not listening, or a store that failed the last
        delivery it was given (until one succeeds).
        """
        for listener in self.listeners:
            if self.running and listener.port is None:
                return f"LMTP listener {listener.description} is not listening"
        if self.factory.storeError is not None:
            return f"mailbox store failing: {self.factory.storeError}"
        return None


def mailboxStore(
    config: Config,
    audit: Any,
    quotaFor: Callable[[str], Quota] = lambda account: Quota(),
    reactor: Any = None,
) -> MaildirStore | PostgresMailboxStore:
    """
    The mailbox store C{[mailbox] store} names (the daemon's, and the admin
    tool's C{mailbox} commands'): the Maildirs of C{[mailbox] directory},
    or the PostgreSQL database, connected with the accounts' settings
    (keepalives, time-outs) and named in messages without its password.
    """
    mailbox = config["mailbox"]
    if mailbox["store"] == "maildir":
        return MaildirStore(
            mailbox["directory"], reactor, audit=audit, quotaFor=quotaFor
        )
    from msa.mailbox.pgstore import PostgresMailboxStore

    url = mailbox["store"]
    return PostgresMailboxStore(
        functools.partial(connect, url),
        describe(url),
        reactor,
        audit=audit,
        quotaFor=quotaFor,
    )


def buildReturnChannel(
    config: Config, accounts: Any, audit: Any, contextArgs: dict, reactor: Any
) -> ReturnChannel:
    """
    The return channel of C{config}.

    @param accounts: the live account store, whose accounts say which
        mailbox a recipient belongs to (L{MailboxDirectory}).
    @param audit: the audit log (L{msa.audit.AuditLog}), or L{None}.
    @param contextArgs: the server certificate and TLS settings, as
        L{msa.tls.serverContextFactory} takes them, for C{tls_listeners}.
    """
    lmtp, mailbox = config["lmtp"], config["mailbox"]
    directory = MailboxDirectory(
        accounts.accounts,
        Quota(
            maxBytes=mailbox["max_bytes"] or 0,
            maxMessages=mailbox["max_messages"] or 0,
        ),
    )
    store = mailboxStore(config, audit, directory.quotaFor, reactor)
    if isinstance(store, MaildirStore):
        store.ensureDirectory()
        removed = store.recover(minAge=0)
        if removed:
            log.warn(
                "mailboxes: removed {count} partial deliveries left by a crash "
                "(never acknowledged)",
                count=removed,
            )
        temporaryDirectory = store.directory
    else:
        temporaryDirectory = config["server"]["state_dir"]
    metrics.MAILBOXES.store = store
    server = config["server"]
    factory = LMTPFactory(
        store,
        directory.accountFor,
        LMTPPolicy(
            hostname=server["hostname"],
            maxMessageSize=lmtp["max_message_size"],
            maxLineLength=server["max_line_length"],
            maxRecipients=lmtp["max_recipients"],
            idleTimeout=server["idle_timeout"],
        ),
        allowlist=AddressAllowlist(lmtp["allow_from"]) or None,
        temporaryDirectory=temporaryDirectory,
        reactor=reactor,
    )
    channel = ReturnChannel(store, factory)
    if lmtp["tls_listeners"]:
        contextFactory = tls.serverContextFactory(
            **contextArgs,
            clientCertificates="require",
            clientCAFile=lmtp["client_ca"],
        )
    for key, served in (("listeners", factory), ("tls_listeners", None)):
        for description in lmtp[key]:
            listenerFactory: IProtocolFactory = served or TLSMemoryBIOFactory(
                contextFactory, False, factory
            )
            # A listener that cannot bind fails the start (twistd exits).
            listener = LMTPListener(description, listenerFactory, reactor)
            listener.setServiceParent(channel)
            channel.listeners.append(listener)
    channel.expireAfter = mailbox["expire_after"]
    if mailbox["expire_after"] is not None:
        TimerService(
            EXPIRY_INTERVAL, _expire, store, mailbox["expire_after"]
        ).setServiceParent(channel)
    return channel


def _expire(store: MaildirStore | PostgresMailboxStore, maxAge: float) -> Any:
    d = store.expire(maxAge)

    def done(count: int) -> None:
        if count:
            log.info("mailboxes: {count} message(s) expired", count=count)

    def failed(failure: Any) -> None:
        log.failure("mailbox expiry failed", failure)

    return d.addCallbacks(done, failed)
