"""
The submission protocol (RFC 6409) on top of Twisted's ESMTP: the TLS gate
(R3), AUTH through twisted.cred before MAIL (R4), the replies of the spec
example (R7), complete addresses only (R8), SIZE, line limits, and a DATA
phase that can neither be smuggled into nor fall back to command mode.

Twisted's L{ESMTP} is kept as the base for its reply helpers, command
lookup, timeouts and cred conventions; every default that is wrong for an
MSA (see DESIGN.md) is overridden here, each with a test in
C{tests/test_server.py}.
"""

import secrets

import attrs
from twisted.internet import defer, interfaces, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP
from twisted.python.failure import Failure
from zope.interface import implementer

from msa import metrics
from msa.envelope import SessionInfo
from msa.errors import SMTPReply
from msa.policy.authorization import AuthThrottle
from msa.sasl import MechanismContext
from msa.submission.auth import (
    AUTH,
    AUTH_FINAL,
    COMMAND,
    MAX_AUTH_LINE,
    AuthenticationMixin,
)
from msa.submission.deadlines import DeadlineMixin
from msa.submission.framing import LineFramer
from msa.submission.sessions import SessionRegistry
from msa.submission.transaction import DATA, MailTransactionMixin
from msa.tls import describeTLS

log = Logger()


#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 510

#: Before TLS only these are honoured (R3).
PRE_TLS_COMMANDS = frozenset({b"NOOP", b"EHLO", b"QUIT", b"STARTTLS"})

#: While a reply is held back (a failed login's delay, a message being
#: committed) the session stops reading from the client; what was already
#: read keeps arriving for a moment (the rest of one read, a TLS record).
#: More input than this held unprocessed means the transport did not pause:
#: the session ends with 421 rather than buffer without limit.
MAX_HELD_INPUT = 1024 * 1024


@attrs.define
class ServerPolicy:
    """
    The limits and names of one listener.  Every limit here has a test at
    and past its edge.
    """

    hostname: str = "localhost"
    implicitTLS: bool = False
    maxMessageSize: int = 52428800
    maxLineLength: int = 998
    maxRecipients: int = 100
    maxErrors: int = 20
    maxAuthFailures: int = 3
    maxConnections: int = 1000
    maxConnectionsPerClient: int = 20
    idleTimeout: float = 300.0
    tlsHandshakeTimeout: float = 30.0
    commandLineTimeout: float = 60.0
    loginTimeout: float = 120.0
    dataTimeout: float = 300.0
    dataMinRate: float = 1024.0
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")


