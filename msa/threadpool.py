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
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads
from twisted.python.threadpool import ThreadPool

__all__ = ["PrivatePool", "reactorThreadPool", "runBlocking"]


def reactorThreadPool(reactor: Any) -> ThreadPool | None:
    """
    @return: C{reactor}'s thread pool, or L{None} when it has none.
    """
    if IReactorThreads.providedBy(reactor):
        return reactor.getThreadPool()
    return None


def runBlocking(reactor: Any, f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """
    Call C{f(*args)} in C{reactor}'s thread pool; synchronously for a
    reactor without one.

    @return: a L{Deferred} of its result.
    """
    pool = reactorThreadPool(reactor)
    if pool is None:
        return defer.maybeDeferred(f, *args)
    return threads.deferToThreadPool(reactor, pool, f, *args)


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
