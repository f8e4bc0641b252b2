# -*- test-case-name: tests.test_testing -*-
"""
Fakes for testing code that embeds the MSA, shipped with it as C{treq.testing}
ships with treq: an embedder's own realm, avatar, content policy or spool can
be tested against the real protocol without sockets, disk or wall-clock time.

  - L{MemorySpool}: an L{ISpool} that keeps each committed message (its
    envelope and its exact bytes) in a list, and can be told to fail the next
    commit, to test what a client hears when the disk lets you down.
  - L{MemoryAccountStore}, L{MemoryChecker}, L{memoryRealm} and
    L{memoryPortal}: accounts with plain-text passwords for AUTH PLAIN and
    LOGIN, behind the real L{msa.accounts.checkers.SubmissionRealm} and the real
    avatar (L{msa.submission.avatar.submissionFactory}).
  - L{MemoryMailboxStore}: an L{IMailboxStore} of return messages in
    memory, with the store's lock (C{MailboxInUse}), snapshots and deletions
    only at C{commitDeletions}; it can be told to fail the next commit.
  - L{Harness}: one L{msa.submission.server.SubmissionServer} on a string transport
    that pretends to start TLS, driven by a L{Clock}, with helpers that speak
    SMTP to it and return the reply lines.

A whole submission in a few lines::

    from msa.testing import Harness

    h = Harness()
    h.login()
    h.submit(b"Subject: hi\\r\\n\\r\\nHello\\r\\n")
    [(envelope, data)] = h.spool.committed

Everything here runs synchronously: the harness advances its clock itself
while the server holds back a reply (the delay after a failed login).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from msa import envelope
from msa.accounts.checkers import SubmissionRealm
from msa.accounts.model import FAILURE_TEXT, Account
from msa.accounts.passwords import unb64
from msa.envelope import Envelope
from msa.errors import MailboxInUse, SMTPReply
from msa.interfaces import IAccountStore, IMailbox, IMailboxStore, ISpool, ISpoolWriter
from msa.policy.authorization import ServerRules
from msa.policy.content import ContentPolicyChain
from msa.submission.avatar import submissionFactory
from msa.submission.phase import SessionPhase
from msa.submission.server import ServerPolicy, SubmissionFactory, SubmissionServer

__all__ = [
    "SENDERS",
    "Harness",
    "MemoryAccountStore",
    "MemoryChecker",
    "MemoryMailbox",
    "MemoryMailboxStore",
    "MemorySpool",
    "MemoryWriter",
    "StoredMessage",
    "TLSStringTransport",
    "commitFailed",
    "dotStuff",
    "memoryPortal",
    "memoryRealm",
    "testAccount",
]

#: The sender addresses a test account may use unless told otherwise.
SENDERS = ["@example.nl", "@mijnbedrijf.nl", "@mijn-bedrijf.nl"]


def commitFailed() -> SMTPReply:
    """
    @return: what the real spool's commit fails with when the disk refuses
        the message (L{msa.queue.writer.SpoolWriter.commit}), and so what
        L{MemorySpool.failNextCommit} fails with by default.
    """
    return SMTPReply(451, "4.3.0", "Cannot queue the message, try again later")


# -- the spool -----------------------------------------------------------


class StoredMessage(NamedTuple):
    """
    One committed message: unpacks as C{(envelope, data)}.

    @ivar envelope: its L{Envelope}, with the queue id set.
    @ivar data: the message exactly as the avatar wrote it (for the real
        avatar: the MSA's Received header, then the message as the client
        sent it, dot-unstuffed, CRLF line ends).
    """

    envelope: Envelope
    data: bytes

    @property
    def queueId(self) -> str:
        return self.envelope.queueId


@implementer(ISpoolWriter)
class MemoryWriter:
    """
    One message being written into a L{MemorySpool}, with the contract of
    L{msa.queue.writer.SpoolWriter}: nothing may be written after L{commit} or
    L{abort}, a second L{commit} fails, L{abort} is safe to call more than
    once and does nothing after a commit, and a failed commit leaves no
    message behind.

    @ivar aborted: L{abort} was called before the message was committed.
    @ivar committed: the commit succeeded.
    @ivar isBounce: set before L{commit} for a delivery status notification,
        as on the real writer.
    @ivar audit: the fields given to L{noteAudit}, as the real writer puts
        them in the message's acceptance record.
    """

    isBounce = False

    def __init__(self, spool: MemorySpool, envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.queueId: str = envelope.queueId
        self.data = io.BytesIO()
        self.aborted = False
        self.committed = False
        self.audit: dict[str, object] = {}
        self._digest = hashlib.sha256()
        self._done = False

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the message.

        @raise RuntimeError: when the message is already committed or aborted.
        """
        if self._done:
            raise RuntimeError(f"message {self.queueId} is no longer open")
        self.data.write(data)
        self._digest.update(data)

    def writeTrace(self, data: bytes) -> None:
        """
        Write the MSA's trace header in front of the message, kept out of
        L{sha256} as the real writer does.

        @raise RuntimeError: after any L{write}.
        """
        if self.data.tell():
            raise RuntimeError("the trace header goes before the message")
        self.write(data)
        self._digest = hashlib.sha256()

    def sha256(self) -> str:
        """
        @return: the SHA-256 of the bytes written after the trace header.
        """
        return self._digest.hexdigest()

    def noteAudit(self, **fields: object) -> None:
        """
        Keep C{fields} in L{audit}.
        """
        self.audit.update(fields)

    def commit(self) -> defer.Deferred[str]:
        """
        Keep the message in C{spool.committed}, or fail as the spool was told
        to (L{MemorySpool.failNextCommit}), leaving nothing behind.

        @return: a L{Deferred} that has already fired with the queue id, or
            failed.
        """
        if self._done:
            return defer.fail(RuntimeError(f"message {self.queueId} already closed"))
        self._done = True
        failure, self.spool.nextCommitFailure = self.spool.nextCommitFailure, None
        if failure is not None:
            return defer.fail(failure)
        self.committed = True
        self.spool.committed.append(StoredMessage(self.envelope, self.data.getvalue()))
        return defer.succeed(self.queueId)

    def abort(self) -> None:
        """
        Forget the message, unless it is already committed.
        """
        if self._done:
            return
        self._done = True
        self.aborted = True


