# -*- test-case-name: tests.test_pop3_retrieval -*-
"""
RETR and TOP (RFC 1939 7): a message streams from its file to the
transport in blocks read on the thread pool, dot-stuffed on the way, with
the transport's flow control (a streaming producer), so memory stays
bounded whatever the message's size and however slowly the client reads.
A message is never loaded whole.

L{MessageFilter} is the pure part (bytes in, bytes out): dot-stuffing, the
final CRLF and, for TOP, the header and the first lines of the body.
"""

from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: Bytes read from the message file at a time.
BLOCK_SIZE = 64 * 1024


class MessageFilter:
    """
    Turns a message's bytes, block by block, into the lines of a POP3
    multi-line response: a line that starts with C{.} gets another
    (RFC 1939 3), the last line ends with CRLF, and with C{bodyLines} set
    (TOP) only the header, the empty line and that many body lines pass.

    @ivar done: whether nothing more can pass (TOP's lines are out); the
        caller stops reading.
    """

    def __init__(self, bodyLines: int | None = None) -> None:
        self._bodyLines = bodyLines
        self._atLineStart = True
        self._inHeader = True
        #: The current line's bytes so far, for TOP (which must see lines).
        self._partial = b""
        self._wroteAny = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """
        The next block of the message; returns what may be sent of it.
        """
        if self.done or not data:
            return b""
        if self._bodyLines is None:
            out = self._stuff(data)
        else:
            out = self._top(data)
        if out:
            self._wroteAny = True
            self._atLineStart = out.endswith(b"\n")
        return out

    def _stuff(self, data: bytes) -> bytes:
        out = data.replace(b"\n.", b"\n..")
        if self._atLineStart and out.startswith(b"."):
            out = b"." + out
        return out

    def _top(self, data: bytes) -> bytes:
        pieces = []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._inHeader:
                if line in (b"", b"\r"):
                    self._inHeader = False
            elif self._bodyLines == 0:
                self.done = True
                break
            else:
                assert self._bodyLines is not None
                self._bodyLines -= 1
            pieces.append(
                b"." + line + b"\n" if line.startswith(b".") else line + b"\n"
            )
            if not self._inHeader and self._bodyLines == 0:
                self.done = True
                break
        return b"".join(pieces)

    def finish(self) -> bytes:
        """
        The end of the message: what is left, its CRLF if it had none, and
        the terminating C{.} line.
        """
        out = b""
        if self._partial and not self.done:
            line = self._partial
            out = (b"." + line) if line.startswith(b".") else line
            self._wroteAny = True
            self._atLineStart = False
        self._partial = b""
        if self._wroteAny and not self._atLineStart:
            out += b"\r\n"
        return out + b".\r\n"


@implementer(IPushProducer)
class MessageStream:
    """
    Sends one message, filtered by a L{MessageFilter}, to a transport: one
    block is read (with C{runBlocking}: in a thread) only when the transport
    has taken the previous one, so at most one block and the transport's
    buffer are in memory.

    @param progress: called after each block is written (the session's
        idle deadline counts progress, not a client that stopped reading).
    """

    def __init__(
        self,
        runBlocking: Callable[..., defer.Deferred],
        source: BinaryIO,
        transport: Any,
        messageFilter: MessageFilter,
        progress: Callable[[], None] = lambda: None,
    ) -> None:
        self._runBlocking = runBlocking
        self._source = source
        self._transport = transport
        self._filter = messageFilter
        self._progress = progress
        self._paused: defer.Deferred[None] | None = None
        self._stopped = False

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()

    def _read(self) -> defer.Deferred[bytes]:
        return self._runBlocking(self._source.read, BLOCK_SIZE)

    @defer.inlineCallbacks
    def send(self) -> Any:
        """
        Stream the message.

        @return: a L{Deferred} firing with C{True} when the whole response,
            terminating line included, was handed to the transport, C{False}
            when the connection went away first.
        """
        self._transport.registerProducer(self, True)
        try:
            while not self._stopped and not self._filter.done:
                block = yield self._read()
                if not block or self._stopped:
                    break
                out = self._filter.feed(block)
                if out:
                    self._transport.write(out)
                self._progress()
                if self._paused is not None:
                    yield self._paused
            if self._stopped:
                return False
            self._transport.write(self._filter.finish())
            return True
        finally:
            self._closeSource()
            if not self._stopped:
                self._transport.unregisterProducer()

    def _closeSource(self) -> None:
        # Closing a file does no disk write: safe on the reactor thread.
        self._source.close()
