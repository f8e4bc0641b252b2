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

import base64
import binascii
import secrets

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP
from twisted.python.failure import Failure

from msa import addresses
from msa.envelope import Envelope, SessionInfo
from msa.errors import SMTPReply
from msa.framing import END, DataFilter, LineFramer
from msa.interfaces import ISubmission
from msa.sasl import Authenticate, Challenge, MechanismContext
from msa.tls import describeTLS

log = Logger()

COMMAND, DATA, AUTH, AUTH_FINAL = "COMMAND", "DATA", "AUTH", "AUTH_FINAL"

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 510
#: RFC 4954 4: an AUTH line (command or response) may be 12288 octets.
MAX_AUTH_LINE = 12286

#: Before TLS only these are honoured (R3).
PRE_TLS_COMMANDS = frozenset({b"NOOP", b"EHLO", b"QUIT", b"STARTTLS"})


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
    idleTimeout: float = 300.0
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")


class SubmissionServer(ESMTP):
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
        self._waiting = False
        self._tls = False
        self._errors = 0
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
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.canStartTLS = (
            interfaces.ITLSTransport.providedBy(self.transport) and self.ctx is not None
        )
        log.info(
            "session {session}: connection from {client}:{port}",
            session=self.session.sessionId,
            client=self.session.clientAddress,
            port=self.session.clientPort,
        )
        self.sendCode(220, self.host + b" ESMTP")
        self.setTimeout(self.timeout)

    def greeting(self) -> bytes:
        return self.host + b" ESMTP"

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.policy.hostname} Error: timeout exceeded")
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._framer.feed(data)
        self._processLines()

    def _maxLineLength(self) -> int:
        if self.mode == DATA:
            return self.policy.maxLineLength
        return MAX_AUTH_LINE

    def _processLines(self) -> None:
        while not self._waiting and self.transport is not None:
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
            if self.transport is None or self.transport.disconnecting:
                self._framer.clear()
                return

    def _wait(self, d: defer.Deferred) -> None:
        """
        Hold back further pipelined commands until C{d} has fired, so that
        replies go out in order.
        """
        self._waiting = True

        def resume(result):
            self._waiting = False
            if self.transport is not None and not self.transport.disconnecting:
                self._processLines()
            return result

        d.addBoth(resume)

    def lineReceived(self, line: bytes) -> None:
        # Everything arrives through dataReceived and the framer; this is
        # kept only for code that calls it directly.
        self._framer.feed(line + b"\r\n")
        self._processLines()

    def connectionLost(self, reason: Failure) -> None:
        if self.mode == DATA and self._message is not None:
            self._abortMessage()
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        self.setTimeout(None)
        log.info("session {session}: disconnected", session=self.session.sessionId)

    # -- replies ------------------------------------------------------

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
            self.transport.loseConnection()
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
        self.transport.loseConnection()

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
        if self._tls and self.policy.mechanisms:
            lines.append("AUTH " + " ".join(self.policy.mechanisms))
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

    def smtp_RSET(self, rest: bytes) -> None:
        self._resetTransaction()
        self.reply(250, "2.0.0", "Ok")

    # -- AUTH ---------------------------------------------------------

    def smtp_AUTH(self, rest: bytes) -> None:
        if self._submission is not None:
            self.protocolError(503, "5.5.1", "Error: already authenticated")
            return
        if not self.session.helo:
            self.protocolError(503, "5.5.1", "Error: send EHLO first")
            return
        if self._sender is not None:
            self.protocolError(503, "5.5.1", "Error: MAIL transaction in progress")
            return
        parts = rest.split()
        if not parts or len(parts) > 2:
            self.protocolError(
                501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"
            )
            return
        name = parts[0].upper().decode("ascii", "replace")
        factory = self.factory.mechanismFactories.get(name)
        if name not in self.policy.mechanisms or factory is None:
            self.protocolError(504, "5.5.4", "Unrecognized authentication type")
            return
        initial = None
        if len(parts) == 2:
            initial = self._decodeSASL(parts[1])
            if initial is None:
                return
        self._mechanism = factory(self.factory.mechanismContext)
        self.session.mechanism = name
        self._saslStep(lambda: self._mechanism.start(initial))

    def _decodeSASL(self, data: bytes) -> bytes | None:
        if data == b"=":
            return b""
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._endAuth()
            self.protocolError(501, "5.5.2", "Error: invalid base64 data")
            return None

    def _saslStep(self, step) -> None:
        try:
            result = step()
        except SMTPReply as e:
            self._authFailed(e)
            return
        except Exception:
            log.failure("session {session}: SASL error", session=self.session.sessionId)
            self._endAuth()
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return
        if isinstance(result, Challenge):
            self.mode = AUTH
            self.sendCode(334, base64.b64encode(result.data))
            return
        assert isinstance(result, Authenticate)
        self.mode = COMMAND
        d = self.portal.login(result.credentials, self.session, ISubmission)
        d.addCallbacks(self._loggedIn, self._loginFailed)
        self._wait(d)

    def _authResponse(self, line: bytes) -> None:
        if line == b"*":
            self._endAuth()
            self.protocolError(501, "5.7.0", "Authentication aborted")
            return
        decoded = self._decodeSASL(line)
        if decoded is not None:
            self._saslStep(lambda: self._mechanism.respond(decoded))

    def _loggedIn(self, result) -> None:
        interface, avatar, logout = result
        self._pendingLogin = (avatar, logout)
        final = self._mechanism.serverFinal()
        if final is not None:
            self.mode = AUTH_FINAL
            self.sendCode(334, base64.b64encode(final))
            return
        self._completeAuth()

    def _authFinal(self, line: bytes) -> None:
        # After the server's final data (rspauth, SCRAM's v=) the client
        # must answer an empty line (RFC 4954 4).
        if line.strip():
            avatar, logout = self._pendingLogin
            self._pendingLogin = None
            logout()
            self._endAuth()
            self.protocolError(501, "5.7.0", "Authentication aborted")
            return
        self._completeAuth()

    def _completeAuth(self) -> None:
        avatar, logout = self._pendingLogin
        self._pendingLogin = None
        self._submission = avatar
        self._logout = logout
        self.session.account = avatar.account
        self.authenticated = True
        self._endAuth()
        log.info(
            "session {session}: authenticated as {account} with {mechanism}",
            session=self.session.sessionId,
            account=self.session.account,
            mechanism=self.session.mechanism,
        )
        self.reply(235, "2.7.0", "Authentication successful")

    def _loginFailed(self, failure: Failure) -> None:
        if failure.check(UnauthorizedLogin):
            self._authFailed(
                SMTPReply(535, "5.7.8", "Authentication credentials invalid")
            )
        elif failure.check(SMTPReply):
            self._authFailed(failure.value)
        else:
            log.failure(
                "session {session}: login error",
                failure,
                session=self.session.sessionId,
            )
            self._endAuth()
            self.reply(454, "4.7.0", "Temporary authentication failure")

    def _authFailed(self, error: SMTPReply) -> None:
        self._endAuth()
        log.info(
            "session {session}: authentication failed ({mechanism}): {code}",
            session=self.session.sessionId,
            mechanism=self.session.mechanism,
            code=error.code,
        )
        if error.code == 535:
            self._authFailures += 1
            if self._authFailures >= self.policy.maxAuthFailures:
                self.sendReply(error)
                self.reply(
                    421,
                    "4.7.0",
                    f"{self.policy.hostname} Error: too many failed logins",
                )
                self.transport.loseConnection()
                return
        self.protocolError(error.code, error.status, error.text)

    def _endAuth(self) -> None:
        self.mode = COMMAND
        self._mechanism = None
        if self._submission is None:
            self.session.mechanism = ""

    # -- mail transaction ---------------------------------------------

    def smtp_MAIL(self, rest: bytes) -> None:
        if self._submission is None:
            self.protocolError(530, "5.7.0", "Authentication required")
            return
        if self._sender is not None:
            self.protocolError(503, "5.5.1", "Error: nested MAIL command")
            return
        try:
            sender, params = addresses.parseMailArgument(rest)
            size = params.get("SIZE")
            if size is not None and int(size) > self.policy.maxMessageSize:
                raise SMTPReply(
                    552, "5.3.4", "Message size exceeds fixed maximum message size"
                )
        except SMTPReply as e:
            self.protocolError(e.code, e.status, e.text)
            return
        d = defer.maybeDeferred(
            self._submission.validateFrom, self.session, sender, params
        )

        def accepted(_):
            self._sender = sender
            self._mailParams = params
            self.reply(250, "2.1.0", "Ok")

        d.addCallbacks(accepted, self._validationFailed)
        self._wait(d)

    def smtp_RCPT(self, rest: bytes) -> None:
        if self._submission is None:
            self.protocolError(530, "5.7.0", "Authentication required")
            return
        if self._sender is None:
            self.protocolError(503, "5.5.1", "Error: need MAIL command")
            return
        try:
            recipient, params = addresses.parseRcptArgument(rest)
        except SMTPReply as e:
            self.protocolError(e.code, e.status, e.text)
            return
        if len(self._recipients) >= self.policy.maxRecipients:
            self.reply(452, "4.5.3", "Error: too many recipients")
            return
        d = defer.maybeDeferred(
            self._submission.validateTo, self.session, recipient, params
        )

        def accepted(_):
            self._recipients.append(recipient)
            self.reply(250, "2.1.5", "Ok")

        d.addCallbacks(accepted, self._validationFailed)
        self._wait(d)

    def _validationFailed(self, failure: Failure) -> None:
        if failure.check(SMTPReply):
            self.protocolError(
                failure.value.code, failure.value.status, failure.value.text
            )
        else:
            log.failure(
                "session {session}: validation error",
                failure,
                session=self.session.sessionId,
            )
            self.reply(451, "4.3.0", "Error: temporary local problem, try again later")

    def smtp_DATA(self, rest: bytes) -> None:
        if self._submission is None:
            self.protocolError(530, "5.7.0", "Authentication required")
            return
        if rest.strip():
            self.protocolError(501, "5.5.4", "Syntax: DATA")
            return
        if self._sender is None:
            self.protocolError(503, "5.5.1", "Error: need MAIL command")
            return
        if not self._recipients:
            self.protocolError(554, "5.5.1", "Error: no valid recipients")
            return
        tlsVersion, cipher = describeTLS(self.transport)
        self.session.tlsVersion, self.session.tlsCipher = tlsVersion, cipher
        envelope = Envelope(
            sender=self._sender,
            recipients=list(self._recipients),
            account=self.session.account,
            mailParams=dict(self._mailParams),
            clientAddress=self.session.clientAddress,
            helo=self.session.helo,
        )
        try:
            self._message = self._submission.startMessage(self.session, envelope)
        except SMTPReply as e:
            self.sendReply(e)
            return
        except Exception:
            log.failure(
                "session {session}: cannot start message",
                session=self.session.sessionId,
            )
            self.reply(451, "4.3.0", "Error: temporary local problem, try again later")
            return
        self._filter = DataFilter(
            maxSize=self.policy.maxMessageSize, maxLineLength=self.policy.maxLineLength
        )
        self.mode = DATA
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _dataLine(self, line: bytes, tooLong: bool) -> None:
        hadError = self._filter.error is not None
        result = self._filter.lineReceived(line, tooLong)
        if result is END:
            self._endOfData()
            return
        if result is not None:
            try:
                self._message.lineReceived(result)
            except SMTPReply as e:
                self._filter.refuse(e)
            except Exception:
                log.failure(
                    "session {session}: spool write failed",
                    session=self.session.sessionId,
                )
                self._filter.refuse(
                    SMTPReply(
                        451, "4.3.0", "Error: temporary local problem, try again later"
                    )
                )
        if not hadError and self._filter.error is not None:
            self._abortMessage()

    def _abortMessage(self) -> None:
        message, self._message = self._message, None
        if message is not None:
            try:
                message.connectionLost()
            except Exception:
                log.failure(
                    "session {session}: abort failed", session=self.session.sessionId
                )

    def _endOfData(self) -> None:
        self.mode = COMMAND
        dataFilter = self._filter
        self._filter = None
        message, self._message = self._message, None
        self._resetTransaction()
        if dataFilter.error is not None:
            self.protocolError(
                dataFilter.error.code, dataFilter.error.status, dataFilter.error.text
            )
            return
        d = defer.maybeDeferred(message.eomReceived)

        def queued(queueId):
            log.info(
                "session {session}: message {queueId} accepted, {size} octets",
                session=self.session.sessionId,
                queueId=queueId,
                size=dataFilter.size,
            )
            self.reply(250, "2.0.0", f"Ok: queued as {queueId}")

        def failed(failure):
            if failure.check(SMTPReply):
                self.sendReply(failure.value)
                return
            log.failure(
                "session {session}: message not queued",
                failure,
                session=self.session.sessionId,
            )
            self.reply(451, "4.3.0", "Error: temporary local problem, try again later")

        d.addCallbacks(queued, failed)
        self._wait(d)

    # -- state --------------------------------------------------------

    def _resetTransaction(self) -> None:
        self._sender: str | None = None
        self._mailParams: dict = {}
        self._recipients: list[str] = []

    def _resetSession(self) -> None:
        self.mode = COMMAND
        self._resetTransaction()
        self._message = None
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
    ) -> None:
        from msa.sasl import mechanismFactories as allMechanisms

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
