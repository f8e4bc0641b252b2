# -*- test-case-name: tests.test_benchsyscalls -*-
"""
C{bench/run.py}'s reading of the system-call counters (issue 20, item 4:
a syscall count per message): C{--syscalls} reads C{perf stat -x ,}, and
C{--strace} reads C{strace -c}.  The samples are those programs' real
output here, for a process that made three fsyncs.
"""

import importlib.util
import os
import sys

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PERF = """# started on Mon Dec  7 10:52:05 2026

3,,syscalls:sys_enter_fsync,123559606,100.00,,
0,,syscalls:sys_enter_flock,123559606,100.00,,
<not counted>,,syscalls:sys_enter_fdatasync,0,100.00,,
"""

STRACE = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 99.26    0.009596           6      1372       588 openat
  0.74    0.000072          24         3           fsync
------ ----------- ----------- --------- --------- ----------------
100.00    0.009668           7      1375       588 total
"""


def loadRun():
    """
    C{bench/run.py} as a module; its imports from C{bench/} (the script's
    directory) are found while it loads, and C{sys.path} is left as it was.
    """
    bench = os.path.join(ROOT, "bench")
    saved = list(sys.path)
    sys.path.insert(0, bench)
    try:
        spec = importlib.util.spec_from_file_location(
            "benchrun", os.path.join(bench, "run.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


class ParseSyscallCountsTests(unittest.TestCase):
    def setUp(self):
        self.run = loadRun()

    def test_perf(self):
        """
        perf's CSV: the count of each tracepoint, by the call's name; a
        counter perf reports as not counted is 0.
        """
        self.assertEqual(
            self.run.parseSyscallCounts(PERF, strace=False),
            {"fsync": 3, "flock": 0, "fdatasync": 0},
        )

    def test_strace(self):
        """
        strace's table: the calls column (not the errors), and the total.
        """
        self.assertEqual(
            self.run.parseSyscallCounts(STRACE, strace=True),
            {"openat": 1372, "fsync": 3, "total": 1375},
        )

    def test_perfOutputIsNotStrace(self):
        """
        Each reader ignores the other's format: no count is made up.
        """
        self.assertEqual(self.run.parseSyscallCounts(STRACE, strace=False), {})
        self.assertEqual(self.run.parseSyscallCounts(PERF, strace=True), {})


class PeakSamplerTests(unittest.TestCase):
    """
    The peak memory of a process tree (L{PeakSampler}): a peak shorter than
    the 0.2 s between samples still counts, from the process's own
    high-water mark.
    """

    def test_shortPeakCounted(self):
        import subprocess
        import time

        run = loadRun()
        # 40 MB written for 20 ms, once told to, then freed; then it waits.
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "sys.stdin.readline()\n"
                "b = bytearray(40 * 1024 * 1024)\n"
                "for i in range(0, len(b), 4096): b[i] = 1\n"
                "time.sleep(0.02)\n"
                "del b\n"
                "print('done', flush=True)\n"
                "sys.stdin.readline()\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        time.sleep(0.3)
        sampler = run.PeakSampler(child.pid)
        before = sampler.pssAtStart
        child.stdin.write("go\n")
        child.stdin.flush()
        self.assertEqual(child.stdout.readline().strip(), "done")
        peak = sampler.stop()
        self.assertGreater(peak - before, 35 * 1024 * 1024)
        # Freed: what the tree holds now is far below the peak.
        self.assertLess(run.treePss(child.pid), peak - 30 * 1024 * 1024)
