# -*- test-case-name: tests.test_deadlines -*-
"""
Deadlines measured against time rather than bytes, so that a client cannot
hold one of the MSA's connection slots for ever by trickling (slowloris).

The idle timeout (C{[server] idle_timeout}, RFC 5321 4.5.3.2) restarts on
every byte, so on its own it lets one byte every few seconds keep a
connection open indefinitely.  These deadlines do not restart on bytes:

  - B{TLS handshake} (C{tls_handshake_timeout}, default 30 s): from the
    connection (implicit TLS) or from STARTTLS's 220 to the end of the
    handshake.  On expiry the connection is closed without a word: the TLS
    layer holds back anything written before the handshake is done, and
    after STARTTLS's 220 a plaintext 421 is not allowed any more.  The close
    is logged.
  - B{a command line} (C{command_line_timeout}, default 60 s): from the
    first byte of a command line (or a SASL response) to its CRLF, as
    chasquid's per-command deadline.  Expiry: C{421 4.4.2} and close.
  - B{the login phase} (C{login_timeout}, default 120 s): from the
    connection to a successful AUTH.  An unauthenticated client is an
    unknown one; it has this long, whatever it sends, to prove who it is.
    Expiry: C{421 4.4.2} and close.
  - B{the DATA phase} (C{data_timeout}, default 300 s, and
    C{data_min_rate}, default 1024 octets/s): from the 354 to the final
    dot the client may take C{data_timeout} seconds plus one second for
    every C{data_min_rate} octets it has sent, counted up to the message
    size limit.  A trickle slower than C{data_min_rate} on average is
    therefore cut off soon after the first C{data_timeout} seconds, while
    a large message on a slow but honest link (8 kbit/s and up) has the
    time it needs; no DATA phase lasts longer than C{data_timeout +
    max_message_size / data_min_rate}.  Expiry: C{421 4.4.2}, the message
    is aborted (nothing queued, no 250 sent, so the client sends it
    again), and close.

There is no cap on a whole authenticated session: a logged-in client is
known, is limited per account (C{maxSessions}), may legitimately send many
messages over one connection, and still meets the idle, command-line and
DATA deadlines above; a session cap would only cut such batches off in the
middle of a message.

All timers are the reactor's (C{callLater}), so that tests drive them with
L{twisted.internet.task.Clock}.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from msa.submission.phase import SessionPhase

if TYPE_CHECKING:
    from msa.submission.server import SubmissionServer

log = Logger()

#: Seconds a connection may stay open after the server's last reply (421,
#: 221) before it is aborted.
CLOSE_TIMEOUT = 10.0


class SessionDeadlines:
    """
    The deadlines of one L{msa.submission.server.SubmissionServer}, which
    owns this object and tells it what happens: bytes received
    (L{bytesReceived}), the greeting (L{start}), a TLS handshake starting
    and ending, the 354 (L{startData}), the server's last word
    (L{startClose}) and the end of the connection (L{stop}).  It reads the
    server's public state (C{phase}, C{avatar}, C{transport}, C{policy},
    C{session}) and ends a session through the server's C{timedOut}.

    @ivar _server: the session these deadlines watch.
    @ivar _handshakeTimer: runs from the start of a TLS handshake to its end.
    @ivar _lineTimer: runs from the first byte of a command line to its CRLF.
    @ivar _loginTimer: runs from the greeting to a successful AUTH.
    @ivar _dataTimer: the next check of the DATA phase's deadline.
    @ivar _closeTimer: runs from the server's last reply to the close.
    @ivar _lastByte: the last byte received outside DATA, to see a CRLF
        split over two reads.
    @ivar _dataStarted: the reactor time of the 354.
    @ivar _dataOctets: the octets received since the 354.
    """

    def __init__(self, server: "SubmissionServer") -> None:
        self._server = server
        self._handshakeTimer: IDelayedCall | None = None
        self._lineTimer: IDelayedCall | None = None
        self._loginTimer: IDelayedCall | None = None
        self._dataTimer: IDelayedCall | None = None
        self._closeTimer: IDelayedCall | None = None
        self._lastByte = b""
        self._dataStarted = 0.0
        self._dataOctets = 0

    def _callLater(self, delay: float, f: Callable[[], object]) -> IDelayedCall:
        return self._server.factory.reactor.callLater(delay, f)

    @staticmethod
    def _cancel(timer: IDelayedCall | None) -> None:
        if timer is not None and timer.active():
            timer.cancel()

    def start(self) -> None:
        """
        The connection has been greeted: the login deadline runs.
        """
        self._loginTimer = self._callLater(
            self._server.policy.loginTimeout, self._loginExpired
        )

    def stop(self) -> None:
        """
        Cancel every deadline (the connection is closing or gone).
        """
        for timer in (
            self._handshakeTimer,
            self._lineTimer,
            self._loginTimer,
            self._dataTimer,
            self._closeTimer,
        ):
            self._cancel(timer)
        self._handshakeTimer = self._lineTimer = self._loginTimer = None
        self._dataTimer = self._closeTimer = None

    # -- closing ----------------------------------------------------------

    def startClose(self) -> None:
        """
        The server has said its last word and closed its side.  Over TLS the
        close waits for the client's close_notify, which a client may never
        send: after L{CLOSE_TIMEOUT} seconds the connection is aborted so
        that it does not hold its slot.
        """
        self.stop()
        self._closeTimer = self._callLater(CLOSE_TIMEOUT, self._closeExpired)

    def _closeExpired(self) -> None:
        self._closeTimer = None
        server = self._server
        if server.transport is not None:
            log.info(
                "session {session}: the client did not close within {seconds}s "
                "of the server's last reply; aborting",
                event="timeout",
                deadline="close",
                session=server.session.sessionId,
                client=server.session.clientAddress,
                seconds=CLOSE_TIMEOUT,
            )
            server.transport.abortConnection()

    # -- TLS handshake --------------------------------------------------

    def startHandshake(self) -> None:
        """
        A TLS handshake starts now.  Whatever plaintext was buffered has been
        thrown away, so no command line is in progress either.
        """
        self._cancel(self._lineTimer)
        self._lastByte = b""
        self._handshakeTimer = self._callLater(
            self._server.policy.tlsHandshakeTimeout, self.handshakeExpired
        )

    def handshakeDone(self) -> None:
        """
        The TLS handshake has completed.
        """
        self._cancel(self._handshakeTimer)
        self._handshakeTimer = None

    @property
    def handshakePending(self) -> bool:
        """
        Whether a TLS handshake has started and not yet completed.
        """
        return self._handshakeTimer is not None and self._handshakeTimer.active()

    def handshakeExpired(self) -> None:
        """
        The handshake did not complete in time: abort the connection without
        a word.
        """
        self._handshakeTimer = None
        server = self._server
        if server.transport is None:
            return
        log.info(
            "session {session}: TLS handshake not completed within {seconds}s, closing",
            event="timeout",
            deadline="tls_handshake",
            session=server.session.sessionId,
            client=server.session.clientAddress,
            seconds=server.policy.tlsHandshakeTimeout,
        )
        # Not loseConnection(): the TLS layer would wait for the handshake to
        # finish before closing, which is exactly what never happens here.
        server.transport.abortConnection()

    # -- command lines -------------------------------------------------

    def bytesReceived(self, data: bytes) -> None:
        """
        Bytes arrived: note the start and end of command lines, and count
        the octets of a message.
        """
        if self.handshakePending:
            # Application data comes only out of a finished handshake (in
            # case a wrapper did not pass handshakeCompleted on).
            self.handshakeDone()
        if self._server.phase in (SessionPhase.DATA, SessionPhase.CHUNK):
            self._cancel(self._lineTimer)
            self._dataOctets += len(data)
            self._lastByte = data[-1:]
            return
        stream = self._lastByte + data
        self._lastByte = data[-1:]
        end = stream.rfind(b"\r\n")
        if end >= 0:
            # A line ended here; whatever follows its CRLF starts a new one.
            self._cancel(self._lineTimer)
            self._lineTimer = None
            if end + 2 < len(stream):
                self._startLineDeadline()
        elif self._lineTimer is None or not self._lineTimer.active():
            self._startLineDeadline()

    def _startLineDeadline(self) -> None:
        self._lineTimer = self._callLater(
            self._server.policy.commandLineTimeout, self._lineExpired
        )

    def _lineExpired(self) -> None:
        self._lineTimer = None
        if self._server.phase in (SessionPhase.DATA, SessionPhase.CHUNK):
            # The DATA phase (and a BDAT chunk) has a deadline of its own.
            return
        self._expired("command line", self._server.policy.commandLineTimeout)

    # -- login ---------------------------------------------------------

    def _loginExpired(self) -> None:
        self._loginTimer = None
        if self._server.avatar is not None:
            return
        self._expired("login", self._server.policy.loginTimeout)

    # -- DATA ----------------------------------------------------------

    def startData(self) -> None:
        """
        The 354 goes out (or the first BDAT chunk starts, or a BDAT chunk
        that is read only to be refused): the DATA phase's deadline runs,
        until the final dot, or a BDAT transaction's C{LAST}.
        """
        self._cancel(self._dataTimer)
        self._dataStarted = self._server.factory.reactor.seconds()
        self._dataOctets = 0
        self._dataTimer = self._callLater(
            self._server.policy.dataTimeout, self._checkData
        )

    def _dataAllowed(self) -> float:
        """
        The seconds the DATA phase may take with the octets received so far.
        """
        server = self._server
        octets = min(self._dataOctets, server.transaction.maxMessageSize())
        return server.policy.dataTimeout + octets / server.policy.dataMinRate

    def _checkData(self) -> None:
        self._dataTimer = None
        if not self._server.transaction.receiving:
            return
        due = self._dataStarted + self._dataAllowed()
        now = self._server.factory.reactor.seconds()
        if now < due:
            self._dataTimer = self._callLater(due - now, self._checkData)
            return
        self._expired("DATA", self._dataAllowed())

    # -- expiry --------------------------------------------------------

    def _expired(self, what: str, seconds: float) -> None:
        """
        Tell the client 421 4.4.2 and close; a message in progress is
        aborted, so nothing is queued.
        """
        server = self._server
        if server.transport is None or server.transport.disconnecting or server.hungUp:
            return
        if self.handshakePending:
            # Nothing can be said before the handshake is done.
            self.handshakeExpired()
            return
        log.info(
            "session {session}: {what} not completed within {seconds:.0f}s, "
            "closing{aborted}",
            event="timeout",
            deadline=what,
            session=server.session.sessionId,
            client=server.session.clientAddress,
            what=what,
            seconds=seconds,
            aborted=", message aborted" if server.transaction.receiving else "",
        )
        server.reply(
            421, "4.4.2", f"{server.policy.hostname} Error: timeout exceeded ({what})"
        )
        # The server's last word: an open message is dropped, no more input.
        server.hangUp()
