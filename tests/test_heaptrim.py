# -*- test-case-name: tests.test_heaptrim -*-
"""
L{msa.service.heaptrim}: the C library's free heap given back while no
session is open (issue 18, defect 15), and the daemon running it.
"""

from twisted.internet import defer, task
from twisted.trial import unittest

from msa.service.heaptrim import INTERVAL, HeapTrim, glibcTrim
from msa.submission.sessions import SessionRegistry
from tests.e2e import RunningMSA
from tests.test_sessions import Info
from tests.waiting import waitUntil


class _Session:
    """
    A live session as the registry sees it.
    """

    session = Info("192.0.2.1")


class HeapTrimTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.registry = SessionRegistry()
        self.calls: list[None] = []
        self.trim = HeapTrim(
            self.registry, self.clock, trim=lambda: self.calls.append(None) or 1
        )
        self.trim.startService()
        self.addCleanup(self.trim.stopService)

    def test_idleTrimmedOncePerInterval(self):
        """
        Nothing at start; one trim at each interval without a session.
        """
        self.assertEqual(self.calls, [])
        self.clock.advance(INTERVAL)
        self.assertEqual((len(self.calls), self.trim.trims), (1, 1))
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.calls), 2)

    def test_notWhileASessionIsOpen(self):
        session = _Session()
        self.registry.add(session)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.calls, [])
        self.registry.remove(session)
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.calls), 1)

    def test_stopped(self):
        self.trim.stopService()
        self.clock.advance(INTERVAL * 3)
        self.assertEqual(self.calls, [])

    def test_failureLogged(self):
        """
        A failing trim is logged and the next interval tries again.
        """

        def fail():
            raise OSError("no")

        self.trim._trim = fail
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.trim._trim = lambda: 1
        self.clock.advance(INTERVAL)
        self.assertEqual(self.trim.trims, 1)


class DaemonTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_daemonTrims(self):
        """
        The daemon built from its configuration runs the trim; a tick
        while idle runs glibc's C{malloc_trim} in the reactor's pool.
        """
        self.assertIsNotNone(glibcTrim())
        msa = RunningMSA(self)
        trim = msa.service.getServiceNamed("heap-trim")
        self.assertTrue(trim.running)
        trim.tick()
        yield waitUntil(lambda: trim.trims == 1, 10, "a heap trim")
