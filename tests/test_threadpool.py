# -*- test-case-name: tests.test_threadpool -*-
"""
L{msa.threadpool}: blocking work runs in the reactor's thread pool when the
reactor declares one (L{IReactorThreads}), synchronously otherwise.
"""

import os
import subprocess
import sys
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from msa.threadpool import _deliveriesOf, reactorThreadPool, runBlocking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunBlockingTests(unittest.TestCase):
    def test_reactorWithThreads(self):
        """
        With the real reactor, C{f} runs in a thread of its pool, and the
        L{Deferred} fires in the reactor's thread with its result.
        """
        self.assertIs(reactorThreadPool(reactor), reactor.getThreadPool())
        d = runBlocking(reactor, threading.get_ident)
        return d.addCallback(self.assertNotEqual, threading.get_ident())

    def test_reactorWithoutThreads(self):
        """
        A L{task.Clock} declares no thread pool: C{f} runs at once, in this
        thread; its exception fails the L{Deferred}.
        """
        clock = task.Clock()
        self.assertIsNone(reactorThreadPool(clock))
        self.assertEqual(
            self.successResultOf(runBlocking(clock, threading.get_ident)),
            threading.get_ident(),
        )
        failure = self.failureResultOf(runBlocking(clock, int, "x"), ValueError)
        self.assertIn("invalid literal", str(failure.value))

    def test_deferredFromThread(self):
        """
        A function that raises in the pool fails the L{Deferred} too.
        """
        d = runBlocking(reactor, int, "x")
        return self.assertFailure(d, ValueError)

    def countThreadCalls(self):
        """
        Count the reactor's C{callFromThread} calls (each writes a byte to
        its waker pipe) from now on.
        """
        calls = []
        real = reactor.callFromThread

        def callFromThread(f, *args, **kwargs):
            calls.append(f)
            return real(f, *args, **kwargs)

        self.patch(reactor, "callFromThread", callFromThread)
        return calls

    def finishedTogether(self, count):
        """
        Wait (blocking this, the reactor's, thread) until C{count} results
        are waiting to be delivered: they then go in one batch.
        """
        deliveries = _deliveriesOf(reactor)
        deadline = time.monotonic() + 10
        while len(deliveries._results) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(deliveries._results), count)

    @defer.inlineCallbacks
    def test_resultsComeBackInBatches(self):
        """
        Results that come while the reactor thread is busy go back to it in
        one C{callFromThread}, not one each: each is a write to the waker
        pipe, a system call for which the pool thread gives up the GIL and
        then waits to take it back from the reactor thread.  Every
        L{Deferred} fires with its own result, in the reactor thread.
        """
        # The pool runs (trial only starts it once the reactor turns).
        yield runBlocking(reactor, lambda: None)
        go = threading.Event()
        calls = self.countThreadCalls()

        def work(n):
            go.wait(10)
            return n, threading.get_ident()

        ds = [runBlocking(reactor, work, n) for n in range(20)]
        go.set()
        self.finishedTogether(20)
        results = yield defer.gatherResults(ds)
        self.assertEqual([n for n, _ in results], list(range(20)))
        self.assertNotIn(threading.get_ident(), {t for _, t in results})
        self.assertEqual(len(calls), 1)

    def test_noResultLeftBehind(self):
        """
        Many quick calls, their results racing the reactor thread's
        deliveries: every L{Deferred} fires, with its own result.
        """
        ds = [runBlocking(reactor, lambda n=n: n * 2) for n in range(2000)]
        d = defer.gatherResults(ds)
        return d.addCallback(self.assertEqual, [n * 2 for n in range(2000)])

    @defer.inlineCallbacks
    def test_deliveryErrorKeepsNoOtherBack(self):
        """
        A L{Deferred} its caller fired already cannot take its result (a
        bug, logged); the result delivered in the same batch behind it
        still reaches its own.
        """
        yield runBlocking(reactor, lambda: None)
        go = threading.Event()
        early = runBlocking(reactor, go.wait, 10)
        early.callback("fired by its caller")
        go.set()
        self.finishedTogether(1)
        later = runBlocking(reactor, lambda: "later")
        self.finishedTogether(2)
        self.assertEqual((yield later), "later")
        self.assertEqual(len(self.flushLoggedErrors(defer.AlreadyCalledError)), 1)


class PrivatePoolTests(unittest.TestCase):
    def test_unstoppedPoolLetsTheProcessExit(self):
        """
        A store's own pool that nobody stopped does not keep the process
        alive at exit (a non-daemon worker waiting for work did: the test
        suite once hung after its last test on the account database's).
        """
        script = (
            "from msa.threadpool import PrivatePool\n"
            "import threading\n"
            "pool = PrivatePool(0, 1, name='left')\n"
            "pool.start()\n"
            "done = threading.Event()\n"
            "pool.callInThread(done.set)\n"
            "assert done.wait(10)\n"
        )
        finished = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, timeout=30, capture_output=True
        )
        self.assertEqual(finished.returncode, 0, finished.stderr)
