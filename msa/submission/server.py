# -*- test-case-name: tests.test_server,tests.test_hangup,tests.test_heldinput -*-
"""
The submission protocol (RFC 6409): the TLS gate (R3), AUTH through
twisted.cred before MAIL (R4), the replies of the spec example (R7),
complete addresses only (R8), SIZE, line limits, and a DATA phase that can
neither be smuggled into nor fall back to command mode.

One L{SubmissionServer} is one connection.  Its state is explicit: a
L{SessionPhase} says what the next line from the client is, and every
field is documented on the class.  It owns three small objects and calls
them; none of them reaches into another's private attributes:

  - L{AuthExchange} (L{msa.submission.auth}): the AUTH command and its SASL
    exchange;
  - L{MailTransaction} (L{msa.submission.transaction}): MAIL, RCPT, DATA
    and the message;
  - L{SessionDeadlines} (L{msa.submission.deadlines}): the deadlines that do
    not restart on bytes.

Why not Twisted's C{twisted.mail.smtp.ESMTP} as the base class: of it, this
protocol used only C{sendCode}, the L{TimeoutMixin} and the C{ctx} and
C{canStartTLS} attributes.  Its command dispatch, its line reader, its
MAIL/RCPT/DATA and AUTH states are each wrong for an MSA (see DESIGN.md and
C{tests/test_twisted_defaults.py}) and were all re-implemented here, so
inheriting them only hid which code runs.  The protocol is therefore a
plain L{Protocol} with L{TimeoutMixin} for the idle timeout.

Replies are coalesced: the lines the input loop produces while it works
through what one read brought (a pipelined batch, a multi-line EHLO) go
out in one C{transport.write} when the loop stops, so that TLS makes one
record of them and the reactor arms the socket for writing once.  A reply
is never held while the server waits: the loop stops (and writes) as soon
as no complete line is buffered or a reply waits for a L{Deferred}, and a
reply produced outside the loop (a L{Deferred} firing later, a timeout, a
shutdown) is written at once.
"""

import secrets
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, interfaces, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from msa import metrics
from msa._compat import writeEagerly, writeTLSAtOnce
from msa.envelope import SessionInfo
from msa.errors import SMTPReply
from msa.interfaces import IAuthThrottle, ISubmission
from msa.policy.authorization import AuthThrottle
from msa.sasl import MechanismContext
from msa.submission.auth import MAX_AUTH_LINE, AuthExchange
from msa.submission.deadlines import SessionDeadlines
from msa.submission.extensions import ALL_EXTENSIONS, extensionKeywords
from msa.submission.framing import LineFramer
from msa.submission.phase import SessionPhase
from msa.submission.proxyheader import internetAddress
from msa.submission.sessions import MemorySessionLimiter, SessionRegistry
from msa.submission.transaction import MailTransaction
from msa.tls import ISessionProtocol, describeTLS

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
    #: The extensions offered over TLS (L{msa.submission.extensions}).
    extensions: frozenset[str] = ALL_EXTENSIONS


