# -*- test-case-name: tests.test_groupcommit -*-
"""
Fewer file system operations per message, with the same durability:

  - L{msa.groupcommit.GroupCommit}, the one group-commit primitive: jobs
    submitted from threads (blocking) and from the reactor (a L{Deferred})
    share rounds; a round runs in a thread, never the reactor's; a failed
    round fails each of its jobs and only them;
  - L{msa.durable.DirectorySync}, the group commit of a directory's fsync
    built on it: concurrent callers share one fsync, and each returns only
    after an fsync that started after its call;
  - the spool's commit and L{msa.queue.spool.Spool.removeDelivered} use it,
    in order (renames, then the fsync; state file, fsync, then message
    file);
  - the outbox is filled by a hard link to the (already durable) spool
    file, not a copy and a second fsync.
"""

import errno
import os
import threading

from twisted.internet import defer, reactor, task, threads
from twisted.internet.interfaces import IReactorThreads
from twisted.python import failure
from twisted.trial import unittest
from zope.interface import implementer

from msa import durable
from msa.audit import AuditLog
from msa.audit.log import FACT_GATHER
from msa.durable import DirectorySync, GroupCommit
from msa.queue.spool import Spool
from msa.relay.outbox import OutboxDownstream
from tests.relaydata import makeEnvelope
from tests.waiting import waitUntil, waitUntilBlocking


class BlockingFsync:
    """
    A fake directory fsync that records its calls and, for the first one,
    waits until released, so that other callers arrive while it runs.
    """

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.log: list[str] = []

    def __call__(self, path: str) -> None:
        self.calls += 1
        self.log.append(f"fsync {self.calls} start")
        if self.calls == 1:
            self.started.set()
            self.release.wait(10)
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")


class DirectorySyncTests(unittest.TestCase):
    """
    L{DirectorySync.sync}.
    """

    def test_single(self):
        """
        One caller, one real fsync of the directory.
        """
        calls = []
        syncer = DirectorySync(self.mktemp(), calls.append)
        syncer.sync()
        syncer.sync()
        self.assertEqual(calls, [syncer.path, syncer.path])
        self.assertEqual(syncer.fsyncs, 2)

    def test_realDirectory(self):
        path = self.mktemp()
        os.mkdir(path)
        DirectorySync(path).sync()

    def _concurrent(self, fsync: BlockingFsync, late: int):
        """
        One caller starts an fsync; C{late} callers arrive while it runs.

        @return: the syncer, the results (None or the exception) of the
            first caller and of the late ones, and the log of events.
        """
        syncer = DirectorySync("dir", fsync)
        results: dict[int, object] = {}

        def call(n):
            try:
                syncer.sync()
                results[n] = None
            except OSError as e:
                results[n] = e
            fsync.log.append(f"caller {n} returned")

        first = threading.Thread(target=call, args=(0,))
        first.start()
        self.assertTrue(fsync.started.wait(10))
        others = [threading.Thread(target=call, args=(n,)) for n in range(1, late + 1)]
        for t in others:
            t.start()
        waitUntilBlocking(
            lambda: syncer.waiting == late, 10, "the late callers to wait"
        )
        fsync.release.set()
        for t in [first, *others]:
            t.join(10)
        return syncer, results, fsync.log

    def test_lateCallersShareOneFsync(self):
        """
        Callers that arrive while an fsync runs are served by one fsync
        that starts after that one ends, not by the one already running.
        """
        fsync = BlockingFsync()
        syncer, results, log = self._concurrent(fsync, 5)
        self.assertEqual(fsync.calls, 2)
        self.assertEqual(syncer.fsyncs, 2)
        self.assertEqual(results, {n: None for n in range(6)})
        second = log.index("fsync 2 start")
        for n in range(1, 6):
            self.assertGreater(log.index(f"caller {n} returned"), second)
        self.assertLess(log.index("caller 0 returned"), second)

    def test_failureReachesItsRound(self):
        """
        A failed fsync fails every caller it served, and only them; the next
        round runs its own fsync.
        """
        fsync = BlockingFsync(fail=True)
        syncer, results, log = self._concurrent(fsync, 3)
        self.assertIsInstance(results[0], OSError)
        self.assertEqual(results[0].errno, errno.EIO)
        self.assertEqual(
            {n: results[n] for n in (1, 2, 3)}, {1: None, 2: None, 3: None}
        )
        self.assertEqual(fsync.calls, 2)
        syncer.sync()
        self.assertEqual(fsync.calls, 3)


