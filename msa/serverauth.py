"""
SMTP AUTH (RFC 4954) for L{msa.server.SubmissionServer}: drives the SASL
state machines of L{msa.sasl}, logs in through the cred portal, and sends
the server's final SASL data (DIGEST-MD5 rspauth, SCRAM's v=) before 235,
which Twisted's C{state_AUTH} cannot do.  Every error is a reply with an
enhanced status code; nothing raises out of the protocol.
"""

import base64
import binascii

import attrs
from OpenSSL import SSL
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa import metrics
from msa.clientcert import peerIdentities
from msa.errors import SMTPReply
from msa.interfaces import ISubmission
from msa.sasl import Authenticate, Challenge

log = Logger()

COMMAND, AUTH, AUTH_FINAL = "COMMAND", "AUTH", "AUTH_FINAL"

#: RFC 4954 4: an AUTH line (command or response) may be 12288 octets.
MAX_AUTH_LINE = 12286

#: The channel-binding mechanism, offered only where L{channelBindings}
#: finds data.
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"

#: The client-certificate mechanism, offered only where L{peerIdentities}
#: finds a verified certificate.
EXTERNAL = "EXTERNAL"


def channelBindings(transport) -> dict[str, bytes]:
    """
    The channel bindings of a TLS transport: C{{"tls-exporter": data}}
    (RFC 9266: the exporter with label C{EXPORTER-Channel-Binding}, no
    context, 32 bytes) on TLS 1.3, else nothing.  On TLS 1.2 tls-exporter
    is safe only with the extended master secret, which pyOpenSSL cannot
    tell us was negotiated, so TLS 1.2 gets no channel binding.
    """
    conn = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(conn, SSL.Connection):
        return {}
    if conn.get_protocol_version_name() != "TLSv1.3":
        return {}
    try:
        data = conn.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    except SSL.Error:
        return {}
    return {"tls-exporter": data}


class AuthenticationMixin:
    """
    The AUTH command and its exchange; mixed into the server protocol,
    whose C{reply}, C{protocolError}, C{_wait}, C{session}, C{policy} and
    C{factory} it uses.
    """

    def _channelBindings(self) -> dict[str, bytes]:
        """
        The channel bindings of this session when SCRAM-SHA-256-PLUS is
        configured, else nothing.
        """
        if SCRAM_PLUS not in self.policy.mechanisms:
            return {}
        return channelBindings(self.transport)

    def offeredMechanisms(self) -> list[str]:
        """
        The configured mechanisms this session can use: SCRAM-SHA-256-PLUS
        only with channel binding data (TLS 1.3), EXTERNAL only on a
        connection with a verified client certificate.  A client such as
        the JDK takes the first advertised mechanism it knows and does not
        fall back when it fails, so nothing unusable is offered.
        """
        mechanisms = list(self.policy.mechanisms)
        if SCRAM_PLUS in mechanisms and not self._channelBindings():
            mechanisms.remove(SCRAM_PLUS)
        if EXTERNAL in mechanisms and not peerIdentities(self.transport):
            mechanisms.remove(EXTERNAL)
        return mechanisms

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
        if name not in self.offeredMechanisms() or factory is None:
            if name == EXTERNAL and EXTERNAL in self.policy.mechanisms:
                # Configured, but this connection has no verified
                # certificate: not offered here, and not a failed login.
                self.protocolError(
                    504, "5.5.4", "EXTERNAL needs a verified client certificate"
                )
                return
            self.protocolError(504, "5.5.4", "Unrecognized authentication type")
            return
        initial = None
        if len(parts) == 2:
            initial = self._decodeSASL(parts[1])
            if initial is None:
                return
        context = self.factory.mechanismContext
        if name == EXTERNAL:
            self.session.clientCertificate = peerIdentities(self.transport)
            context = attrs.evolve(
                context, peerIdentities=self.session.clientCertificate
            )
        elif name in ("SCRAM-SHA-256", SCRAM_PLUS):
            # -PLUS needs the data; plain SCRAM needs to know whether -PLUS
            # is offered here (downgrade protection).
            context = attrs.evolve(context, channelBindings=self._channelBindings())
        self._mechanism = factory(context)
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
        self._attemptedUser = str(getattr(result.credentials, "username", ""))
        self.session.clientCertificate = peerIdentities(self.transport)
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
        maxSessions = getattr(avatar, "maxSessions", None)
        if maxSessions is not None and (
            self.factory.registry.sessionsOf(avatar.account) >= maxSessions
        ):
            logout()
            self._endAuth()
            self.reply(
                454,
                "4.7.0",
                f"Too many concurrent sessions for this account (at most "
                f"{maxSessions}); try again later",
            )
            return
        self.factory.authThrottle.succeeded(
            self.session.clientAddress, self._attemptedUser
        )
        self._submission = avatar
        self._logout = logout
        self.session.account = avatar.account
        self.authenticated = True
        self._endAuth()
        log.info(
            "session {session}: authenticated as {account} with {mechanism}",
            event="auth",
            outcome="success",
            session=self.session.sessionId,
            account=self.session.account,
            mechanism=self.session.mechanism,
        )
        metrics.AUTH_RESULTS.labels(self.session.mechanism, "success").inc()
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
        self._failedMechanism = self.session.mechanism
        self._endAuth()
        user, self._attemptedUser = self._attemptedUser, ""
        mechanism = self._failedMechanism
        log.info(
            "session {session}: authentication failed for {user!r} with "
            "{mechanism}: {code}",
            event="auth",
            outcome="failure",
            session=self.session.sessionId,
            user=user[:64],
            mechanism=mechanism,
            code=error.code,
        )
        metrics.AUTH_RESULTS.labels(mechanism or "none", f"failure-{error.code}").inc()
        if error.code != 535:
            self.protocolError(error.code, error.status, error.text)
            return
        self._authFailures += 1
        throttle = self.factory.authThrottle
        client = self.session.clientAddress
        delay = throttle.delay(client, user)
        throttle.failed(client, user)
        # The delay holds back this session's next command too, so that a
        # pipelining guesser gains nothing.
        d = task.deferLater(self.factory.reactor, delay, self._failedReply, error)
        self._wait(d)

    def _failedReply(self, error: SMTPReply) -> None:
        if self._hungUp or self.transport is None or self.transport.disconnecting:
            return
        if self._authFailures >= self.policy.maxAuthFailures:
            self.sendReply(error)
            self.reply(
                421, "4.7.0", f"{self.policy.hostname} Error: too many failed logins"
            )
            self._hangUp()
            return
        self.protocolError(error.code, error.status, error.text)

    def _endAuth(self) -> None:
        self.mode = COMMAND
        self._mechanism = None
        if self._submission is None:
            self.session.mechanism = ""
