# -*- test-case-name: tests.test_threadpool -*-
"""
L{msa.threadpool}: blocking work runs in the reactor's thread pool when the
reactor declares one (L{IReactorThreads}), synchronously otherwise.
"""

import os
import subprocess
import sys
import threading

from twisted.internet import reactor, task
from twisted.trial import unittest

from msa.threadpool import reactorThreadPool, runBlocking

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
