# -*- test-case-name: tests.test_waiting -*-
"""
Tests for L{tests.waiting}: the one waiting helper returns what the
predicate found, fails loudly naming what it waited for, and leaves the
reactor running while it waits.
"""

import threading

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.trial import unittest
from twisted.trial.unittest import FailTest

from tests.e2e import freePort
from tests.waiting import listening, waitUntil, waitUntilBlocking


class WaitUntilTests(unittest.TestCase):
    """
    L{waitUntil} on a clock, and on the real reactor.
    """

    def test_returnsTheValue(self):
        """
        The L{Deferred} fires with the predicate's first true value.
        """
        clock = task.Clock()
        values = iter([None, 0, [], ["found"]])
        d = waitUntil(lambda: next(values), 5, "a value", clock=clock)
        self.assertNoResult(d)
        clock.pump([0.02, 0.02, 0.02])
        self.assertEqual(self.successResultOf(d), ["found"])

    def test_immediate(self):
        """
        A predicate already true is asked once, with no waiting.
        """
        clock = task.Clock()
        calls = []
        d = waitUntil(lambda: calls.append(1) or "now", 5, "it", clock=clock)
        self.assertEqual(self.successResultOf(d), "now")
        self.assertEqual((calls, clock.getDelayedCalls()), ([1], []))

    def test_deferredPredicate(self):
        """
        A predicate may return a L{Deferred}; its result is what counts.
        """
        clock = task.Clock()
        results = iter([False, "yes"])
        d = waitUntil(lambda: defer.succeed(next(results)), 5, "a value", clock=clock)
        clock.advance(0.02)
        self.assertEqual(self.successResultOf(d), "yes")

    def test_failsLoudly(self):
        """
        Still false at the deadline: a L{FailTest} (an L{AssertionError})
        naming what was awaited, the time-out and the last value.  The
        predicate is asked once more at the deadline itself.
        """
        clock = task.Clock()
        calls = []

        def never():
            calls.append(clock.seconds())
            return []

        d = waitUntil(never, 1.0, "the core to answer", interval=0.25, clock=clock)
        clock.pump([0.25] * 3)
        self.assertNoResult(d)
        clock.advance(0.25)
        failure = self.failureResultOf(d, FailTest)
        self.assertIsInstance(failure.value, AssertionError)
        self.assertEqual(
            str(failure.value),
            "timed out after 1.0s waiting for the core to answer (last value: [])",
        )
        self.assertEqual(calls, [0.0, 0.25, 0.5, 0.75, 1.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_whatCallable(self):
        """
        C{what} may be a callable, asked at the time-out, so that the
        message shows the state found then.
        """
        clock = task.Clock()
        state = ["a"]
        d = waitUntil(lambda: False, 0.1, lambda: f"state {state}", clock=clock)
        state.append("b")
        clock.advance(0.1)
        self.assertEqual(
            str(self.failureResultOf(d, FailTest).value),
            "timed out after 0.1s waiting for state ['a', 'b'] (last value: False)",
        )

    def test_predicateError(self):
        """
        An exception from the predicate ends the wait with that exception.
        """
        clock = task.Clock()
        d = waitUntil(lambda: 1 / 0, 5, "it", clock=clock)
        self.failureResultOf(d, ZeroDivisionError)

    @defer.inlineCallbacks
    def test_reactorKeepsRunning(self):
        """
        On the real reactor the wait does not block it: a call scheduled
        meanwhile runs, and is what makes the predicate true.
        """
        ran = []
        reactor.callLater(0.05, ran.append, "called")
        value = yield waitUntil(lambda: ran, 10, "the delayed call")
        self.assertEqual(value, ["called"])

    @defer.inlineCallbacks
    def test_realTimeout(self):
        """
        On the real reactor too, a predicate that stays false fails the
        wait with C{what} in the message.
        """
        error = yield self.assertFailure(
            waitUntil(lambda: None, 0.1, "nothing at all"), FailTest
        )
        self.assertIn("waiting for nothing at all", str(error))
        self.assertIn("0.1s", str(error))


class WaitUntilBlockingTests(unittest.TestCase):
    """
    L{waitUntilBlocking}, the twin for code in a thread.
    """

    @defer.inlineCallbacks
    def test_returnsTheValue(self):
        """
        In a thread, it returns the predicate's value once another thread
        makes it true.
        """
        event = threading.Event()
        reactor.callLater(0.05, event.set)
        value = yield threads.deferToThread(
            waitUntilBlocking, lambda: event.is_set() and "set", 10, "the event"
        )
        self.assertEqual(value, "set")

    def test_failsLoudly(self):
        """
        Still false after the time-out: L{FailTest} naming C{what}.
        """
        error = self.assertRaises(
            FailTest, waitUntilBlocking, lambda: 0, 0.05, "the impossible"
        )
        self.assertEqual(
            str(error),
            "timed out after 0.05s waiting for the impossible (last value: 0)",
        )

    def test_listening(self):
        """
        L{listening} tells a port that accepts connections from one that
        does not.
        """
        port = reactor.listenTCP(
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.assertTrue(listening(port.getHost().port))
        self.assertFalse(listening(freePort()))