@implementer(ISpool)
class MemorySpool:
    """
    An L{ISpool} in memory.  Queue ids are C{Q0001}, C{Q0002}, ... in the
    order messages are started.

    @ivar committed: every committed message, a L{StoredMessage}, in commit
        order.
    @ivar writers: every L{MemoryWriter} handed out, committed or not.
    @ivar nextCommitFailure: the exception the next commit fails with, or
        L{None}; see L{failNextCommit}.
    """

    def __init__(self) -> None:
        self.committed: list[StoredMessage] = []
        self.writers: list[MemoryWriter] = []
        self.counter = 0
        self.nextCommitFailure: BaseException | None = None
        #: No directory: the messages are in memory.
        self.queueDirectory: str | None = None

    def newMessage(self, envelope: Envelope) -> MemoryWriter:
        """
        Allocate the next queue id (set on C{envelope}) and a writer.
        """
        self.counter += 1
        envelope.queueId = f"Q{self.counter:04d}"
        writer = MemoryWriter(self, envelope)
        self.writers.append(writer)
        return writer

    def failNextCommit(self, exception: BaseException | None = None) -> None:
        """
        Make the next commit fail with C{exception} and keep nothing, as the
        real spool does when the disk is full or the fsync fails.  The
        server sends an L{SMTPReply} to the client as it is; any other
        exception becomes C{451 4.3.0}.

        @param exception: by default the real spool's own commit failure,
            L{commitFailed}.
        """
        self.nextCommitFailure = exception if exception is not None else commitFailed()

    def messages(self) -> list[bytes]:
        """
        @return: the bytes of every committed message, in commit order.
        """
        return [stored.data for stored in self.committed]


# -- accounts ------------------------------------------------------------


