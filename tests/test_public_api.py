# -*- test-case-name: tests.test_public_api -*-
"""
The public API of C{msa}: every name it lists resolves to the object its
module defines, is documented, and C{import msa} loads none of it until
used (so the modules below can import C{msa} without a cycle).
"""

import subprocess
import sys
from importlib import import_module

from twisted.trial import unittest

import msa


class PublicAPITests(unittest.TestCase):
    def test_everyNameResolves(self):
        for name, module in msa._PUBLIC.items():
            self.assertIs(
                getattr(msa, name), getattr(import_module(module), name), name
            )

    def test_everyNameDocumented(self):
        """
        Each public class and function has a docstring, and the package
        docstring names it.
        """
        for name in msa._PUBLIC:
            value = getattr(msa, name)
            self.assertTrue((value.__doc__ or "").strip(), f"{name} has no docstring")
            self.assertIn(f"L{{{name}}}", msa.__doc__, name)

    def test_allListsThem(self):
        self.assertEqual(sorted(msa.__all__), sorted(["__version__", *msa._PUBLIC]))
        self.assertEqual(set(msa._PUBLIC) - set(dir(msa)), set())

    def test_unknownName(self):
        with self.assertRaises(AttributeError):
            msa.noSuchThing  # noqa: B018

    def test_importIsLazy(self):
        """
        C{import msa} imports no module of the daemon until a name is used.
        """
        code = (
            "import sys, msa\n"
            "print(sorted(m for m in sys.modules if m.startswith('msa.')))\n"
            "msa.Spool\n"
            "print('msa.queue.spool' in sys.modules)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        self.assertEqual(out, ["[]", "True"])

    def test_noWebServerWithoutMetrics(self):
        """
        The daemon's module does not import twisted.web (some 3 MB in every
        worker) until C{[metrics] listen} asks for the HTTP listener.
        """
        code = (
            "import sys, msa.service.tap\n"
            "print(sorted(m for m in sys.modules if m.startswith('twisted.web')))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        self.assertEqual(out, ["[]"])
