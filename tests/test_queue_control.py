# -*- test-case-name: tests.test_queue_control -*-
"""
Tests for L{msa.queue.control}: the operator's hold, release, flush, delete
and describe on L{QueueControl}, against a fake queue runner, and through a
real L{msa.relay.runner.RelayRunner} with a fake clock and downstream.
"""

import errno
import os

from twisted.internet import defer, task
from twisted.trial import unittest

from msa.queue.control import QueueControl, describeEntry
from msa.queue.spool import DELIVERED, PENDING, Spool, SpoolEntry
from msa.relay.results import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
)
from tests.relaydata import DOTTY, RunnerFixture, allWith, makeEnvelope


class QueueControlTests(RunnerFixture, unittest.TestCase):
    """
    flush, hold, release, delete and describe through the runner's
    control, with a fake clock.
    """

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
        retryAt = self.spool.load(first).nextAttempt
        self.assertGreater(retryAt, self.clock.seconds())
        self.assertEqual(self.runner.control.flush(first), [first])
        # Attempted now; the recorded retry time is not rewritten.
        self.assertEqual(self.spool.load(first).nextAttempt, retryAt)
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

    def test_flushWhileStateWritten(self):
        """
        A flush that arrives after the attempt's outcome, while the
        deferred entry's new state is being written (still in flight), is
        not lost: the entry is attempted again right after the write, not
        at its retry time a minute later.
        """
        writes = []
        update = self.spool.update

        def slowUpdate(entry):
            gate = defer.Deferred()
            writes.append(gate)
            return gate.addCallback(lambda _: update(entry))

        self.patch(self.spool, "update", slowUpdate)
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.fail451()
        [write] = writes
        self.assertTrue(self.runner.isInFlight(queueId))
        self.assertEqual(self.runner.control.flush(), [queueId])
        write.callback(None)
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


class FakeQueueRunner:
    """
    The L{msa.queue.control.QueueRunner} interface, recording the calls
    that change the schedule.
    """

    def __init__(self):
        self.scheduled = set()
        self.inFlight = set()
        self.unremovable = set()
        self.calls = []

    def queued(self):
        return list(self.scheduled | self.inFlight)

    def isInFlight(self, queueId):
        return queueId in self.inFlight

    def isUnremovable(self, queueId):
        return queueId in self.unremovable

    def attemptNow(self, queueId):
        self.calls.append(("attemptNow", queueId))

    def unschedule(self, queueId):
        self.calls.append(("unschedule", queueId))


