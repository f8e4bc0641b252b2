# -*- test-case-name: tests.test_threadpool -*-
"""
L{msa.threadpool}: blocking work runs in the reactor's thread pool when the
reactor declares one (L{IReactorThreads}), synchronously otherwise.
"""

import threading

from twisted.internet import reactor, task
from twisted.trial import unittest

from msa.threadpool import reactorThreadPool, runBlocking


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