class Rounds:
    """
    A C{runRound} for L{GroupCommit} that records each round's jobs and
    thread and, while C{gate} is set, makes the first round wait for it.
    """

    def __init__(self) -> None:
        self.rounds: list[list[str]] = []
        self.threads: list[threading.Thread] = []
        self.started = threading.Event()
        self.gate: threading.Event | None = None
        self.failing = False

    def __call__(self, jobs: list[str]) -> list[str]:
        self.rounds.append(list(jobs))
        self.threads.append(threading.current_thread())
        self.started.set()
        if self.gate is not None and len(self.rounds) == 1:
            self.gate.wait(10)
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        return [job.upper() for job in jobs]


class GroupCommitTests(unittest.TestCase):
    """
    L{GroupCommit.commit} (from the reactor) and L{GroupCommit.commitBlocking}
    (from threads) sharing rounds.
    """

    timeout = 15

    def test_withoutThreadPool(self):
        """
        With a reactor that has no thread pool (a L{task.Clock}), a job
        submitted from the reactor runs at once, in the caller's thread.
        """
        rounds = Rounds()
        commits = GroupCommit(rounds, task.Clock())
        self.assertEqual(self.successResultOf(commits.commit("a")), "A")
        self.assertEqual(self.successResultOf(commits.commit("b")), "B")
        self.assertEqual(rounds.rounds, [["a"], ["b"]])

    def test_jobSubmittedFromARoundWithoutThreadPool(self):
        """
        Without a thread pool, a round run by a blocking caller that
        submits a job itself (as a spool commit's round can start a
        removal) has that job run right after it, in the same thread: the
        lock is re-entrant, so this neither deadlocks nor waits.
        """
        inner = []

        def runRound(jobs):
            if jobs == ["outer"]:
                inner.append(commits.commit("inner"))
            return [job.upper() for job in jobs]

        commits = GroupCommit(runRound, task.Clock())
        self.assertEqual(commits.commitBlocking("outer"), "OUTER")
        self.assertEqual(self.successResultOf(inner[0]), "INNER")
        self.assertEqual(commits.rounds, 2)

    def test_failureFailsTheRound(self):
        rounds = Rounds()
        rounds.failing = True
        commits = GroupCommit(rounds, task.Clock())
        failure = self.failureResultOf(commits.commit("a"), OSError)
        self.assertEqual(failure.value.errno, errno.EIO)
        rounds.failing = False
        self.assertEqual(self.successResultOf(commits.commit("b")), "B")

    def test_wrongResultCount(self):
        """
        A C{runRound} that does not give one result per job fails its
        round: no job gets another's result.
        """
        commits = GroupCommit(lambda jobs: [], task.Clock())
        failure = self.failureResultOf(commits.commit("a"), RuntimeError)
        self.assertIn("a round of 1 job(s) gave 0 result(s)", str(failure.value))

    @defer.inlineCallbacks
    def test_globalReactorByDefault(self):
        """
        Without a reactor given (as the spool's and the audit log's are
        made), a job from the reactor runs in the global reactor's thread
        pool, never in the reactor thread.
        """
        rounds = Rounds()
        result = yield GroupCommit(rounds).commit("a")
        self.assertEqual(result, "A")
        self.assertNotIn(threading.current_thread(), rounds.threads)

    def test_oneDrainScheduled(self):
        """
        Jobs submitted from the reactor before the thread pool picks up the
        first one's drain share that drain and its round: one thread-pool
        call, not one each.
        """
        calls = []

        class Pool:
            def callInThread(self, f):
                calls.append(f)

        @implementer(IReactorThreads)
        class PooledClock(task.Clock):
            getThreadPool = Pool

            def callFromThread(self, f, *args):
                f(*args)

        rounds = Rounds()
        commits = GroupCommit(rounds, PooledClock())
        results = [commits.commit(name) for name in ("a", "b", "c")]
        self.assertEqual(len(calls), 1)
        calls[0]()
        self.assertEqual(rounds.rounds, [["a", "b", "c"]])
        self.assertEqual([self.successResultOf(d) for d in results], ["A", "B", "C"])

    @defer.inlineCallbacks
    def test_reactorJobsShareARound(self):
        """
        Jobs submitted from the reactor while a round runs share the next
        round, run in the reactor's thread pool (never the reactor thread);
        their L{Deferred}s fire in the reactor thread with their own
        results.
        """
        rounds = Rounds()
        rounds.gate = threading.Event()
        commits = GroupCommit(rounds, reactor)
        first = commits.commit("first")
        yield waitUntil(rounds.started.is_set, 10, "the first round")
        later = [commits.commit(name) for name in ("b", "c", "d")]
        rounds.gate.set()
        fired = []
        for d in [first, *later]:
            d.addCallback(lambda r: fired.append((r, threading.current_thread())))
        yield defer.gatherResults([first, *later])
        self.assertEqual(rounds.rounds, [["first"], ["b", "c", "d"]])
        self.assertEqual(commits.rounds, 2)
        main = threading.current_thread()
        self.assertNotIn(main, rounds.threads)
        self.assertEqual(
            fired, [("FIRST", main), ("B", main), ("C", main), ("D", main)]
        )

    @defer.inlineCallbacks
    def test_handedBackAfterABlockingRound(self):
        """
        A job from the reactor that arrives while a thread runs a blocking
        caller's round is run after it, by the pool, though no blocking
        caller waits for it.
        """
        rounds = Rounds()
        rounds.gate = threading.Event()
        commits = GroupCommit(rounds, reactor)
        blocking = threads.deferToThread(commits.commitBlocking, "one")
        yield waitUntil(rounds.started.is_set, 10, "the first round")
        fromReactor = commits.commit("two")
        rounds.gate.set()
        self.assertEqual((yield blocking), "ONE")
        self.assertEqual((yield fromReactor), "TWO")
        self.assertEqual(rounds.rounds, [["one"], ["two"]])

    @defer.inlineCallbacks
    def test_mixedCallers(self):
        """
        A thread's blocking job and the reactor's jobs, submitted while a
        round runs, share the next round; a round that fails fails the
        blocking caller and the L{Deferred}s alike.
        """
        rounds = Rounds()
        rounds.gate = threading.Event()
        commits = GroupCommit(rounds, reactor)
        blocking = threads.deferToThread(commits.commitBlocking, "one")
        yield waitUntil(rounds.started.is_set, 10, "the first round")
        rounds.failing = True
        fromThread = threads.deferToThread(commits.commitBlocking, "two")
        yield waitUntil(lambda: commits.waiting == 1, 10, "the blocking caller")
        fromReactor = commits.commit("three")
        rounds.gate.set()
        self.assertEqual((yield self.assertFailure(blocking, OSError)).errno, errno.EIO)
        yield self.assertFailure(fromThread, OSError)
        yield self.assertFailure(fromReactor, OSError)
        self.assertEqual(rounds.rounds, [["one"], ["two", "three"]])

    @defer.inlineCallbacks
    def test_roundEndWakesOnlyWhomItConcerns(self):
        """
        Five threads wait for a running round with jobs of the next: when
        it ends, one of them is woken to run the next round, and the other
        four once, when that round is done (it takes 0.2 s: time enough to
        wake them all).  Five wake-ups: each spurious one is a hand-off of
        the GIL that the reactor thread pays for too (one condition
        notified to all, as before, woke the four at both rounds' ends:
        nine).
        """
        gates = [threading.Event(), threading.Event()]
        started: list[list[str]] = []

        def runRound(jobs: list[str]) -> list[str]:
            started.append(list(jobs))
            if len(started) <= len(gates):
                gates[len(started) - 1].wait(10)
            return [job.upper() for job in jobs]

        commits = GroupCommit(runRound, reactor)
        first = threads.deferToThread(commits.commitBlocking, "one")
        yield waitUntil(lambda: started, 10, "the first round")
        names = ["two", "three", "four", "five", "six"]
        waiting = [threads.deferToThread(commits.commitBlocking, n) for n in names]
        yield waitUntil(lambda: commits.waiting == 5, 10, "five waiting callers")
        gates[0].set()
        self.assertEqual((yield first), "ONE")
        yield waitUntil(lambda: len(started) == 2, 10, "the second round")
        yield task.deferLater(reactor, 0.2, lambda: None)
        gates[1].set()
        results = yield defer.gatherResults(waiting)
        self.assertEqual(results, [n.upper() for n in names])
        self.assertEqual(sorted(started[1]), sorted(names))
        self.assertEqual(commits.wakeups, 5)


