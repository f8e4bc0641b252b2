# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 server for companies (R16): RFC 1939 with the extensions of
RFC 2449 (CAPA, response codes), RFC 2595 (STLS), RFC 5034 (SASL AUTH) and
RFC 3206 (AUTH and SYS response codes), behind the same TLS policy, gate
and login as submission.  It is our own protocol rather than
L{twisted.mail.pop3.POP3}, which has no STLS, no SASL with our mechanisms,
no C{[IN-USE]} lock and no durable deletions (tests/test_twisted_defaults).

One input loop (L{POP3Server._processInput}) takes one line at a time, and
nothing re-enters it: a handler returns its L{Reply} (or a L{Deferred} of
one, or L{None} when it wrote the response itself), and while a
L{Deferred} is pending the following lines wait in a bounded buffer
(PIPELINING, RFC 2449 6.6).

Which command is honoured where (anything else: C{-ERR}, counted towards
C{max_errors}):

  =====================  ===============  ==================  ===========
  command                AUTHORIZATION,   AUTHORIZATION,      TRANSACTION
                         before TLS       after TLS
  =====================  ===============  ==================  ===========
  CAPA, QUIT             yes              yes                 yes (QUIT:
                                                              UPDATE)
  STLS                   yes              no                  no
  USER, PASS, AUTH       no (-ERR, says   yes                 no
                         nothing else)
  STAT LIST UIDL TOP     no               no                  yes
  RETR DELE RSET NOOP
  =====================  ===============  ==================  ===========

