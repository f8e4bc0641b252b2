# -*- test-case-name: tests.test_pop3 -*-
"""
L{POP3Factory}: one POP3 listener's portal, policy, TLS, mechanisms and
throttle, the connection limits (in total and per client address) and the
C{mailbox-retrieved} audit records.  This is the embedding point: give it
a cred L{Portal} whose realm yields L{msa.interfaces.IMailbox} avatars
(L{msa.pop3.realm.MailboxRealm}).
"""

import functools
from collections import Counter
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.logger import Logger

from msa import threadpool
from msa.envelope import StoredMessage
from msa.interfaces import IAuthThrottle
from msa.pop3.server import POP3Server, POP3Session
from msa.sasl import MechanismContext
from msa.sasl.registry import mechanismFactories

log = Logger()


@attrs.frozen
class POP3Policy:
    """
    The limits of one POP3 listener (C{[pop3]} in the configuration).

    @ivar implicitTLS: TLS from the first byte (port 995) rather than STLS.
    @ivar maxLineLength: longest command line, CRLF included (RFC 2449 4:
        255); SASL responses may be longer (L{msa.pop3.server.MAX_AUTH_LINE}).
    @ivar expire: what CAPA's EXPIRE says: C{"NEVER"} or days.
    """

    hostname: str = "localhost"
    implicitTLS: bool = False
    maxLineLength: int = 255
    maxErrors: int = 20
    maxAuthFailures: int = 3
    idleTimeout: float = 600.0
    loginTimeout: float = 120.0
    maxConnections: int = 1000
    maxConnectionsPerClient: int = 20
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "DIGEST-MD5", "PLAIN", "LOGIN")
    expire: str = "NEVER"


class POP3Connections:
    """
    The open POP3 connections of every listener that shares this object
    (the daemon's STLS and implicit-TLS listeners share one), counted in
    total and per client address for C{max_connections} and
    C{max_connections_per_client}.

    @ivar sessions: the open connections.
    """

    def __init__(self) -> None:
        self.sessions: set[POP3Server] = set()
        self._perClient: Counter[str] = Counter()

    def add(self, server: POP3Server) -> tuple[int, int]:
        """
        Count a new connection.

        @return: the connections now open in total and from its client.
        """
        client = server.session.clientAddress
        self.sessions.add(server)
        self._perClient[client] += 1
        return len(self.sessions), self._perClient[client]

    def remove(self, server: POP3Server) -> None:
        if server in self.sessions:
            self.sessions.discard(server)
            client = server.session.clientAddress
            self._perClient[client] -= 1
            if self._perClient[client] <= 0:
                del self._perClient[client]


class _NoThrottle:
    def failedLogin(self, clientAddress: str, account: str) -> float:
        return 0.0

    def succeededLogin(self, clientAddress: str, account: str) -> None:
        return None


class POP3Factory(protocol.ServerFactory):
    """
    Builds L{POP3Server}s for one listener.

    @ivar audit: the audit log (its C{append}) for C{mailbox-retrieved},
        or L{None}.
    @ivar connections: the open connections, shared with the daemon's
        other POP3 listener.
    """

    protocol = POP3Server
    noisy = False

    def __init__(
        self,
        portal: Any,
        policy: POP3Policy,
        tlsContextFactory: Any = None,
        mechanismContext: MechanismContext | None = None,
        authThrottle: IAuthThrottle | None = None,
        audit: Any = None,
        reactor: Any = None,
        runBlocking: Any = None,
        connections: POP3Connections | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        #: C{runBlocking(f, *args)}: a L{Deferred} of C{f(*args)} run off
        #: the reactor thread (file reads, audit fsyncs); the thread pool
        #: unless given (the unit tests run it at once).
        self.runBlocking = runBlocking or functools.partial(
            threadpool.runBlocking, reactor
        )
        self.portal = portal
        self.policy = policy
        self.tlsContextFactory = tlsContextFactory
        self.mechanismContext = attrs.evolve(
            mechanismContext
            or MechanismContext(realm=policy.hostname, serverNames=[policy.hostname]),
            serviceType="pop",
        )
        self.mechanismFactories = mechanismFactories()
        unknown = set(policy.mechanisms) - set(self.mechanismFactories)
        if unknown:
            raise ValueError(f"unknown SASL mechanisms: {', '.join(sorted(unknown))}")
        self.authThrottle: Any = authThrottle or _NoThrottle()
        self.audit = audit
        self.connections = connections or POP3Connections()

    def buildProtocol(self, addr: Any) -> POP3Server:
        return self.protocol(self)

    def admit(self, server: POP3Server) -> bool:
        """
        Count a new connection; whether it is within the limits.
        """
        total, fromClient = self.connections.add(server)
        return (
            total <= self.policy.maxConnections
            and fromClient <= self.policy.maxConnectionsPerClient
        )

    def release(self, server: POP3Server) -> None:
        """
        A connection ended.
        """
        self.connections.remove(server)

    def recordRetrieval(
        self, session: POP3Session, message: StoredMessage, command: str
    ) -> defer.Deferred[None]:
        """
        Append C{mailbox-retrieved} to the audit log (in a thread: it
        fsyncs) once a message went out whole; a failure is logged, the
        session goes on.
        """
        if self.audit is None:
            return defer.succeed(None)
        d = self.runBlocking(
            self.audit.append,
            "mailbox-retrieved",
            account=session.account,
            uid=message.uid,
            size=message.size,
            command=command,
            session=session.sessionId,
            client=session.clientAddress,
        )

        def lost(failure: Any) -> None:
            log.critical(
                "AUDIT RECORD LOST: mailbox-retrieved of {uid} in {account}: {error}",
                uid=message.uid,
                account=session.account,
                error=failure.value,
            )

        return d.addCallbacks(lambda _: None, lost)
