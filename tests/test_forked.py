"""
Tests for L{msa.service.forked}: workers forked before the reactor.

A fork needs a process without a reactor, so the forks happen in a helper
program (C{tests/forkedhelper.py}, run with this interpreter) that does
what worker 0 does: park a worker, then make its reactor and start the
worker over a listening socket.  The worker runs the helper's stand-in for
L{msa.service.worker.main}, which reports what it was given.  The
assembled daemon's forked workers are tested in L{tests.test_workers}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from msa.service.forked import ForkedProcess, ParkedWorker, parkWorkers, waitReason
from msa.service.supervisor import Workers

HELPER = os.path.join(os.path.dirname(__file__), "forkedhelper.py")


def runHelper(testCase: unittest.TestCase, mode: str) -> dict:
    """
    Run the helper in C{mode}: its report.
    """
    if mode == "uid":
        # One the switched user can enter (trial's may not be).
        directory = tempfile.mkdtemp()
        os.chmod(directory, 0o755)
        testCase.addCleanup(shutil.rmtree, directory, True)
    else:
        directory = testCase.mktemp()
        os.makedirs(directory)
    done = subprocess.run(
        [sys.executable, HELPER, mode, directory],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(HELPER))},
    )
    testCase.assertEqual(done.returncode, 0, done.stderr.decode())
    report = json.loads(done.stdout)
    report["directory"] = os.path.abspath(directory)
    return report


class ForkedStartTests(unittest.TestCase):
    """
    A parked worker started by its parent (the helper program).
    """

    def test_givenWhatASpawnedWorkerIsGiven(self):
        """
        The worker runs with the arguments after C{python -m
        msa.service.worker}, worker 0's environment (exactly), working
        directory and umask, its standard input and output from worker 0,
        the listening socket at descriptor 3 and no other descriptor; it
        is worker 0's child, named C{msa-worker-1}; what it writes to its
        output reaches the protocol, and its exit status its
        C{processEnded}.
        """
        report = runHelper(self, "report")
        child = report["child"]
        self.assertEqual(child["args"], ["--worker", "1", "--listener", "k=3"])
        self.assertEqual(child["env"], {"ONLY": "this"})
        self.assertEqual(child["cwd"], report["directory"])
        self.assertEqual(child["umask"], 0o027)
        self.assertEqual(child["fds"], [0, 1, 2, 3])
        self.assertEqual(child["listener"], report["listener"])
        self.assertEqual(child["ppid"], report["pid"])
        self.assertEqual(child["comm"], "msa-worker-1")
        # Worker 0's events from before logging began are not replayed
        # into the worker's log.
        self.assertEqual(child["replayed"], [])
        self.assertEqual(report["ended"], {"exitCode": 3, "signal": None})
        self.assertIn("from the worker's standard error", report["output"])

    def test_takesOnWorkerZerosUser(self):
        """
        Forked while worker 0 was still root (twistd sheds its privileges
        after making the service), the worker takes on the user, group and
        supplementary groups worker 0 has when it starts it, before anything
        else: it never runs as root.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root, to switch users")
        report = runHelper(self, "uid")
        self.assertEqual(
            report["child"]["ids"], [[65534] * 3, [65534] * 3, []], report["output"]
        )
        self.assertEqual(report["ended"], {"exitCode": 3, "signal": None})

    def test_signalled(self):
        """
        C{signalProcess} reaches the worker (its parent's signal); its end
        by the signal reaches C{processEnded}; another signal after it
        raises L{ProcessExitedAlready}.
        """
        report = runHelper(self, "signal")
        self.assertEqual(report["ended"], {"exitCode": None, "signal": 15})
        self.assertTrue(report["exitedAlready"])

    def test_discarded(self):
        """
        A parked worker let go unused ends at once, with status 0, without
        running the worker.
        """
        report = runHelper(self, "discard")
        self.assertEqual(report["status"], 0)
        self.assertFalse(report["ran"])

    def test_sharesMemory(self):
        """
        The point of it: the worker shares the pages of the modules its
        parent had loaded (C{Shared_Dirty}, several MB: here the MSA's
        modules and Twisted's).
        """
        report = runHelper(self, "memory")
        self.assertGreater(report["sharedDirty"], 5 * 1024 * 1024)


class EnvironmentTests(unittest.TestCase):
    def test_workerEnvironment(self):
        """
        A worker gets worker 0's environment without systemd's socket
        variables: its sockets come from worker 0.
        """
        from msa.service.supervisor import workerEnvironment

        self.patch(
            os,
            "environ",
            {"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b", "K": "v"},
        )
        self.assertEqual(workerEnvironment(), {"K": "v"})