class QueueControlUnitTests(unittest.TestCase):
    """
    L{QueueControl} on its own: a real spool, a fake clock and a fake
    runner; every value it writes or returns exactly.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), reactor=self.clock)
        self.runner = FakeQueueRunner()
        self.control = QueueControl(self.spool, self.runner, self.clock)

    def queue(self, recipients=("bob@example.org",), **state):
        """
        Commit a message, then give its entry the attributes C{state}.
        """
        writer = self.spool.newMessage(makeEnvelope(recipients))
        writer.write(DOTTY)
        queueId = self.successResultOf(writer.commit())
        if state:
            entry = self.spool.load(queueId)
            for name, value in state.items():
                setattr(entry, name, value)
            self.spool.update(entry)
        if not state.get("held"):
            # As the runner does: every entry not on hold is scheduled.
            self.runner.scheduled.add(queueId)
        return queueId

    def stateFiles(self):
        """
        The bytes of every queue file of the queue.
        """
        directory = self.spool.queueDirectory
        return {
            name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))
        }

    def test_flushOne(self):
        """
        flush(id) asks the runner to attempt the entry now and writes
        nothing: its recorded next attempt and count stay as they were.
        """
        queueId = self.queue(nextAttempt=1_700_003_600.0, attempts=2)
        before = self.stateFiles()
        self.clock.advance(30)
        self.assertEqual(self.control.flush(queueId), [queueId])
        self.assertEqual(self.runner.calls, [("attemptNow", queueId)])
        self.assertEqual(self.stateFiles(), before)
        entry = self.spool.load(queueId)
        self.assertEqual((entry.nextAttempt, entry.attempts), (1_700_003_600.0, 2))

    def test_flushAllSkipsHeldAndUnremovable(self):
        """
        flush() returns the ids it scheduled, oldest first; a held entry and
        one the runner holds unremovable are left out.  No state file is
        written.
        """
        first = self.queue(nextAttempt=1_700_009_000.0)
        held = self.queue(nextAttempt=1_700_009_000.0, held=True)
        stuck = self.queue(nextAttempt=1_700_009_000.0)
        last = self.queue(nextAttempt=1_700_009_000.0)
        self.runner.unremovable.add(stuck)
        before = self.stateFiles()
        self.assertEqual(self.control.flush(), [first, last])
        self.assertEqual(
            self.runner.calls, [("attemptNow", first), ("attemptNow", last)]
        )
        self.assertEqual(self.control.flush(held), [])
        self.assertEqual(self.control.flush(stuck), [])
        self.assertEqual(self.stateFiles(), before)

    def test_flushAllReadsNothing(self):
        """
        flush() of the whole queue takes the ids from the runner: it opens
        no state file (a backlog of thousands costs no disk work), so it
        works even while the spool cannot be read.
        """
        ids = [self.queue() for _ in range(3)]

        def unreadable(queueId):
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(self.spool, "load", unreadable)
        self.assertEqual(self.control.flush(), ids)
        self.assertEqual(self.runner.calls, [("attemptNow", q) for q in ids])

    def test_flushAllSkipsDelivered(self):
        """
        An entry whose attempt delivered it and whose removal is still
        running (in flight for the runner, gone for the spool's readers) is
        not flushed: nothing is left to send.
        """
        queueId = self.queue()
        self.runner.inFlight.add(queueId)
        # The removal's round has not run yet.
        self.patch(self.spool.commits, "commit", lambda job: defer.Deferred())
        self.spool.removeDelivered(queueId)
        self.assertEqual(self.control.flush(), [])
        self.assertEqual(self.runner.calls, [])

    def test_flushAllSkipsHeldInFlight(self):
        """
        An entry put on hold during its attempt is not flushed by flush():
        the hold wins, as when it is on hold on disk.
        """
        queueId = self.queue()
        self.runner.inFlight.add(queueId)
        self.control.hold(queueId)
        self.assertEqual(self.control.flush(), [])

    def test_flushInFlight(self):
        """
        An entry in flight is not attempted twice at once: the flush is
        applied to the entry when its attempt ends (the next attempt at
        that time).
        """
        queueId = self.queue(nextAttempt=1_700_009_000.0)
        self.runner.inFlight.add(queueId)
        self.assertEqual(self.control.flush(), [queueId])
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(self.spool.load(queueId).nextAttempt, 1_700_009_000.0)
        entry = self.spool.load(queueId)
        entry.nextAttempt = 1_700_000_060.0
        self.control.applyRequests(entry, 1_700_000_005.0)
        self.assertEqual((entry.nextAttempt, entry.held), (1_700_000_005.0, False))

    def test_hold(self):
        queueId = self.queue()
        self.assertIsNone(self.successResultOf(self.control.hold(queueId)))
        self.assertTrue(self.spool.load(queueId).held)
        self.assertEqual(self.runner.calls, [("unschedule", queueId)])

    def test_holdInFlight(self):
        """
        Held while in flight: written at once, and given back to the runner
        for the entry it writes when the attempt ends.
        """
        queueId = self.queue()
        self.runner.inFlight.add(queueId)
        self.control.hold(queueId)
        self.assertTrue(self.spool.load(queueId).held)
        entry = self.spool.load(queueId)
        entry.held = False
        entry.nextAttempt = 1_700_000_060.0
        self.control.applyRequests(entry, 1_700_000_005.0)
        self.assertEqual((entry.held, entry.nextAttempt), (True, 1_700_000_060.0))

    def test_release(self):
        """
        Released: off hold, due now, attempted.
        """
        queueId = self.queue(held=True, nextAttempt=1_700_009_000.0)
        self.clock.advance(7)
        self.assertIsNone(self.successResultOf(self.control.release(queueId)))
        entry = self.spool.load(queueId)
        self.assertEqual((entry.held, entry.nextAttempt), (False, 1_700_000_007.0))
        self.assertEqual(self.runner.calls, [("attemptNow", queueId)])

    def test_releaseInFlight(self):
        """
        Released while in flight: not attempted twice at once; when the
        attempt ends the entry is off hold and due again at once.
        """
        queueId = self.queue(held=True)
        self.runner.inFlight.add(queueId)
        self.control.release(queueId)
        self.assertEqual(self.runner.calls, [])
        self.assertFalse(self.spool.load(queueId).held)
        entry = self.spool.load(queueId)
        entry.held = True
        entry.nextAttempt = 1_700_000_060.0
        self.control.applyRequests(entry, 1_700_000_005.0)
        self.assertEqual((entry.held, entry.nextAttempt), (False, 1_700_000_005.0))

    def test_delete(self):
        """
        Deleted: its queue file gone, the schedule cancelled; unknown since.
        """
        queueId = self.queue()
        other = self.queue()
        self.assertIsNone(self.successResultOf(self.control.delete(queueId)))
        self.assertEqual(self.spool.pending(), [other])
        self.assertEqual(
            sorted(os.listdir(self.spool.queueDirectory)),
            [other],
        )
        self.assertEqual(self.runner.calls, [("unschedule", queueId)])
        self.assertFalse(self.control.isDeleted(queueId))
        with self.assertRaises(KeyError) as e:
            self.control.delete(queueId)
        self.assertEqual(e.exception.args, (queueId,))

    def test_deleteInFlight(self):
        """
        Deleted while in flight: gone from the spool at once, and the
        runner is told to ignore the outcome until the attempt ends.
        """
        queueId = self.queue()
        self.runner.inFlight.add(queueId)
        self.control.delete(queueId)
        self.assertEqual(self.spool.pending(), [])
        self.assertTrue(self.control.isDeleted(queueId))
        self.assertEqual(self.control.describe(), [])
        self.control.attemptEnded(queueId)
        self.assertFalse(self.control.isDeleted(queueId))

    def test_attemptEndedForgets(self):
        """
        Once the attempt has ended, the requests made during it no longer
        apply to the entry.
        """
        queueId = self.queue(held=True)
        self.runner.inFlight.add(queueId)
        self.control.release(queueId)
        self.control.hold(queueId)
        self.control.flush(queueId)
        self.runner.inFlight.discard(queueId)
        self.control.attemptEnded(queueId)
        entry = self.spool.load(queueId)
        entry.held = False
        entry.nextAttempt = 1_700_000_060.0
        self.control.applyRequests(entry, 1_700_000_005.0)
        self.assertEqual((entry.held, entry.nextAttempt), (False, 1_700_000_060.0))

    def test_unknownOrMalformed(self):
        """
        An id that is not in the queue or not an id at all: C{KeyError} of
        it, nothing changed, nothing scheduled.
        """
        queueId = self.queue()
        for bad in ("0000000000000ABCDE", "../" + queueId, queueId + ".json", ""):
            for method in (
                self.control.flush,
                self.control.hold,
                self.control.release,
                self.control.delete,
            ):
                with self.assertRaises(KeyError) as e:
                    method(bad)
                self.assertEqual(e.exception.args, (bad,))
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(self.spool.pending(), [queueId])

    def test_describe(self):
        """
        Every entry, oldest first, exactly as the admin command gets it; an
        entry whose state file is unreadable is left out.
        """
        first = self.queue(("a@example.org", "b@example.org"))
        self.clock.advance(5)
        second = self.queue(
            attempts=3,
            nextAttempt=1_700_000_900.0,
            lastError="451 4.3.0 later",
            errors={"bob@example.org": "451 4.3.0 later"},
            held=True,
        )
        broken = self.queue()
        # Its first load, which reads no file (Spool.remember), is gone.
        self.spool.load(broken)
        with open(self.spool.queuePath(broken), "r+b") as f:
            f.write(b"not a queue file")
        self.runner.inFlight.add(first)
        self.clock.advance(20)
        self.assertEqual(
            self.control.describe(),
            [
                {
                    "id": first,
                    "age": 25.0,
                    "size": len(DOTTY),
                    "sender": "alice@example.com",
                    "recipients": {"a@example.org": PENDING, "b@example.org": PENDING},
                    "errors": {},
                    "attempts": 0,
                    "nextAttempt": 1_700_000_000.0,
                    "lastError": "",
                    "held": False,
                    "inFlight": True,
                    "isBounce": False,
                },
                {
                    "id": second,
                    "age": 20.0,
                    "size": len(DOTTY),
                    "sender": "alice@example.com",
                    "recipients": {"bob@example.org": PENDING},
                    "errors": {"bob@example.org": "451 4.3.0 later"},
                    "attempts": 3,
                    "nextAttempt": 1_700_000_900.0,
                    "lastError": "451 4.3.0 later",
                    "held": True,
                    "inFlight": False,
                    "isBounce": False,
                },
            ],
        )


class DescribeEntryTests(unittest.TestCase):
    """
    L{describeEntry}, which the control socket also uses to read the spool
    while the server is stopped.
    """

    def test_ageNeverNegative(self):
        """
        An entry created "after" C{now} (a clock that stepped back) is 0
        seconds old; the dicts are copies.
        """
        entry = SpoolEntry(
            queueId="ABC",
            envelope=makeEnvelope(),
            recipients={"bob@example.org": DELIVERED},
            createdAt=100.0,
            size=12,
            isBounce=True,
        )
        described = describeEntry(entry, 40.0)
        self.assertEqual(
            described,
            {
                "id": "ABC",
                "age": 0.0,
                "size": 12,
                "sender": "alice@example.com",
                "recipients": {"bob@example.org": DELIVERED},
                "errors": {},
                "attempts": 0,
                "nextAttempt": 0.0,
                "lastError": "",
                "held": False,
                "inFlight": False,
                "isBounce": True,
            },
        )
        described["recipients"]["bob@example.org"] = PENDING
        self.assertEqual(entry.recipients, {"bob@example.org": DELIVERED})
