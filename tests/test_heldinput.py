# -*- test-case-name: tests.test_heldinput -*-
"""
Input while a reply is held (issue 9 item 8): during a failed login's delay
or a message's commit the session stops reading from the client, so
pipelined input waits in the kernel and the client's socket, not in the
MSA's memory; should a transport not pause, more than
L{msa.submission.server.MAX_HELD_INPUT} held ends the session with 421 4.7.0.  And the
DATA path takes each buffered byte a bounded number of times.

Over a real socket against the assembled daemon (100 x 64 KiB sent while
AUTH is delayed), and with the protocol on a string transport for the exact
edges.
"""

import base64

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from msa.submission.framing import LineFramer
from msa.submission.server import MAX_HELD_INPUT, SubmissionServer
from tests.e2e import RunningMSA
from tests.helpers import Harness
from tests.sessionclient import RawSession, sessionRegistry
from tests.test_hangup import BODY, HeldCommit

BAD_PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0guess") + b"\r\n"
NOT_VALID = b"535 5.7.8 Authentication credentials invalid"

#: The most a session may hold after it paused reading: the rest of what
#: the transport had already read (one read of 64 KiB, TLS records).
HELD_BOUND = 256 * 1024


class HeldInputProtocolTests(unittest.TestCase):
    def heldLogin(self) -> Harness:
        """
        A session whose failed login's 535 is pending (not yet sent).
        """
        h = Harness(self)
        h.startTLS()
        h.transport.clear()
        h.server.dataReceived(BAD_PLAIN)
        self.assertEqual(h.server._waiting, 1)
        return h

    def test_pausedWhileReplyHeld(self):
        """
        Reading stops when input arrives behind the held reply, and resumes
        once the reply is sent; a client that waits for the reply (nothing
        arrives) costs no pause at all.
        """
        h = self.heldLogin()
        self.assertEqual(h.transport.producerState, "producing")
        h.server.dataReceived(b"NOOP\r\n" * 3)
        self.assertEqual(h.transport.producerState, "paused")
        self.assertEqual(h.transport.value(), b"")
        h.clock.advance(0)
        self.assertEqual(
            h.transport.value().split(b"\r\n")[:-1], [NOT_VALID] + [b"250 2.0.0 Ok"] * 3
        )
        self.assertEqual(h.transport.producerState, "producing")

    def test_heldInputEdge(self):
        """
        Exactly L{MAX_HELD_INPUT} octets held is allowed; one more ends the
        session with 421, and the held 535 is never sent after it.
        """
        h = self.heldLogin()
        h.server.dataReceived(b"x" * (MAX_HELD_INPUT - 2) + b"\r\n")
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.server.framer.buffered, MAX_HELD_INPUT)
        h.server.dataReceived(b"N")
        self.assertEqual(
            h.transport.value(),
            b"421 4.7.0 msa.example.nl Error: too much pipelined input\r\n",
        )
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.server.framer.buffered, 0)
        h.transport.clear()
        h.clock.advance(30)
        self.assertEqual(h.transport.value(), b"")

    def test_atEdgeProcessedAfterReply(self):
        h = self.heldLogin()
        h.server.dataReceived(b"x" * (MAX_HELD_INPUT - 8) + b"\r\nNOOP\r\n")
        h.clock.advance(0)
        self.assertEqual(
            h.transport.value().split(b"\r\n")[:-1],
            [NOT_VALID, b"500 5.5.6 Error: line too long", b"250 2.0.0 Ok"],
        )

    def test_pausedDuringCommit(self):
        h = Harness(self)
        h.login()
        h.transaction()
        held = HeldCommit(h)
        self.assertEqual(h.send(BODY + b".\r\nNOOP\r\n"), [])
        self.assertEqual(h.transport.producerState, "paused")
        held.fire()
        self.assertEqual(
            h.transport.value().split(b"\r\n")[:-1],
            [b"250 2.0.0 Ok: queued as Q0001", b"250 2.0.0 Ok"],
        )
        self.assertEqual(h.transport.producerState, "producing")

    def test_notPausedForImmediateReplies(self):
        """
        MAIL and RCPT whose checks answer at once never pause reading.
        """
        h = Harness(self)
        h.login()
        states = []
        h.transport.pauseProducing = lambda: states.append("paused")
        h.send(b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n")
        self.assertEqual(states, [])


class CountingFramer(LineFramer):
    def __init__(self):
        super().__init__()
        self.judged = 0

    def completeLines(self) -> bytes:
        block = super().completeLines()
        self.judged += len(block)
        return block


class DataPathLinearTests(unittest.TestCase):
    """
    When a run of lines cannot go as one block (a bare LF at its end), its
    lines go one by one: the buffered run is not judged again for each
    line, which made a 64 KiB packet cost 64 KiB per line.
    """

    def test_declinedBlockJudgedOnce(self):
        h = Harness(self)
        h.server.framer = framer = CountingFramer()
        h.login()
        h.transaction()
        data = b"short line of text\r\n" * 3000 + b"bare\nLF\r\n"
        self.assertEqual(h.send(data), [])
        self.assertLessEqual(framer.judged, 2 * len(data))
        [reply] = h.send(b".\r\n")
        self.assertTrue(reply.startswith(b"550 5.5.2 "))

    def test_contentPolicyNeverJudgesBlocks(self):
        """
        A message a content policy reads line by line is never offered as
        a block.
        """
        h = Harness(self)
        h.server.framer = framer = CountingFramer()
        h.login()
        h.transaction()
        h.server.transaction.message._checker = object()
        self.assertFalse(h.server.transaction.message.acceptsBlocks)
        h.server.transaction.dataBlock()
        self.assertEqual(framer.judged, 0)


class FloodWhileLoginDelayedTests(unittest.TestCase):
    """
    100 x 64 KiB pipelined while a failed login's 535 is delayed: the
    session stops reading, holds at most L{HELD_BOUND} octets, and then
    goes on correctly.
    """

    @defer.inlineCallbacks
    def test_floodBounded(self):
        records = []
        original = SubmissionServer.dataReceived

        def recording(server, data):
            waiting = server._waiting
            original(server, data)
            records.append((waiting, len(data), server.framer.buffered))

        self.patch(SubmissionServer, "dataReceived", recording)
        msa = RunningMSA(self, server={"auth_delay_base": 2})
        registry = sessionRegistry(msa.service)
        observed = []

        def poll():
            for session in registry.sessions:
                observed.append(
                    (session._waiting, session._paused, session.framer.buffered)
                )

        poller = task.LoopingCall(poll)
        poller.start(0.01)
        self.addCleanup(lambda: poller.running and poller.stop())

        def talk():
            client = RawSession(msa.starttlsPort, msa.clientContext())
            try:
                client.secure()
                first = client.command(BAD_PLAIN[:-2])
                client.settimeout(60)
                # The second failure is delayed 2 s; meanwhile the flood.
                client.send(BAD_PLAIN)
                for _ in range(100):
                    client.send(b"x" * 65536)
                client.send(b"\r\nNOOP\r\nQUIT\r\n")
                return first, client.readUntilClosed()
            finally:
                client.close()

        first, replies = yield threads.deferToThread(talk)
        poller.stop()
        self.assertEqual(first, NOT_VALID)
        self.assertEqual(
            replies,
            [
                NOT_VALID,
                b"500 5.5.6 Error: line too long",
                b"250 2.0.0 Ok",
                b"221 2.0.0 Bye",
            ],
        )
        # All of it reached the session, but only after the delay.
        self.assertGreater(sum(size for _, size, _ in records), 100 * 65536)
        heldDelivered = sum(size for waiting, size, _ in records if waiting)
        self.assertLessEqual(heldDelivered, HELD_BOUND)
        self.assertLessEqual(max(buffered for _, _, buffered in records), HELD_BOUND)
        # The delay was seen, reading paused whenever input was held (not
        # before the flood came: nothing to hold), and little held.
        held = [(paused, buffered) for waiting, paused, buffered in observed if waiting]
        self.assertTrue(any(buffered for _, buffered in held), held)
        self.assertTrue(all(paused for paused, buffered in held if buffered), held)
        self.assertLessEqual(max(buffered for _, buffered in held), HELD_BOUND)
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(msa.outboxFiles(), [])
