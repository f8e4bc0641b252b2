# -*- test-case-name: tests.test_submission_auth -*-
"""
SMTP AUTH (RFC 4954) for L{msa.submission.server.SubmissionServer}: one
L{AuthExchange} per session, owned by the server, drives the SASL state
machines of L{msa.sasl}, logs in through the cred portal, and sends the
server's final SASL data (DIGEST-MD5 rspauth, SCRAM's v=) before 235, which
Twisted's C{state_AUTH} cannot do.  Every error is a reply with an enhanced
status code; nothing raises out of the protocol.
"""

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa import metrics
from msa.accounts.clientcert import peerIdentities
from msa.errors import LimitsUnavailable, SMTPReply
from msa.interfaces import IMechanismCredentials, ISubmission
from msa.sasl import Authenticate, Challenge
from msa.sasl.digest_md5 import parseDirectives
from msa.submission.phase import SessionPhase
from msa.tls import channelBindings

if TYPE_CHECKING:
    from msa.submission.server import SubmissionServer

log = Logger()

#: RFC 4954 4: an AUTH line (command or response) may be 12288 octets.
MAX_AUTH_LINE = 12286

#: The channel-binding mechanism, offered only where L{channelBindings}
#: finds data.
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"

#: The client-certificate mechanism, offered only where L{peerIdentities}
#: finds a verified certificate.
EXTERNAL = "EXTERNAL"


def namedUser(mechanism: str, response: bytes) -> str:
    """
    The user name a client's SASL response names, for the log line and the
    throttle key of a refusal the mechanism makes itself, before any
    credentials reach the checker (a wrong realm, the digest-uri of another
    service): DIGEST-MD5's C{username} directive, decoded as the mechanism
    does (UTF-8, else ISO 8859-1).

    @return: the name, or C{""} when the response names none or belongs
        to another mechanism.
    """
    if mechanism != "DIGEST-MD5":
        return ""
    try:
        raw = parseDirectives(response).get("username", b"")
    except SMTPReply:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("iso-8859-1")


