# -*- test-case-name: tests.test_pop3_e2e -*-
"""
The POP3 listeners of the daemon (C{[pop3]}, R16): the submission's
account store, checkers and failed-login throttle, the same TLS context
factory (certificate, chain, OCSP stapling, client-certificate mode) for
STLS and implicit TLS, a portal whose realm gives each account its locked
mailbox (L{msa.pop3.realm.MailboxRealm}), and the audit log for
C{mailbox-retrieved}.  The mailboxes are the return channel's
(L{msa.service.returnchannel}), which LMTP delivers into.
"""

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from msa.accounts.clientcert import CertificateBindingRealm
from msa.interfaces import IMailboxStore
from msa.pop3 import MailboxRealm, POP3Connections, POP3Factory, POP3Policy
from msa.service.backlog import withBacklog
from msa.service.config import Config


def addPOP3Listeners(
    top: MultiService,
    config: Config,
    reactor: Any,
    portal: Portal,
    accounts: Any,
    mailboxes: IMailboxStore,
    audit: Any,
    throttle: Any,
    contextFactory: Any,
    mechanismContext: Any,
) -> None:
    """
    Start the C{[pop3]} listeners under C{top}, if any are configured.

    @param portal: the submission's portal: its checkers (the same
        objects, with their password cache) check POP3 logins too.
    @param mailboxes: the return channel's store (C{[mailbox]}), which
        LMTP delivers into.
    """
    pop3, server = config["pop3"], config["server"]
    if not pop3["starttls_listeners"] and not pop3["implicit_tls_listeners"]:
        return
    checkers = list({id(c): c for c in portal.checkers.values()}.values())
    realm = CertificateBindingRealm(MailboxRealm(accounts, mailboxes), accounts)
    mailboxPortal = Portal(realm, checkers)
    # The connection limits count both listeners together, as SMTP's do.
    connections = POP3Connections()
    expire = pop3["expire"]
    if expire is None and config["mailbox"]["expire_after"] is not None:
        # The days a message is surely kept (RFC 2449 6.7: a minimum).
        expire = int(config["mailbox"]["expire_after"] // 86400)
    for implicit, key in (
        (False, "starttls_listeners"),
        (True, "implicit_tls_listeners"),
    ):
        policy = POP3Policy(
            hostname=server["hostname"],
            implicitTLS=implicit,
            maxLineLength=pop3["max_line_length"],
            maxErrors=pop3["max_errors"],
            maxAuthFailures=pop3["max_auth_failures"],
            idleTimeout=pop3["idle_timeout"],
            loginTimeout=pop3["login_timeout"],
            maxConnections=pop3["max_connections"],
            maxConnectionsPerClient=pop3["max_connections_per_client"],
            mechanisms=tuple(pop3["mechanisms"] or server["mechanisms"]),
            expire="NEVER" if expire is None else str(expire),
        )
        factory = POP3Factory(
            mailboxPortal,
            policy,
            tlsContextFactory=contextFactory,
            mechanismContext=mechanismContext,
            authThrottle=throttle,
            audit=audit,
            reactor=reactor,
            connections=connections,
        )
        served: IProtocolFactory = factory
        if implicit:
            served = TLSMemoryBIOFactory(contextFactory, False, factory)
        for description in pop3[key]:
            # A listener that cannot bind fails the start (twistd exits).
            listener = strports.service(
                withBacklog(description, server["listen_backlog"]), served, reactor
            )
            listener.setServiceParent(top)
