# -*- test-case-name: tests.test_faultunits -*-
"""
Unit tests (a fake clock, fakes for the kernel's answers) for the error
paths of issue 10 that L{tests.test_faults} shows on the real spool and
relay: an unopenable message over 48 simulated hours, owed notices, the
held message the spool cannot remove, /health, the open files check and
the session's one clock.
"""

import email.utils
import errno
import os

from twisted.internet import task
from twisted.trial import unittest

from msa.queue.spool import FAILED, PENDING, Spool
from msa.relay.results import ACCEPTED, PERMANENT
from msa.relay.runner import RelayRunner
from msa.service.health import Health
from msa.service.startupchecks import checkFileLimit, filesNeeded
from tests.helpers import Harness
from tests.relaydata import FakeDownstream, allWith, makeEnvelope

DAY = 86400.0


class RelayFaultTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), reactor=self.clock)
        self.downstream = FakeDownstream()
        self.runner = RelayRunner(
            self.spool,
            self.downstream,
            reactor=self.clock,
            retryBase=60,
            retryMax=3600,
            maxLifetime=DAY,
            dsnHostname="msa.example.nl",
        )
        self.runner.startService()
        self.addCleanup(self.runner.stopService)

    def queue(self, sender="alice@example.com"):
        envelope = makeEnvelope()
        envelope.sender = sender
        writer = self.spool.newMessage(envelope)
        writer.write(b"Subject: s\r\n\r\nbody\r\n")
        return self.successResultOf(writer.commit())

    def bounces(self):
        return [
            q for q in self.spool.pending() if self.spool.load(q).envelope.sender == ""
        ]

    def test_unopenableRescheduled(self):
        """
        The message file cannot be opened (EMFILE): the attempt counts as a
        temporary failure and is rescheduled about retryBase later.
        """
        opened = self.spool.openMessage

        def emfile(queueId, entry=None):
            raise OSError(errno.EMFILE, "Too many open files")

        self.spool.openMessage = emfile
        queueId = self.queue()
        self.clock.advance(0)
        entry = self.spool.load(queueId)
        self.assertEqual(entry.attempts, 1)
        self.assertEqual(entry.recipients, {"bob@example.org": PENDING})
        self.assertIn("Too many open files", entry.lastError)
        delay = entry.nextAttempt - self.clock.seconds()
        self.assertTrue(54 <= delay <= 66, delay)
        self.assertIn(queueId, self.runner._timers)
        self.spool.openMessage = opened
        self.clock.advance(delay)
        [(attempted, _, d)] = self.downstream.calls
        d.callback(allWith(attempted, ACCEPTED, 250, "2.0.0 ok"))
        self.assertEqual(self.spool.pending(), [])

    def test_unopenableExpires(self):
        """
        Never openable for 48 simulated hours: attempted with the backoff
        (not stranded), failed at the end of its lifetime (one day) with a
        notice to the sender, and gone from the queue.
        """
        self.spool.openMessage = lambda queueId, entry=None: open(
            "/nonexistent/x", "rb"
        )
        queueId = self.queue()
        attempts = []
        for _ in range(48 * 6):
            self.clock.advance(600)
            try:
                attempts.append(self.spool.load(queueId).attempts)
            except FileNotFoundError:
                break
        self.assertGreater(max(attempts), 10)
        self.assertNotIn(queueId, self.spool.pending())
        [bounce] = self.bounces()
        with open(self.spool.load(bounce).messagePath, "rb") as f:
            self.assertIn(b"Action: failed", f.read())

    def test_owedNoticeKeepsOriginal(self):
        """
        A permanent failure whose notice cannot be queued: the original
        stays (recipient failed, notice owed, never attempted again) and
        the notice is retried with the backoff until it is queued; then the
        original is removed.
        """
        queueId = self.queue()
        newMessage = self.spool.newMessage
        broken = [True]

        def failing(envelope):
            if broken[0]:
                raise OSError(errno.EIO, "Input/output error")
            return newMessage(envelope)

        self.spool.newMessage = failing
        self.clock.advance(0)
        [(entry, _, d)] = self.downstream.calls
        d.callback(allWith(entry, PERMANENT, 550, "5.1.1 no such user"))
        entry = self.spool.load(queueId)
        self.assertEqual(entry.recipients, {"bob@example.org": FAILED})
        self.assertEqual(entry.owedNotices, ["bob@example.org"])
        for _ in range(5):
            self.clock.advance(3600)
        self.assertEqual(self.spool.pending(), [queueId])
        self.assertEqual(len(self.downstream.calls), 1)
        broken[0] = False
        self.clock.advance(3600)
        # The notice is queued (and handed to the core), the original gone.
        self.assertNotIn(queueId, self.spool.pending())
        [_, (bounce, data, d)] = self.downstream.calls
        self.assertEqual(bounce.envelope.sender, "")
        self.assertEqual(bounce.envelope.recipients, [entry.envelope.sender])
        self.assertIn(b"Action: failed", data)
        d.callback(allWith(bounce, ACCEPTED, 250, "2.0.0 ok"))
        self.assertEqual(self.spool.pending(), [])

    def test_paidNoticeNotRemovable(self):
        """
        The owed notice is finally queued but the original cannot be
        removed: held, so the notice is not queued a second time.
        """
        queueId = self.queue()
        newMessage = self.spool.newMessage

        def failing(envelope):
            raise OSError(errno.EIO, "Input/output error")

        self.spool.newMessage = failing
        self.clock.advance(0)
        [(entry, _, d)] = self.downstream.calls
        d.callback(allWith(entry, PERMANENT, 550, "5.1.1 no such user"))
        self.spool.newMessage = newMessage

        def readOnly(queueId):
            raise OSError(errno.EROFS, "Read-only file system")

        self.spool.removeDelivered = readOnly
        self.clock.advance(3600)
        self.assertIn(queueId, self.runner.unremovable)
        self.assertEqual(len(self.bounces()), 1)
        self.runner.control.flush()
        self.clock.advance(DAY)
        self.assertEqual(len(self.bounces()), 1)
        [_, (bounce, _, d)] = self.downstream.calls
        self.assertEqual(bounce.envelope.sender, "")
        d.callback(allWith(bounce, ACCEPTED, 250, "2.0.0 ok"))

    def test_expiredNotRecorded(self):
        """
        The message expires, its notice is queued, and the state cannot be
        written: held (a retry would expire it again and notify twice).
        """
        self.runner.maxLifetime = 0
        queueId = self.queue()
        self.clock.advance(0)
        [(entry, _, d)] = self.downstream.calls

        def full(entry):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.spool.removeDelivered = full
        d.callback(allWith(entry, "temporary", 451, "4.3.0 later"))
        self.assertIn(queueId, self.runner.unremovable)
        self.assertEqual(len(self.bounces()), 1)

    def test_expiredNoticeOwed(self):
        """
        Expiry whose notice cannot be queued: owed like a refusal.
        """
        self.runner.maxLifetime = 0
        queueId = self.queue()

        def full(envelope):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.spool.newMessage = full
        self.clock.advance(0)
        [(entry, _, d)] = self.downstream.calls
        d.callback(allWith(entry, "temporary", 451, "4.3.0 later"))
        entry = self.spool.load(queueId)
        self.assertEqual(entry.owedNotices, ["bob@example.org"])
        self.assertEqual(entry.recipients, {"bob@example.org": FAILED})
        self.assertEqual(entry.lastError, "451 4.3.0 later")

    def test_unremovableHeld(self):
        """
        The core accepted it, the spool cannot remove it: held in memory,
        never attempted again (not on a flush either), /health 503.
        """
        queueId = self.queue()
        self.clock.advance(0)
        [(entry, _, d)] = self.downstream.calls

        def readOnly(queueId):
            raise OSError(errno.EROFS, "Read-only file system")

        self.spool.removeDelivered = readOnly
        d.callback(allWith(entry, ACCEPTED, 250, "2.0.0 ok"))
        self.assertIn(queueId, self.runner.unremovable)
        self.assertIn("Read-only file system", self.runner.unremovable[queueId])
        self.assertEqual(self.runner.control.flush(), [])
        self.runner.wake(queueId)
        self.clock.advance(DAY)
        self.assertEqual(len(self.downstream.calls), 1)
        spool = Health(self.spool, self.runner).spoolHealth()
        self.assertEqual(spool.status, "failing")
        self.assertIn("spool cannot be changed: 1 message(s)", spool.detail)
        self.assertIn(queueId, spool.detail)

    def test_stateNotWrittenAfterPartialDelivery(self):
        """
        One recipient accepted, one deferred, and the state cannot be
        written: held too (a retry would send the accepted one again).
        """
        envelope = makeEnvelope(("bob@example.org", "carol@example.org"))
        writer = self.spool.newMessage(envelope)
        writer.write(b"Subject: s\r\n\r\nbody\r\n")
        queueId = self.successResultOf(writer.commit())
        self.clock.advance(0)
        [(entry, _, d)] = self.downstream.calls

        def full(entry):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.spool.update = full
        result = allWith(entry, ACCEPTED, 250, "ok")
        result.recipients["carol@example.org"] = allWith(
            entry, "temporary", 451, "later"
        ).recipients["carol@example.org"]
        d.callback(result)
        self.assertIn(queueId, self.runner.unremovable)
        self.clock.advance(DAY)
        self.assertEqual(len(self.downstream.calls), 1)

    def test_stateNotWrittenAfterDeferral(self):
        """
        Nothing delivered (the core said 451) and the state cannot be
        written: no error escapes the runner, the message stays queued as
        it was and is tried again after C{retryBase}.
        """
        envelope = makeEnvelope(("bob@example.org",))
        writer = self.spool.newMessage(envelope)
        writer.write(b"Subject: s\r\n\r\nbody\r\n")
        queueId = self.successResultOf(writer.commit())
        self.clock.advance(0)
        [(entry, _, d)] = self.downstream.calls
        realUpdate = self.spool.update

        def readOnly(entry):
            raise OSError(errno.EROFS, "Read-only file system")

        self.spool.update = readOnly
        d.callback(allWith(entry, "temporary", 451, "later"))
        self.assertNotIn(queueId, self.runner.unremovable)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.spool.update = realUpdate
        self.clock.advance(self.runner.retryBase - 1)
        self.assertEqual(len(self.downstream.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.downstream.calls), 2)
        entry, _, d = self.downstream.calls[1]
        self.assertEqual(entry.attempts, 0)  # the unrecorded attempt is lost
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual(self.spool.pending(), [])