def testAccount(name: str, extra: Mapping[str, Any] | None = None) -> Account:
    """
    An enabled L{Account} without secrets (L{MemoryChecker} holds the
    passwords).

    @param extra: the account's other fields, as in the accounts file (its
        senders, limits, ...); by default it may send as L{SENDERS}.
    """
    if extra is None:
        extra = {"senders": list(SENDERS)}
    return Account(name=name, extra=dict(extra))


@implementer(IAccountStore)
class MemoryAccountStore:
    """
    An L{IAccountStore} over a L{dict}: add, change or remove accounts in
    C{accounts} at will.

    @ivar accounts: account name to L{Account}.
    """

    def __init__(self, accounts: Iterable[Account] = ()) -> None:
        self.accounts: dict[str, Account] = {a.name: a for a in accounts}

    def getAccount(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def scramParameters(
        self, username: str, mechanism: str
    ) -> tuple[bytes, int] | None:
        """
        The salt and iterations of a SCRAM secret, for
        L{msa.sasl.MechanismContext} (as the account file gives them).
        """
        account = self.accounts.get(username)
        keys = account.scram.get(mechanism) if account is not None else None
        return None if keys is None else (unb64(keys["salt"]), keys["iterations"])


@implementer(ICredentialsChecker)
class MemoryChecker:
    """
    Checks the user name and password of AUTH PLAIN and LOGIN against
    plain-text passwords, without the cost of a password hash.  Every
    refusal is the same L{UnauthorizedLogin}, as from the real
    L{msa.accounts.checkers.AccountChecker}.

    @ivar users: account name to password.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        """
        @return: a L{Deferred} firing with the account name (L{str}), or
            failing with L{UnauthorizedLogin}.
        """
        password = self.users.get(credentials.username)
        if password is not None and credentials.checkPassword(password):
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin(FAILURE_TEXT))


def memoryRealm(
    spool: ISpool,
    hostname: str = "msa.example.nl",
    users: Iterable[str] = ("alice",),
    serverRules: ServerRules | None = None,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
    contentPolicy: ContentPolicyChain | None = None,
) -> SubmissionRealm:
    """
    The real L{SubmissionRealm} and avatar over a L{MemoryAccountStore}.

    @param users: the account names.
    @param extras: account name to its other fields (see L{testAccount}).
    @param serverRules: passed to L{submissionFactory}, as is
        C{contentPolicy}.
    """
    extras = extras or {}
    store = MemoryAccountStore(testAccount(name, extras.get(name)) for name in users)
    return SubmissionRealm(
        store, submissionFactory(spool, hostname, serverRules, contentPolicy)
    )


def memoryPortal(
    spool: ISpool,
    hostname: str = "msa.example.nl",
    users: Mapping[str, str] | None = None,
    **realmArgs: Any,
) -> Portal:
    """
    A L{Portal} for a L{SubmissionFactory}: L{memoryRealm} with a
    L{MemoryChecker}.

    @param users: account name to password; by default C{alice} with the
        password C{wonderland}.
    @param realmArgs: C{serverRules}, C{extras} and C{contentPolicy} for
        L{memoryRealm}.
    """
    users = users or {"alice": "wonderland"}
    realm = memoryRealm(spool, hostname, list(users), **realmArgs)
    return Portal(realm, [MemoryChecker(users)])


# -- the protocol harness ------------------------------------------------


@implementer(IMailboxStore)
class MemoryMailboxStore:
    """
    Return messages in memory, per account, in delivery order.

    @ivar mailboxes: account -> L{dict} of uid -> message bytes.
    @ivar locked: the accounts a session holds.
    @ivar failNextCommit: make the next C{commitDeletions} fail (and delete
        nothing), to test what a client hears when the disk lets you down.
    """

    def __init__(self) -> None:
        self.mailboxes: dict[str, dict[str, bytes]] = {}
        self.locked: set[str] = set()
        self.failNextCommit = False
        self._next = 0

    def add(self, account: str, message: bytes) -> str:
        """
        Deliver synchronously; return the new uid.
        """
        self._next += 1
        uid = f"m{self._next:06d}.{account.encode().hex()}"
        self.mailboxes.setdefault(account, {})[uid] = message
        return uid

    def deliver(
        self,
        account: str,
        source: Any,
        size: int,
        sha256: str,
        auditFields: Mapping[str, Any] | None = None,
    ) -> defer.Deferred[str]:
        return defer.succeed(self.add(account, source.read()))

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def open(self, account: str) -> defer.Deferred[IMailbox]:
        if account in self.locked:
            return defer.fail(MailboxInUse(account))
        self.locked.add(account)
        return defer.succeed(MemoryMailbox(self, account))


@implementer(IMailbox)
class MemoryMailbox:
    """
    The L{IMailbox} of L{MemoryMailboxStore}: a snapshot at open.
    """

    def __init__(self, store: MemoryMailboxStore, account: str) -> None:
        self.account = account
        self._store = store
        self._snapshot = dict(store.mailboxes.get(account, {}))
        self.released = False

    def messages(self) -> list[envelope.StoredMessage]:
        return [envelope.StoredMessage(u, len(m)) for u, m in self._snapshot.items()]

    def openMessage(self, uid: str) -> defer.Deferred[Any]:
        return defer.succeed(io.BytesIO(self._snapshot[uid]))

    def commitDeletions(self, uids: Sequence[str]) -> defer.Deferred[None]:
        if self._store.failNextCommit:
            self._store.failNextCommit = False
            return defer.fail(OSError("simulated disk failure"))
        for uid in uids:
            self._snapshot.pop(uid, None)
            self._store.mailboxes[self.account].pop(uid, None)
        return defer.succeed(None)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._store.locked.discard(self.account)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that can "start TLS": it records the call, and the
    bytes stay clear text, so the server believes it speaks TLS.  The TCP
    options of L{ITLSTransport} are recorded and do nothing.

    @ivar tlsStarted: whether C{startTLS} was called.
    @ivar writeConnectionLost: whether C{loseWriteConnection} was called.
    """

    tlsStarted = False
    writeConnectionLost = False
    tcpNoDelay = False
    tcpKeepAlive = False

    def startTLS(self, contextFactory: object, *args: object) -> None:
        self.tlsStarted = True

    def loseWriteConnection(self) -> None:
        self.writeConnectionLost = True

    def getTcpNoDelay(self) -> bool:
        return self.tcpNoDelay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.tcpNoDelay = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.tcpKeepAlive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.tcpKeepAlive = enabled


class _CleanupRegistry(Protocol):
    def addCleanup(self, function: Any, /, *args: Any, **kwargs: Any) -> None: ...


def dotStuff(message: bytes) -> bytes:
    """
    @return: C{message} as DATA sends it: CRLF line ends (one is added at
        the end if missing), each line starting with a dot doubled, then the
        final C{.}.
    """
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


class Harness:
    """
    One L{SubmissionServer} on a L{TLSStringTransport}, with helpers to talk
    to it.  Each helper returns the reply lines (without CRLF) the server
    sent in answer.

    @param testCase: if given, the connection is closed in its cleanup.
    @param implicitTLS: the listener is TLS from the first byte.
    @param clock: drives the server's timers; a new L{Clock} by default.
    @param factory: the factory to build the server with (to share sessions
        and limits between several harnesses); by default one over
        C{portal}.
    @param portal: the portal of the new factory; by default a
        L{memoryPortal} over C{spool} with C{users} and C{realmArgs}.
    @param spool: where the default portal's avatars queue messages; a new
        L{MemorySpool} by default.
    @param peer: the client's IPv4 address.
    @param policyArgs: the fields of the L{ServerPolicy} (C{hostname} is
        C{msa.example.nl} unless given).

    @ivar spool: the spool given or made.
    @ivar server: the protocol.
    @ivar transport: its L{TLSStringTransport}.
    @ivar waited: how many (fake) seconds the last reply was held back.
    """

    def __init__(
        self,
        testCase: _CleanupRegistry | None = None,
        implicitTLS: bool = False,
        clock: Clock | None = None,
        factory: SubmissionFactory | None = None,
        realmArgs: Mapping[str, Any] | None = None,
        users: Mapping[str, str] | None = None,
        peer: str = "192.0.2.1",
        portal: Portal | None = None,
        spool: ISpool | None = None,
        **policyArgs: Any,
    ) -> None:
        policyArgs.setdefault("hostname", "msa.example.nl")
        self.spool: Any = spool if spool is not None else MemorySpool()
        self.policy = ServerPolicy(implicitTLS=implicitTLS, **policyArgs)
        self.clock = clock if clock is not None else Clock()
        if factory is None:
            if portal is None:
                portal = memoryPortal(
                    self.spool, self.policy.hostname, users, **(realmArgs or {})
                )
            factory = SubmissionFactory(
                portal, self.policy, tlsContextFactory=object(), reactor=self.clock
            )
        self.factory = factory
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.server: SubmissionServer = self.factory.buildProtocol(None)
        self.server.callLater = self.clock.callLater
        self.server.makeConnection(self.transport)
        self.waited = 0.0
        if testCase is not None:
            testCase.addCleanup(self.close)

    def close(self) -> None:
        """
        Drop the connection (if the server has not) and stop its timer.
        """
        if self.server.transport is not None:
            self.server.connectionLost(Failure(ConnectionDone("harness closed")))
        self.server.setTimeout(None)

    def send(self, data: bytes) -> list[bytes]:
        """
        Send raw bytes; return the reply lines the server sent since.
        """
        self.transport.clear()
        self.server.dataReceived(data)
        self.settle()
        sent: bytes = self.transport.value()
        return sent.split(b"\r\n")[:-1]

    def settle(self, limit: float = 20.0) -> None:
        """
        Let the fake clock run while the server holds back a reply (the
        failed-login delay), up to C{limit} seconds.
        """
        self.clock.advance(0)
        waited = 0.0
        while self.server._waiting and waited < limit:
            self.clock.advance(0.25)
            waited += 0.25
        self.waited = waited

    def command(self, line: bytes) -> list[bytes]:
        """
        Send one command line (CRLF added).
        """
        return self.send(line + b"\r\n")

    def startTLS(self) -> list[bytes]:
        """
        STARTTLS, the (simulated) end of the TLS handshake, then EHLO again.

        @return: the reply to the EHLO after TLS.
        """
        self.command(b"STARTTLS")
        self.server.handshakeCompleted()
        return self.command(b"EHLO client.example.nl")

    def login(
        self,
        user: bytes = b"alice",
        password: bytes = b"wonderland",
        mechanism: str = "PLAIN",
    ) -> list[bytes]:
        """
        Authenticate with AUTH PLAIN (an initial response) or AUTH LOGIN,
        after starting TLS if it is not on yet.

        @return: the reply to the last line of the exchange.
        """
        if self.server.phase is SessionPhase.BEFORE_TLS:
            self.startTLS()
        if mechanism == "LOGIN":
            self.command(b"AUTH LOGIN")
            self.command(base64.b64encode(user))
            return self.command(base64.b64encode(password))
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        return self.command(b"AUTH PLAIN " + token)

    def transaction(
        self,
        sender: bytes = b"a@example.nl",
        recipients: Sequence[bytes] = (b"b@example.nl",),
    ) -> list[bytes]:
        """
        MAIL FROM, one RCPT TO per recipient, then DATA.

        @return: the reply to DATA.
        """
        self.command(b"MAIL FROM:<" + sender + b">")
        for r in recipients:
            self.command(b"RCPT TO:<" + r + b">")
        return self.command(b"DATA")

    def submit(
        self,
        message: bytes,
        sender: bytes = b"a@example.nl",
        recipients: Sequence[bytes] = (b"b@example.nl",),
    ) -> list[bytes]:
        """
        One whole mail transaction: MAIL FROM, RCPT TO, DATA and, if the
        server answers DATA with 354, the message (see L{dotStuff}).

        @return: every reply line, from MAIL FROM's to the one after the
            final dot: its last line says whether the message was queued.
        """
        replies = self.command(b"MAIL FROM:<" + sender + b">")
        for r in recipients:
            replies += self.command(b"RCPT TO:<" + r + b">")
        data = self.command(b"DATA")
        replies += data
        if data[-1:] and data[-1].startswith(b"354 "):
            replies += self.send(dotStuff(message))
        return replies
