# -*- test-case-name: tests.test_testing -*-
"""
L{Harness}: one L{msa.submission.server.SubmissionServer} on a string
transport that pretends to start TLS (L{TLSStringTransport}), with helpers
that speak SMTP to it.  Part of L{msa.testing}.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from msa.interfaces import ISpool
from msa.submission.phase import SessionPhase
from msa.submission.server import ServerPolicy, SubmissionFactory, SubmissionServer
from msa.testing.accounts import memoryPortal
from msa.testing.spool import MemorySpool


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
