# -*- test-case-name: tests.test_pop3_auth -*-
"""
Logging in to POP3: USER/PASS (RFC 1939 7) and AUTH (RFC 5034) with the
SASL state machines of L{msa.sasl}, through the same cred checkers, the
same per-account mechanism policy and the same failed-login throttle as
submission (L{msa.submission.auth} does the same for SMTP; the two share
the mechanisms, not the glue, because the replies differ).

The portal's realm (L{msa.pop3.realm.MailboxRealm}) gives the locked
mailbox.  Every handler returns the L{Reply} to send, or a L{Deferred} of
it; nothing raises out of the protocol.  A failure says C{[AUTH]}
(RFC 3206) after the throttle's delay, a mailbox held by another session
C{[IN-USE]} (RFC 2449), anything else C{[SYS/TEMP]}.
"""

import base64
import binascii
from typing import TYPE_CHECKING, Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa.accounts.clientcert import peerIdentities
from msa.errors import MailboxInUse, SMTPReply
from msa.interfaces import IMailbox, IMechanismCredentials
from msa.pop3.replies import AUTH, IN_USE, SYS_TEMP, Reply, error, ok
from msa.sasl import Authenticate, Challenge, UsernamePassword
from msa.tls import channelBindings

if TYPE_CHECKING:
    from msa.pop3.server import POP3Server

log = Logger()

SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
EXTERNAL = "EXTERNAL"
#: USER/PASS sends the password in the clear, as PLAIN does: an account
#: may use it when its mechanisms allow PLAIN.
USER_PASS_MECHANISM = "PLAIN"


def _decode(data: bytes) -> bytes | None:
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


