# -*- test-case-name: tests.test_queue_control -*-
"""
Tests for L{msa.queue.control}: the operator's hold, release, flush, delete
and describe on L{QueueControl}, against a fake queue runner, and through a
real L{msa.relay.runner.RelayRunner} with a fake clock and downstream.
"""

import os

from twisted.internet import task
from twisted.trial import unittest

from msa.queue.spool import DELIVERED, PENDING, Spool
from msa.relay.protocol import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
)
from msa.relay.runner import RelayRunner
from tests.relaydata import DOTTY, FakeDownstream, allWith, makeEnvelope


class QueueControlTests(unittest.TestCase):
    """
    flush, hold, release, delete and describe, with a fake clock.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), reactor=self.clock)
        self.downstream = FakeDownstream()
        self.runner = RelayRunner(self.spool, self.downstream, reactor=self.clock)

    def queue(self, recipients=("bob@example.org",)):
        writer = self.spool.newMessage(makeEnvelope(recipients))
        writer.write(DOTTY)
        return self.successResultOf(writer.commit())

    def fail451(self):
        entry, _, d = self.downstream.calls[-1]
        d.callback(allWith(entry, TEMPORARY, 451, "4.3.0 later"))
        return entry.queueId

    def test_describe(self):
        self.runner.startService()
        first = self.queue(("a@example.org", "b@example.org"))
        self.clock.advance(0)
        entry, _, d = self.downstream.calls[0]
        d.callback(
            DeliveryResult(
                {
                    "a@example.org": RecipientResult(ACCEPTED, 250, "ok"),
                    "b@example.org": RecipientResult(TEMPORARY, 452, "4.2.2 full"),
                },
                "250 ok",
            )
        )
        self.clock.advance(10)
        second = self.queue()
        self.runner.control.hold(second)
        [a, b] = self.runner.control.describe()
        self.assertEqual(a["id"], first)
        self.assertEqual(a["age"], 10)
        self.assertEqual(a["size"], len(DOTTY))
        self.assertEqual(a["sender"], "alice@example.com")
        self.assertEqual(
            a["recipients"], {"a@example.org": DELIVERED, "b@example.org": PENDING}
        )
        self.assertEqual(a["errors"], {"b@example.org": "452 4.2.2 full"})
        self.assertEqual(a["attempts"], 1)
        self.assertGreater(a["nextAttempt"], self.clock.seconds())
        self.assertEqual(a["lastError"], "250 ok")
        self.assertFalse(a["held"])
        self.assertFalse(a["inFlight"])
        self.assertEqual((b["id"], b["held"], b["attempts"]), (second, True, 0))

    def test_flush(self):
        self.runner.startService()
        first = self.queue()
        self.clock.advance(0)
        self.fail451()
        second = self.queue()
        self.clock.advance(0)
        self.fail451()
        self.assertEqual(self.runner.control.flush(first), [first])
        self.assertEqual(self.spool.load(first).nextAttempt, self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual(self.downstream.calls[-1][0].queueId, first)
        self.fail451()
        self.assertEqual(self.runner.control.flush(), [first, second])
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 5)

    def test_flushInFlight(self):
        """
        Flushing a message in flight: attempted again right after.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.assertEqual(self.runner.control.flush(), [queueId])
        self.fail451()
        self.assertEqual(self.spool.load(queueId).nextAttempt, self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 2)

    def test_hold(self):
        """
        A held message is not attempted, not by flush either, and stays
        held across a restart; release attempts it at once.
        """
        queueId = self.queue()
        other = self.queue()
        self.runner.control.hold(queueId)
        self.assertTrue(self.spool.load(queueId).held)
        self.runner.startService()
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [other])
        # The other one is in flight: flushed, to be tried again at once.
        self.assertEqual(self.runner.control.flush(), [other])
        self.assertEqual(self.runner.control.flush(queueId), [])
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.runner.control.release(queueId)
        self.assertFalse(self.spool.load(queueId).held)
        self.clock.advance(0)
        self.assertEqual(self.downstream.calls[-1][0].queueId, queueId)

    def test_holdScheduled(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.fail451()
        self.runner.control.hold(queueId)
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)

    def test_holdInFlight(self):
        """
        Held while in flight: the attempt finishes, its outcome is kept,
        and the message is not retried until released.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.runner.control.hold(queueId)
        self.fail451()
        saved = self.spool.load(queueId)
        self.assertTrue(saved.held)
        self.assertEqual(saved.attempts, 1)
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.runner.control.release(queueId)
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 2)

    def test_releaseInFlight(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.runner.control.hold(queueId)
        self.runner.control.release(queueId)
        self.fail451()
        self.assertFalse(self.spool.load(queueId).held)
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 2)

    def test_delete(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.fail451()
        self.runner.control.delete(queueId)
        self.assertEqual(self.spool.pending(), [])
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.assertRaises(KeyError, self.runner.control.delete, queueId)

    def test_deleteInFlight(self):
        """
        Deleted while in flight: gone at once, and the outcome (here a
        permanent failure) is ignored: no state written back, no DSN.
        """
        failures = []
        self.runner.onPermanentFailure = lambda *a: failures.append(a)
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.runner.control.delete(queueId)
        self.assertEqual(self.spool.pending(), [])
        self.assertEqual(self.runner.control.describe(), [])
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, PERMANENT, 550, "5.1.1 no"))
        self.assertEqual(failures, [])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)

    def test_unknown(self):
        self.runner.startService()
        for bad in ("0000000000000ABCDE", "../../etc/passwd", "", None):
            for method in (
                self.runner.control.flush,
                self.runner.control.hold,
                self.runner.control.release,
                self.runner.control.delete,
            ):
                if bad is None and method == self.runner.control.flush:
                    continue  # flush(None) is "flush all"
                with self.assertRaises(KeyError) as e:
                    method(bad)
                self.assertEqual(e.exception.args, (bad,))
