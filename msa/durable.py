# -*- test-case-name: tests.test_durable,tests.test_groupcommit -*-
"""
Durable file replacement, the one way the MSA writes a file that must
survive a power loss: the outbox, the account file.  (The spool's queue
files are written once and changed in place: L{msa.queue.queuefile}.)

The order is what makes it durable and atomic: write a temporary file in
the target's directory, fsync it, rename it over the target (atomic on
POSIX: a reader sees the old file or the new one, never a mix), then fsync
the directory, so that the rename itself is on disk.  A failure at any step
before the rename leaves the old file as it was and removes the temporary
file.

Where many writers need the same fsync (the spool's C{queue/} directory,
the audit log), L{GroupCommit} lets them share it.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads

__all__ = [
    "DirectorySync",
    "GroupCommit",
    "fsyncDirectory",
    "publish",
    "unlinkQuietly",
    "writeDurably",
    "writeSynced",
]


#: A job of a L{GroupCommit}, and its result.
J = TypeVar("J")
R = TypeVar("R")


def fsyncDirectory(path: str) -> None:
    """
    Make the entries of directory C{path} (created, renamed, removed files)
    durable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Round(Generic[J, R]):
    """
    One round of a L{GroupCommit}: the jobs it carries, who waits for them,
    and how it ended.

    @ivar deferreds: C{(index, Deferred)} of the jobs submitted with
        L{GroupCommit.commit}, fired in the reactor thread.
    @ivar blocking: how many L{GroupCommit.commitBlocking} callers wait for
        it (one of them runs it).
    """

    def __init__(self) -> None:
        self.jobs: list[J] = []
        self.deferreds: list[tuple[int, defer.Deferred[R]]] = []
        self.blocking = 0
        self.results: Sequence[R] = ()
        self.error: BaseException | None = None
        self.done = False


