# -*- test-case-name: tests.test_spool -*-
"""
Tests for L{msa.queue.spool}.
"""

import os

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import ISpool, ISpoolWriter
from msa.queue import queuefile
from msa.queue.entry import SpoolEntry
from msa.queue.spool import (
    DELIVERED,
    FAILED,
    PENDING,
    WRITE_BUFFER,
    Spool,
    newQueueId,
)


def makeEnvelope(recipients=("bob@example.org", "carol@example.org")) -> Envelope:
    return Envelope(
        sender="alice@example.com",
        recipients=list(recipients),
        account="alice",
        mailParams={"BODY": "8BITMIME"},
        clientAddress="192.0.2.1",
        helo="client.example.com",
    )


MESSAGE = b"Subject: test\r\n\r\n.leading dot\r\n..two\r\nlast line\r\n"


def stateOnDisk(spool, queueId):
    """
    The state in force in the queue file of C{queueId}, as a fresh reader
    (another process) reads it.
    """
    entry, _ = queuefile.loadEntry(spool.queuePath(queueId))
    return entry.toJSON()


class SpoolTestsMixin:
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, reactor=self.clock)

    def queueFiles(self):
        return sorted(os.listdir(self.spool.queueDirectory))

    def tmpFiles(self):
        return sorted(os.listdir(self.spool.tmpDirectory))

    def commitMessage(self, data=MESSAGE, envelope=None):
        writer = self.spool.newMessage(envelope or makeEnvelope())
        writer.write(data)
        return self.successResultOf(writer.commit())


