"""
RETR and TOP's streaming (L{msa.pop3.retrieval}): the pure filter against
a whole-message reference at every block boundary, and the stream's flow
control: a block is read only when the transport took the previous one.
"""

import io
import itertools

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from msa.pop3.retrieval import BLOCK_SIZE, MessageFilter, MessageStream

MESSAGE = (
    b".Header: starts with a dot\r\nSubject: x\r\n\r\n.\r\n..\r\nbody . line\r\n.last"
)


def reference(message: bytes, bodyLines: int | None = None) -> bytes:
    """
    The response body computed line by line on the whole message.
    """
    lines = message.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    if bodyLines is not None:
        end = lines.index(b"") + 1 + bodyLines
        lines = lines[:end]
    out = b"".join(
        (b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines
    )
    return out + b".\r\n"


def filtered(blocks, bodyLines=None) -> bytes:
    f = MessageFilter(bodyLines)
    out = b""
    for block in blocks:
        out += f.feed(block)
        if f.done:
            break
    return out + f.finish()


class MessageFilterTests(unittest.TestCase):
    def test_everySplit(self):
        """
        Cut anywhere, twice, the output is the same as for the whole
        message: dot-stuffing sees line starts across blocks, the final
        CRLF is added once.
        """
        expected = reference(MESSAGE)
        self.assertEqual(filtered([MESSAGE]), expected)
        for i, j in itertools.combinations(range(len(MESSAGE) + 1), 2):
            blocks = [MESSAGE[:i], MESSAGE[i:j], MESSAGE[j:]]
            self.assertEqual(filtered(blocks), expected, (i, j))

    def test_topEverySplit(self):
        for n in range(4):
            expected = reference(MESSAGE, n)
            for i in range(len(MESSAGE) + 1):
                self.assertEqual(
                    filtered([MESSAGE[:i], MESSAGE[i:]], n), expected, (n, i)
                )

    def test_topPastTheEnd(self):
        self.assertEqual(filtered([MESSAGE], 100), reference(MESSAGE))

    def test_empty(self):
        self.assertEqual(filtered([b""]), b".\r\n")


class PausingTransport(StringTransport):
    """
    A transport whose buffer is full after every write: it pauses its
    producer, as a TCP transport does for a client that reads slowly.
    """

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()


class CountingSource(io.BytesIO):
    reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        return super().read(size)


class MessageStreamTests(unittest.TestCase):
    def test_flowControl(self):
        """
        While the transport is paused nothing more is read: memory holds
        one block, whatever the message's size.
        """
        data = b"x" * 78 + b"\r\n"
        message = data * (5 * BLOCK_SIZE // len(data))
        source = CountingSource(message)
        transport = PausingTransport()
        stream = MessageStream(defer.maybeDeferred, source, transport, MessageFilter())
        done = stream.send()
        self.assertEqual(source.reads, 1)
        self.assertEqual(len(transport.value()), BLOCK_SIZE)
        stream.resumeProducing()
        self.assertEqual(source.reads, 2)
        while not done.called:
            stream.resumeProducing()
        self.assertTrue(self.successResultOf(done))
        self.assertEqual(transport.value(), message + b".\r\n")
        self.assertTrue(source.closed)
        self.assertIsNone(transport.producer)

    def test_stopped(self):
        """
        The connection went away mid-message: the stream ends, the file
        is closed, and the caller hears it was not sent whole.
        """
        source = CountingSource(b"y\r\n" * BLOCK_SIZE)
        transport = PausingTransport()
        stream = MessageStream(defer.maybeDeferred, source, transport, MessageFilter())
        done = stream.send()
        stream.stopProducing()
        self.assertFalse(self.successResultOf(done))
        self.assertTrue(source.closed)
        self.assertEqual(source.reads, 1)
