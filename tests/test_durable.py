# -*- test-case-name: tests.test_durable -*-
"""
L{msa.durable}: the one durable write (temporary file, write, fsync, rename,
directory fsync), and its three users: the spool's state updates and
commits, the outbox, the account file.

Durability is shown by observing the system calls, not by losing power: a
real power loss (or its stand-in, dropping a file system's unsynced writes
with dm-flakey or dm-log-writes) needs a block device and the device mapper,
which the test machine does not offer, and killing the process (as
L{tests.test_crash} does) keeps the page cache, so it cannot tell a missing
fsync.  So C{os.fsync} and C{os.replace} are wrapped to record, in order,
which file or directory each call touched; the promise is in that order:
the file's data synced before the rename, the directory synced after it.
Failures are real where the kernel can produce them (a full tmpfs, a
read-only remount) and injected where it cannot (EIO from fsync).
"""

import errno
import io
import json
import os
import stat

from twisted.internet import task
from twisted.trial import unittest

from msa import durable
from msa.accounts.model import makeAccount, readAccounts, writeAccounts
from msa.queue.spool import Spool, SpoolEntry
from msa.relay.outbox import OutboxDownstream
from tests.faultfs import fillFileSystem, mountTmpfs, remount
from tests.test_relay import makeEnvelope


def _fdPath(fd) -> str:
    fd = fd if isinstance(fd, int) else fd.fileno()
    return os.readlink(f"/proc/self/fd/{fd}")


class SyscallLog:
    """
    Wrap C{os.fsync}, C{os.fdatasync} and C{os.replace} for one test,
    recording C{("fsync", path)}, C{("fdatasync", path)} and
    C{("replace", source, target)} with real paths; the calls themselves
    go through.

    @ivar failFsync: a path whose fsync fails with EIO instead.
    """

    def __init__(self, testCase) -> None:
        self.calls: list[tuple] = []
        self.failFsync: str | None = None
        self._fsync, self._replace = os.fsync, os.replace
        testCase.patch(os, "fsync", self.fsync)
        testCase.patch(os, "replace", self.replace)
        self._fdatasync = os.fdatasync
        testCase.patch(os, "fdatasync", self.fdatasync)

    def fdatasync(self, fd) -> None:
        self.calls.append(("fdatasync", _fdPath(fd)))
        self._fdatasync(fd)

    def fsync(self, fd) -> None:
        path = _fdPath(fd)
        self.calls.append(("fsync", path))
        if path == self.failFsync:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._fsync(fd)

    def replace(self, source, target) -> None:
        self.calls.append(
            ("replace", os.path.realpath(source), os.path.realpath(target))
        )
        self._replace(source, target)


def _umask(testCase, mask: int) -> None:
    old = os.umask(mask)
    testCase.addCleanup(os.umask, old)


class WriteDurablyTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.realpath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "file.json")
        _umask(self, 0o022)

    def listing(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def test_bytes(self):
        """
        The file holds exactly the bytes, with mode 0600 by default, and
        nothing else is left in the directory.
        """
        durable.writeDurably(self.path, b"{}\n")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"{}\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.listing(), ["file.json"])

    def test_writeSyncedMode(self):
        """
        L{durable.writeSynced} (the spool's state file in C{tmp/}) writes
        the bytes with mode 0600 by default, owner-only like every file of
        a message.
        """
        durable.writeSynced(self.path, b"{}\n")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"{}\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_chunks(self):
        """
        An iterable of chunks is written in order, consumed as it comes.
        """
        consumed = []

        def chunks():
            for chunk in (b"a" * 70000, b"", b"bc", b"\r\n"):
                consumed.append(len(chunk))
                yield chunk

        durable.writeDurably(self.path, chunks())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"a" * 70000 + b"bc\r\n")
        self.assertEqual(consumed, [70000, 0, 2, 2])

    def test_modeLessUmask(self):
        """
        The mode is given to the new file less the umask, as L{os.open}
        does: 0666 under umask 022 is 0644.
        """
        durable.writeDurably(self.path, b"x", mode=0o666)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)

    def test_replacesByRename(self):
        """
        An existing file is replaced by a new one (a new inode, renamed
        over it), never rewritten in place: a reader holding the old file
        still reads the old bytes.
        """
        durable.writeDurably(self.path, b"old")
        with open(self.path, "rb") as reader:
            before = os.fstat(reader.fileno()).st_ino
            durable.writeDurably(self.path, b"new")
            self.assertEqual(reader.read(), b"old")
        self.assertNotEqual(os.stat(self.path).st_ino, before)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"new")

    def test_syncOrder(self):
        """
        The temporary file (hidden, in the same directory, ending in .tmp)
        is fsynced, then renamed over the target, then the directory is
        fsynced: the data is on disk before the name points at it, and the
        name is on disk before writeDurably returns.
        """
        log = SyscallLog(self)
        durable.writeDurably(self.path, b"data")
        self.assertEqual(len(log.calls), 3, log.calls)
        (op1, tmp), (op2, source, target), (op3, directory) = log.calls
        self.assertEqual((op1, op2, op3), ("fsync", "replace", "fsync"))
        self.assertEqual((source, target), (tmp, self.path))
        self.assertEqual(os.path.dirname(tmp), self.directory)
        name = os.path.basename(tmp)
        self.assertTrue(name.startswith(".file.json.") and name.endswith(".tmp"))
        self.assertEqual(directory, self.directory)

    def test_uniqueTemporaryNames(self):
        """
        Without a given temporary name, each write uses a new one, so two
        writers (two admin commands) never write into the same file.
        """
        log = SyscallLog(self)
        durable.writeDurably(self.path, b"1")
        durable.writeDurably(self.path, b"2")
        temporaries = [c[1] for c in log.calls if c[0] == "replace"]
        self.assertEqual(len(set(temporaries)), 2)

    def test_givenTemporaryName(self):
        """
        A given temporary name is used, and a leftover of a crash there is
        overwritten, not appended to.
        """
        tmpPath = self.path + ".tmp"
        with open(tmpPath, "wb") as f:
            f.write(b"leftover of a crash, longer than the data")
        log = SyscallLog(self)
        durable.writeDurably(self.path, b"data", tmpPath=tmpPath)
        self.assertIn(("replace", tmpPath, self.path), log.calls)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"data")
        self.assertEqual(self.listing(), ["file.json"])

    def test_failedWriteLeavesNothing(self):
        """
        The data source fails halfway: the error comes through, the old
        file is unchanged and the temporary file is gone.
        """
        durable.writeDurably(self.path, b"old")

        def chunks():
            yield b"half"
            raise OSError(errno.ENOSPC, "injected")

        error = self.assertRaises(OSError, durable.writeDurably, self.path, chunks())
        self.assertEqual(error.errno, errno.ENOSPC)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(self.listing(), ["file.json"])

    def test_failedFsyncLeavesNothing(self):
        """
        The fsync of the temporary file fails (EIO, injected: see the
        module docstring): no rename happens, the old file is unchanged and
        the temporary file is gone.
        """
        durable.writeDurably(self.path, b"old")
        log = SyscallLog(self)
        original = log.fsync

        def failOnTemporary(fd):
            log.failFsync = _fdPath(fd)
            original(fd)

        self.patch(os, "fsync", failOnTemporary)
        error = self.assertRaises(OSError, durable.writeDurably, self.path, b"new")
        self.assertEqual(error.errno, errno.EIO)
        self.assertEqual([c[0] for c in log.calls], ["fsync"])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(self.listing(), ["file.json"])

    def test_failedRenameLeavesNothing(self):
        """
        The rename fails (the target is a directory): the temporary file is
        gone.
        """
        os.makedirs(self.path)
        self.assertRaises(OSError, durable.writeDurably, self.path, b"data")
        self.assertEqual(self.listing(), ["file.json"])
        self.assertEqual(os.listdir(self.path), [])

    def test_fullDisk(self):
        """
        A real full file system (a tmpfs): ENOSPC comes through, the old
        file is unchanged and no temporary file is left.
        """
        mount = mountTmpfs(self, "1m")
        path = os.path.join(mount, "accounts.json")
        durable.writeDurably(path, b"old")
        filler = fillFileSystem(mount)
        error = self.assertRaises(
            OSError, durable.writeDurably, path, b"x" * 256 * 1024
        )
        self.assertEqual(error.errno, errno.ENOSPC)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(sorted(os.listdir(mount)), ["accounts.json", "filler"])
        os.unlink(filler)
        durable.writeDurably(path, b"new")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"new")

    def test_readOnly(self):
        """
        A file system remounted read-only: EROFS comes through and the old
        file is unchanged.
        """
        mount = mountTmpfs(self, "1m")
        path = os.path.join(mount, "accounts.json")
        durable.writeDurably(path, b"old")
        remount(mount, "ro")
        self.addCleanup(remount, mount, "rw")
        error = self.assertRaises(OSError, durable.writeDurably, path, b"new")
        self.assertEqual(error.errno, errno.EROFS)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(os.listdir(mount), ["accounts.json"])