@implementer(IReactorThreads)
class InlineThreadsClock(task.Clock):
    """
    A clock whose "thread pool" runs each call at once, in this thread: a
    reactor with threads, deterministic.
    """

    def getThreadPool(self):
        return self

    def callInThread(self, f, *args):
        f(*args)

    def callInThreadWithCallback(self, onResult, f, *args):
        try:
            result = f(*args)
        except BaseException:
            onResult(False, failure.Failure())
        else:
            onResult(True, result)

    def callFromThread(self, f, *args):
        f(*args)


class GatherTests(unittest.TestCase):
    """
    L{GroupCommit}'s C{gatherDelay}: a round only L{GroupCommit.commit}
    jobs wait for starts after the delay, with every job submitted
    meanwhile; a blocking caller arriving meanwhile takes them along.
    """

    def setUp(self):
        self.clock = InlineThreadsClock()
        self.rounds: list[list[str]] = []

        def runRound(jobs):
            self.rounds.append(list(jobs))
            return jobs

        self.commits = GroupCommit(runRound, self.clock, gatherDelay=0.02)

    def test_gathered(self):
        first = self.commits.commit("one")
        second = self.commits.commit("two")
        self.assertEqual(self.rounds, [])
        self.assertNoResult(first)
        self.clock.advance(0.02)
        self.assertEqual(self.rounds, [["one", "two"]])
        self.assertEqual(
            (self.successResultOf(first), self.successResultOf(second)),
            ("one", "two"),
        )

    def test_blockingCallerTakesThemAlong(self):
        waiting = self.commits.commit("removal")
        self.assertEqual(self.commits.commitBlocking("commit"), "commit")
        self.assertEqual(self.rounds, [["removal", "commit"]])
        self.assertEqual(self.successResultOf(waiting), "removal")
        self.clock.advance(0.02)
        self.assertEqual(len(self.rounds), 1)

    def test_youngerRoundGetsItsOwnDelay(self):
        """
        A blocking caller takes the first job's round along before its
        delay is over; a job that comes after it is not run when that
        first delay ends, but after its own: so that it too can ride on a
        blocking caller's round (the relay's removals and records on the
        next commit's, under load).
        """
        first = self.commits.commit("removal 1")
        self.clock.advance(0.01)
        self.assertEqual(self.commits.commitBlocking("commit 1"), "commit 1")
        self.assertEqual(self.successResultOf(first), "removal 1")
        self.clock.advance(0.005)
        second = self.commits.commit("removal 2")
        self.clock.advance(0.005)
        # The first delay is over: the second job's round is 5 ms old.
        self.assertNoResult(second)
        self.clock.advance(0.01)
        self.assertEqual(self.commits.commitBlocking("commit 2"), "commit 2")
        self.assertEqual(self.successResultOf(second), "removal 2")
        self.assertEqual(
            self.rounds, [["removal 1", "commit 1"], ["removal 2", "commit 2"]]
        )
        # Its delay over with nothing pending: no round of its own.
        self.clock.advance(0.02)
        self.assertEqual(len(self.rounds), 2)
        third = self.commits.commit("removal 3")
        self.clock.advance(0.02)
        self.assertEqual(self.successResultOf(third), "removal 3")
        self.assertEqual(self.rounds[2:], [["removal 3"]])

    def test_youngerRoundRunsAfterItsDelay(self):
        """
        With no blocking caller to take it along, the younger round runs
        once its own delay is over.
        """
        self.commits.commit("removal 1")
        self.clock.advance(0.01)
        self.commits.commitBlocking("commit 1")
        self.clock.advance(0.005)
        second = self.commits.commit("removal 2")
        self.clock.advance(0.005)
        self.assertNoResult(second)
        self.clock.advance(0.015)
        self.assertEqual(self.successResultOf(second), "removal 2")
        self.assertEqual(self.rounds[-1], ["removal 2"])

    def test_auditFactsGathered(self):
        """
        The audit log's facts from the reactor (a delivery's record): one
        round, one fdatasync, for those submitted within the delay.
        """
        synced = []
        audit = AuditLog(
            os.path.join(self.mktemp(), "audit.jsonl"),
            fdatasync=synced.append,
            reactor=self.clock,
        )
        audit.open()
        before = len(synced)
        first = audit.submitFact("relayed", queueId="A")
        second = audit.submitFact("relayed", queueId="B")
        self.assertEqual(len(synced), before)
        self.clock.advance(FACT_GATHER)
        self.assertEqual(len(synced), before + 1)
        self.assertEqual(self.successResultOf(second), self.successResultOf(first) + 1)
        audit.close()

    def test_removalRidesOnACommit(self):
        """
        The spool's removal: its directory fsync joins the next commit's.
        """
        spool = Spool(self.mktemp(), self.clock)
        fsyncs = []
        spool.commits.directoryFsync = fsyncs.append
        writer = spool.newMessage(makeEnvelope(("bob@example.org",)))
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        delivered = self.successResultOf(writer.commit())
        removed = spool.removeDelivered(delivered)
        self.assertNoResult(removed)
        writer = spool.newMessage(makeEnvelope(("bob@example.org",)))
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        self.successResultOf(writer.commit())
        self.assertEqual(len(fsyncs), 2)
        self.assertIsNone(self.successResultOf(removed))
        self.clock.advance(0.02)
        self.assertEqual(len(fsyncs), 2)