@implementer(IHandshakeListener, ISessionProtocol)
class SubmissionServer(TimeoutMixin, protocol.Protocol):
    """
    One client connection.  Created by L{SubmissionFactory}.

    Input goes through one loop (L{_processLines}) that nothing re-enters:
    take a line, dispatch it by phase, and stop while a reply is held back
    (L{wait}); the reply's callback restarts the loop.  What each command
    gets, by phase (C{ok}: the command runs; its own checks may still
    refuse it)::

      command         before TLS  TLS, no AUTH   authenticated  transaction
      EHLO            ok          ok             ok             ok, resets
      NOOP, QUIT      ok          ok             ok             ok
      STARTTLS        ok          554 5.5.1      554 5.5.1      554 5.5.1
      HELO, RSET      530 5.7.0   ok             ok             ok, resets
      HELP/VRFY/EXPN  530 5.7.0   214/502/502    214/502/502    214/502/502
      AUTH            530 5.7.0   ok (503 5.5.1  503 5.5.1      503 5.5.1
                                  before EHLO)
      MAIL            530 5.7.0   530 5.7.0      ok             503 5.5.1
      RCPT            530 5.7.0   530 5.7.0      503 5.5.1      ok
      DATA            530 5.7.0   530 5.7.0      503 5.5.1      ok (554 5.5.1
                                                                without RCPT)
      other           530 5.7.0   500 5.5.2      500 5.5.2      500 5.5.2

    In L{SessionPhase.AUTH_EXCHANGE} every line is a SASL response (C{*}
    aborts with 501 5.7.0); in L{SessionPhase.DATA} every line is message
    text up to the final dot (the DATA filter decides, see
    L{msa.submission.framing}); in L{SessionPhase.CLOSING} nothing is read.
    A command line over 512 octets gets 500 5.5.6 in every phase (AUTH's
    up to 12288, RFC 4954 4); each error counts towards C{maxErrors}
    (421 4.7.0 past it).  Plaintext pipelined after STARTTLS is discarded.

    @ivar factory: the listener's L{SubmissionFactory} (portal, mechanisms,
        registry, throttle, reactor).
    @ivar policy: the listener's limits, L{ServerPolicy}.
    @ivar host: the host name in the greeting, IDNA-encoded.
    @ivar timeout: the idle timeout in seconds (L{TimeoutMixin}): it
        restarts on every byte.
    @ivar ctx: the TLS context factory for STARTTLS, or C{None}.
    @ivar canStartTLS: whether STARTTLS can be offered on this transport.
    @ivar session: what is known about the session (L{SessionInfo}): id,
        client, HELO name, TLS, account, mechanism; set at connection.
    @ivar phase: what the next line from the client is (L{SessionPhase}).
    @ivar framer: cuts the received bytes into lines (L{LineFramer}).
    @ivar avatar: the L{ISubmission} avatar of the logged-in account, or
        C{None} before a successful AUTH.
    @ivar auth: the AUTH exchange (L{AuthExchange}).
    @ivar transaction: the mail transaction (L{MailTransaction}).
    @ivar deadlines: the session's deadlines (L{SessionDeadlines}).
    @ivar _logout: the avatar's logout, called once when the connection is
        gone.
    @ivar _waiting: how many replies are held back (a login, its failure
        delay, a validation, a commit); while any is, no line is processed
        and reading is paused.
    @ivar _looping: whether the input loop (L{_processLines}) is running:
        a reply that completes meanwhile lets it go on instead of starting
        another.
    @ivar _paused: whether reading from the transport is paused.
    @ivar _replies: reply lines produced by the running input loop and not
        yet written (see L{_flushReplies}).
    @ivar _errors: the protocol errors so far (see L{protocolError}).
    @ivar _closing: the MSA is stopping: the session ends after the message
        in progress.
    @ivar _forced: the grace period of a shutdown ended while a reply was
        held back: the session ends once it has gone out.
    @ivar _started: the reactor time of the connection, for its duration.
    """

    #: The transport: TCP, TLS over TCP, or a test's string transport.
    transport: Any

    def __init__(self, factory: "SubmissionFactory") -> None:
        self.factory = factory
        self.policy: ServerPolicy = factory.policy
        self.host = self.policy.hostname.encode("idna")
        self.timeout = self.policy.idleTimeout
        self.ctx = factory.tlsContextFactory
        self.canStartTLS = False
        self.session = SessionInfo(sessionId="", clientAddress="")
        self.phase = SessionPhase.BEFORE_TLS
        self.framer = LineFramer()
        self.avatar: ISubmission | None = None
        self.auth = AuthExchange(self)
        self.transaction = MailTransaction(self)
        self.deadlines = SessionDeadlines(self)
        self._logout: Callable[[], None] | None = None
        self._waiting = 0
        self._looping = False
        self._paused = False
        self._replies: list[bytes] = []
        self._errors = 0
        self._closing = False
        self._forced = False
        self._started = 0.0
        #: The handler of each command verb; any other verb is unknown.
        self._handlers: dict[bytes, Callable[[bytes], None]] = {
            b"NOOP": self.smtp_NOOP,
            b"QUIT": self.smtp_QUIT,
            b"HELP": self.smtp_HELP,
            b"VRFY": self.smtp_VRFY,
            b"EXPN": self.smtp_EXPN,
            b"HELO": self.smtp_HELO,
            b"EHLO": self.smtp_EHLO,
            b"STARTTLS": self.smtp_STARTTLS,
            b"RSET": self.smtp_RSET,
            b"AUTH": self.smtp_AUTH,
            b"MAIL": self.smtp_MAIL,
            b"RCPT": self.smtp_RCPT,
            b"DATA": self.smtp_DATA,
            b"BDAT": self.smtp_BDAT,
        }

    # -- phase --------------------------------------------------------

    def enter(self, phase: SessionPhase) -> None:
        """
        Move to C{phase}.  L{SessionPhase.CLOSING} is final: a reply that
        completes after the server's last word changes nothing.
        """
        if self.phase is not SessionPhase.CLOSING:
            self.phase = phase

    @property
    def hungUp(self) -> bool:
        """
        Whether the server has said its last word or the connection is gone.
        """
        return self.phase is SessionPhase.CLOSING

    def loggedIn(self, avatar: ISubmission, logout: Callable[[], None]) -> None:
        """
        AUTH succeeded: C{avatar} submits this session's messages, and
        C{logout} is called when the connection is gone.
        """
        self.avatar = avatar
        self._logout = logout
        self.session.account = avatar.account

    # -- connection and framing --------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        address = internetAddress(peer)
        self.session = SessionInfo(
            sessionId=secrets.token_hex(6),
            clientAddress=address[0] if address is not None else str(peer),
            clientPort=address[1] if address is not None else 0,
        )
        if self.policy.implicitTLS:
            self.enter(SessionPhase.COMMAND)
        self._started = self.factory.reactor.seconds()
        if self.policy.implicitTLS:
            # Also for a connection refused below: its 421 waits for the
            # handshake, and must not wait for ever.
            self.deadlines.startHandshake()
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
            self.hangUp()
            return
        # Replies go out at once (not after Nagle's delay); a UNIX socket
        # (behind a local proxy) has no such option.
        if interfaces.ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        # A reply is sent at once, not after a reactor turn spent arming the
        # socket for writing (msa._compat.writeEagerly), nor encrypted a
        # turn later (implicit TLS: msa._compat.writeTLSAtOnce).
        writeEagerly(self.transport)
        writeTLSAtOnce(self.transport)
        self.canStartTLS = (
            interfaces.ITLSTransport.providedBy(self.transport) and self.ctx is not None
        )
        # DEBUG: the accepted message's INFO line carries these facts.
        log.debug(
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
        self.deadlines.start()

    def sessionSeconds(self) -> float:
        """
        How long the session has lasted so far, in seconds (reactor time):
        for the accepted message's log line and the disconnection.
        """
        return self.factory.reactor.seconds() - self._started

    def greeting(self) -> bytes:
        return self.host + b" ESMTP"

    def timeoutConnection(self) -> None:
        if self.deadlines.handshakePending:
            self.deadlines.handshakeExpired()
            return
        if self.transaction.committing is not None:
            # The client is waiting for us, not idle: its 250 comes first.
            self.resetTimeout()
            return
        self.reply(421, "4.4.2", f"{self.policy.hostname} Error: timeout exceeded")
        self.hangUp()

    def dataReceived(self, data: bytes) -> None:
        if self.hungUp:
            # The server has said its last word (421, 221): nothing the
            # client sends after it is a command or message text.
            return
        self.resetTimeout()
        self.deadlines.bytesReceived(data)
        self.framer.feed(data)
        if self._waiting:
            # Pipelined input behind a held reply: stop reading until it
            # is sent (L{wait}).
            self._pauseReading()
        if self._waiting and self.framer.buffered > MAX_HELD_INPUT:
            log.info(
                "session {session}: closed, {size} octets of input while a "
                "reply was pending",
                event="input-limit",
                session=self.session.sessionId,
                client=self.session.clientAddress,
                size=self.framer.buffered,
            )
            self.reply(
                421, "4.7.0", f"{self.policy.hostname} Error: too much pipelined input"
            )
            self.hangUp()
            return
        self._processLines()

    def _maxLineLength(self) -> int:
        if self.phase is SessionPhase.DATA and self.transaction.filter is not None:
            # The transparency dot does not count; the filter judges the rest.
            return self.transaction.framingLimit
        return MAX_AUTH_LINE

    def hangUp(self) -> None:
        """
        End the session from the server's side, after its last reply (421,
        221).  From here on no input is processed: a message still open in
        DATA is abandoned (its spool file removed; the client saw no 250 and
        sends it again), and bytes already received or still arriving are
        thrown away.  Reading resumes if it was paused, so that the TLS
        close can complete.  A message whose final dot was already taken is
        committed all the same (see L{msa.submission.transaction}).
        """
        if self.hungUp:
            return
        wasData = self.transaction.receiving
        self.phase = SessionPhase.CLOSING
        self.framer.clear()
        if wasData:
            self.transaction.abandon("the server closed the session")
        self._resumeReading()
        self._flushReplies()
        self.transport.loseConnection()
        self.deadlines.startClose()

    def _pauseReading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def _resumeReading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def _processLines(self) -> None:
        """
        The one input loop: take a line, dispatch it, repeat, until no
        complete line is buffered, a reply is held back (L{wait}) or the
        session is over.

        Nothing re-enters it.  A reply held back by a L{Deferred} that has
        already fired (a validation answered at once, the usual case for
        MAIL and RCPT) only lets this loop carry on with the next line; one
        that fires later calls this method from its callback, when no loop
        is running.  So the stack is as deep for the thousandth pipelined
        command as for the first (a trampoline, not recursion).
        """
        if self._looping:
            return
        self._looping = True
        try:
            while not self._waiting and not self.hungUp and self.transport is not None:
                if self.phase is SessionPhase.CHUNK:
                    if not self.transaction.chunks.received():
                        return
                    continue
                if self.phase is SessionPhase.DATA and self.transaction.dataBlock():
                    continue
                item = self.framer.nextLine(self._maxLineLength())
                if item is None:
                    return
                self._dispatchLine(*item)
                if self._closing and not self.hungUp:
                    self._afterTransaction()
                transport = self.transport
                if self.hungUp or transport is None or transport.disconnecting:
                    self.framer.clear()
                    return
        finally:
            self._looping = False
            self._flushReplies()

    def _dispatchLine(self, line: bytes, tooLong: bool) -> None:
        """
        Hand one line to what the phase says it is (see the table in the
        class docstring).
        """
        if self.phase is SessionPhase.DATA:
            self.transaction.dataLine(line, tooLong)
        elif self.phase is SessionPhase.AUTH_EXCHANGE:
            if tooLong:
                self.auth.lineTooLong()
            else:
                self.auth.lineReceived(line)
        elif tooLong:
            self.protocolError(500, "5.5.6", "Error: line too long")
        else:
            self._commandLine(line)

    def wait(self, d: defer.Deferred[Any]) -> None:
        """
        Hold back further pipelined commands until C{d} has fired, so that
        replies go out in order.  Meanwhile the session stops reading from
        the client as soon as input is there to hold (already buffered, or
        arriving: L{dataReceived}; see L{MAX_HELD_INPUT}): pipelined input
        waits in the kernel and the client's socket, not in our memory.  A
        client that waits for the reply, as most do, costs no pause and no
        resume (two C{epoll_ctl} calls and a reactor turn per held reply).

        When C{d} has fired already, the input loop simply goes on; when it
        fires later, its callback restarts the loop (L{_processLines}).
        """
        self._waiting += 1

        def resume(result: object) -> object:
            # Waits may nest (a failed login's delay inside the login itself).
            self._waiting -= 1
            if self._waiting:
                return result
            if self._forced and not self.hungUp:
                # The grace period ended while this reply was pending.
                self._shutdownReply()
            if not self._looping and not self.hungUp and self.transport is not None:
                self._processLines()
                if self._closing and not self.hungUp:
                    self._afterTransaction()
            if not self._waiting:
                self._resumeReading()
            return result

        d.addBoth(resume)
        if self._waiting and self.framer.buffered:
            self._pauseReading()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        wasData = self.transaction.receiving
        self.phase = SessionPhase.CLOSING
        self.factory.registry.remove(self)
        if wasData:
            self.transaction.abandon("the client closed the connection")
        if self.transaction.committing is not None:
            log.info(
                "session {session}: the client left while message {queueId} was "
                "being committed; it is delivered all the same",
                event="left-during-commit",
                session=self.session.sessionId,
                client=self.session.clientAddress,
                queueId=self.transaction.queueId,
            )
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        self.setTimeout(None)
        self.deadlines.stop()
        duration = self.sessionSeconds()
        metrics.SESSION_SECONDS.observe(duration)
        log.debug(
            "session {session}: disconnected after {duration:.3f}s",
            event="disconnected",
            session=self.session.sessionId,
            duration=duration,
        )

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (STARTTLS or implicit TLS).
        """
        self.deadlines.handshakeDone()
        version, cipher = describeTLS(self.transport)
        self.session.tlsVersion, self.session.tlsCipher = version, cipher
        metrics.TLS_HANDSHAKES.labels(version or "unknown").inc()
        log.debug(
            "session {session}: TLS established, {version} {cipher}",
            event="tls",
            session=self.session.sessionId,
            version=version,
            cipher=cipher,
        )

    # -- shutdown -----------------------------------------------------

    def _inTransaction(self) -> bool:
        return (
            bool(self._waiting)
            or self.phase is SessionPhase.AUTH_EXCHANGE
            or self.transaction.receiving
            or self.transaction.inProgress
        )

    def _shutdownReply(self) -> None:
        self.reply(421, "4.3.2", f"{self.policy.hostname} Service shutting down")
        self.hangUp()

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
        if self.transaction.committing is not None:
            self._forced = True
            return
        self._shutdownReply()

    def _afterTransaction(self) -> None:
        if self._closing and not self._inTransaction() and self.transport is not None:
            self._shutdownReply()

    # -- replies ------------------------------------------------------

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """
        Send a reply, one line per line of C{message} (C{250-} before the
        last, C{250 } on it).  Inside the input loop the lines are held
        until the loop stops (see the module docstring); outside it they
        are written at once.  After the server's last word (421, 221)
        nothing more is said, not even the reply to something already
        under way.
        """
        if self.hungUp:
            return
        lines = message.splitlines() or [b""]
        replies = self._replies
        for line in lines[:-1]:
            replies.append(b"%03d-%s\r\n" % (code, line))
        replies.append(b"%03d %s\r\n" % (code, lines[-1]))
        if not self._looping:
            self._flushReplies()

    def _flushReplies(self) -> None:
        """
        Write the reply lines held by the input loop, in one
        C{transport.write}: one TLS record and one arming of the socket for
        the whole batch instead of one per line.
        """
        if self._replies:
            data = b"".join(self._replies)
            self._replies.clear()
            if self.transport is not None:
                self.transport.write(data)

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
            self.hangUp()
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
        if self.phase is SessionPhase.BEFORE_TLS and command not in PRE_TLS_COMMANDS:
            self.protocolError(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        handler = self._handlers.get(command)
        if handler is None:
            self.protocolError(500, "5.5.2", "Error: command not recognized")
            return
        handler(rest)

    def smtp_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self.hangUp()

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
        self.transaction.reset()
        self.session.helo = _printable(rest)
        self.reply(250, "2.0.0", self.policy.hostname)

    def smtp_EHLO(self, rest: bytes) -> None:
        if not rest.strip():
            self.protocolError(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self.transaction.reset()
        self.session.helo = _printable(rest)
        lines = [
            self.policy.hostname,
            "PIPELINING",
            f"SIZE {self.policy.maxMessageSize}",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
        ]
        beforeTLS = self.phase is SessionPhase.BEFORE_TLS
        if beforeTLS and self.canStartTLS:
            lines.append("STARTTLS")
        if not beforeTLS:
            lines += extensionKeywords(
                self.policy.extensions, self.transaction.maxRecipients()
            )
        mechanisms = [] if beforeTLS else self.auth.offeredMechanisms()
        if mechanisms:
            lines.append("AUTH " + " ".join(mechanisms))
        self.sendCode(250, "\n".join(lines).encode("ascii"))

    def smtp_STARTTLS(self, rest: bytes) -> None:
        if self.phase is not SessionPhase.BEFORE_TLS:
            self.protocolError(554, "5.5.1", "Error: TLS already active")
            return
        if rest.strip():
            self.protocolError(501, "5.5.4", "Syntax: STARTTLS")
            return
        if not self.canStartTLS:
            self.reply(454, "4.7.0", "TLS not available due to local problem")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # The 220 goes out in plaintext, before the TLS layer is put in.
        self._flushReplies()
        # RFC 3207 4.2 and CVE-2011-0411: whatever the client pipelined after
        # STARTTLS in plaintext is discarded, and the session starts anew.
        self.framer.clear()
        self.transaction.resetSession()
        self.auth.resetSession()
        self.session.helo = ""
        self.transport.startTLS(self.ctx)
        writeTLSAtOnce(self.transport)
        self.enter(SessionPhase.COMMAND)
        self.deadlines.startHandshake()

    def smtp_RSET(self, rest: bytes) -> None:
        self.transaction.reset()
        self.reply(250, "2.0.0", "Ok")

    def smtp_AUTH(self, rest: bytes) -> None:
        self.auth.command(rest)

    def smtp_MAIL(self, rest: bytes) -> None:
        self.transaction.mail(rest)

    def smtp_RCPT(self, rest: bytes) -> None:
        self.transaction.rcpt(rest)

    def smtp_DATA(self, rest: bytes) -> None:
        self.transaction.data(rest)

    def smtp_BDAT(self, rest: bytes) -> None:
        if "CHUNKING" not in self.policy.extensions:
            self.protocolError(500, "5.5.2", "Error: command not recognized")
            return
        self.transaction.chunks.command(rest)


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
        authThrottle: IAuthThrottle | None = None,
        reactor=None,
        sessionLimiter=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.authThrottle: IAuthThrottle = (
            authThrottle if authThrottle is not None else AuthThrottle()
        )
        from msa.sasl import mechanismFactories as allMechanisms

        self.registry = registry if registry is not None else SessionRegistry()
        #: Concurrent sessions per account (L{msa.interfaces.ISessionLimiter}):
        #: this instance's registry unless a shared one is given.
        self.sessionLimiter = (
            sessionLimiter
            if sessionLimiter is not None
            else MemorySessionLimiter(self.registry)
        )
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
