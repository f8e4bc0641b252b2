# -*- test-case-name: tests.test_benchcharts -*-
"""
C{bench/charts.py} (issue 22, item 8): it draws the three PNG charts from
C{bench/run.py --json} output (every run's numbers) and from a file of
medians; the shipped results file draws the shipped charts.
"""

import importlib.util
import json
import os

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def loadCharts():
    spec = importlib.util.spec_from_file_location(
        "benchcharts", os.path.join(ROOT, "bench", "charts.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: A tiny run.py --json: two runs per server, run.py's units.
SAMPLE = {
    "command": "bench/run.py -s relay -s idle -s big --repeat 2",
    "results": {
        "relay": {
            "MSA": [
                {"rate": 250.0, "cpu_per_msg": 0.006, "errors": []},
                {"rate": 270.0, "cpu_per_msg": 0.004, "errors": []},
            ],
            "aiosmtpd": [
                {"rate": 300.0, "cpu_per_msg": 0.0045, "errors": []},
                {"rate": 280.0, "cpu_per_msg": 0.0045, "errors": []},
            ],
        },
        "idle": {
            "MSA": [{"per_conn": 33 * 1024.0, "errors": []}],
            "aiosmtpd": [{"per_conn": 305 * 1024.0, "errors": []}],
        },
        "big": {
            "MSA": [{"peak": 72.7 * 1024 * 1024, "cpu_per_msg": 0.59, "errors": []}],
            "aiosmtpd": [{"peak": 352.8 * 1024 * 1024, "errors": []}],
        },
    },
}


class ChartsTests(unittest.TestCase):
    def setUp(self):
        self.charts = loadCharts()

    def test_medians(self):
        found = self.charts.medians(SAMPLE)
        self.assertEqual(found["relay"]["MSA"], {"rate": 260.0, "cpu_per_msg": 0.005})
        self.assertEqual(found["idle"]["aiosmtpd"], {"per_conn": 305 * 1024.0})

    def test_rendersPNGs(self):
        directory = os.path.abspath(self.mktemp())
        written = self.charts.render(SAMPLE, directory)
        self.assertEqual(
            sorted(os.path.basename(p) for p in written),
            ["cpu-per-message.png", "memory.png", "throughput.png"],
        )
        from matplotlib import image

        for path in written:
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), PNG, path)
            height, width = image.imread(path).shape[:2]
            self.assertGreater((width, height), (600, 150), path)

    def test_ratios(self):
        """
        The labels say where the MSA wins (green) and loses (red).
        """
        self.assertEqual(
            list(self.charts._ratios({"MSA": 260.0, "aiosmtpd": 290.0}, True)),
            [("MSA = 0.90 x aiosmtpd", False)],
        )
        self.assertEqual(
            list(self.charts._ratios({"MSA": 33.0, "Postfix": 1827.0}, False)),
            [("MSA = 0.02 x Postfix", True)],
        )

    def test_shippedNumbersAreTheRun(self):
        """
        The shipped charts are drawn from the shipped medians, which
        RESULTS.md names as their run.
        """
        with open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8") as f:
            results = f.read()
        shipped = sorted(
            name
            for name in os.listdir(os.path.join(ROOT, "bench"))
            if name.startswith("results-") and name.endswith(".json")
        )
        self.assertEqual(len(shipped), 1, shipped)
        self.assertIn(f"bench/{shipped[0]}", results)
        with open(os.path.join(ROOT, "bench", shipped[0]), encoding="utf-8") as f:
            data = json.load(f)
        drawn = self.charts.render(data, self.mktemp())
        self.assertEqual(
            sorted(os.path.basename(p) for p in drawn),
            ["cpu-per-message.png", "memory.png", "throughput.png"],
        )
        for name in ("throughput.png", "cpu-per-message.png", "memory.png"):
            self.assertTrue(os.path.exists(os.path.join(ROOT, "bench", "charts", name)))
