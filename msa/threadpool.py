# -*- test-case-name: tests.test_threadpool -*-
"""
Where the MSA's blocking work (file creation, fsync, hashing of large data)
runs: the reactor's thread pool, never the reactor's thread.  A reactor
without threads (a test's L{twisted.internet.task.Clock}) runs it
synchronously instead, so that unit tests stay deterministic.

A reactor has a thread pool when it provides
L{twisted.internet.interfaces.IReactorThreads}, as Twisted's reactors do
and the fakes of L{twisted.internet.testing} do not.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

__all__ = ["PrivatePool", "reactorThreadPool", "runBlocking"]


def reactorThreadPool(reactor: Any) -> ThreadPool | None:
    """
    @return: C{reactor}'s thread pool, or L{None} when it has none.
    """
    if IReactorThreads.providedBy(reactor):
        return reactor.getThreadPool()
    return None


class _Deliveries:
    """
    The results of L{runBlocking}'s calls, handed to the reactor thread in
    batches: the first result of a batch schedules one C{callFromThread},
    the ones that finish before it runs ride on it.

    Each C{callFromThread} writes a byte to the reactor's waker pipe: a
    system call in the pool thread, which gives up the GIL for it and has to
    take it back from the reactor thread (a hand-off both threads pay for).
    Under load many commits finish during one turn of the reactor; with
    L{twisted.internet.threads.deferToThreadPool} each of them wrote.

    Under C{_lock}, a result is appended and C{_scheduled} tested and set;
    L{_fire} clears C{_scheduled} and takes every result at once: a result
    is taken by the L{_fire} already scheduled, or schedules its own.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._lock = threading.Lock()
        self._results: list[tuple[defer.Deferred, bool, Any]] = []
        self._scheduled = False

    def deliver(self, d: defer.Deferred, success: bool, result: Any) -> None:
        """
        (In a pool thread.)  Have C{d} fired with C{result} in the reactor
        thread.
        """
        with self._lock:
            self._results.append((d, success, result))
            if self._scheduled:
                return
            self._scheduled = True
        self._reactor.callFromThread(self._fire)

    def _fire(self) -> None:
        """
        (In the reactor thread.)  Fire every result delivered so far.
        """
        with self._lock:
            self._scheduled = False
            results, self._results = self._results, []
        for d, success, result in results:
            try:
                if success:
                    d.callback(result)
                else:
                    d.errback(result)
            except Exception:
                # Only a Deferred fired twice raises here: a bug, which must
                # not keep the results behind it from being delivered.
                log.failure("delivering the result of a blocking call")


_deliveries: weakref.WeakKeyDictionary[Any, _Deliveries] = weakref.WeakKeyDictionary()


def _deliveriesOf(reactor: Any) -> _Deliveries:
    """
    The L{_Deliveries} of C{reactor} (one per reactor, made at first use,
    in the reactor thread).
    """
    deliveries = _deliveries.get(reactor)
    if deliveries is None:
        deliveries = _deliveries[reactor] = _Deliveries(reactor)
    return deliveries


def runBlocking(
    reactor: Any, f: Callable[..., Any], *args: Any, **kwargs: Any
) -> defer.Deferred:
    """
    Call C{f(*args, **kwargs)} in C{reactor}'s thread pool; synchronously
    for a reactor without one.  The results come back to the reactor thread
    in batches (L{_Deliveries}).

    @return: a L{Deferred} of its result.
    """
    pool = reactorThreadPool(reactor)
    if pool is None:
        return defer.maybeDeferred(f, *args, **kwargs)
    d: defer.Deferred = defer.Deferred()
    deliveries = _deliveriesOf(reactor)

    def onResult(success: bool, result: Any) -> None:
        deliveries.deliver(d, success, result)

    pool.callInThreadWithCallback(onResult, f, *args, **kwargs)
    return d


class _DaemonThread(threading.Thread):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class PrivatePool(ThreadPool):
    """
    A thread pool of a store's own (the account database's, the mailbox
    database's, scrypt's), beside the reactor's: its threads are daemon
    threads, so that a pool its owner never stopped (an embedder's, a
    test's) cannot keep the process from exiting.  The owners stop theirs
    in C{stopService}, which waits for the query in progress.
    """

    threadFactory = _DaemonThread
