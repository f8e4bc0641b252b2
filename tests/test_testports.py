"""
The ports the tests' servers listen on (L{tests.e2e.freePort}): each
C{trial -j} worker picks from a share of its own, so that two workers
never race for the same port.
"""

import os

from twisted.trial import unittest

from tests import e2e


class WorkerPortsTests(unittest.TestCase):
    def inDirectory(self, name: str) -> range:
        """
        L{e2e.workerPorts} as a process whose working directory is called
        C{name} sees it.
        """
        directory = os.path.join(os.path.abspath(self.mktemp()), name)
        os.makedirs(directory)
        here = os.getcwd()
        os.chdir(directory)
        try:
            return e2e.workerPorts()
        finally:
            os.chdir(here)

    def test_workersApart(self):
        """
        Workers 0 to 5 (trial's directories "0" to "5") have disjoint
        shares, all below Linux's ephemeral range; a single process
        (C{_trial_temp}) takes the first.
        """
        shares = [self.inDirectory(str(n)) for n in range(6)]
        for i, a in enumerate(shares):
            self.assertEqual(len(a), e2e.WORKER_SHARE)
            self.assertGreaterEqual(a.start, 20000)
            self.assertLessEqual(a.stop, 32768)
            for b in shares[i + 1 :]:
                self.assertFalse(set(a) & set(b), (a, b))
        self.assertEqual(self.inDirectory("_trial_temp"), shares[0])
        self.assertEqual(self.inDirectory("6"), shares[0])

    def test_freePortInShare(self):
        """
        L{e2e.freePort} gives a port of this process's share, never one it
        gave before, and says so when the share is used up.
        """
        share = e2e.workerPorts()
        port = e2e.freePort()
        self.assertIn(port, share)
        self.assertIn(port, e2e._given)
        given = set(e2e._given)
        self.addCleanup(lambda: (e2e._given.clear(), e2e._given.update(given)))
        e2e._given.update(share)
        with self.assertRaises(RuntimeError):
            e2e.freePort()