class PublishTests(unittest.TestCase):
    def test_renamesThenDirectorySync(self):
        """
        L{durable.publish} renames in the order given, then fsyncs the
        directory once.
        """
        base = os.path.realpath(self.mktemp())
        source, target = os.path.join(base, "tmp"), os.path.join(base, "queue")
        os.makedirs(source)
        os.makedirs(target)
        for name in ("a.msg", "a.json"):
            durable.writeSynced(os.path.join(source, name), b"x")
        log = SyscallLog(self)
        moves = [
            (os.path.join(source, n), os.path.join(target, n))
            for n in ("a.msg", "a.json")
        ]
        durable.publish(moves, target)
        self.assertEqual(
            log.calls,
            [("replace", *moves[0]), ("replace", *moves[1]), ("fsync", target)],
        )
        self.assertEqual(sorted(os.listdir(target)), ["a.json", "a.msg"])


class UsersTests(unittest.TestCase):
    """
    The spool, the outbox and the account file write through the helper:
    each fsyncs the file before its rename and the directory after.
    """

    def assertDurable(self, calls: list[tuple], target: str) -> None:
        replaces = [c for c in calls if c[0] == "replace" and c[2] == target]
        self.assertEqual(len(replaces), 1, calls)
        index = calls.index(replaces[0])
        self.assertIn(("fsync", replaces[0][1]), calls[:index])
        self.assertIn(("fsync", os.path.dirname(target)), calls[index + 1 :])

    def test_spoolCommitAndUpdate(self):
        """
        A commit fsyncs the queue file (message and state in one) in tmp/,
        moves it into queue/ and fsyncs that; an update writes the state in
        place and fdatasyncs the file: no rename, no directory fsync.
        """
        spool = Spool(os.path.realpath(self.mktemp()), reactor=task.Clock())
        log = SyscallLog(self)
        writer = spool.newMessage(makeEnvelope())
        writer.write(b"Subject: s\r\n\r\nbody\r\n")
        queueId = self.successResultOf(writer.commit())
        self.assertDurable(log.calls, spool.queuePath(queueId))
        self.assertEqual(len(log.calls), 3, log.calls)
        del log.calls[:]
        entry = spool.load(queueId)
        entry.attempts = 3
        spool.update(entry)
        self.assertEqual([c[0] for c in log.calls], ["fdatasync"])
        self.assertEqual(spool.load(queueId).attempts, 3)
        self.assertEqual(os.listdir(spool.queueDirectory), [queueId])

    def test_outbox(self):
        """
        The outbox writes C{<id>.eml} through a hidden C{.<id>.eml.tmp},
        the message ending in CRLF, with mode 0666 less the umask.
        """
        _umask(self, 0o027)
        directory = os.path.realpath(self.mktemp())
        outbox = OutboxDownstream(directory, reactor=task.Clock())
        entry = _entry("Q1")
        log = SyscallLog(self)
        path = outbox._write(entry, io.BytesIO(b"Subject: s\r\n\r\nno newline"))
        self.assertEqual(path, os.path.join(directory, "Q1.eml"))
        self.assertDurable(log.calls, path)
        self.assertIn(
            ("replace", os.path.join(directory, ".Q1.eml.tmp"), path), log.calls
        )
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: s\r\n\r\nno newline\r\n")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertEqual(os.listdir(directory), ["Q1.eml"])

    def test_outboxFailureLeavesNothing(self):
        """
        A message file that fails while it is copied leaves no temporary
        file in the outbox.
        """
        directory = os.path.realpath(self.mktemp())
        outbox = OutboxDownstream(directory, reactor=task.Clock())

        class Failing(io.BytesIO):
            def read(self, size=-1):
                raise OSError(errno.EIO, "injected")

        self.assertRaises(OSError, outbox._write, _entry("Q2"), Failing())
        self.assertEqual(os.listdir(directory), [])

    def test_accounts(self):
        """
        L{writeAccounts} writes the account file durably, mode 0600, and
        leaves no temporary file.
        """
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "accounts.json")
        log = SyscallLog(self)
        writeAccounts(path, {"alice": makeAccount("alice", "pw", ["localhost"])})
        self.assertDurable(log.calls, path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(directory), ["accounts.json"])
        with open(path, encoding="utf-8") as f:
            self.assertEqual(sorted(json.load(f)["accounts"]), ["alice"])
        self.assertEqual(sorted(readAccounts(path)), ["alice"])


def _entry(queueId: str) -> SpoolEntry:
    """
    A spool entry of an earlier version (no digest recorded), as the outbox
    reads it.
    """
    return SpoolEntry(queueId=queueId, envelope=makeEnvelope(), recipients={})