The UPDATE state is QUIT in TRANSACTION: the messages marked by DELE are
removed through L{IMailbox.commitDeletions}, and C{+OK} is sent only after
that is durable.  A connection that ends any other way deletes nothing.
"""

import secrets
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa.interfaces import IMailbox
from msa.pop3.auth import Login
from msa.pop3.maildrop import Maildrop, parseNumber
from msa.pop3.replies import SYS_TEMP, Reply, error, ok
from msa.pop3.retrieval import MessageFilter, MessageStream

log = Logger()

#: RFC 5034 4 lets SASL responses be longer than a command (255 octets).
MAX_AUTH_LINE = 12288
#: Pipelined input held while a command is pending, before reading pauses.
MAX_BUFFERED = 64 * 1024
#: Seconds a closing connection may take to send its last reply.
CLOSE_GRACE = 10.0


@attrs.define
class POP3Session:
    """
    What is known about one POP3 connection; also the cred C{mind}
    (L{msa.accounts.clientcert.CertificateBindingRealm} reads
    C{clientCertificate}).
    """

    sessionId: str
    clientAddress: str
    clientCertificate: tuple[str, ...] = ()
    mechanism: str = ""
    account: str = ""


class POP3Server(protocol.Protocol):
    """
    One POP3 session; see the module docstring for its states.

    @ivar factory: the L{msa.pop3.factory.POP3Factory}: portal, policy,
        TLS, mechanisms, throttle, audit log.
    @ivar session: the connection's L{POP3Session}.
    @ivar secure: TLS is on (implicit, or after STLS).
    @ivar login: the USER/PASS and AUTH driver.
    @ivar maildrop: the locked mailbox once logged in (TRANSACTION).
    """

    factory: Any
    transport: Any

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.secure = factory.policy.implicitTLS
        self.login = Login(self)
        self.maildrop: Maildrop | None = None
        self._logout: Callable[[], None] | None = None
        self._buffer = b""
        self._running = False
        self._waiting = False
        self._closed = False
        #: The connection is gone (not merely closing).
        self.hungUp = False
        self._readPaused = False
        self._errors = 0
        self._timers: dict[str, Any] = {}
        self._pendingRelease: defer.Deferred | None = None

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.session = POP3Session(
            sessionId=secrets.token_hex(6),
            clientAddress=(
                peer.host if isinstance(peer, IPv4Address | IPv6Address) else str(peer)
            ),
        )
        policy = self.factory.policy
        if not self.factory.admit(self):
            self._send(error(SYS_TEMP + "Too many connections", close=True))
            return
        self._restartTimer("idle", policy.idleTimeout, "Idle timeout")
        self._restartTimer("login", policy.loginTimeout, "Login timeout")
        self._send(ok(f"{policy.hostname} POP3 ready"))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = self.hungUp = True
        self.factory.release(self)
        self.login.abandon()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._pendingRelease is not None:
            # QUIT's deletions are on their way: release when they are done.
            self._pendingRelease.addBoth(lambda _: self._release())
        else:
            self._release()

    def _release(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    def _restartTimer(self, name: str, delay: float, why: str) -> None:
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.reset(delay)
            return
        self._timers[name] = self.factory.reactor.callLater(delay, self._timedOut, why)

    def _timedOut(self, why: str) -> None:
        log.info("session {session}: {why}", session=self.session.sessionId, why=why)
        if self._waiting:
            # Mid-response (a RETR the client stopped reading): a -ERR now
            # would land inside the message; the connection just ends, and
            # nothing is deleted.
            self._closed = True
            self._abort()
            return
        self._send(error(why + ", closing connection", close=True))

    def progress(self) -> None:
        """
        A response is still moving: the idle deadline starts again.
        """
        self._restartTimer("idle", self.factory.policy.idleTimeout, "Idle timeout")

    def _send(self, reply: Reply) -> None:
        if self._closed:
            return
        self.transport.write(reply.encode())
        if reply.close:
            self._closeConnection()

    def _closeConnection(self) -> None:
        self._closed = True
        self._buffer = b""
        self.transport.loseConnection()
        # A client that reads nothing must not keep the connection open.
        self._timers["close"] = self.factory.reactor.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self.transport.abortConnection()

    # -- the input loop --------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._buffer += data
        self._processInput()
        if self._closed:
            return
        pending = self._buffer.rfind(b"\n") + 1
        if len(self._buffer) - pending > MAX_AUTH_LINE:
            self._send(error("Line too long", close=True))
        elif len(self._buffer) > MAX_BUFFERED and not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()

    def _processInput(self) -> None:
        """
        Answer the buffered lines in order, one at a time, until one waits
        for a L{Deferred}.  Never re-entered: a reply that comes while it
        runs lets this same loop go on.
        """
        if self._running:
            return
        self._running = True
        try:
            while not self._waiting and not self._closed:
                end = self._buffer.find(b"\n")
                if end < 0:
                    break
                line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
                if line.endswith(b"\r"):
                    line = line[:-1]
                self._answer(self._lineReceived(line))
        finally:
            self._running = False
        if self._readPaused and len(self._buffer) < MAX_BUFFERED // 2:
            self._readPaused = False
            self.transport.resumeProducing()

    def _answer(self, result: Reply | defer.Deferred | None) -> None:
        if isinstance(result, defer.Deferred):
            self._waiting = True
            result.addErrback(self._internalError)
            result.addCallback(self._resume)
        elif result is not None:
            self._send(result)

    def _resume(self, reply: Reply | None) -> None:
        self._waiting = False
        if reply is not None:
            self._send(reply)
        self._processInput()

    def _internalError(self, failure: Failure) -> Reply:
        log.failure(
            "session {session}: internal error", failure, session=self.session.sessionId
        )
        return error(SYS_TEMP + "Internal error, try again later", close=True)

    def _lineReceived(self, line: bytes) -> Reply | defer.Deferred | None:
        self.progress()
        if self.login.inExchange:
            if len(line) > MAX_AUTH_LINE:
                self.login.continuation(b"*")
                return error("Line too long")
            return self.login.continuation(line)
        verb, _, argument = line.partition(b" ")
        limit = self.factory.policy.maxLineLength
        if verb.upper() == b"AUTH":
            limit = MAX_AUTH_LINE
        if len(line) + 2 > limit:
            return self._mistake("Line too long")
        command = verb.upper().decode("ascii", "replace")
        handler = self._handler(command)
        if handler is None:
            return self._refused(command)
        return handler(argument if _ else None)

    def _mistake(self, text: str) -> Reply:
        self._errors += 1
        if self._errors >= self.factory.policy.maxErrors:
            return error(text + "; too many errors, closing connection", close=True)
        return error(text)

    def _refused(self, command: str) -> Reply:
        if not self.secure and command in ("USER", "PASS", "AUTH", "APOP"):
            # R3 for POP3: nothing about accounts before TLS.
            return self._mistake("Must issue STLS first")
        return self._mistake("Command not available here")

    def _handler(self, command: str) -> Callable[[Any], Any] | None:
        always = {"CAPA": self.capa, "QUIT": self.quit}
        if command in always:
            return always[command]
        maildrop = self.maildrop
        if maildrop is not None:
            return {
                "STAT": lambda a: self._noArgument(a, maildrop.stat),
                "LIST": maildrop.listing,
                "UIDL": maildrop.uidl,
                "RETR": self.retr,
                "TOP": self.top,
                "DELE": maildrop.delete,
                "RSET": lambda a: self._noArgument(a, maildrop.reset),
                "NOOP": lambda a: self._noArgument(a, ok),
            }.get(command)
        if not self.secure:
            return {"STLS": self.stls}.get(command)
        return {
            "USER": self.login.user,
            "PASS": self.login.password,
            "AUTH": self.auth,
        }.get(command)

    @staticmethod
    def _noArgument(argument: bytes | None, handler: Callable[[], Reply]) -> Reply:
        if argument is not None:
            return error("This command takes no argument")
        return handler()

    # -- AUTHORIZATION ---------------------------------------------------

    def capa(self, argument: bytes | None) -> Reply:
        """
        CAPA (RFC 2449 5): what this session can do now.
        """
        policy = self.factory.policy
        lines = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        lines.append(b"EXPIRE " + policy.expire.encode("ascii"))
        if not self.secure:
            if self.factory.tlsContextFactory is not None:
                lines.append(b"STLS")
        elif self.maildrop is None:
            if self.login.userOffered():
                lines.append(b"USER")
            mechanisms = self.login.offeredMechanisms()
            if mechanisms:
                lines.append(("SASL " + " ".join(mechanisms)).encode("ascii"))
        return ok("Capability list follows", tuple(lines))

    def stls(self, argument: bytes | None) -> Reply | None:
        """
        STLS (RFC 2595 4): TLS starts right after the C{+OK}; whatever the
        client sent after STLS in the clear is thrown away (the STARTTLS
        command injection of CVE-2011-0411).
        """
        context = self.factory.tlsContextFactory
        if argument is not None or context is None:
            return self._mistake("STLS not available")
        self._send(ok("Begin TLS negotiation"))
        self._buffer = b""
        self.transport.startTLS(context)
        self.secure = True
        return None

    def auth(self, argument: bytes | None) -> Reply | defer.Deferred | None:
        if argument is None:
            return self.login.listMechanisms()
        return self.login.start(argument)

    def loggedIn(self, mailbox: IMailbox, logout: Callable[[], None]) -> Reply:
        """
        The login succeeded and the mailbox is locked: TRANSACTION.
        """
        if self._closed:
            logout()
            return error("Connection closed")
        self._logout = logout
        self.maildrop = Maildrop(mailbox)
        self.session.account = mailbox.account
        timer = self._timers.pop("login", None)
        if timer is not None and timer.active():
            timer.cancel()
        log.info(
            "session {session}: {account} logged in to POP3 with {mechanism}",
            event="auth",
            outcome="success",
            session=self.session.sessionId,
            account=mailbox.account,
            mechanism=self.session.mechanism,
        )
        return ok("Logged in, mailbox locked")

    # -- TRANSACTION -----------------------------------------------------

    def retr(self, argument: bytes | None) -> Reply | defer.Deferred:
        return self._stream(argument or b"", None, "RETR")

    def top(self, argument: bytes | None) -> Reply | defer.Deferred:
        message, _, lines = (argument or b"").partition(b" ")
        count = parseNumber(lines) if lines != b"0" else 0
        if count is None:
            return error("Syntax: TOP msg n")
        return self._stream(message, count, "TOP")

    def _stream(
        self, argument: bytes, bodyLines: int | None, command: str
    ) -> Reply | defer.Deferred:
        assert self.maildrop is not None
        found = self.maildrop.message(argument)
        if isinstance(found, Reply):
            return found
        number, message = found
        d = self.maildrop.mailbox.openMessage(message.uid)

        def opened(source: Any) -> defer.Deferred:
            if self._closed:
                source.close()
                return defer.succeed(False)
            self._send(ok(f"{message.size} octets"))
            stream = MessageStream(
                self.factory.runBlocking,
                source,
                self.transport,
                MessageFilter(bodyLines),
                self.progress,
            )
            return stream.send()

        def sent(complete: bool) -> defer.Deferred | None:
            if not complete:
                return None
            return self.factory.recordRetrieval(self.session, message, command)

        def failed(failure: Failure) -> Reply:
            log.failure(
                "session {session}: cannot read {uid}",
                failure,
                session=self.session.sessionId,
                uid=message.uid,
            )
            return error(SYS_TEMP + "Cannot read the message now", close=True)

        d.addCallbacks(opened, failed)
        d.addCallback(
            lambda result: sent(result) if isinstance(result, bool) else result
        )
        return d

    # -- UPDATE ----------------------------------------------------------

    def quit(self, argument: bytes | None) -> Reply | defer.Deferred:
        """
        QUIT: in TRANSACTION, the UPDATE state: the deletions are made
        durable before C{+OK}; when they cannot be, C{-ERR [SYS/TEMP]} and
        every message stays.
        """
        maildrop = self.maildrop
        if maildrop is None:
            return Reply(True, "Bye", close=True)
        d = self._pendingRelease = maildrop.update(self.session.sessionId)

        def released(reply: Reply) -> Reply:
            self._pendingRelease = None
            self._release()
            return reply

        return d.addCallback(released)
