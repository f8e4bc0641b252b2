# -*- test-case-name: tests.test_queuefile -*-
"""
Tests for L{msa.queue.queuefile} (one file per message: two state slots in
front of the message) and L{msa.queue.legacy} (the .msg/.json pairs of
earlier versions, read and converted; tests/fixtures/spool-v2, written by
the version before, is converted and relayed by the daemon).
"""

import io
import json
import os
import shutil

from twisted.internet import defer, task
from twisted.trial import unittest

from msa.queue import legacy, queuefile
from msa.queue.spool import DELIVERED, PENDING, Spool
from tests.test_integrity import LogRecorder, relayedFromOldSpool
from tests.test_spool import MESSAGE, makeEnvelope, stateOnDisk
from tests.waiting import waitUntil

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "spool-v2", "queue")
#: The fixture's entries, oldest first (see its make_fixture.py).
PLAIN, PARTIAL, HELD = "662025D46E12B6B865", "662025D49362053F20", "662025D49BDA9AE222"


def fixtureMessage(queueId: str) -> bytes:
    with open(os.path.join(FIXTURE, queueId + legacy.MESSAGE), "rb") as f:
        return f.read()


class SlotTests(unittest.TestCase):
    """
    The state slots: a change goes into the slot not in force; a torn
    write of it leaves the state before in force.
    """

    def setUp(self):
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, reactor=task.Clock())
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(MESSAGE)
        self.queueId = self.successResultOf(writer.commit())
        self.path = self.spool.queuePath(self.queueId)

    def where(self):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return queuefile.readState(fd)[1]
        finally:
            os.close(fd)

    def test_alternate(self):
        self.assertEqual((self.where().slot, self.where().sequence), (0, 1))
        entry = self.spool.load(self.queueId)
        for attempts, slot in ((1, 1), (2, 0), (3, 1)):
            entry.attempts = attempts
            self.successResultOf(self.spool.update(entry))
            where = self.where()
            self.assertEqual((where.slot, where.sequence), (slot, attempts + 1))
            self.assertEqual(
                stateOnDisk(self.spool, self.queueId)["attempts"], attempts
            )

    def test_tornWriteKeepsTheStateBefore(self):
        """
        A crash in the middle of the slot's write (here: its first bytes
        new, the rest the old slot's): its CRC fails, the state before it
        is in force, and the next change goes into the same slot again.
        """
        entry = self.spool.load(self.queueId)
        entry.attempts = 1
        self.successResultOf(self.spool.update(entry))
        where = self.where()
        entry.attempts = 2
        entry.lastError = "451 4.3.0 try again later"
        data = queuefile.encodeSlot(entry.toJSON(), where.sequence + 1, where.slotSize)
        with open(self.path, "r+b") as f:
            f.seek(queuefile.slotOffset(where.slotSize, 1 - where.slot))
            f.write(data[:40])
        restarted = Spool(self.directory, reactor=task.Clock())
        self.assertEqual(restarted.load(self.queueId).attempts, 1)
        entry.attempts = 3
        self.successResultOf(restarted.update(entry))
        self.assertEqual(Spool(self.directory).load(self.queueId).attempts, 3)
        with restarted.openMessage(self.queueId) as f:
            self.assertEqual(f.read(), MESSAGE)

    def test_firstChangeOfAProcessSyncsFirst(self):
        """
        A process that did not write the state in force itself (it may not
        be durable: its writer died before the fdatasync) makes it durable
        before it overwrites the other slot; the writing process does not.
        """
        synced = []
        real = os.fdatasync

        def fdatasync(fd):
            synced.append(fd)
            real(fd)

        self.patch(os, "fdatasync", fdatasync)
        entry = self.spool.load(self.queueId)
        entry.attempts = 1
        self.successResultOf(self.spool.update(entry))
        self.assertEqual(len(synced), 1)
        restarted = Spool(self.directory, reactor=task.Clock())
        entry.attempts = 2
        self.successResultOf(restarted.update(entry))
        self.assertEqual(len(synced), 3)
        entry.attempts = 3
        self.successResultOf(restarted.update(entry))
        self.assertEqual(len(synced), 4)

    def test_longRepliesShortened(self):
        """
        Replies longer than the slots were sized for are shortened: the
        state still fits, the envelope whole.
        """
        entry = self.spool.load(self.queueId)
        for rcpt in entry.recipients:
            entry.errors[rcpt] = "451 4.3.0 " + "é" * 5000
        entry.lastError = "x" * 100_000
        self.successResultOf(self.spool.update(entry))
        again = Spool(self.directory).load(self.queueId)
        self.assertEqual(again.envelope, entry.envelope)
        for rcpt in entry.recipients:
            self.assertTrue(entry.errors[rcpt].startswith(again.errors[rcpt]))
            self.assertLessEqual(len(again.errors[rcpt]), queuefile.ERROR_LIMIT)

    def test_notAQueueFile(self):
        with open(self.path, "r+b") as f:
            f.write(b"Subject: x")
        self.assertRaises(queuefile.QueueFileError, queuefile.loadEntry, self.path)


