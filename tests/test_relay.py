# -*- test-case-name: tests.test_relay -*-
"""
Tests for L{msa.relay.runner}: the queue runner's retry logic with a fake
clock and downstream, and the runner with the SMTP downstream on the real
reactor.  The SMTP client itself is tested in L{tests.test_relay_client},
the outbox in L{tests.test_outbox}, the queue control in
L{tests.test_queue_control}.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from msa.queue.control import QueueControl
from msa.queue.spool import DELIVERED, FAILED, PENDING, Spool
from msa.relay.client import SMTPDownstream
from msa.relay.results import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
)
from msa.relay.runner import RelayRunner
from msa.tls import clientContextFactory
from tests.downstream import DownstreamServer
from tests.relaydata import (
    DOTTY,
    RunnerFixture,
    allWith,
    bigMessage,
    makeEnvelope,
)
from tests.waiting import waitUntil


class RelayRunnerTests(RunnerFixture, unittest.TestCase):
    """
    Scheduling and state logic with a fake clock and downstream.
    """

    def setUp(self):
        super().setUp()
        self.failures = []
        self.runner.onPermanentFailure = lambda e, r, reply: self.failures.append(
            (e.queueId, r, reply)
        )

    def test_wakeDelivers(self):
        """
        A new message goes out promptly and leaves the spool only after the
        core's 250.
        """
        self.runner.startService()
        queueId = self.queue()
        self.assertEqual(self.downstream.calls, [])
        self.clock.advance(0)
        [(entry, data, d)] = self.downstream.calls
        self.assertEqual(entry.queueId, queueId)
        self.assertEqual(data, DOTTY)
        self.assertEqual(self.spool.pending(), [queueId])
        d.callback(allWith(entry, ACCEPTED, 250, "queued as X"))
        self.assertEqual(self.spool.pending(), [])

    def test_startSchedulesPending(self):
        first = self.queue()
        second = self.queue()
        entry = self.spool.load(second)
        entry.nextAttempt = self.clock.seconds() + 100
        self.spool.update(entry)
        self.runner.startService()
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first])
        self.clock.advance(100)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first, second])

    def test_temporaryFailureRetried(self):
        """
        451: attempts incremented, lastError and nextAttempt set with
        exponential back-off, delivered again later.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        start = self.clock.seconds()
        for attempt, base in ((1, 60), (2, 120), (3, 240)):
            entry, _, d = self.downstream.calls[-1]
            d.callback(allWith(entry, TEMPORARY, 451, "4.3.0 try later"))
            saved = self.spool.load(queueId)
            self.assertEqual(saved.attempts, attempt)
            self.assertEqual(saved.lastError, "451 4.3.0 try later")
            self.assertEqual(saved.recipients, {"bob@example.org": PENDING})
            delay = saved.nextAttempt - self.clock.seconds()
            self.assertTrue(base * 0.9 <= delay <= base * 1.1, (attempt, delay))
            self.clock.advance(base * 0.9 - 0.001)
            self.assertEqual(len(self.downstream.calls), attempt)
            self.clock.advance(base * 0.2)
            self.assertEqual(len(self.downstream.calls), attempt + 1)
        self.assertGreater(self.clock.seconds(), start)

    def test_retryDelayCapped(self):
        for attempts in (7, 8, 20):
            self.assertLessEqual(self.runner.retryDelay(attempts), 3600 * 1.1)
            self.assertGreaterEqual(self.runner.retryDelay(attempts), 3600 * 0.9)

    def test_partialSuccess(self):
        """
        550 on one of two recipients: the other is delivered, the refused
        one failed, and the entry is removed; a temporary one stays.
        """
        self.runner.startService()
        queueId = self.queue(("a@example.org", "b@example.org", "c@example.org"))
        self.clock.advance(0)
        entry, _, d = self.downstream.calls[0]
        d.callback(
            DeliveryResult(
                {
                    "a@example.org": RecipientResult(PERMANENT, 550, "5.1.1 unknown"),
                    "b@example.org": RecipientResult(ACCEPTED, 250, "ok"),
                    "c@example.org": RecipientResult(TEMPORARY, 452, "4.2.2 full"),
                },
                "250 ok",
            )
        )
        self.assertEqual(self.failures, [(queueId, ["a@example.org"], "250 ok")])
        saved = self.spool.load(queueId)
        self.assertEqual(
            saved.recipients,
            {
                "a@example.org": FAILED,
                "b@example.org": DELIVERED,
                "c@example.org": PENDING,
            },
        )
        self.assertEqual(saved.errors["a@example.org"], "550 5.1.1 unknown")
        self.clock.advance(70)
        entry, _, d = self.downstream.calls[1]
        self.assertEqual(entry.pendingRecipients(), ["c@example.org"])
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual(self.spool.pending(), [])

    def test_permanentOnly(self):
        self.runner.startService()
        queueId = self.queue(("a@example.org", "b@example.org"))
        self.clock.advance(0)
        entry, _, d = self.downstream.calls[0]
        d.callback(
            DeliveryResult(
                {
                    "a@example.org": RecipientResult(PERMANENT, 550, "no"),
                    "b@example.org": RecipientResult(ACCEPTED, 250, "ok"),
                },
                "250 ok",
            )
        )
        self.assertEqual(self.failures, [(queueId, ["a@example.org"], "250 ok")])
        self.assertEqual(self.spool.pending(), [])

    def test_expiry(self):
        self.runner.maxLifetime = 300
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        for _ in range(10):
            if not self.downstream.calls[-1][2].called:
                entry, _, d = self.downstream.calls[-1]
                d.callback(allWith(entry, TEMPORARY, 421, "down"))
            self.clock.advance(3600)
        self.assertEqual(self.spool.pending(), [])
        [(failedId, recipients, reply)] = self.failures
        self.assertEqual((failedId, recipients), (queueId, ["bob@example.org"]))
        self.assertIn("expired", reply)
        self.assertLessEqual(len(self.downstream.calls), 4)

    def test_concurrencyAndOnePerMessage(self):
        self.runner.concurrency = 2
        self.runner.startService()
        ids = [self.queue() for _ in range(3)]
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], ids[:2])
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual([c[0].queueId for c in self.downstream.calls], ids)

    def test_slotFreedAtTheFinalDot(self):
        """
        When the downstream says the message is all sent and its
        connection free for the next (C{dataSent}), the delivery slot goes
        to the next message at once; the first stays in flight until the
        core has answered and its outcome is recorded.
        """
        self.runner.concurrency = 1
        self.runner.startService()
        first, second, third = self.queue(), self.queue(), self.queue()
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first])
        self.downstream.dataSent[0]()
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first, second])
        self.assertTrue(self.runner.isInFlight(first))
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertFalse(self.runner.isInFlight(first))
        self.assertEqual(self.spool.pending(), [second, third])
        # One slot: the third waits for the second's dot (or its outcome).
        self.assertEqual(len(self.downstream.calls), 2)
        entry, _, d = self.downstream.calls[1]
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual([c[0].queueId for c in self.downstream.calls][-1], third)

    def test_slotKeptWhileReceiving(self):
        """
        While a message is being received (a writer is open), the slot is
        not freed at the final dot but when the core has answered:
        submissions first.  Once no message is being received, the next
        dot frees it again.
        """
        self.runner.concurrency = 1
        self.runner.startService()
        ids = [self.queue() for _ in range(3)]
        self.clock.advance(0)
        receiving = self.spool.newMessage(makeEnvelope(("bob@example.org",)))
        self.assertEqual(self.spool.receiving, 1)
        self.downstream.dataSent[0]()
        self.assertEqual([c[0].queueId for c in self.downstream.calls], ids[:1])
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual([c[0].queueId for c in self.downstream.calls], ids[:2])
        receiving.abort()
        self.assertEqual(self.spool.receiving, 0)
        self.downstream.dataSent[1]()
        self.assertEqual([c[0].queueId for c in self.downstream.calls], ids)

    def test_slotFreedWhileTheOutcomeIsRecorded(self):
        """
        Once the core has answered, the delivery slot goes to the next
        message while the first one's outcome is still being recorded (its
        removal waiting for the disk); the first stays in flight for the
        queue control and for L{RelayRunner.stopService} until then.
        """
        self.runner.concurrency = 1
        removals: dict[str, defer.Deferred[None]] = {}

        def slowRemoval(queueId):
            removals[queueId] = defer.Deferred()
            return removals[queueId]

        self.spool.removeDelivered = slowRemoval
        self.runner.startService()
        first, second = self.queue(), self.queue()
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first])
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual(list(removals), [first])
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first, second])
        self.assertTrue(self.runner.isInFlight(first))
        entry, _, d = self.downstream.calls[1]
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        stopped = self.runner.stopService()
        removals[second].callback(None)
        self.assertNoResult(stopped)
        removals[first].callback(None)
        self.successResultOf(stopped)
        self.assertFalse(self.runner.isInFlight(first))

    def test_downstreamError(self):
        """
        A downstream that fails outright is a temporary failure.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.downstream.calls[0][2].errback(RuntimeError("boom"))
        self.assertEqual(self.spool.load(queueId).attempts, 1)
        self.flushLoggedErrors(RuntimeError)

    def test_stopWaitsForInFlight(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        stopped = self.runner.stopService()
        self.assertNoResult(stopped)
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, TEMPORARY, 421, "down"))
        self.successResultOf(stopped)
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.assertEqual(self.spool.pending(), [queueId])
        self.queue()
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 1)

    def test_stopBounded(self):
        self.runner.startService()
        self.queue()
        self.clock.advance(0)
        stopped = self.runner.stopService()
        self.clock.advance(self.runner.stopTimeout)
        self.successResultOf(stopped)


class EndToEndTests(unittest.TestCase):
    """
    Spool, runner and SMTP downstream together, on the real reactor.
    """

    timeout = 15

    @defer.inlineCallbacks
    def test_deliveredThenRemoved(self):
        server = DownstreamServer(self.mktemp())
        port = server.start()
        self.addCleanup(server.stop)
        server.rcptReplies = {"refused@example.org": (550, "5.1.1 unknown")}
        spool = Spool(self.mktemp())
        downstream = SMTPDownstream(
            "127.0.0.1",
            port,
            contextFactory=clientContextFactory("localhost", caFile=server.caFile),
            commandTimeout=5,
        )
        runner = RelayRunner(spool, downstream)
        runner.startService()
        self.addCleanup(runner.stopService)
        writer = spool.newMessage(
            makeEnvelope(("bob@example.org", "refused@example.org"))
        )
        data = bigMessage()
        writer.write(data)
        queueId = yield writer.commit()
        [message] = yield server.waitForMessages(1)
        self.assertEqual(message.data, data)
        self.assertEqual(message.recipients, ["bob@example.org"])
        msgPath = os.path.join(spool.queueDirectory, queueId + ".msg")
        # The message file goes in a thread after the state file (and the
        # directory fsync): wait for both.
        yield waitUntil(
            lambda: not spool.pending() and not os.path.exists(msgPath),
            what="an empty queue and the message file removed",
        )
        self.assertEqual(spool.pending(), [])
        self.assertFalse(os.path.exists(msgPath))


class EndToEndFailureTests(unittest.TestCase):
    """
    Temporary failures through the runner on the real reactor: the entry
    stays queued with its retry state.
    """

    timeout = 15

    @defer.inlineCallbacks
    def runOnce(self, server):
        port = server.start()
        self.addCleanup(server.stop)
        spool = Spool(self.mktemp())
        downstream = SMTPDownstream(
            "127.0.0.1",
            port,
            contextFactory=clientContextFactory("localhost", caFile=server.caFile),
            commandTimeout=5,
        )
        runner = RelayRunner(spool, downstream)
        runner.startService()
        self.addCleanup(runner.stopService)
        writer = spool.newMessage(makeEnvelope())
        writer.write(DOTTY)
        before = reactor.seconds()
        queueId = yield writer.commit()

        def attempted():
            entry = spool.load(queueId)
            return entry if entry.attempts else None

        entry = yield waitUntil(attempted, what=f"a first attempt of {queueId}")
        after = reactor.seconds()
        self.assertEqual(spool.pending(), [queueId])
        self.assertEqual(entry.attempts, 1)
        self.assertEqual(entry.recipients, {"bob@example.org": PENDING})
        # The first retry comes 60 s +-10% after the attempt, which was made
        # between the commit and now (not "60 s from now": a jitter near
        # -10% and a slow check made that fail).
        self.assertTrue(before + 54 <= entry.nextAttempt <= after + 66)
        self.assertEqual(server.messages, [])
        return entry

    @defer.inlineCallbacks
    def test_mail451(self):
        server = DownstreamServer(self.mktemp())
        server.mailReply = (451, "4.3.0 try again later")
        entry = yield self.runOnce(server)
        self.assertIn("451 4.3.0 try again later", entry.lastError)

    @defer.inlineCallbacks
    def test_noStartTLS(self):
        server = DownstreamServer(self.mktemp(), tlsMode="none")
        entry = yield self.runOnce(server)
        self.assertIn("STARTTLS", entry.lastError)
        self.assertEqual(server.plaintextCommands(), [b"EHLO localhost"])


class QueueRunnerInterfaceTests(RunnerFixture, unittest.TestCase):
    """
    What the runner offers its queue control
    (L{msa.queue.control.QueueRunner}), with a fake clock and downstream.
    """

    def test_control(self):
        """
        The runner owns one queue control, on its spool.
        """
        self.assertIsInstance(self.runner.control, QueueControl)
        self.assertIs(self.runner.control.spool, self.spool)

    def test_isInFlight(self):
        self.runner.startService()
        queueId = self.queue()
        self.assertFalse(self.runner.isInFlight(queueId))
        self.clock.advance(0)
        self.assertTrue(self.runner.isInFlight(queueId))
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, TEMPORARY, 451, "4.3.0 later"))
        self.assertFalse(self.runner.isInFlight(queueId))

    def test_attemptNowStopped(self):
        """
        A stopped runner attempts nothing; a running one at once.
        """
        queueId = self.queue()
        self.runner.attemptNow(queueId)
        self.clock.advance(0)
        self.assertEqual(self.downstream.calls, [])
        self.runner.startService()
        self.clock.advance(0)
        self.downstream.calls.pop()[2].callback(
            allWith(self.spool.load(queueId), TEMPORARY, 451, "4.3.0 later")
        )
        self.runner.attemptNow(queueId)
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [queueId])

    def test_unschedule(self):
        """
        An unscheduled entry is not attempted when it falls due.
        """
        self.runner.startService()
        queueId = self.queue()
        self.runner.unschedule(queueId)
        self.clock.advance(100000)
        self.assertEqual(self.downstream.calls, [])
        self.assertEqual(self.spool.pending(), [queueId])

    def test_isUnremovable(self):
        queueId = self.queue()
        self.assertFalse(self.runner.isUnremovable(queueId))
        self.runner.unremovable[queueId] = "read-only"
        self.assertTrue(self.runner.isUnremovable(queueId))