class SpoolGroupCommitTests(unittest.TestCase):
    """
    The spool's commit and removal go through its group commit, after
    the rename of the queue file (commit) and after its removal.
    """

    def setUp(self):
        self.spool = Spool(self.mktemp(), task.Clock())
        self.seen: list[list[str]] = []
        self.fail = False

        def fsync(path):
            self.assertEqual(path, self.spool.queueDirectory)
            self.seen.append(sorted(os.listdir(path)))
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")

        self.spool.commits.directoryFsync = fsync

    def commit(self) -> str:
        writer = self.spool.newMessage(makeEnvelope(("bob@example.org",)))
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        return self.successResultOf(writer.commit())

    def test_commitSyncsAfterRenames(self):
        queueId = self.commit()
        self.assertEqual(self.seen, [[queueId]])
        self.assertEqual(self.spool.pending(), [queueId])
        self.assertEqual(os.listdir(self.spool.tmpDirectory), [])

    def test_commitFsyncFails(self):
        """
        The directory fsync fails: the commit fails with 451 and nothing of
        the message stays.
        """
        self.fail = True
        writer = self.spool.newMessage(makeEnvelope(("bob@example.org",)))
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        failure = self.failureResultOf(writer.commit())
        self.assertEqual(failure.value.code, 451)
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])

    def test_removeDelivered(self):
        """
        The queue file goes, then the fsync sees it gone.
        """
        queueId = self.commit()
        del self.seen[:]
        d = self.spool.removeDelivered(queueId)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.seen, [[]])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])

    def test_removeDeliveredFsyncFails(self):
        """
        The fsync fails: the L{Deferred} fails, the entry is gone from the
        queue (the removal may not be durable: the file may come back after
        a power loss, and be delivered again).
        """
        queueId = self.commit()
        self.fail = True
        failure = self.failureResultOf(self.spool.removeDelivered(queueId))
        self.assertEqual(failure.value.errno, errno.EIO)
        self.assertEqual(self.spool.pending(), [])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])
        self.fail = False
        self.assertEqual(self.spool.recover(), [])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])

    def test_removeDeliveredStateRefused(self):
        """
        The queue file cannot be removed (a read-only spool): the
        L{Deferred} fails with the error and the entry is intact, visible
        again.
        """
        queueId = self.commit()

        def refuse(path):
            raise OSError(errno.EROFS, "Read-only file system")

        self.patch(os, "unlink", refuse)
        failure = self.failureResultOf(self.spool.removeDelivered(queueId))
        self.assertEqual(failure.value.errno, errno.EROFS)
        self.patch(os, "unlink", os.remove)
        self.assertEqual(self.spool.pending(), [queueId])
        self.assertEqual(self.spool.load(queueId).queueId, queueId)

    def test_failedUnlinkFailsItsRemovalAlone(self):
        """
        A round carrying a removal whose unlink fails and a commit's fsync:
        the removal's result is the error, the rest of the round goes on
        (the directory is fsynced once, the other removal done).
        """
        stuck, gone = self.commit(), self.commit()
        del self.seen[:]
        unlink = os.unlink

        def refuseOne(path):
            if path.endswith(stuck):
                raise OSError(errno.EIO, "Input/output error")
            unlink(path)

        self.patch(os, "unlink", refuseOne)
        results = self.spool.commits._round([stuck, None, gone])
        self.assertEqual(results[0].errno, errno.EIO)
        self.assertEqual(results[1:], [None, None])
        self.assertEqual(self.seen, [[stuck]])

    def test_removeDeliveredInvisibleAtOnce(self):
        """
        While the removal runs in its thread, the entry is already gone for
        the readers of this process (L{Spool.pending}, L{Spool.load}), so
        that a queue listing or a flush never sees a delivered entry.
        """
        queueId = self.commit()
        started = []
        self.patch(
            self.spool.commits,
            "commit",
            lambda job: started.append(job) or defer.Deferred(),
        )
        self.spool.removeDelivered(queueId)
        # Its unlink is a job of the spool's next round.
        self.assertEqual(started, [queueId])
        self.assertEqual(self.spool.pending(), [])
        self.assertRaises(FileNotFoundError, self.spool.load, queueId)
        # Not yet removed from disk: the round does that.
        self.assertIn(queueId, os.listdir(self.spool.queueDirectory))


