# -*- test-case-name: tests.test_benchwindow -*-
"""
C{bench/threadcpu.py}'s L{BurstWindow}: how the server's event-loop thread
spent the load generator's run (running, waiting for a CPU, neither) and
how busy the machine was; the measurements that showed the MSA's reactor
waiting for the GIL in (b) while the machine had CPU to spare.
"""

import importlib.util
import os
import threading
import time

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loadThreadCpu():
    spec = importlib.util.spec_from_file_location(
        "threadcpu", os.path.join(ROOT, "bench", "threadcpu.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


threadcpu = loadThreadCpu()

#: The first line of /proc/stat: user nice system idle iowait irq softirq
#: steal guest guest_nice.
STAT = "cpu  100 5 50 800 20 3 2 1 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n"


class MachineTimesTests(unittest.TestCase):
    def test_busyIsAllButIdleAndIowait(self):
        self.assertEqual(threadcpu.machineTimes(STAT), (161, 981))

    def test_readsProcStat(self):
        busy, total = threadcpu.machineTimes()
        self.assertGreater(total, busy)
        self.assertGreater(busy, 0)


class BurstWindowTests(unittest.TestCase):
    def test_loopThreadAndMachine(self):
        """
        Over a window in which this process's main thread computes, its
        running share is positive and at most the window (plus the clock
        tick's rounding), its run-queue wait is not negative, and the
        machine's busy share is a fraction.
        """
        window = threadcpu.BurstWindow(os.getpid())
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            sum(range(1000))
        out = window.stop()
        self.assertEqual(sorted(out), ["loop_running", "loop_runqueue", "machine_busy"])
        self.assertGreater(out["loop_running"], 0)
        self.assertLessEqual(out["loop_running"], 1.1)
        self.assertGreaterEqual(out["loop_runqueue"], 0)
        self.assertGreater(out["machine_busy"], 0)
        self.assertLessEqual(out["machine_busy"], 1)

    def test_otherThreadAsTheLoop(self):
        """
        The loop thread may be another than the main thread (aiosmtpd's):
        a thread that sleeps through the window ran next to nothing of it.
        """
        started = threading.Event()
        stop = threading.Event()
        ids = []

        def sleeper():
            ids.append(threading.get_native_id())
            started.set()
            stop.wait(10)

        thread = threading.Thread(target=sleeper)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        started.wait(10)
        window = threadcpu.BurstWindow(os.getpid(), ids[0])
        time.sleep(0.2)
        self.assertLess(window.stop()["loop_running"], 0.5)

    def test_machineOnly(self):
        """
        For a server of many processes (Postfix) there is no one loop
        thread: the machine's share alone.
        """
        window = threadcpu.BurstWindow(None)
        time.sleep(0.05)
        self.assertEqual(sorted(window.stop()), ["machine_busy"])