class NoForkTests(unittest.TestCase):
    """
    Where no worker can be forked.
    """

    def test_reactorAlreadyThere(self):
        """
        In a program whose reactor is already there (this one), no worker is
        forked: they are all started as new processes.
        """
        import twisted.internet.reactor  # noqa: F401

        self.assertEqual(parkWorkers(range(1, 3), target=lambda args: None), {})

    def test_daemonizedSince(self):
        """
        A parked worker can be started only by the process that forked it
        (twistd forked into the background since, without C{--nodaemon}).
        """
        a, b = __import__("socket").socketpair()
        self.addCleanup(b.close)
        parked = ParkedWorker(1, 99999, a)
        self.assertTrue(parked.usable())
        parked.parent = os.getpid() + 1
        self.assertFalse(parked.usable())
        parked.discard()
        self.assertEqual(b.recv(1), b"")


class Recording(ProcessProtocol):
    def __init__(self) -> None:
        self.reasons: list[Failure] = []
        self.data: list[tuple[int, bytes]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.data.append((childFD, data))

    def processEnded(self, reason: Failure) -> None:
        self.reasons.append(reason)


class ForkedProcessTests(unittest.TestCase):
    """
    L{ForkedProcess}'s end: once reaped and its output closed, in either
    order, and once.
    """

    def ended(self, order: list[str], status: int) -> Recording:
        proto = Recording()
        a, b = __import__("socket").socketpair()
        self.addCleanup(b.close)
        forked = ForkedProcess(12345, proto, a)
        for step in order:
            self.assertEqual(proto.reasons, [])
            if step == "reaped":
                forked.processEnded(status)
            else:
                forked.outputClosed()
        self.assertEqual(len(proto.reasons), 1)
        self.assertIsNone(forked.pid)
        self.assertRaises(ProcessExitedAlready, forked.signalProcess, "TERM")
        # Its life line closed with it.
        self.assertEqual(b.recv(1), b"")
        return proto

    def test_reapedThenClosed(self):
        proto = self.ended(["reaped", "closed"], 0)
        proto.reasons[0].trap(ProcessDone)

    def test_closedThenReaped(self):
        proto = self.ended(["closed", "reaped"], 3 << 8)
        reason = proto.reasons[0].trap(ProcessTerminated)
        self.assertIs(reason, ProcessTerminated)
        self.assertEqual(proto.reasons[0].value.exitCode, 3)

    def test_output(self):
        """
        What the worker writes comes as its descriptor 2's (its log).
        """
        proto = Recording()
        ForkedProcess(12345, proto, __import__("socket").socket()).output(b"x\n")
        self.assertEqual(proto.data, [(2, b"x\n")])

    def test_waitReason(self):
        self.assertIsInstance(waitReason(0).value, ProcessDone)
        self.assertEqual(waitReason(9).value.signal, 9)
        self.assertEqual(waitReason(1 << 8).value.exitCode, 1)


class FakeReactor:
    def __init__(self) -> None:
        self.spawned: list[list[str]] = []

    def spawnProcess(self, proto, executable, args, env, path, childFDs):
        self.spawned.append(args)
        return type("P", (), {"pid": 4242})()


class FakeParked:
    def __init__(self, usable: bool) -> None:
        self._usable = usable
        self.started: list[list[str]] = []
        self.discarded = False

    def usable(self) -> bool:
        return self._usable

    def start(self, proto, args, env, path, childFDs, reactor):
        self.started.append(args)
        return type("P", (), {"pid": 4343})()

    def discard(self) -> None:
        self.discarded = True


class WorkersStartTests(unittest.TestCase):
    """
    L{Workers} starts a parked worker the first time, a new process after.
    """

    def workers(self, parked) -> tuple[Workers, FakeReactor]:
        reactor = FakeReactor()
        workers = Workers(2, None, [], reactor, 1, parked={1: parked})
        workers.running = True
        return workers, reactor

    def test_parkedFirst(self):
        parked = FakeParked(True)
        workers, reactor = self.workers(parked)
        workers._start(1)
        self.assertEqual(len(parked.started), 1)
        self.assertEqual(parked.started[0][3:5], ["--worker", "1"])
        self.assertEqual(reactor.spawned, [])
        # The next start of worker 1 is a new process.
        workers._start(1)
        self.assertEqual(len(reactor.spawned), 1)
        self.assertEqual(len(parked.started), 1)

    def test_unusableDiscarded(self):
        parked = FakeParked(False)
        workers, reactor = self.workers(parked)
        workers._start(1)
        self.assertTrue(parked.discarded)
        self.assertEqual(parked.started, [])
        self.assertEqual(len(reactor.spawned), 1)

    def test_stopDiscardsUnstarted(self):
        parked = FakeParked(True)
        workers, reactor = self.workers(parked)
        workers.stopService()
        self.assertTrue(parked.discarded)
