# -*- test-case-name: tests.test_groupcommit -*-
"""
L{GroupCommit}: the one way the MSA shares a durable write among
concurrent callers (the spool's commits and removals, the audit log's
records, the outbox directory: L{msa.durable.DirectorySync}).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads

__all__ = ["GroupCommit"]

#: A job of a L{GroupCommit}, and its result.
J = TypeVar("J")
R = TypeVar("R")


class _Round(Generic[J, R]):
    """
    One round of a L{GroupCommit}: the jobs it carries, who waits for them,
    and how it ended.

    @ivar deferreds: C{(index, Deferred)} of the jobs submitted with
        L{GroupCommit.commit}, fired in the reactor thread.
    @ivar blocking: how many L{GroupCommit.commitBlocking} callers wait for
        it (one of them runs it).
    """

    def __init__(self, mutex: threading.RLock) -> None:
        self.jobs: list[J] = []
        #: Its blocking callers wait here (on the L{GroupCommit}'s mutex)
        #: until it is done, or until one of them is to run it: a round's
        #: end wakes its own waiters, and one of the next round's.
        self.finished = threading.Condition(mutex)
        #: The caller holding it back for company waits here; each caller
        #: joining it wakes that one alone.
        self.company = threading.Condition(mutex)
        self.deferreds: list[tuple[int, defer.Deferred[R]]] = []
        self.blocking = 0
        self.results: Sequence[R] = ()
        self.error: BaseException | None = None
        self.done = False
        #: A blocking caller holds the round back for company (the commit
        #: delay): nobody else starts it meanwhile.
        self.gathering = False
        #: The commit delay was spent on this round: it starts now.
        self.gathered = False
        #: When its first job came: the commit delay counts from there.
        self.created = time.monotonic()
        #: The reactor's time of its first L{GroupCommit.commit} job: the
        #: gather delay counts from there.
        self.firstCommit: float | None = None


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

    A round that a blocking caller would start may wait too, as
    PostgreSQL's C{commit_delay} does: when C{company(joined)} says that
    more blocking callers are on their way (the spool: messages whose data
    is being received or committed, more than have joined), the caller that
    would run it waits until they have joined, at most C{commitDelay}
    seconds.  A lone writer never waits; under load a round carries every
    commit that was close behind, and the fsyncs per message fall (on a
    disk whose fsync is fast, rounds otherwise carry one job each).

    @ivar rounds: how many rounds ran (for tests and curiosity).
    @ivar waiting: how many blocking callers wait for another's round.
    @ivar wakeups: how many times such a caller was woken: once when its
        round is done, or once to run it; nobody else is woken (each
        wake-up is a hand-off of the GIL, paid by the reactor thread too).
    """

    def __init__(
        self,
        runRound: Callable[[list[J]], Sequence[R]],
        reactor: Any = None,
        gatherDelay: float = 0.0,
        commitDelay: float = 0.0,
        company: Callable[[int], bool] | None = None,
    ) -> None:
        """
        @param runRound: writes the jobs of a round and makes them durable,
            blocking (in a thread); returns one result per job, in order,
            or raises.
        @param reactor: for L{commit}: its thread pool and C{callFromThread}
            (the global reactor by default).
        @param gatherDelay: see the class docstring; 0: none.
        @param commitDelay: see the class docstring; 0: none.
        @param company: called under the lock, in a thread, with how many
            blocking callers have joined the round: whether more are on
            their way (see the class docstring).  L{None}: never.
        """
        self._runRound = runRound
        self._reactor = reactor
        self.gatherDelay = gatherDelay
        self.commitDelay = commitDelay
        self._company = company
        #: Guards the rounds; every thread waits on a condition of a round
        #: (L{_Round.finished}, L{_Round.company}) over it, so that a
        #: thread is woken only by what concerns it: each wake-up costs a
        #: hand-off of the GIL, which the reactor thread pays for.
        #: Re-entrant: a round run synchronously (a reactor without
        #: threads) may start the next one from under it.
        self._mutex = threading.RLock()
        self._pending: _Round[J, R] | None = None
        self._running = False
        self._draining = False
        self._unfired: list[_Round[J, R]] = []
        self.rounds = 0
        self.waiting = 0
        #: How many rounds were held back for company (for tests).
        self.gathers = 0
        #: How many times a waiting blocking caller was woken (for tests).
        self.wakeups = 0

    def _join(self, job: J) -> _Round[J, R]:
        """
        Under the lock: add C{job} to the next round.
        """
        current = self._pending
        if current is None:
            current = self._pending = _Round(self._mutex)
        current.jobs.append(job)
        return current

    def commitBlocking(self, job: J) -> R:
        """
        Submit C{job} and wait until it is durable; blocks (call it in a
        thread, never the reactor's).

        @return: C{runRound}'s result for C{job}.
        @raise BaseException: the error of the round that carried C{job}.
        """
        return self.commitAllBlocking([job])[0]

    def commitAllBlocking(self, jobs: Sequence[J]) -> Sequence[R]:
        """
        L{commitBlocking} for several jobs, all in the same round.

        @return: C{runRound}'s results for C{jobs}, in order.
        """
        if not jobs:
            return []
        with self._mutex:
            for job in jobs:
                current = self._join(job)
            index = len(current.jobs) - len(jobs)
            current.blocking += 1
            if current.gathering:
                # The caller holding the round back may have waited for us.
                current.company.notify()
            while not current.done:
                if self._running or current.gathering:
                    self.waiting += 1
                    current.finished.wait()
                    self.waiting -= 1
                    self.wakeups += 1
                    continue
                if not current.gathered and self._expectsCompany(current):
                    self._gather(current)
                    continue
                self._lead(current)
        self._fireUnthreaded()
        if current.error is not None:
            raise current.error
        return current.results[index : index + len(jobs)]

    def _expectsCompany(self, current: _Round[J, R]) -> bool:
        """
        Under the lock: whether more blocking callers are on their way to
        round C{current} (see the class docstring).
        """
        return (
            self.commitDelay > 0
            and self._company is not None
            and self._company(current.blocking)
        )

    def _gather(self, current: _Round[J, R]) -> None:
        """
        Under the lock: hold round C{current} back until the company
        expected has joined it, or C{commitDelay} seconds have passed since
        its first job came (the lock is released meanwhile, so that they
        can join).  Counted from the first job, not from the end of the
        round before: under load the rounds follow one another without a
        gap, and no job waits more than C{commitDelay} for company.
        """
        current.gathering = True
        deadline = current.created + self.commitDelay
        try:
            while self._expectsCompany(current):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                current.company.wait(remaining)
        except BaseException:
            # The round is not ours to run any more: one of its other
            # callers runs it.
            current.finished.notify()
            raise
        finally:
            current.gathering = False
            current.gathered = True
            self.gathers += 1

    def commit(self, job: J) -> defer.Deferred[R]:
        """
        Submit C{job} from the reactor thread.

        @return: a L{Deferred} firing with C{runRound}'s result for C{job}
            once it is durable, or failing with the round's error.
        """
        d: defer.Deferred[R] = defer.Deferred()
        reactor = self._getReactor()
        gather = bool(self.gatherDelay) and IReactorThreads.providedBy(reactor)
        with self._mutex:
            current = self._join(job)
            if gather and current.firstCommit is None:
                current.firstCommit = reactor.seconds()
            current.deferreds.append((len(current.jobs) - 1, d))
            start = not self._running and not self._draining
            if start:
                self._draining = True
        if start:
            if gather:
                reactor.callLater(self.gatherDelay, self._gatherOver)
            else:
                self._startDrain()
        return d

    def _gatherOver(self) -> None:
        """
        (In the reactor thread.)  The gather delay of the round it was
        started for is over: run the pending round.  When a blocking caller
        has run that round meanwhile, the one pending now is younger: it
        gets the rest of its own delay, counted from its own first job, so
        that it too can ride on a blocking caller's round.
        """
        reactor = self._getReactor()
        with self._mutex:
            pending = self._pending
            if pending is None:
                self._draining = False
                return
            wait = 0.0
            if pending.firstCommit is not None:
                wait = pending.firstCommit + self.gatherDelay - reactor.seconds()
        if wait > 0:
            reactor.callLater(wait, self._gatherOver)
        else:
            self._startDrain()

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
        with self._mutex:
            while (
                self._pending is not None
                and not self._running
                and not self._pending.gathering
            ):
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
        self._mutex.release()
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
            self._mutex.acquire()
            self.rounds += 1
            current.done = True
            self._running = False
            current.finished.notify_all()
            if self._pending is not None:
                # One of the next round's callers runs it (or holds it back).
                self._pending.finished.notify()
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