class Login:
    """
    The login of one session: USER/PASS and the AUTH exchange.

    @ivar inExchange: an AUTH exchange waits for the client's next line.
    @ivar failures: the failed logins of this session.
    """

    def __init__(self, server: "POP3Server") -> None:
        self._server = server
        self._user: bytes | None = None
        self._mechanism: Any = None
        self._final: tuple[IMailbox, Any] | None = None
        self._attemptedUser = ""
        self.inExchange = False
        self.failures = 0

    def offeredMechanisms(self) -> list[str]:
        """
        The configured mechanisms usable on this connection: -PLUS only
        with channel binding data, EXTERNAL only with a verified client
        certificate.
        """
        server = self._server
        mechanisms = [
            m
            for m in server.factory.policy.mechanisms
            if m in server.factory.mechanismFactories
        ]
        if SCRAM_PLUS in mechanisms and not channelBindings(server.transport):
            mechanisms.remove(SCRAM_PLUS)
        if EXTERNAL in mechanisms and not peerIdentities(server.transport):
            mechanisms.remove(EXTERNAL)
        return mechanisms

    def userOffered(self) -> bool:
        return USER_PASS_MECHANISM in self._server.factory.policy.mechanisms

    def user(self, argument: bytes | None) -> Reply:
        """
        USER name: remembered for PASS; the answer says nothing about it.
        """
        if not self.userOffered():
            return error("USER not available; use AUTH")
        if not argument:
            return error("Syntax: USER name")
        self._user = argument
        return ok("Send PASS")

    def password(self, argument: bytes | None) -> Reply | defer.Deferred:
        """
        PASS password (which may hold spaces): log in.
        """
        if self._user is None:
            return error("Send USER first")
        user, self._user = self._user, None
        credentials = UsernamePassword(
            user.decode("utf-8", "replace"),
            (argument or b"").decode("utf-8", "replace"),
            USER_PASS_MECHANISM,
        )
        return self._login(credentials, "USER")

    def listMechanisms(self) -> Reply:
        """
        AUTH without an argument (RFC 1734, which clients still send): the
        mechanisms, one a line.
        """
        return ok("", tuple(m.encode("ascii") for m in self.offeredMechanisms()))

    def start(self, argument: bytes) -> Reply | defer.Deferred | None:
        """
        AUTH mechanism [initial-response].
        """
        parts = argument.split(b" ")
        if len(parts) > 2 or not parts[0]:
            return error("Syntax: AUTH mechanism [initial-response]")
        name = parts[0].upper().decode("ascii", "replace")
        server = self._server
        if name not in self.offeredMechanisms():
            return error("Unrecognized authentication type")
        initial = None
        if len(parts) == 2:
            initial = _decode(parts[1])
            if initial is None:
                return error("Invalid base64 data")
        context = server.factory.mechanismContext
        if name == EXTERNAL:
            server.session.clientCertificate = peerIdentities(server.transport)
            context = attrs.evolve(
                context, peerIdentities=server.session.clientCertificate
            )
        elif name in ("SCRAM-SHA-256", SCRAM_PLUS):
            context = attrs.evolve(
                context, channelBindings=self._channelBindings(server)
            )
        mechanism = self._mechanism = server.factory.mechanismFactories[name](context)
        server.session.mechanism = name
        return self._step(lambda: mechanism.start(initial))

    def _channelBindings(self, server: "POP3Server") -> dict[str, bytes]:
        if SCRAM_PLUS not in server.factory.policy.mechanisms:
            return {}
        return channelBindings(server.transport)

    def continuation(self, line: bytes) -> Reply | defer.Deferred | None:
        """
        A client line during the exchange.

        @return: the reply, or L{None} when a C{+} challenge was sent and
            another line is awaited.
        """
        if line == b"*":
            self._end()
            return error("Authentication cancelled")
        if self._final is not None:
            mailbox, logout = self._final
            self._final = None
            self._end()
            if line:
                logout()
                return error("Authentication cancelled")
            return self._welcome(mailbox, logout)
        decoded = _decode(line)
        if decoded is None:
            self._end()
            return error("Invalid base64 data")
        mechanism = self._mechanism
        return self._step(lambda: mechanism.respond(decoded))

    def _challenge(self, data: bytes) -> None:
        self.inExchange = True
        transport: Any = self._server.transport
        transport.write(b"+ " + base64.b64encode(data) + b"\r\n")

    def _step(self, step: Any) -> Reply | defer.Deferred | None:
        try:
            result = step()
        except SMTPReply as e:
            self._end()
            if e.code == 535:
                return self._failed(UnauthorizedLogin(e.text))
            return error(e.text)
        except Exception:
            log.failure("session {session}: SASL error", session=self._sessionId())
            self._end()
            return error(SYS_TEMP + "Temporary authentication failure")
        if isinstance(result, Challenge):
            self._challenge(result.data)
            return None
        assert isinstance(result, Authenticate)
        self.inExchange = False
        return self._login(result.credentials, self._server.session.mechanism)

    def _sessionId(self) -> str:
        return self._server.session.sessionId

    def _login(self, credentials: Any, mechanism: str) -> defer.Deferred:
        server = self._server
        server.session.mechanism = mechanism
        named = IMechanismCredentials(credentials, None)
        self._attemptedUser = str(named.username) if named is not None else ""
        if not server.session.clientCertificate:
            server.session.clientCertificate = peerIdentities(server.transport)
        d = server.factory.portal.login(credentials, server.session, IMailbox)
        return d.addCallbacks(self._loggedIn, self._failed)

    def _loggedIn(self, result: tuple[Any, IMailbox, Any]) -> defer.Deferred | None:
        _, mailbox, logout = result
        if self._server.hungUp:
            # The client left while the portal was asked.
            logout()
            return None
        final = self._mechanism.serverFinal() if self._mechanism is not None else None
        if final is not None:
            self._final = (mailbox, logout)
            self._challenge(final)
            return None
        self._end()
        return self._welcome(mailbox, logout)

    def _welcome(self, mailbox: IMailbox, logout: Any) -> defer.Deferred:
        server = self._server
        d = defer.maybeDeferred(
            server.factory.authThrottle.succeededLogin,
            server.session.clientAddress,
            self._attemptedUser,
        )

        def admitted(_: object) -> Reply:
            return server.loggedIn(mailbox, logout)

        def unavailable(failure: Failure) -> Reply:
            logout()
            return error(SYS_TEMP + "Temporary authentication failure")

        return d.addCallbacks(admitted, unavailable)

    def _failed(self, reason: Failure | Exception) -> Reply | defer.Deferred:
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        server = self._server
        self._end()
        user, self._attemptedUser = self._attemptedUser, ""
        if failure.check(MailboxInUse):
            log.info(
                "session {session}: mailbox of {user!r} in use",
                session=self._sessionId(),
                user=user[:64],
            )
            return error(IN_USE + "Mailbox in use by another session")
        if not failure.check(UnauthorizedLogin):
            log.failure(
                "session {session}: login error", failure, session=self._sessionId()
            )
            return error(SYS_TEMP + "Temporary authentication failure")
        self.failures += 1
        log.info(
            "session {session}: POP3 login failed for {user!r} with {mechanism}",
            event="auth",
            outcome="failure",
            session=self._sessionId(),
            client=server.session.clientAddress,
            user=user[:64],
            mechanism=server.session.mechanism,
        )
        close = self.failures >= server.factory.policy.maxAuthFailures
        reply = error(AUTH + "Authentication failed", close=close)
        d = defer.maybeDeferred(
            server.factory.authThrottle.failedLogin, server.session.clientAddress, user
        )
        d.addCallback(
            lambda delay: task.deferLater(server.factory.reactor, delay, lambda: reply)
        )
        d.addErrback(
            lambda _: error(SYS_TEMP + "Temporary authentication failure", close=close)
        )
        return d

    def abandon(self) -> None:
        """
        The connection is gone: a login that waits for the client's last
        line gives its mailbox back.
        """
        if self._final is not None:
            _, logout = self._final
            logout()
        self._end()

    def _end(self) -> None:
        self.inExchange = False
        self._mechanism = None
        self._final = None