class GroupCommit(Generic[J, R]):
    """
    Group commit, the one way the MSA shares a durable write among
    concurrent callers: a caller submits a job; the jobs that arrive while
    a round runs make up the next round, which one thread runs as
    C{runRound(jobs)}: one write and one fsync (or fdatasync) for all of
    them, as a database's log does.

    The guarantee for each job is the one its own write and fsync would
    give: its result is delivered only after an fsync that I{started after}
    it was submitted.  At most one round runs at a time.  When C{runRound}
    raises, every job of that round fails with the error, and only them:
    the next round runs its own fsync.

    Jobs come from two kinds of callers, sharing the same rounds:
      - L{commitBlocking}, from a thread that already left the reactor (the
        spool's commit): it waits, and runs the round itself when no other
        thread does, so the commit costs no second thread handoff;
      - L{commit}, from the reactor thread: it returns a L{Deferred}; a
        round only such jobs wait for runs in the reactor's thread pool
        (synchronously with a reactor that has none, such as
        L{twisted.internet.task.Clock}), and the L{Deferred}s fire in the
        reactor thread.

    A round that only L{commit} jobs wait for may wait C{gatherDelay}
    seconds before it starts (with a reactor that has a thread pool), so
    that more jobs join it: for jobs nobody's reply waits for (the removal
    of a delivered message), which then mostly ride on a round that a
    blocking caller (a commit) runs anyway.

    @ivar rounds: how many rounds ran (for tests and curiosity).
    @ivar waiting: how many blocking callers wait for another's round.
    """

    def __init__(
        self,
        runRound: Callable[[list[J]], Sequence[R]],
        reactor: Any = None,
        gatherDelay: float = 0.0,
    ) -> None:
        """
        @param runRound: writes the jobs of a round and makes them durable,
            blocking (in a thread); returns one result per job, in order,
            or raises.
        @param reactor: for L{commit}: its thread pool and C{callFromThread}
            (the global reactor by default).
        @param gatherDelay: see the class docstring; 0: none.
        """
        self._runRound = runRound
        self._reactor = reactor
        self.gatherDelay = gatherDelay
        self._lock = threading.Condition()
        self._pending: _Round[J, R] | None = None
        self._running = False
        self._draining = False
        self._unfired: list[_Round[J, R]] = []
        self.rounds = 0
        self.waiting = 0

    def _join(self, job: J) -> _Round[J, R]:
        """
        Under the lock: add C{job} to the next round.
        """
        current = self._pending
        if current is None:
            current = self._pending = _Round()
        current.jobs.append(job)
        return current

    def commitBlocking(self, job: J) -> R:
        """
        Submit C{job} and wait until it is durable; blocks (call it in a
        thread, never the reactor's).

        @return: C{runRound}'s result for C{job}.
        @raise BaseException: the error of the round that carried C{job}.
        """
        with self._lock:
            current = self._join(job)
            index = len(current.jobs) - 1
            current.blocking += 1
            while not current.done:
                if self._running:
                    self.waiting += 1
                    self._lock.wait()
                    self.waiting -= 1
                    continue
                self._lead(current)
        self._fireUnthreaded()
        if current.error is not None:
            raise current.error
        return current.results[index]

    def commit(self, job: J) -> defer.Deferred[R]:
        """
        Submit C{job} from the reactor thread.

        @return: a L{Deferred} firing with C{runRound}'s result for C{job}
            once it is durable, or failing with the round's error.
        """
        d: defer.Deferred[R] = defer.Deferred()
        with self._lock:
            current = self._join(job)
            current.deferreds.append((len(current.jobs) - 1, d))
            start = not self._running and not self._draining
            if start:
                self._draining = True
        if start:
            if self.gatherDelay and IReactorThreads.providedBy(self._getReactor()):
                self._getReactor().callLater(self.gatherDelay, self._startDrain)
            else:
                self._startDrain()
        return d

    def _getReactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _startDrain(self) -> None:
        """
        Have a thread of the pool run the pending rounds (L{_drain}); with
        a reactor without a pool, run them now.
        """
        reactor = self._getReactor()
        if IReactorThreads.providedBy(reactor):
            reactor.getThreadPool().callInThread(self._drain)
        else:
            self._drain()

    def _drain(self) -> None:
        """
        Run the pending rounds until none is left, or another thread runs
        one (it hands the rest back here when it is done, L{_lead}).
        """
        with self._lock:
            while self._pending is not None and not self._running:
                self._lead(self._pending)
            self._draining = False
        self._fireUnthreaded()

    def _lead(self, current: _Round[J, R]) -> None:
        """
        Under the lock: run round C{current}, the pending one.  The lock is
        released while the disk works, so that the next round's callers
        can queue.
        """
        self._pending = None
        self._running = True
        self._lock.release()
        try:
            results = self._runRound(current.jobs)
            if len(results) != len(current.jobs):
                raise RuntimeError(
                    f"a round of {len(current.jobs)} job(s) gave "
                    f"{len(results)} result(s)"
                )
            current.results = results
        except BaseException as e:
            current.error = e
        finally:
            self._lock.acquire()
            self.rounds += 1
            current.done = True
            self._running = False
            self._lock.notify_all()
        if current.deferreds:
            self._deliver(current)
        following = self._pending
        if following is not None and not following.blocking and not self._draining:
            # Only Deferreds wait for the next round: nobody would run it.
            self._draining = True
            self._startDrain()

    def _deliver(self, current: _Round[J, R]) -> None:
        """
        Under the lock: have the L{Deferred}s of a finished round fired in
        the reactor thread (with a reactor without threads, by the caller
        once the lock is released: L{_fireUnthreaded}).
        """
        reactor = self._getReactor()
        if IReactorThreads.providedBy(reactor):
            reactor.callFromThread(_fire, current)
        else:
            self._unfired.append(current)

    def _fireUnthreaded(self) -> None:
        """
        Fire what L{_deliver} left for the caller, outside the lock (the
        callbacks may submit again).
        """
        while self._unfired:
            _fire(self._unfired.pop(0))


def _fire(current: _Round[Any, Any]) -> None:
    """
    Fire the L{Deferred}s of a finished round: its results, or its error.
    """
    for index, d in current.deferreds:
        if current.error is not None:
            d.errback(current.error)
        else:
            d.callback(current.results[index])