class OutboxCopyTests(unittest.TestCase):
    """
    The outbox gets a durable copy of the message (the queue file's
    content, not its state), the outbox directory's fsync a group commit
    shared by concurrent writes (L{DirectorySync}).
    """

    def setUp(self):
        self.spool = Spool(self.mktemp(), task.Clock())
        self.directory = os.path.join(self.mktemp(), "outbox")
        self.outbox = OutboxDownstream(self.directory, task.Clock())
        self.fsyncs: list[list[str]] = []

        def fsyncDirectory(path):
            self.fsyncs.append(sorted(os.listdir(path)))
            durable.fsyncDirectory(path)

        self.outbox.directorySync = DirectorySync(self.directory, fsyncDirectory)

    def write(self, data: bytes) -> tuple[object, str]:
        writer = self.spool.newMessage(makeEnvelope(("bob@example.org",)))
        writer.write(data)
        queueId = self.successResultOf(writer.commit())
        entry = self.spool.load(queueId)
        with self.spool.openMessage(queueId) as f:
            path = self.outbox._write(entry, f)
        return entry, path

    def test_copied(self):
        data = b"Subject: x\r\n\r\nbody\r\n"
        entry, path = self.write(data)
        self.assertFalse(os.path.samefile(path, entry.messagePath))
        self.assertEqual(self.fsyncs, [[entry.queueId + ".eml"]])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(os.listdir(self.directory), [entry.queueId + ".eml"])
        # The spool's removal leaves the outbox's file whole.
        self.successResultOf(self.spool.removeDelivered(entry.queueId))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_empty(self):
        entry, path = self.write(b"")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"")

    def test_withoutCRLF(self):
        entry, path = self.write(b"Subject: x\r\n\r\nno newline")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: x\r\n\r\nno newline\r\n")

    def test_earlierFileReplaced(self):
        """
        A file of an earlier attempt (a crash before the spool recorded the
        delivery) is replaced; no temporary file stays.
        """
        data = b"Subject: x\r\n\r\nbody\r\n"
        writer = self.spool.newMessage(makeEnvelope(("bob@example.org",)))
        writer.write(data)
        queueId = self.successResultOf(writer.commit())
        stale = os.path.join(self.directory, queueId + ".eml")
        with open(stale, "wb") as f:
            f.write(b"partial")
        entry = self.spool.load(queueId)
        for _ in range(2):
            with self.spool.openMessage(queueId) as f:
                path = self.outbox._write(entry, f)
            self.assertEqual(os.listdir(self.directory), [queueId + ".eml"])
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data)

    def test_fsyncFails(self):
        """
        The directory's fsync fails: the write fails (the attempt is
        deferred, the message stays queued).
        """

        def failing(path):
            raise OSError(errno.EIO, "Input/output error")

        self.outbox.directorySync = DirectorySync(self.directory, failing)
        self.assertRaises(OSError, self.write, b"Subject: x\r\n\r\nbody\r\n")