@implementer(IHandshakeListener)
class SubmissionServer(DeadlineMixin, AuthenticationMixin, MailTransactionMixin, ESMTP):
    """
    One client connection.  Created by L{SubmissionFactory}.
    """

    def __init__(self, factory: "SubmissionFactory") -> None:
        ESMTP.__init__(self, contextFactory=factory.tlsContextFactory)
        self.factory = factory
        self.policy: ServerPolicy = factory.policy
        self.portal = factory.portal
        self.host = self.policy.hostname.encode("idna")
        self.timeout = self.policy.idleTimeout
        self.noisy = False
        self._framer = LineFramer()
        self._waiting = 0
        self._paused = False
        self._hungUp = False
        self._forced = False
        self._committing = None
        self._tls = False
        self._errors = 0
        self._attemptedUser = ""
        self._closing = False
        self._authFailures = 0
        self._submission = None
        self._logout = None
        self._mechanism = None
        self._resetSession()

    # -- connection and framing --------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.session = SessionInfo(
            sessionId=secrets.token_hex(6),
            clientAddress=getattr(peer, "host", str(peer)),
            clientPort=getattr(peer, "port", 0),
        )
        self._tls = self.policy.implicitTLS
        self._started = self.factory.reactor.seconds()
        if self.policy.implicitTLS:
            # Also for a connection refused below: its 421 waits for the
            # handshake, and must not wait for ever.
            self._startHandshakeDeadline()
        registry = self.factory.registry
        registry.add(self)
        if registry.closing:
            self._shutdownReply()
            return
        if len(registry.sessions) > self.policy.maxConnections or (
            registry.sessionsFrom(self.session.clientAddress)
            > self.policy.maxConnectionsPerClient
        ):
            log.info(
                "session {session}: refused {client}, too many connections",
                session=self.session.sessionId,
                client=self.session.clientAddress,
            )
            metrics.CONNECTIONS_REFUSED.inc()
            self.reply(
                421, "4.7.0", f"{self.policy.hostname} Error: too many connections"
            )
            self._hangUp()
            return
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.canStartTLS = (
            interfaces.ITLSTransport.providedBy(self.transport) and self.ctx is not None
        )
        log.info(
            "session {session}: connection from {client}:{port}",
            event="connection",
            session=self.session.sessionId,
            client=self.session.clientAddress,
            port=self.session.clientPort,
        )
        metrics.CONNECTIONS.labels(
            "implicit-tls" if self.policy.implicitTLS else "starttls"
        ).inc()
        self.sendCode(220, self.greeting())
        self.setTimeout(self.timeout)
        self._startDeadlines()

    def greeting(self) -> bytes:
        return self.host + b" ESMTP"

    def timeoutConnection(self) -> None:
        if self._handshakePending:
            self._handshakeExpired()
            return
        if self._committing is not None:
            # The client is waiting for us, not idle: its 250 comes first.
            self.resetTimeout()
            return
        self.reply(421, "4.4.2", f"{self.policy.hostname} Error: timeout exceeded")
        self._hangUp()

    def dataReceived(self, data: bytes) -> None:
        if self._hungUp:
            # The server has said its last word (421, 221): nothing the
            # client sends after it is a command or message text.
            return
        self.resetTimeout()
        self._deadlineBytes(data)
        self._framer.feed(data)
        if self._waiting and self._framer.buffered > MAX_HELD_INPUT:
            log.info(
                "session {session}: closed, {size} octets of input while a "
                "reply was pending",
                event="input-limit",
                session=self.session.sessionId,
                size=self._framer.buffered,
            )
            self.reply(
                421, "4.7.0", f"{self.policy.hostname} Error: too much pipelined input"
            )
            self._hangUp()
            return
        self._processLines()

    def _maxLineLength(self) -> int:
        if self.mode == DATA and self._filter is not None:
            # The transparency dot does not count; the filter judges the rest.
            return self._filter.framingLimit
        return MAX_AUTH_LINE

    def _hangUp(self) -> None:
        """
        End the session from the server's side, after its last reply (421,
        221).  From here on no input is processed: a message still open in
        DATA is abandoned (its spool file removed; the client saw no 250 and
        sends it again), and bytes already received or still arriving are
        thrown away.  Reading resumes if it was paused, so that the TLS
        close can complete.  A message whose final dot was already taken is
        committed all the same (see L{msa.submission.transaction}).
        """
        if self._hungUp:
            return
        self._hungUp = True
        self._framer.clear()
        if self.mode == DATA:
            self._abandonMessage("the server closed the session")
        self._resumeReading()
        self.transport.loseConnection()
        self._startCloseDeadline()

    def _pauseReading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def _resumeReading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def _processLines(self) -> None:
        while not self._waiting and not self._hungUp and self.transport is not None:
            if self.mode == DATA and self._dataBlock():
                continue
            item = self._framer.nextLine(self._maxLineLength())
            if item is None:
                return
            line, tooLong = item
            if self.mode == DATA:
                self._dataLine(line, tooLong)
            elif tooLong:
                self.protocolError(500, "5.5.6", "Error: line too long")
            elif self.mode == AUTH:
                self._authResponse(line)
            elif self.mode == AUTH_FINAL:
                self._authFinal(line)
            else:
                self._commandLine(line)
            if self._closing and not self._hungUp:
                self._afterTransaction()
            if self._hungUp or self.transport is None or self.transport.disconnecting:
                self._framer.clear()
                return

    def _wait(self, d: defer.Deferred) -> None:
        """
        Hold back further pipelined commands until C{d} has fired, so that
        replies go out in order.  Meanwhile the session stops reading from
        the client (see L{MAX_HELD_INPUT}): pipelined input waits in the
        kernel and the client's socket, not in our memory.
        """
        self._waiting += 1

        def resume(result):
            # Waits may nest (a failed login's delay inside the login itself).
            self._waiting -= 1
            if self._waiting:
                return result
            if self._forced and not self._hungUp:
                # The grace period ended while this reply was pending.
                self._shutdownReply()
            if not self._hungUp and self.transport is not None:
                self._processLines()
                if self._closing and not self._hungUp:
                    self._afterTransaction()
            if not self._waiting:
                self._resumeReading()
            return result

        d.addBoth(resume)
        if self._waiting:
            self._pauseReading()

    def connectionLost(self, reason: Failure) -> None:
        self._hungUp = True
        self.factory.registry.remove(self)
        if self.mode == DATA:
            self._abandonMessage("the client closed the connection")
        if self._committing is not None:
            log.info(
                "session {session}: the client left while message {queueId} was "
                "being committed; it is delivered all the same",
                event="left-during-commit",
                session=self.session.sessionId,
                queueId=self._queueId,
            )
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        self.setTimeout(None)
        self._stopDeadlines()
        duration = self.factory.reactor.seconds() - self._started
        metrics.SESSION_SECONDS.observe(duration)
        log.info(
            "session {session}: disconnected after {duration:.3f}s",
            event="disconnected",
            session=self.session.sessionId,
            duration=duration,
        )

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (STARTTLS or implicit TLS).
        """
        self._handshakeDone()
        version, cipher = describeTLS(self.transport)
        self.session.tlsVersion, self.session.tlsCipher = version, cipher
        metrics.TLS_HANDSHAKES.labels(version or "unknown").inc()
        log.info(
            "session {session}: TLS established, {version} {cipher}",
            event="tls",
            session=self.session.sessionId,
            version=version,
            cipher=cipher,
        )

    # -- shutdown -----------------------------------------------------

    def _inTransaction(self) -> bool:
        return bool(self._waiting) or self.mode != COMMAND or self._sender is not None

    def _shutdownReply(self) -> None:
        self.reply(421, "4.3.2", f"{self.policy.hostname} Service shutting down")
        self._hangUp()

    def beginShutdown(self) -> None:
        """
        The MSA is stopping: end now if idle, else after the message in
        progress (see L{_afterTransaction}).
        """
        self._closing = True
        if not self._inTransaction():
            self._shutdownReply()

    def forceShutdown(self) -> None:
        """
        The grace period is over: a message in progress is abandoned (it was
        not acknowledged, so the client will send it again).  A message
        whose final dot has arrived is committed and acknowledged first
        (see L{msa.submission.transaction}): its 250, then the 421.
        """
        if self._committing is not None:
            self._forced = True
            return
        self._shutdownReply()

    def _afterTransaction(self) -> None:
        if self._closing and not self._inTransaction() and self.transport is not None:
            self._shutdownReply()

    # -- replies ------------------------------------------------------

    def sendCode(self, code: int, message: bytes = b"") -> None:
        # After the server's last word (421, 221) nothing more is said, not
        # even the reply to something already under way.
        if not self._hungUp:
            super().sendCode(code, message)

    def reply(self, code: int, status: str, text: str) -> None:
        self.sendCode(code, f"{status} {text}".encode("ascii", "replace"))

    def sendReply(self, error: SMTPReply) -> None:
        self.reply(error.code, error.status, error.text)

    def protocolError(self, code: int, status: str, text: str) -> None:
        """
        Reply with an error that counts towards the session's error limit.
        """
        self._errors += 1
        if self._errors > self.policy.maxErrors:
            self.reply(421, "4.7.0", f"{self.policy.hostname} Error: too many errors")
            self._hangUp()
            return
        self.reply(code, status, text)

    # -- commands -----------------------------------------------------

    def _commandLine(self, line: bytes) -> None:
        parts = line.strip().split(None, 1)
        if not parts:
            self.protocolError(500, "5.5.2", "Error: bad syntax")
            return
        command = parts[0].upper()
        rest = parts[1] if len(parts) > 1 else b""
        if len(line) > MAX_COMMAND_LINE and command != b"AUTH":
            self.protocolError(500, "5.5.6", "Error: line too long")
            return
        if not self._tls and command not in PRE_TLS_COMMANDS:
            self.protocolError(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        method = None
        if command.isalpha():
            method = getattr(self, "smtp_" + command.decode("ascii"), None)
        if method is None:
            self.protocolError(500, "5.5.2", "Error: command not recognized")
            return
        method(rest)

    def smtp_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._hangUp()

    def smtp_HELP(self, rest: bytes) -> None:
        self.reply(214, "2.0.0", "See RFC 5321 and RFC 6409")

    def smtp_VRFY(self, rest: bytes) -> None:
        self.reply(502, "5.5.1", "VRFY command is disabled")

    def smtp_EXPN(self, rest: bytes) -> None:
        self.reply(502, "5.5.1", "EXPN command is disabled")

    def smtp_HELO(self, rest: bytes) -> None:
        if not rest.strip():
            self.protocolError(501, "5.5.4", "Syntax: HELO hostname")
            return
        self._resetTransaction()
        self.session.helo = _printable(rest)
        self.reply(250, "2.0.0", self.policy.hostname)

    def smtp_EHLO(self, rest: bytes) -> None:
        if not rest.strip():
            self.protocolError(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self._resetTransaction()
        self.session.helo = _printable(rest)
        lines = [
            self.policy.hostname,
            "PIPELINING",
            f"SIZE {self.policy.maxMessageSize}",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
        ]
        if not self._tls and self.canStartTLS:
            lines.append("STARTTLS")
        mechanisms = self.offeredMechanisms() if self._tls else []
        if mechanisms:
            lines.append("AUTH " + " ".join(mechanisms))
        self.sendCode(250, "\n".join(lines).encode("ascii"))

    def smtp_STARTTLS(self, rest: bytes) -> None:
        if self._tls:
            self.protocolError(554, "5.5.1", "Error: TLS already active")
            return
        if rest.strip():
            self.protocolError(501, "5.5.4", "Syntax: STARTTLS")
            return
        if not self.canStartTLS:
            self.reply(454, "4.7.0", "TLS not available due to local problem")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 4.2 and CVE-2011-0411: whatever the client pipelined after
        # STARTTLS in plaintext is discarded, and the session starts anew.
        self._framer.clear()
        self._resetSession()
        self.transport.startTLS(self.ctx)
        self._tls = True
        self.startedTLS = True
        self._startHandshakeDeadline()

    def smtp_RSET(self, rest: bytes) -> None:
        self._resetTransaction()
        self.reply(250, "2.0.0", "Ok")

    # -- state --------------------------------------------------------

    def _resetTransaction(self) -> None:
        # The avatar releases what it held for the transaction (a rate slot).
        endTransaction = getattr(self._submission, "endTransaction", None)
        if endTransaction is not None:
            endTransaction()
        self._sender: str | None = None
        self._mailParams: dict = {}
        self._recipients: list[str] = []

    def _resetSession(self) -> None:
        self.mode = COMMAND
        self._resetTransaction()
        self._message = None
        self._queueId = ""
        self._filter = None
        self._pendingLogin = None
        if hasattr(self, "session"):
            self.session.helo = ""


def _printable(raw: bytes) -> str:
    """
    A client-supplied name made safe to log and to put in a header.
    """
    text = raw.strip().decode("ascii", "replace")
    return "".join(c if 32 < ord(c) < 127 and c not in "()\\" else "?" for c in text)[
        :255
    ]


class SubmissionFactory(protocol.ServerFactory):
    """
    Builds L{SubmissionServer}s for one listener.  This is the embedding
    point: give it a cred L{Portal} whose realm yields L{ISubmission}
    avatars, a context factory for STARTTLS (or C{policy.implicitTLS} for a
    listener that is TLS from the first byte), and the limits.
    """

    protocol = SubmissionServer
    noisy = False

    def __init__(
        self,
        portal,
        policy: ServerPolicy,
        tlsContextFactory=None,
        mechanismContext: MechanismContext | None = None,
        mechanismFactories: dict | None = None,
        registry: SessionRegistry | None = None,
        authThrottle: AuthThrottle | None = None,
        reactor=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.authThrottle = authThrottle if authThrottle is not None else AuthThrottle()
        from msa.sasl import mechanismFactories as allMechanisms

        self.registry = registry if registry is not None else SessionRegistry()
        self.portal = portal
        self.policy = policy
        self.tlsContextFactory = tlsContextFactory
        self.mechanismContext = mechanismContext or MechanismContext(
            realm=policy.hostname, serverNames=[policy.hostname]
        )
        self.mechanismFactories = mechanismFactories or allMechanisms()
        unknown = set(policy.mechanisms) - set(self.mechanismFactories)
        if unknown:
            raise ValueError(f"unknown SASL mechanisms: {', '.join(sorted(unknown))}")

    def buildProtocol(self, addr):
        return self.protocol(self)
