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

from twisted.logger import Logger

from msa.transaction import DATA

log = Logger()

#: Seconds a connection may stay open after the server's last reply (421,
#: 221) before it is aborted.
CLOSE_TIMEOUT = 10.0


class DeadlineMixin:
    """
    The deadlines of one L{msa.server.SubmissionServer}; mixed in before
    L{twisted.mail.smtp.ESMTP}, whose C{sendCode} it watches for the 354.
    It uses the server's C{policy}, C{factory.reactor}, C{session},
    C{mode}, C{reply}, C{_hangUp}, C{_framer} and C{_submission}.
    """

    _handshakeTimer = None
    _lineTimer = None
    _loginTimer = None
    _dataTimer = None
    _closeTimer = None
    _lastByte = b""
    _dataStarted = 0.0
    _dataOctets = 0

    def _callLater(self, delay: float, f, *args):
        return self.factory.reactor.callLater(delay, f, *args)

    @staticmethod
    def _cancel(timer) -> None:
        if timer is not None and timer.active():
            timer.cancel()

    def _startDeadlines(self) -> None:
        """
        The connection has been greeted: the login deadline runs.
        """
        self._loginTimer = self._callLater(self.policy.loginTimeout, self._loginExpired)

    def _stopDeadlines(self) -> None:
        for name in (
            "_handshakeTimer",
            "_lineTimer",
            "_loginTimer",
            "_dataTimer",
            "_closeTimer",
        ):
            self._cancel(getattr(self, name))
            setattr(self, name, None)

    # -- closing ----------------------------------------------------------

    def _startCloseDeadline(self) -> None:
        """
        The server has said its last word and closed its side.  Over TLS the
        close waits for the client's close_notify, which a client may never
        send: after L{CLOSE_TIMEOUT} seconds the connection is aborted so
        that it does not hold its slot.
        """
        self._stopDeadlines()
        self._closeTimer = self._callLater(CLOSE_TIMEOUT, self._closeExpired)

    def _closeExpired(self) -> None:
        self._closeTimer = None
        if self.transport is not None:
            log.info(
                "session {session}: the client did not close within {seconds}s "
                "of the server's last reply; aborting",
                event="timeout",
                deadline="close",
                session=self.session.sessionId,
                seconds=CLOSE_TIMEOUT,
            )
            self.transport.abortConnection()

    # -- TLS handshake --------------------------------------------------

    def _startHandshakeDeadline(self) -> None:
        """
        A TLS handshake starts now.  Whatever plaintext was buffered has been
        thrown away, so no command line is in progress either.
        """
        self._cancel(self._lineTimer)
        self._lastByte = b""
        self._handshakeTimer = self._callLater(
            self.policy.tlsHandshakeTimeout, self._handshakeExpired
        )

    def _handshakeDone(self) -> None:
        self._cancel(self._handshakeTimer)
        self._handshakeTimer = None

    @property
    def _handshakePending(self) -> bool:
        return self._handshakeTimer is not None and self._handshakeTimer.active()

    def _handshakeExpired(self) -> None:
        self._handshakeTimer = None
        if self.transport is None:
            return
        log.info(
            "session {session}: TLS handshake not completed within {seconds}s, closing",
            event="timeout",
            deadline="tls_handshake",
            session=self.session.sessionId,
            seconds=self.policy.tlsHandshakeTimeout,
        )
        # Not loseConnection(): the TLS layer would wait for the handshake to
        # finish before closing, which is exactly what never happens here.
        self.transport.abortConnection()

    # -- command lines -------------------------------------------------

    def _deadlineBytes(self, data: bytes) -> None:
        """
        Bytes arrived: note the start and end of command lines, and count
        the octets of a message.
        """
        if self._handshakePending:
            # Application data comes only out of a finished handshake (in
            # case a wrapper did not pass handshakeCompleted on).
            self._handshakeDone()
        if self.mode == DATA:
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
            self.policy.commandLineTimeout, self._lineExpired
        )

    def _lineExpired(self) -> None:
        self._lineTimer = None
        if self.mode == DATA:
            # The DATA phase has a deadline of its own.
            return
        self._deadlineExpired("command line", self.policy.commandLineTimeout)

    # -- login ---------------------------------------------------------

    def _loginExpired(self) -> None:
        self._loginTimer = None
        if self._submission is not None:
            return
        self._deadlineExpired("login", self.policy.loginTimeout)

    # -- DATA ----------------------------------------------------------

    def sendCode(self, code: int, message: bytes = b"") -> None:
        if code == 354:
            self._startDataDeadline()
        super().sendCode(code, message)

    def _startDataDeadline(self) -> None:
        self._cancel(self._dataTimer)
        self._dataStarted = self.factory.reactor.seconds()
        self._dataOctets = 0
        self._dataTimer = self._callLater(self.policy.dataTimeout, self._checkData)

    def _dataAllowed(self) -> float:
        """
        The seconds the DATA phase may take with the octets received so far.
        """
        octets = min(self._dataOctets, self._maxMessageSize())
        return self.policy.dataTimeout + octets / self.policy.dataMinRate

    def _checkData(self) -> None:
        self._dataTimer = None
        if self.mode != DATA:
            return
        due = self._dataStarted + self._dataAllowed()
        now = self.factory.reactor.seconds()
        if now < due:
            self._dataTimer = self._callLater(due - now, self._checkData)
            return
        self._deadlineExpired("DATA", self._dataAllowed())

    # -- expiry --------------------------------------------------------

    def _deadlineExpired(self, what: str, seconds: float) -> None:
        """
        Tell the client 421 4.4.2 and close; a message in progress is
        aborted, so nothing is queued.
        """
        if self.transport is None or self.transport.disconnecting or self._hungUp:
            return
        if self._handshakePending:
            # Nothing can be said before the handshake is done.
            self._handshakeExpired()
            return
        log.info(
            "session {session}: {what} not completed within {seconds:.0f}s, "
            "closing{aborted}",
            event="timeout",
            deadline=what,
            session=self.session.sessionId,
            what=what,
            seconds=seconds,
            aborted=", message aborted" if self.mode == DATA else "",
        )
        self.reply(
            421, "4.4.2", f"{self.policy.hostname} Error: timeout exceeded ({what})"
        )
        # The server's last word: an open message is dropped, no more input.
        self._hangUp()