class SpoolWriteTests(SpoolTestsMixin, unittest.TestCase):
    def test_interfaces(self):
        self.assertTrue(verifyObject(ISpool, self.spool))
        writer = self.spool.newMessage(makeEnvelope())
        self.assertTrue(verifyObject(ISpoolWriter, writer))
        writer.abort()

    def test_roundTrip(self):
        """
        A committed message loads back with its envelope, every recipient
        pending, and its bytes exactly as written.
        """
        envelope = makeEnvelope()
        writer = self.spool.newMessage(envelope)
        self.assertEqual(writer.queueId, envelope.queueId)
        for line in MESSAGE.split(b"\r\n")[:-1]:
            writer.write(line + b"\r\n")
        queueId = self.successResultOf(writer.commit())
        self.assertEqual(queueId, envelope.queueId)
        self.assertEqual(self.spool.pending(), [queueId])
        entry = self.spool.load(queueId)
        self.assertEqual(entry.envelope, envelope)
        self.assertEqual(
            entry.recipients, {"bob@example.org": PENDING, "carol@example.org": PENDING}
        )
        self.assertEqual(entry.attempts, 0)
        self.assertEqual(entry.createdAt, 1_700_000_000)
        self.assertEqual(entry.lastError, "")
        self.assertEqual(entry.size, len(MESSAGE))
        self.assertFalse(entry.eightBit)
        with self.spool.openMessage(queueId) as f:
            self.assertEqual(f.read(), MESSAGE)
        # One file: the state slots, then the message's bytes to its end.
        self.assertEqual(entry.messagePath, self.spool.queuePath(queueId))
        with open(entry.messagePath, "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(queuefile.MAGIC))
        self.assertEqual(data[entry.contentOffset :], MESSAGE)

    def test_bufferedMessageWrittenInOneWrite(self):
        """
        A message that fits the writer's buffer is written by the commit
        in one write of the whole file (the preamble, slot 0, slot 1 as
        zeros, the content) and one fsync, before the rename: the fewer
        system calls in the thread pool, the fewer hand-offs of the GIL
        the reactor thread waits for.  The file reads back as before.
        """
        calls = []
        realWrite, realFsync, realReplace = os.write, os.fsync, os.replace

        def write(fd, data):
            calls.append(("write", os.readlink(f"/proc/self/fd/{fd}"), bytes(data)))
            return realWrite(fd, data)

        def fsync(fd):
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            realFsync(fd)

        def replace(src, dst):
            calls.append(("replace", os.path.abspath(src)))
            realReplace(src, dst)

        self.patch(os, "write", write)
        self.patch(os, "fsync", fsync)
        self.patch(os, "replace", replace)
        queueId = self.commitMessage()
        tmpPath = os.path.abspath(os.path.join(self.spool.tmpDirectory, queueId))
        mine = [c for c in calls if c[1] == tmpPath]
        self.assertEqual([c[0] for c in mine], ["write", "fsync", "replace"])
        entry = self.spool.load(queueId)
        with open(entry.messagePath, "rb") as f:
            data = f.read()
        self.assertEqual(mine[0][2], data)
        self.assertEqual(data[entry.contentOffset :], MESSAGE)
        self.assertTrue(data.startswith(queuefile.MAGIC))

    def test_eightBit(self):
        queueId = self.commitMessage("Subject: é\r\n\r\n".encode())
        self.assertTrue(self.spool.load(queueId).eightBit)

    def test_filesOnlyAfterCommit(self):
        """
        While the message is written, nothing is in queue/ (a small message
        is not even in tmp/ yet: it is in the writer's buffer); after the
        commit, exactly one file is, holding the message and its state, and
        tmp/ is empty.
        """
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(MESSAGE)
        self.assertEqual(self.queueFiles(), [])
        self.assertEqual(self.spool.pending(), [])
        self.assertEqual(self.tmpFiles(), [])
        self.successResultOf(writer.commit())
        self.assertEqual(self.queueFiles(), [writer.queueId])
        self.assertEqual(self.tmpFiles(), [])
        state = stateOnDisk(self.spool, writer.queueId)
        self.assertEqual(state["envelope"]["sender"], "alice@example.com")
        self.assertEqual(state["recipients"]["bob@example.org"], PENDING)

    def test_abort(self):
        """
        An aborted message leaves nothing, and abort may be called twice.
        """
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(MESSAGE)
        writer.abort()
        writer.abort()
        self.assertEqual(self.tmpFiles(), [])
        self.assertEqual(self.queueFiles(), [])
        self.assertRaises(RuntimeError, writer.write, b"more")

    def test_listenerAfterCommit(self):
        seen = []

        def listener(queueId):
            seen.append((queueId, self.spool.pending()))

        self.spool.addListener(listener)
        queueId = self.commitMessage()
        self.assertEqual(seen, [(queueId, [queueId])])
        self.spool.removeListener(listener)
        self.commitMessage()
        self.assertEqual(len(seen), 1)

    def test_streamingWrites(self):
        """
        A large message written in many chunks reaches the file as it comes:
        never more than the write buffer is held back (the file is created
        when the data first outgrows it).
        """
        writer = self.spool.newMessage(makeEnvelope())
        path = os.path.join(self.spool.tmpDirectory, writer.queueId)
        offset = queuefile.contentOffset(queuefile.slotSizeFor(writer.envelope))
        line = b"x" * 998 + b"\r\n"
        written = 0
        for _ in range(5000):
            writer.write(line)
            written += len(line)
            size = os.path.getsize(path) - offset if os.path.exists(path) else 0
            self.assertGreaterEqual(size, written - WRITE_BUFFER)
        self.assertTrue(os.path.exists(path))
        queueId = self.successResultOf(writer.commit())
        self.assertEqual(self.spool.load(queueId).size, 5000 * 1000)

    def test_queueIds(self):
        """
        Queue ids are upper-case hex, unique, and sort by allocation time.
        """
        ids = [newQueueId() for _ in range(2000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(sorted(ids), ids)
        for queueId in ids[:10]:
            self.assertTrue(12 <= len(queueId) <= 20)
            self.assertEqual(queueId, queueId.upper())
            int(queueId, 16)

    def test_commitWithRealReactor(self):
        """
        With a real reactor the fsyncs run in the thread pool.
        """
        spool = Spool(self.mktemp())
        writer = spool.newMessage(makeEnvelope())
        writer.write(MESSAGE)

        def committed(queueId):
            self.assertEqual(spool.pending(), [queueId])
            with spool.openMessage(queueId) as f:
                self.assertEqual(f.read(), MESSAGE)

        return writer.commit().addCallback(committed)

    def test_abortDuringCommit(self):
        """
        A connection lost while the commit runs: the message is dropped and
        the commit fails, so no 250 goes out.
        """
        spool = Spool(self.mktemp())
        writer = spool.newMessage(makeEnvelope())
        writer.write(MESSAGE)
        d = writer.commit()
        writer.abort()

        def failed(f):
            f.trap(SMTPReply)
            self.assertEqual(spool.pending(), [])
            self.assertEqual(os.listdir(spool.queueDirectory), [])

        return d.addCallbacks(lambda _: self.fail("commit succeeded"), failed)


class SpoolStateTests(SpoolTestsMixin, unittest.TestCase):
    def test_firstLoadReadsNoFile(self):
        """
        The first load of a message just committed is the entry as its queue
        file gives it, without reading the file; later loads read it.  A
        change (L{Spool.update}) drops the remembered entry.
        """
        queueId = self.commitMessage()
        loadEntry = queuefile.loadEntry
        onDisk, _ = loadEntry(self.spool.queuePath(queueId))
        opened = []
        self.patch(queuefile, "loadEntry", lambda p: opened.append(p) or loadEntry(p))
        first = self.spool.load(queueId)
        self.assertEqual((first, opened), (onDisk, []))
        self.assertEqual(
            (first.contentOffset, first.size, first.messagePath),
            (onDisk.contentOffset, onDisk.size, onDisk.messagePath),
        )
        self.spool.load(queueId)
        self.assertEqual(len(opened), 1)
        other = self.commitMessage()
        entry = self.spool.load(other)
        self.spool.remember(entry)
        entry.attempts = 2
        self.spool.update(entry)
        self.assertEqual(self.spool.load(other).attempts, 2)
        self.assertEqual(len(opened), 2)

    def test_update(self):
        """
        update() writes the new state in place, into the queue file's other
        state slot: the same file (no temporary, no rename), the message's
        bytes untouched.
        """
        queueId = self.commitMessage()
        path = self.spool.queuePath(queueId)
        inode = os.stat(path).st_ino
        entry = self.spool.load(queueId)
        entry.recipients["bob@example.org"] = DELIVERED
        entry.recipients["carol@example.org"] = FAILED
        entry.errors["carol@example.org"] = "550 5.1.1 no such user"
        entry.attempts = 3
        entry.nextAttempt = 1_700_000_600
        entry.lastError = "451 4.3.0 try later"
        self.spool.update(entry)
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertEqual(self.queueFiles(), [queueId])
        again = self.spool.load(queueId)
        self.assertEqual(again, entry)
        self.assertEqual(again.pendingRecipients(), [])
        self.assertEqual(stateOnDisk(self.spool, queueId)["attempts"], 3)
        # A second change goes into the first slot again, the third...
        for attempts in (4, 5):
            entry.attempts = attempts
            self.spool.update(entry)
            self.assertEqual(Spool(self.directory).load(queueId), entry)
        with self.spool.openMessage(queueId) as f:
            self.assertEqual(f.read(), MESSAGE)

    def test_flags(self):
        """
        C{held}, C{isBounce} and C{delayWarned} are durable; a state
        written before they existed loads with them false.
        """
        queueId = self.commitMessage()
        entry = self.spool.load(queueId)
        self.assertEqual((entry.held, entry.isBounce, entry.delayWarned), (False,) * 3)
        entry.held = entry.delayWarned = True
        self.spool.update(entry)
        self.assertEqual(self.spool.load(queueId), entry)
        data = stateOnDisk(self.spool, queueId)
        self.assertTrue(data["held"])
        for key in ("held", "isBounce", "delayWarned"):
            del data[key]
        old = SpoolEntry.fromJSON(data, "", 0)
        self.assertEqual((old.held, old.isBounce, old.delayWarned), (False,) * 3)

    def test_bounceWriter(self):
        writer = self.spool.newMessage(makeEnvelope())
        writer.isBounce = True
        writer.write(MESSAGE)
        queueId = self.successResultOf(writer.commit())
        self.assertTrue(self.spool.load(queueId).isBounce)

    def test_remove(self):
        queueId = self.commitMessage()
        other = self.commitMessage()
        self.spool.remove(queueId)
        self.assertEqual(self.queueFiles(), [other])
        self.assertEqual(self.spool.pending(), [other])
        self.assertRaises(FileNotFoundError, self.spool.load, queueId)

    def test_pendingSorted(self):
        ids = [self.commitMessage() for _ in range(5)]
        self.assertEqual(self.spool.pending(), ids)

    def test_recover(self):
        """
        recover() removes everything in tmp/ (messages being received,
        whose commit did not rename them into queue/) and keeps complete
        entries.
        """
        complete = self.commitMessage()
        # A message being received, its file created.
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(MESSAGE * (WRITE_BUFFER // len(MESSAGE) + 1))
        self.assertEqual(self.tmpFiles(), [writer.queueId])
        self.assertEqual(self.spool.pending(), [complete])

        restarted = Spool(self.directory, reactor=self.clock)
        self.assertEqual(restarted.recover(), [complete])
        self.assertEqual(self.tmpFiles(), [])
        self.assertEqual(self.queueFiles(), [complete])
        with restarted.openMessage(complete) as f:
            self.assertEqual(f.read(), MESSAGE)

    def test_recoverUnreadableQueueFile(self):
        """
        A queue file without a valid state slot (only a disk that lost
        acknowledged data makes one) cannot be delivered: set aside.
        """
        queueId = self.commitMessage()
        with open(self.spool.queuePath(queueId), "r+b") as f:
            f.seek(queuefile.SLOTS)
            f.write(b"\xff" * 16)
        self.assertEqual(self.spool.recover(), [])
        self.assertEqual(self.queueFiles(), [queueId + ".broken"])


class SpoolChangeOrderTests(SpoolTestsMixin, unittest.TestCase):
    """
    The changes of an entry run in the thread pool (here: when the test
    says), one at a time in the order asked, and this process's readers see
    each at once.  So does the creation of a large message's file.
    """

    def setUp(self):
        super().setUp()
        self.queued = []

        def runBlocking(f, *args):
            d = defer.Deferred()
            self.queued.append((f, args, d))
            return d

        self.patch(self.spool, "_runBlocking", runBlocking)

    def runNext(self):
        f, args, d = self.queued.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def committed(self):
        """
        Commit a message (its commit's thread run at once).

        @return: its queue id.
        """
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(MESSAGE)
        d = writer.commit()
        self.runNext()
        return self.successResultOf(d)

    def onDisk(self, queueId):
        return stateOnDisk(self.spool, queueId)

    def test_updatesInOrderAndSeenAtOnce(self):
        queueId = self.committed()
        entry = self.spool.load(queueId)
        entry.attempts = 1
        first = self.spool.update(entry)
        entry.attempts = 2
        second = self.spool.update(entry)
        removed = self.spool.remove(queueId)
        # One change at a time: the second waits for the first.
        self.assertEqual(len(self.queued), 1)
        self.assertEqual(self.onDisk(queueId)["attempts"], 0)
        self.assertEqual(self.spool.pending(), [])
        self.runNext()
        self.successResultOf(first)
        self.assertEqual(self.onDisk(queueId)["attempts"], 1)
        self.assertNoResult(second)
        self.runNext()
        self.successResultOf(second)
        self.assertEqual(self.onDisk(queueId)["attempts"], 2)
        self.assertNoResult(removed)
        self.runNext()
        self.successResultOf(removed)
        self.assertEqual(self.queueFiles(), [])
        self.assertEqual(self.spool._changing, {})

    def test_newestStateReadAtOnce(self):
        queueId = self.committed()
        entry = self.spool.load(queueId)
        entry.held = True
        written = self.spool.update(entry)
        self.assertTrue(self.spool.load(queueId).held)
        self.assertFalse(self.onDisk(queueId)["held"])
        self.runNext()
        self.successResultOf(written)
        self.assertTrue(self.onDisk(queueId)["held"])

    def test_refusedChangeUndone(self):
        """
        The disk refuses the new state: the update fails and the readers
        see the old state again.
        """
        queueId = self.committed()
        entry = self.spool.load(queueId)
        entry.attempts = 7
        written = self.spool.update(entry)
        self.assertEqual(self.spool.load(queueId).attempts, 7)

        def pwrite(fd, data, offset):
            raise OSError(30, "Read-only file system")

        self.patch(os, "pwrite", pwrite)
        self.runNext()
        self.failureResultOf(written, OSError)
        self.assertEqual(self.spool.load(queueId).attempts, 0)
        self.assertEqual(self.onDisk(queueId)["attempts"], 0)

    def test_largeMessageFileCreatedInAThread(self):
        """
        A message outgrowing the writer's buffer has its file created in
        the thread pool; what arrives meanwhile is written after it.
        """
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(b"a" * WRITE_BUFFER)
        self.assertEqual(self.queued, [])
        writer.write(b"b" * 10)
        self.assertEqual(self.tmpFiles(), [])
        writer.write(b"c" * 10)
        self.runNext()
        self.assertEqual(self.tmpFiles(), [writer.queueId])
        d = writer.commit()
        self.runNext()
        queueId = self.successResultOf(d)
        with self.spool.openMessage(queueId) as f:
            self.assertEqual(f.read(), b"a" * WRITE_BUFFER + b"b" * 10 + b"c" * 10)

    def test_abortedWhileCreating(self):
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(b"a" * (WRITE_BUFFER + 1))
        writer.abort()
        self.runNext()
        self.assertEqual(self.tmpFiles(), [])

    def test_creationFails(self):
        """
        The file cannot be created (a full file table): the next write is
        refused with 452 4.3.1 and the commit with 451 4.3.0; nothing is
        left in C{tmp/} or C{queue/}.
        """
        writer = self.spool.newMessage(makeEnvelope())
        realOpen = os.open

        def full(path, flags, *args):
            if path.startswith(self.spool.tmpDirectory):
                raise OSError(24, "Too many open files")
            return realOpen(path, flags, *args)

        self.patch(os, "open", full)
        writer.write(b"a" * (WRITE_BUFFER + 1))
        self.runNext()
        error = self.assertRaises(SMTPReply, writer.write, b"more")
        self.assertEqual((error.code, error.status), (452, "4.3.1"))
        d = writer.commit()
        self.runNext()
        failure = self.failureResultOf(d, SMTPReply)
        self.assertEqual((failure.value.code, failure.value.status), (451, "4.3.0"))
        self.assertEqual((self.tmpFiles(), self.queueFiles()), ([], []))
        self.flushLoggedErrors(OSError)