class AuthExchange:
    """
    The AUTH command and its SASL exchange, for one session.  The server
    owns this object, passes it the AUTH command (L{command}) and, in the
    AUTH exchange phase, the client's lines (L{lineReceived}); it answers
    through the server's C{reply}, C{sendCode}, C{protocolError} and
    C{wait}, and hands the logged-in avatar to the server's C{loggedIn}.
    The checks that precede the exchange return their refusal
    (L{refusal}) rather than send it.

    @ivar _server: the session.
    @ivar _mechanism: the SASL state machine of the exchange in progress.
    @ivar _awaitingFinal: whether the server has sent its final SASL data
        (334) and waits for the client's empty line (RFC 4954 4).
    @ivar _pendingLogin: the avatar and logout of a login the portal has
        accepted, until the exchange completes.
    @ivar _attemptedUser: the user name of the credentials being checked,
        for the failed-login throttle and the log.
    @ivar failures: the failed logins (535) of this session.
    """

    def __init__(self, server: "SubmissionServer") -> None:
        self._server = server
        self._mechanism: Any = None
        self._awaitingFinal = False
        self._pendingLogin: tuple[ISubmission, Callable[[], None]] | None = None
        self._attemptedUser = ""
        self.failures = 0

    def resetSession(self) -> None:
        """
        The session starts anew (STARTTLS): no login is pending.
        """
        self._pendingLogin = None

    def _channelBindings(self) -> dict[str, bytes]:
        """
        The channel bindings of this session when SCRAM-SHA-256-PLUS is
        configured, else nothing.
        """
        if SCRAM_PLUS not in self._server.policy.mechanisms:
            return {}
        return channelBindings(self._server.transport)

    def offeredMechanisms(self) -> list[str]:
        """
        The configured mechanisms this session can use: SCRAM-SHA-256-PLUS
        only with channel binding data (TLS 1.3), EXTERNAL only on a
        connection with a verified client certificate.  A client such as
        the JDK takes the first advertised mechanism it knows and does not
        fall back when it fails, so nothing unusable is offered.
        """
        mechanisms = list(self._server.policy.mechanisms)
        if SCRAM_PLUS in mechanisms and not self._channelBindings():
            mechanisms.remove(SCRAM_PLUS)
        if EXTERNAL in mechanisms and not peerIdentities(self._server.transport):
            mechanisms.remove(EXTERNAL)
        return mechanisms

    def refusal(self, rest: bytes) -> SMTPReply | None:
        """
        Why this AUTH command cannot start an exchange, if it cannot.
        """
        server = self._server
        if server.avatar is not None:
            return SMTPReply(503, "5.5.1", "Error: already authenticated")
        if not server.session.helo:
            return SMTPReply(503, "5.5.1", "Error: send EHLO first")
        if server.transaction.inProgress:
            return SMTPReply(503, "5.5.1", "Error: MAIL transaction in progress")
        parts = rest.split()
        if not parts or len(parts) > 2:
            return SMTPReply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        name = parts[0].upper().decode("ascii", "replace")
        if name not in self.offeredMechanisms() or (
            name not in server.factory.mechanismFactories
        ):
            if name == EXTERNAL and EXTERNAL in server.policy.mechanisms:
                # Configured, but this connection has no verified
                # certificate: not offered here, and not a failed login.
                return SMTPReply(
                    504, "5.5.4", "EXTERNAL needs a verified client certificate"
                )
            return SMTPReply(504, "5.5.4", "Unrecognized authentication type")
        return None

    def command(self, rest: bytes) -> None:
        """
        AUTH mechanism [initial-response]: start the exchange.
        """
        server = self._server
        refusal = self.refusal(rest)
        if refusal is not None:
            server.protocolError(refusal.code, refusal.status, refusal.text)
            return
        parts = rest.split()
        name = parts[0].upper().decode("ascii", "replace")
        factory = server.factory.mechanismFactories[name]
        initial = None
        if len(parts) == 2:
            initial = self._decodeSASL(parts[1])
            if initial is None:
                return
        context = server.factory.mechanismContext
        session = server.session
        if name == EXTERNAL:
            session.clientCertificate = peerIdentities(server.transport)
            context = attrs.evolve(context, peerIdentities=session.clientCertificate)
        elif name in ("SCRAM-SHA-256", SCRAM_PLUS):
            # -PLUS needs the data; plain SCRAM needs to know whether -PLUS
            # is offered here (downgrade protection).
            context = attrs.evolve(context, channelBindings=self._channelBindings())
        mechanism = self._mechanism = factory(context)
        session.mechanism = name
        self._saslStep(lambda: mechanism.start(initial))

    def lineReceived(self, line: bytes) -> None:
        """
        A line of the exchange: the response to a challenge, or the empty
        line after the server's final data.
        """
        if self._awaitingFinal:
            self._finalReceived(line)
        else:
            self._responseReceived(line)

    def lineTooLong(self) -> None:
        """
        A line of the exchange longer than L{MAX_AUTH_LINE}: the exchange
        ends with 500 5.5.6 (RFC 4954 4), so that the client's next line is
        read as a command again, as the client expects after a final reply.
        """
        self.abort(SMTPReply(500, "5.5.6", "Authentication Exchange line is too long"))

    def abort(self, reply: SMTPReply) -> None:
        """
        End the exchange in progress with C{reply}, dropping a login that
        waited only for the client's empty line.
        """
        if self._pendingLogin is not None:
            avatar, logout = self._pendingLogin
            self._pendingLogin = None
            logout()
        self._end()
        self._server.protocolError(reply.code, reply.status, reply.text)

    def _decodeSASL(self, data: bytes) -> bytes | None:
        if data == b"=":
            return b""
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._end()
            self._server.protocolError(501, "5.5.2", "Error: invalid base64 data")
            return None

    def _saslStep(self, step: Callable[[], object]) -> None:
        server = self._server
        try:
            result = step()
        except SMTPReply as e:
            self._failed(e)
            return
        except Exception:
            log.failure(
                "session {session}: SASL error", session=server.session.sessionId
            )
            self._end()
            server.reply(454, "4.7.0", "Temporary authentication failure")
            return
        if isinstance(result, Challenge):
            server.enter(SessionPhase.AUTH_EXCHANGE)
            server.sendCode(334, base64.b64encode(result.data))
            return
        assert isinstance(result, Authenticate)
        server.enter(SessionPhase.COMMAND)
        credentials = IMechanismCredentials(result.credentials, None)
        self._attemptedUser = (
            str(credentials.username) if credentials is not None else ""
        )
        server.session.clientCertificate = peerIdentities(server.transport)
        d = server.factory.portal.login(result.credentials, server.session, ISubmission)
        d.addCallbacks(self._loggedIn, self._loginFailed)
        server.wait(d)

    def _responseReceived(self, line: bytes) -> None:
        if line == b"*":
            self._end()
            self._server.protocolError(501, "5.7.0", "Authentication aborted")
            return
        decoded = self._decodeSASL(line)
        if decoded is not None:
            mechanism = self._mechanism
            # Should the mechanism refuse the response itself (a wrong
            # realm), the refusal is still the named user's.
            self._attemptedUser = namedUser(self._server.session.mechanism, decoded)
            self._saslStep(lambda: mechanism.respond(decoded))

    def _loggedIn(self, result: tuple[object, ISubmission, Callable[[], None]]) -> None:
        interface, avatar, logout = result
        self._pendingLogin = (avatar, logout)
        final = self._mechanism.serverFinal()
        if final is not None:
            self._awaitingFinal = True
            self._server.enter(SessionPhase.AUTH_EXCHANGE)
            self._server.sendCode(334, base64.b64encode(final))
            return
        self._complete()

    def _finalReceived(self, line: bytes) -> None:
        # After the server's final data (rspauth, SCRAM's v=) the client
        # must answer an empty line (RFC 4954 4).
        if line.strip():
            self.abort(SMTPReply(501, "5.7.0", "Authentication aborted"))
            return
        self._complete()

    def _complete(self) -> None:
        server = self._server
        assert self._pendingLogin is not None
        avatar, logout = self._pendingLogin
        self._pendingLogin = None
        maxSessions = avatar.maxSessions
        limiter = server.factory.sessionLimiter
        sessionId = server.session.sessionId
        if maxSessions is None:
            d: defer.Deferred = defer.succeed(True)
        else:
            # The memory limiter answers at once; a shared one (Redis) later.
            d = defer.maybeDeferred(
                limiter.acquire, avatar.account, maxSessions, sessionId
            )

        def admitted(admit: bool) -> defer.Deferred | None:
            if not admit:
                logout()
                self._end()
                server.reply(
                    454,
                    "4.7.0",
                    f"Too many concurrent sessions for this account (at most "
                    f"{maxSessions}); try again later",
                )
                return None
            release = logout
            if maxSessions is not None:

                def release() -> None:
                    limiter.release(avatar.account, sessionId)
                    logout()

            done = defer.maybeDeferred(
                server.factory.authThrottle.succeededLogin,
                server.session.clientAddress,
                self._attemptedUser,
            )
            done.addCallbacks(
                lambda _: self._welcome(avatar, release),
                lambda failure: self._limitsFailed(failure, release),
            )
            return done

        d.addCallbacks(admitted, lambda failure: self._limitsFailed(failure, logout))
        server.wait(d)

    def _welcome(self, avatar: ISubmission, logout: Callable[[], None]) -> None:
        """
        The login is complete and admitted: 235.
        """
        server = self._server
        session = server.session
        if server.hungUp or server.transport is None:
            # The client left while the limits were asked.
            logout()
            return
        server.loggedIn(avatar, logout)
        self._end()
        # DEBUG: the accepted message's INFO line names the account.
        log.debug(
            "session {session}: authenticated as {account} with {mechanism}",
            event="auth",
            outcome="success",
            session=session.sessionId,
            account=session.account,
            mechanism=session.mechanism,
        )
        metrics.AUTH_RESULTS.labels(session.mechanism, "success").inc()
        server.reply(235, "2.7.0", "Authentication successful")

    def _limitsFailed(
        self, failure: Failure, logout: Callable[[], None] | None = None
    ) -> None:
        """
        The shared limits (Redis) could not be asked about this login, with
        C{[limits] fallback = "refuse"}: C{454 4.7.0}, whether the password
        was right or wrong, so that an outage tells a guesser nothing; for
        the same reason it counts as a failed login of the session
        (C{max_auth_failures}) either way.  The client tries again later.
        """
        server = self._server
        session = server.session
        if logout is not None:
            logout()
        if not failure.check(LimitsUnavailable):
            log.failure(
                "session {session}: login limits error",
                failure,
                session=session.sessionId,
            )
        mechanism = session.mechanism
        self._end()
        self._attemptedUser = ""
        self.failures += 1
        log.info(
            "session {session}: authentication refused for now, the shared "
            "limits cannot be checked: 454",
            event="auth",
            outcome="unavailable",
            session=session.sessionId,
            client=session.clientAddress,
            mechanism=mechanism,
            code=454,
        )
        metrics.AUTH_RESULTS.labels(mechanism or "none", "failure-454").inc()
        self._failedReply(SMTPReply(454, "4.7.0", "Temporary authentication failure"))

    def _loginFailed(self, failure: Failure) -> None:
        if failure.check(UnauthorizedLogin):
            self._failed(SMTPReply(535, "5.7.8", "Authentication credentials invalid"))
        elif isinstance(failure.value, SMTPReply):
            self._failed(failure.value)
        else:
            log.failure(
                "session {session}: login error",
                failure,
                session=self._server.session.sessionId,
            )
            self._end()
            self._server.reply(454, "4.7.0", "Temporary authentication failure")

    def _failed(self, error: SMTPReply) -> None:
        server = self._server
        session = server.session
        mechanism = session.mechanism
        self._end()
        user, self._attemptedUser = self._attemptedUser, ""
        fields = dict(
            event="auth",
            outcome="failure",
            session=session.sessionId,
            client=session.clientAddress,
            user=user[:64],
            mechanism=mechanism,
            code=error.code,
        )
        if error.code != 535:
            log.info(
                "session {session}: authentication failed for {user!r} with "
                "{mechanism}: {code}",
                **fields,
            )
            metrics.AUTH_RESULTS.labels(
                mechanism or "none", f"failure-{error.code}"
            ).inc()
            server.protocolError(error.code, error.status, error.text)
            return
        self.failures += 1
        client = session.clientAddress
        # The memory throttle answers at once; a shared one (Redis) later.
        d = defer.maybeDeferred(server.factory.authThrottle.failedLogin, client, user)

        def delayed(delay: float) -> defer.Deferred:
            log.info(
                "session {session}: authentication failed for {user!r} with "
                "{mechanism}: {code}, answered after {delay}s",
                delay=delay,
                **fields,
            )
            metrics.AUTH_RESULTS.labels(mechanism or "none", "failure-535").inc()
            # The delay holds back this session's next command too, so that
            # a pipelining guesser gains nothing.
            return task.deferLater(
                server.factory.reactor, delay, self._failedReply, error
            )

        def unavailable(failure: Failure) -> None:
            # Counted above already.
            self.failures -= 1
            self._limitsFailed(failure)

        d.addCallbacks(delayed, unavailable)
        server.wait(d)

    def _failedReply(self, error: SMTPReply) -> None:
        server = self._server
        if server.hungUp or server.transport is None or server.transport.disconnecting:
            return
        if self.failures >= server.policy.maxAuthFailures:
            server.sendReply(error)
            server.reply(
                421, "4.7.0", f"{server.policy.hostname} Error: too many failed logins"
            )
            server.hangUp()
            return
        server.protocolError(error.code, error.status, error.text)

    def _end(self) -> None:
        """
        The exchange is over, whatever its outcome: back to commands.
        """
        self._server.enter(SessionPhase.COMMAND)
        self._mechanism = None
        self._awaitingFinal = False
        if self._server.avatar is None:
            self._server.session.mechanism = ""
