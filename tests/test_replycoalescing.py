# -*- test-case-name: tests.test_replycoalescing -*-
"""
L{SubmissionServer} coalesces its replies (issue 20, item 3): the replies
the input loop produces for what one read brought go out in one
C{transport.write} (over TLS: one record, one arming of the socket for
writing), and no reply is ever held while the server waits for the client
or for a L{Deferred}.
"""

from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import Harness


def recordWrites(testCase: unittest.TestCase, harness: Harness) -> list[bytes]:
    """
    Record every C{write} and C{writeSequence} on C{harness}'s transport
    (for the rest of C{testCase}), one entry per call.

    @return: the list the written bytes are appended to.
    """
    transport = harness.transport
    writes: list[bytes] = []
    write, writeSequence = transport.write, transport.writeSequence

    def recordedWrite(data: bytes) -> None:
        writes.append(data)
        write(data)

    def recordedSequence(iovec: list[bytes]) -> None:
        writes.append(b"".join(iovec))
        writeSequence(iovec)

    testCase.patch(transport, "write", recordedWrite)
    testCase.patch(transport, "writeSequence", recordedSequence)
    return writes


class ReplyCoalescingTests(unittest.TestCase):
    def test_pipelinedBatchOneWrite(self):
        """
        MAIL, three RCPT and a NOOP pipelined in one read: their five
        replies reach the transport in one write, in order.
        """
        h = Harness(self)
        h.login()
        writes = recordWrites(self, h)
        h.server.dataReceived(
            b"MAIL FROM:<a@example.nl>\r\n"
            + b"".join(b"RCPT TO:<r%d@example.nl>\r\n" % n for n in range(3))
            + b"NOOP\r\n"
        )
        self.assertEqual(
            writes,
            [b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 3 + b"250 2.0.0 Ok\r\n"],
        )

    def test_multilineReplyOneWrite(self):
        """
        The lines of a multi-line reply (EHLO) go out in one write.
        """
        h = Harness(self)
        writes = recordWrites(self, h)
        h.server.dataReceived(b"EHLO client.example.nl\r\n")
        self.assertEqual(len(writes), 1, writes)
        lines = writes[0].split(b"\r\n")[:-1]
        self.assertEqual(lines[0], b"250-msa.example.nl")
        self.assertEqual(lines[-1], b"250 STARTTLS")
        self.assertTrue(all(line.startswith(b"250-") for line in lines[:-1]))

    def test_singleCommandReplyAtOnce(self):
        """
        A command sent alone is answered before C{dataReceived} returns:
        nothing holds its reply until more input comes.
        """
        h = Harness(self)
        h.transport.clear()
        h.server.dataReceived(b"NOOP\r\n")
        self.assertEqual(h.transport.value(), b"250 2.0.0 Ok\r\n")

    def test_repliesBeforeAWaitAreWritten(self):
        """
        When a reply waits for a L{Deferred}, the replies before it are
        written at once (not held while the server waits), and the waiting
        reply is written as soon as the L{Deferred} fires, with the replies
        of the commands pipelined behind it.
        """
        h = Harness(self)
        h.login()
        pending: list[defer.Deferred[None]] = []

        def slowRecipient(session, recipient, params):
            d: defer.Deferred[None] = defer.Deferred()
            pending.append(d)
            return d

        self.patch(h.server.avatar, "validateTo", slowRecipient)
        h.transport.clear()
        h.server.dataReceived(
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<r@example.nl>\r\nNOOP\r\n"
        )
        self.assertEqual(h.transport.value(), b"250 2.1.0 Ok\r\n")
        h.transport.clear()
        pending[0].callback(None)
        self.assertEqual(h.transport.value(), b"250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n")

    def test_startTLSReplyBeforeTLS(self):
        """
        The 220 to STARTTLS is written before the TLS layer is put in (it
        must go out in plaintext), even though it is produced by the input
        loop.
        """
        h = Harness(self)
        writtenAtStart: list[bytes] = []
        startTLS = h.transport.startTLS

        def recordedStart(contextFactory, *args):
            writtenAtStart.append(h.transport.value())
            startTLS(contextFactory, *args)

        self.patch(h.transport, "startTLS", recordedStart)
        h.transport.clear()
        h.server.dataReceived(b"STARTTLS\r\n")
        self.assertEqual(writtenAtStart, [b"220 2.0.0 Ready to start TLS\r\n"])

    def test_lastWordBeforeClose(self):
        """
        The 221 to QUIT, produced inside the loop, is written before the
        connection is closed.
        """
        h = Harness(self)
        writtenAtClose: list[bytes] = []
        loseConnection = h.transport.loseConnection

        def recordedClose():
            writtenAtClose.append(h.transport.value())
            loseConnection()

        self.patch(h.transport, "loseConnection", recordedClose)
        h.transport.clear()
        h.server.dataReceived(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(writtenAtClose, [b"221 2.0.0 Bye\r\n"])
        self.assertEqual(h.transport.value(), b"221 2.0.0 Bye\r\n")
