# -*- test-case-name: tests.test_relay_client,tests.test_relay_pipelining -*-
"""
The SMTP I{client} side of the relay, the MSA speaking to the core MTA (the
server side, where mail clients submit, is L{msa.submission.server}):

  - L{DotStuffer}, a stateful dot-stuffer for data fed in chunks;
  - L{SMTPClientProtocol}, a line protocol that turns each command into a
    L{Deferred} of the core's L{Reply}, failing with L{SMTPClientError}.

The results of a delivery attempt, which every downstream returns, are in
L{msa.relay.results}.

L{msa.relay.client.SMTPDownstream} builds the delivery to the core MTA
(connections, STARTTLS, AUTH, the mail transaction) on top of it.

Twisted's own C{ESMTPClient} is not used: it dot-stuffs each 16 KiB chunk on
its own and misses a "." that starts a chunk.
"""

from __future__ import annotations

from collections import deque
from typing import Any, BinaryIO, cast

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, ITCPTransport, ITLSTransport
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import FileSender, LineReceiver
from twisted.python.failure import Failure

from msa._compat import writeEagerly, writeTLSAtOnce
from msa.queue.integrity import Digester, IntegrityError

#: A message up to this size (octets, as stored) is read and sent in one
#: write with its final dot; a larger one streams through a producer,
#: a chunk at a time.  With the producer's first chunk, what is hashed in
#: one turn of the reactor stays well under what the reactor guard of the
#: tests allows (C{tests.reactorguard.HASH_LIMIT}, 128 KiB).
WHOLE_AT_ONCE = 64 * 1024


class DotStuffer:
    """
    Dot-stuffing (RFC 5321 section 4.5.2) of a CRLF message fed in chunks of
    any size: every line that starts with "." gets one more, wherever the
    chunk boundaries fall.
    """

    def __init__(self) -> None:
        # The last two bytes seen; CRLF at the start means "at a line start".
        self._tail = b"\r\n"

    def feed(self, data: bytes) -> bytes:
        """
        @return: C{data}, stuffed.
        """
        if not data:
            return b""
        out = data.replace(b"\r\n.", b"\r\n..")
        if data[:1] == b"." and self._tail == b"\r\n":
            out = b"." + out
        elif data[:2] == b"\n." and self._tail[-1:] == b"\r":
            out = b"\n." + out[1:]
        self._tail = (self._tail + data)[-2:]
        return out

    def finish(self) -> bytes:
        """
        @return: the end of the data: a CRLF if the message did not end with
            one, and the terminating ".CRLF".
        """
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def dotStuff(data: bytes) -> bytes:
    """
    Stuff a whole message and add the terminator (for tests and small data).
    """
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.finish()