class DirectorySync:
    """
    Group commit of a directory's fsync (a L{GroupCommit} whose rounds are
    one fsync of the directory): threads that each need their own changes
    to the directory (renames, creations, removals) made durable call
    L{sync}; concurrent callers share one fsync.

    The guarantee for each caller is the same as its own L{fsyncDirectory}
    would give: L{sync} returns only after an fsync of the directory that
    I{started after} the call did, so after every change the caller made
    before calling it.

    @ivar fsyncs: how many fsyncs were run (for tests and curiosity).
    @ivar waiting: how many callers wait for another's fsync (for tests).
    """

    def __init__(
        self,
        path: str,
        fsync: Callable[[str], None] = fsyncDirectory,
        reactor: Any = None,
        gatherDelay: float = 0.0,
    ) -> None:
        """
        @param reactor: for L{syncLater} (see L{GroupCommit}).
        @param gatherDelay: for L{syncLater} (see L{GroupCommit}).
        """
        self.path = path
        self._fsync = fsync
        self._commits: GroupCommit[None, None] = GroupCommit(
            self._round, reactor, gatherDelay
        )

    def _round(self, jobs: list[None]) -> list[None]:
        self._fsync(self.path)
        return [None] * len(jobs)

    @property
    def fsyncs(self) -> int:
        return self._commits.rounds

    @property
    def waiting(self) -> int:
        return self._commits.waiting

    def sync(self) -> None:
        """
        Make the entries of the directory durable, as L{fsyncDirectory}
        does; blocks (call it in a thread, never the reactor's).

        @raise OSError: the error of the fsync that served this call: every
            caller of a failed round gets it.
        """
        self._commits.commitBlocking(None)

    def syncLater(self) -> defer.Deferred[None]:
        """
        L{sync} from the reactor thread, without holding a thread while it
        waits: the round may wait for company (C{gatherDelay}).

        @return: a L{Deferred} firing once the directory's entries are
            durable, or failing with the fsync's L{OSError}.
        """
        return self._commits.commit(None)


def writeSynced(
    path: str,
    data: bytes | Iterable[bytes],
    mode: int = 0o600,
    exclusive: bool = False,
) -> None:
    """
    Write C{data} to the file at C{path} (created with C{mode}, less the
    umask, as L{os.open} does; truncated if it exists, unless C{exclusive})
    and fsync it.  Not atomic by itself: see L{writeDurably}.

    @param data: the bytes, or an iterable of chunks (written as they come,
        never joined in memory).
    @raise OSError: from the file system; the file may be left partly
        written (the caller removes it).
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        for chunk in [data] if isinstance(data, bytes | bytearray) else data:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(moves: Sequence[tuple[str, str]], directory: str) -> None:
    """
    Rename each C{(source, target)} in order (each replacing its target
    atomically), then fsync C{directory}, the targets' directory: the step
    that makes written and fsynced files visible, durably.
    """
    for source, target in moves:
        os.replace(source, target)
    fsyncDirectory(directory)


def writeDurably(
    path: str | os.PathLike[str],
    data: bytes | Iterable[bytes],
    mode: int = 0o600,
    tmpPath: str | None = None,
    directorySync: DirectorySync | None = None,
) -> None:
    """
    Replace the file at C{path} with C{data}, atomically and durably: see
    the module docstring.

    @param mode: of the new file, less the umask.
    @param tmpPath: the temporary file, in C{path}'s directory; by default a
        new unique name, C{.<name>.<random>.tmp}, so that two writers never
        share one.  A given name is truncated if it exists (a leftover of a
        crash).
    @param directorySync: the group commit of C{path}'s directory, when
        concurrent writers share its fsync; by default it is fsynced alone.
    @raise OSError: from the file system; C{path} is then unchanged (unless
        only the final directory fsync failed) and the temporary file gone.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    exclusive = tmpPath is None
    if tmpPath is None:
        name = f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
        tmpPath = os.path.join(directory, name)
    try:
        writeSynced(tmpPath, data, mode, exclusive=exclusive)
        if directorySync is None:
            publish([(tmpPath, path)], directory)
        else:
            os.replace(tmpPath, path)
            directorySync.sync()
    except BaseException:
        # The failure above is the one reported; a file system that refuses
        # even this (read-only) leaves the file for the caller's recovery.
        unlinkQuietly(tmpPath, keepErrors=True)
        raise


def unlinkQuietly(path: str, keepErrors: bool = False) -> OSError | None:
    """
    Remove the file at C{path}; one that is already gone is no error (a
    removal repeated after a crash, the cleanup of a file never created).
    The one way the spool, the relay and the durable writes remove a file.

    @param keepErrors: for a cleanup on a path that must not fail (another
        failure is already being reported, a refusal is on its way to the
        client): any other error (a read-only file system) is returned
        instead of raised, for the caller to log; the file is then left for
        the recovery at the next start (L{msa.queue.spool.Spool.recover}).
    @return: the error kept, or L{None}.
    @raise OSError: any error but a missing file, unless C{keepErrors}.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if not keepErrors:
            raise
        return e
    return None