class FakeResource:
    """
    The part of the L{resource} module L{checkFileLimit} uses.
    """

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        if self.refuse or limits[0] > self.limits[1] != self.RLIM_INFINITY:
            raise ValueError("not allowed")
        self.limits = limits


class FileLimitTests(unittest.TestCase):
    def test_needed(self):
        """
        The default limits (1000 connections, relay concurrency 4) need
        2268 descriptors, well under the unit's LimitNOFILE=8192.
        """
        self.assertEqual(filesNeeded(1000, 4), 2268)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "etc", "digipoort-msa.service")) as f:
            self.assertIn("\nLimitNOFILE=8192\n", f.read())

    def test_enough(self):
        fake = FakeResource(2268, 4096)
        self.assertEqual(checkFileLimit(1000, 4, fake), [])
        self.assertEqual(fake.limits, (2268, 4096))

    def test_raisedToNeeded(self):
        """
        One short: the soft limit is raised to what is needed, no warning.
        """
        fake = FakeResource(2267, 8192)
        self.assertEqual(checkFileLimit(1000, 4, fake), [])
        self.assertEqual(fake.limits, (2268, 8192))

    def test_raisedToHardStillShort(self):
        fake = FakeResource(1024, 2000)
        [warning] = checkFileLimit(1000, 4, fake)
        self.assertEqual(fake.limits, (2000, 2000))
        self.assertIn("is 2000", warning)
        self.assertIn("LimitNOFILE", warning)

    def test_refused(self):
        fake = FakeResource(1024, 8192, refuse=True)
        [warning] = checkFileLimit(1000, 4, fake)
        self.assertIn("is 1024", warning)

    def test_unlimited(self):
        fake = FakeResource(-1, -1)
        self.assertEqual(checkFileLimit(100000, 4, fake), [])
        fake = FakeResource(100, -1)
        self.assertEqual(checkFileLimit(1000, 4, fake), [])
        self.assertEqual(fake.limits, (2268, -1))


class ReceivedClockTests(unittest.TestCase):
    def test_receivedDateFromReactor(self):
        """
        The Received date is the reactor's time at DATA, not the system
        clock's: with a fake clock it is exactly reproducible.
        """
        clock = task.Clock()
        clock.advance(1_234_567_890)
        h = Harness(self, clock=clock)
        h.login()
        h.transaction()
        h.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
        [(envelope, body)] = h.spool.committed
        self.assertEqual(envelope.receivedAt, 1_234_567_890)
        date = email.utils.formatdate(1_234_567_890, localtime=True)
        self.assertIn(f"; {date}\r\n".encode(), body)