@attrs.frozen
class Reply:
    """
    One SMTP reply: its code and its text lines (without the code).
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SMTPClientError(Exception):
    """
    The conversation cannot go on: time-out, garbage from the server, a
    requirement (TLS) not met.  Always a temporary failure.
    """


class SMTPConnectionLost(SMTPClientError):
    """
    The connection went away (closed by the server, reset, or a TLS
    handshake that failed).
    """


class StaleConnection(SMTPClientError):
    """
    A parked connection did not answer the first command of a
    transaction's pipelined group (RSET, or MAIL behind a final dot:
    L{msa.relay.transaction.Probe}), or answered it 421: the core took
    nothing of it, and the message can go over a new connection.
    """


@attrs.define
class _Waiter:
    """
    One caller of L{SMTPClientProtocol.readReply}: its L{Deferred}, and its
    time-out, which runs only while it waits for the very next reply.
    """

    deferred: defer.Deferred[Reply]
    timeout: float
    what: str
    timer: IDelayedCall | None = None

    def stopClock(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class SMTPClientProtocol(LineReceiver):
    """
    The client side of an SMTP connection to the core MTA: L{command} sends
    a line and returns a L{Deferred} firing with the next L{Reply}.

    @ivar tlsStarted: whether L{startTLS} was called (the handshake may
        still fail).
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._replies: deque[Reply] = deque()
        self._partial: list[str] = []
        #: Who waits for the next replies, in the order of their commands:
        #: more than one when a transaction's commands follow the final dot
        #: of the one before (RFC 2920 3.1, L{msa.relay.client}).  Only the
        #: first one's time runs (L{_Waiter}).
        self._waiters: deque[_Waiter] = deque()
        self._lost: Exception | None = None
        self.tlsStarted = False
        self._lostWaiters: list[defer.Deferred[None]] = []
        self._closed = False

    @property
    def _connection(self) -> ITLSTransport:
        """
        The transport: a TCP connection, which can start TLS.
        """
        assert self.transport is not None, "not connected"
        return cast(ITLSTransport, self.transport)

    @property
    def lost(self) -> bool:
        """
        Whether the conversation is over (connection lost, time-out,
        garbage): the protocol cannot be used for another transaction.
        """
        return self._lost is not None

    @property
    def unsolicited(self) -> bool:
        """
        Whether the server said something nobody asked for (e.g. a 421
        while the connection was idle).
        """
        return bool(self._replies or (self._partial and not self._waiters))

    def notifyLost(self) -> defer.Deferred[None]:
        """
        @return: a L{Deferred} firing when the connection is closed.
        """
        if self._closed:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._lostWaiters.append(d)
        return d

    def lineReceived(self, line: bytes) -> None:
        if self._lost is not None:
            # The conversation is over (abandoned, timed out): nobody reads.
            return
        code, sep = line[:3], line[3:4]
        if len(line) < 3 or not code.isdigit() or sep not in (b"", b" ", b"-"):
            self._fail(SMTPClientError(f"malformed reply line {line[:100]!r}"))
            self._connection.abortConnection()
            return
        self._partial.append(line[4:].decode("utf-8", "replace"))
        if sep == b"-":
            return
        reply = Reply(int(code), tuple(self._partial))
        self._partial = []
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.stopClock()
            if self._waiters:
                # The next reply's time starts now, not when it was asked
                # for: the core may take its time over the one before (the
                # data), and a time-out behind it would end the connection
                # under a message the core may have taken.
                self._startClock(self._waiters[0])
            waiter.deferred.callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(SMTPClientError("reply line too long"))
        self._connection.abortConnection()

    def _fail(self, reason: Exception) -> None:
        """
        The conversation is over: every waiter fails with C{reason}, the
        first ones first.
        """
        if self._lost is None:
            self._lost = reason
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.stopClock()
            waiter.deferred.errback(reason)

    def abandon(self, why: str) -> None:
        """
        The client is closing the connection: whoever still waits for a
        reply fails now with L{SMTPConnectionLost}, and replies that
        arrive meanwhile (even in the same read) go to nobody.
        """
        self._fail(SMTPConnectionLost(f"connection closed: {why}"))

    def _startClock(self, waiter: _Waiter) -> None:
        """
        C{waiter} is next: its time-out runs from now.
        """
        waiter.timer = self._reactor.callLater(
            waiter.timeout, self._timedOut, waiter.what, waiter.timeout
        )

    def _timedOut(self, what: str, timeout: float) -> None:
        self._fail(SMTPClientError(f"timed out after {timeout:g}s waiting for {what}"))
        self._connection.abortConnection()

    def readReply(self, timeout: float, what: str = "a reply") -> defer.Deferred[Reply]:
        """
        @return: a L{Deferred} firing with the next L{Reply} (the one after
            those the callers before are waiting for), failing with
            L{SMTPClientError} when the connection is lost, or when that
            reply has not come C{timeout} seconds after the one before it
            (or after now, when no reply before it is owed).
        """
        if self._replies:
            # Queued only while nobody waited: this caller is the first.
            return defer.succeed(self._replies.popleft())
        if self._lost is not None:
            return defer.fail(self._lost)
        waiter = _Waiter(defer.Deferred(), timeout, what)
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._startClock(waiter)
        return waiter.deferred

    def command(self, line: bytes, timeout: float) -> defer.Deferred[Reply]:
        """
        Send one command line and read its reply.
        """
        self.sendLine(line)
        return self.readReply(
            timeout, repr(line.split(b" ", 1)[0].decode("ascii", "replace"))
        )

    def sendLines(self, lines: list[bytes]) -> None:
        """
        Send a group of command lines in one write (RFC 2920 pipelining);
        their replies are read in order with L{readReply}.
        """
        self._connection.write(b"".join(line + self.delimiter for line in lines))

    def startTLS(self, contextFactory: Any) -> None:
        """
        Switch to TLS after the 220 to STARTTLS.  Anything the server sent
        after that reply (before the handshake) is an injection attempt.
        """
        if self.clearLineBuffer() or self._replies or self._partial:
            self._connection.abortConnection()
            raise SMTPClientError("data after the STARTTLS reply: possible injection")
        self.tlsStarted = True
        self._connection.startTLS(contextFactory)
        writeTLSAtOnce(self._connection)

    def sendFile(
        self,
        messageFile: BinaryIO,
        timeout: float,
        digester: Digester | None = None,
        entry: Any = None,
    ) -> defer.Deferred[None]:
        """
        Send C{messageFile}, dot-stuffed and terminated: up to
        L{WHOLE_AT_ONCE} octets in one write with the final dot, a larger
        message streamed through a pull producer, so that only a chunk at
        a time is in memory.

        @param digester: hashes the bytes read from C{messageFile} (before
            stuffing), the one pass over them, and is compared with what
            C{entry} recorded before the final dot: on a mismatch the final
            dot is never sent, the connection is dropped (the server
            discards the unterminated data) and the L{Deferred} fails with
            L{IntegrityError}.
        @return: a L{Deferred} firing when everything is handed to the
            transport.
        """
        stuffer = DotStuffer()
        transform = stuffer.feed
        if digester is not None:

            def transform(data: bytes) -> bytes:
                digester.update(data)
                return stuffer.feed(data)

        def end(last: bytes = b"") -> bytes:
            """
            The rest of the data and the final dot, once the digest is
            known to match.
            """
            if digester is not None:
                mismatch = digester.mismatch(entry)
                if mismatch is not None:
                    self._connection.abortConnection()
                    raise IntegrityError(mismatch)
            return last + stuffer.finish()

        head = messageFile.read(WHOLE_AT_ONCE + 1)
        if len(head) <= WHOLE_AT_ONCE:
            # The whole message in one write with its final dot: no
            # producer, whose pulls each wait for a turn of the reactor.
            try:
                self._connection.write(end(transform(head)))
            except IntegrityError as e:
                return defer.fail(e)
            return defer.succeed(None)
        self._connection.write(transform(head))
        d = FileSender().beginFileTransfer(messageFile, self.transport, transform)

        def finished(_: object) -> None:
            self._connection.write(end())

        def timedOut(_: object, __: float) -> None:
            self._connection.abortConnection()
            raise SMTPClientError(f"timed out after {timeout:g}s sending the message")

        d.addCallback(finished)
        d.addTimeout(timeout, self._reactor, onTimeoutCancel=timedOut)
        return d

    def connectionMade(self) -> None:
        """
        Turn Nagle's algorithm off, as the server side does: a command or
        the last segment of the data must not wait for the core's delayed
        ACK (about 40 ms per message otherwise).  Commands are sent at once
        when nothing is queued before them (L{writeEagerly}).
        """
        super().connectionMade()
        setTcpNoDelay(self.transport)
        writeEagerly(self.transport)
        writeTLSAtOnce(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._closed = True
        self._fail(SMTPConnectionLost(f"connection lost: {reason.getErrorMessage()}"))
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(None)


def setTcpNoDelay(transport: Any) -> bool:
    """
    Set C{TCP_NODELAY} on the TCP connection under C{transport}, which may
    be wrapped in TLS (implicit TLS: a L{TLSMemoryBIOProtocol}, which
    provides the interfaces of the connection it wraps and passes the
    methods it does not have on to it).

    @return: whether C{transport} is a TCP connection.
    """
    if not ITCPTransport.providedBy(transport):
        return False
    transport.setTcpNoDelay(True)
    return True