class ContentFileTests(unittest.TestCase):
    """
    L{queuefile.ContentFile}: the message alone, as if it were the file.
    """

    def test_readSeekTell(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"STATE" + MESSAGE)
        with queuefile.ContentFile(path, 5) as f:
            self.assertEqual(f.read(7), MESSAGE[:7])
            self.assertEqual(f.tell(), 7)
            self.assertEqual(f.read(), MESSAGE[7:])
            self.assertEqual(f.read(10), b"")
            f.seek(0)
            self.assertEqual(f.read(), MESSAGE)
            self.assertEqual(f.seek(-2, io.SEEK_END), len(MESSAGE) - 2)
            self.assertEqual(f.read(), b"\r\n")
            self.assertEqual(f.size(), len(MESSAGE))
            self.assertRaises(io.UnsupportedOperation, f.fileno)


class UpgradeTests(unittest.TestCase):
    """
    A spool of the version before (tests/fixtures/spool-v2: .msg and .json
    per entry) is read as it is, converted to queue files at the start,
    and relayed by the daemon byte for byte with its recorded digests.
    """

    timeout = 60

    def copiedFixture(self) -> str:
        directory = os.path.abspath(self.mktemp())
        shutil.copytree(FIXTURE, os.path.join(directory, "queue"))
        os.chmod(directory, 0o700)
        return directory

    def test_readAsItIs(self):
        spool = Spool(self.copiedFixture(), reactor=task.Clock())
        self.assertEqual(spool.pending(), [PLAIN, PARTIAL, HELD])
        partial = spool.load(PARTIAL)
        self.assertEqual(
            partial.recipients,
            {"al-bezorgd@overheid.nl": DELIVERED, "nog-niet@overheid.nl": PENDING},
        )
        self.assertEqual(partial.attempts, 1)
        self.assertTrue(spool.load(HELD).held)
        with spool.openMessage(PLAIN) as f:
            self.assertEqual(f.read(), fixtureMessage(PLAIN))

    def test_converted(self):
        """
        L{Spool.recover} replaces each pair with a queue file holding the
        same state and bytes.
        """
        directory = self.copiedFixture()
        before = Spool(directory, reactor=task.Clock())
        states = {q: before.load(q).toJSON() for q in before.pending()}
        spool = Spool(directory, reactor=task.Clock())
        self.assertEqual(spool.recover(), [PLAIN, PARTIAL, HELD])
        self.assertEqual(
            sorted(os.listdir(spool.queueDirectory)), [PLAIN, PARTIAL, HELD]
        )
        self.assertEqual(os.listdir(spool.tmpDirectory), [])
        for queueId, state in states.items():
            self.assertEqual(stateOnDisk(spool, queueId), state)
            with spool.openMessage(queueId) as f:
                self.assertEqual(f.read(), fixtureMessage(queueId))
            self.assertEqual(spool.load(queueId).size, len(fixtureMessage(queueId)))

    def test_crashDuringConversion(self):
        """
        Killed after the queue file was renamed into place and before the
        pair was removed: the next recovery keeps the queue file and
        removes the pair (and a message file left alone).
        """
        directory = self.copiedFixture()
        spool = Spool(directory, reactor=task.Clock())
        legacy.convert(spool.queueDirectory, spool.tmpDirectory, PLAIN)
        for name in os.listdir(FIXTURE):
            if name.startswith((PLAIN, PARTIAL)):
                shutil.copy(os.path.join(FIXTURE, name), spool.queueDirectory)
        os.unlink(os.path.join(spool.queueDirectory, PARTIAL + legacy.STATE))
        legacy.convert(spool.queueDirectory, spool.tmpDirectory, HELD)
        self.assertEqual(spool.pending(), [PLAIN, HELD])
        self.assertEqual(spool.recover(), [PLAIN, HELD])
        self.assertEqual(sorted(os.listdir(spool.queueDirectory)), [PLAIN, HELD])

    def test_updateOfAnUnconvertedEntry(self):
        """
        A change of an entry still in the old format (no recovery ran, as
        with the admin command on a stopped server) converts it first.
        """
        spool = Spool(self.copiedFixture(), reactor=task.Clock())
        entry = spool.load(HELD)
        entry.held = False
        self.successResultOf(spool.update(entry))
        self.assertIn(HELD, os.listdir(spool.queueDirectory))
        self.assertNotIn(HELD + legacy.STATE, os.listdir(spool.queueDirectory))
        self.assertFalse(Spool(spool.directory).load(HELD).held)
        with spool.openMessage(HELD) as f:
            self.assertEqual(f.read(), fixtureMessage(HELD))

    def test_removalOfAnUnconvertedEntry(self):
        """
        Removed before any recovery (as with the admin command on a
        stopped server): an entry still in the old format goes with both
        its files, even before a listing of the queue found its pair.
        """
        spool = Spool(self.copiedFixture(), reactor=task.Clock())
        self.successResultOf(spool.removeDelivered(PLAIN))
        self.assertEqual(
            [n for n in os.listdir(spool.queueDirectory) if n.startswith(PLAIN)], []
        )
        self.assertEqual(spool.pending(), [PARTIAL, HELD])
        self.successResultOf(spool.removeDelivered(PARTIAL))
        self.assertEqual(spool.pending(), [HELD])
        self.assertEqual(
            [n for n in os.listdir(spool.queueDirectory) if n.startswith(PARTIAL)],
            [],
        )

    def test_noLookForPairsOnceConverted(self):
        """
        Once recovery has converted every pair (its listing finds none), a
        removal looks for no earlier version's state file: one system call
        fewer per relayed message, in the thread pool.
        """
        spool = Spool(self.copiedFixture(), reactor=task.Clock())
        spool.recover()
        looked = []
        realLexists = os.path.lexists
        self.patch(os.path, "lexists", lambda p: looked.append(p) or realLexists(p))
        self.successResultOf(spool.removeDelivered(PLAIN))
        self.assertEqual(sorted(os.listdir(spool.queueDirectory)), [PARTIAL, HELD])
        self.assertEqual(looked, [])

    @defer.inlineCallbacks
    def test_relayedAfterUpgrade(self):
        """
        The daemon started on the old spool: the pending recipients of the
        two entries not held reach a real core byte for byte, verified
        against their recorded digests (no warning, no mismatch); the held
        one stays, converted.
        """
        logs = LogRecorder(self)
        directory, byRecipients = yield relayedFromOldSpool(self, FIXTURE, 2)
        self.assertEqual(
            byRecipients[("belastingdienst@overheid.nl",)][:3],
            (
                "ik@mijnbedrijf.nl",
                ["belastingdienst@overheid.nl"],
                fixtureMessage(PLAIN),
            ),
        )
        self.assertEqual(
            byRecipients[("nog-niet@overheid.nl",)][:3],
            ("ik@mijnbedrijf.nl", ["nog-niet@overheid.nl"], fixtureMessage(PARTIAL)),
        )
        queue = os.path.join(directory, "queue")
        yield waitUntil(lambda: os.listdir(queue) == [HELD], 10, "the held one left")
        self.assertTrue(stateOnDisk(Spool(directory), HELD)["held"])
        self.assertEqual(logs.named("integrity"), [])
        recorded = []
        for queueId in (PLAIN, PARTIAL):
            with open(os.path.join(FIXTURE, queueId + legacy.STATE)) as f:
                recorded.append(json.load(f)["sha256"])
        self.assertEqual(
            sorted(e["sha256"] for e in logs.named("relay")), sorted(recorded)
        )
