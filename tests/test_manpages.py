# -*- test-case-name: tests.test_manpages -*-
"""
The manual pages (issue 22, item 7): C{man/digipoort-msa-admin.1} and
C{man/digipoort-msa.8} are what L{msa.admin.manpage} makes from the
programs' own option definitions (so they cannot drift), C{groff -ww} and
C{man --warnings} find nothing to warn about, every subcommand and option
is in the rendered text, and the wheel C{pip install .} builds installs
both under C{share/man}.
"""

import os
import subprocess
import sys
import zipfile

from twisted.internet import threads
from twisted.trial import unittest

from msa import __version__
from msa.admin import command, manpage
from msa.service import tap
from tests.e2e import requireProgram

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = {
    "digipoort-msa-admin.1": manpage.adminPage,
    "digipoort-msa.8": manpage.daemonPage,
}


def render(testCase, name: str) -> tuple[str, str]:
    """
    The page rendered by C{groff -ww -man -Tutf8} (all warnings on), as
    plain text: (text, warnings).
    """
    groff = requireProgram(testCase, "groff")
    done = subprocess.run(
        [groff, "-ww", "-man", "-Tutf8", "-P-cbou", os.path.join(ROOT, "man", name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout, done.stderr


def joined(text: str) -> str:
    """
    Rendered text with its line breaks, hyphenation and runs of blanks
    undone, for looking up phrases.
    """
    text = text.replace("\u2010\n", "").replace("-\n", "-")
    return " ".join(text.split())


class ManPageTests(unittest.TestCase):
    def test_current(self):
        """
        The committed pages are what the generator makes now (regenerate
        with C{python -m msa.admin.manpage man}).
        """
        for name, make in PAGES.items():
            with open(os.path.join(ROOT, "man", name), encoding="utf-8") as f:
                self.assertEqual(f.read(), make(), f"man/{name} is stale")

    def test_groffWarnsNothing(self):
        for name in PAGES:
            text, warnings = render(self, name)
            self.assertEqual(warnings, "", name)
            self.assertIn("NAME", text)

    def test_manWarnsNothing(self):
        program = requireProgram(self, "man")
        for name in PAGES:
            done = subprocess.run(
                [program, "--warnings", "-l", os.path.join(ROOT, "man", name)],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"},
            )
            self.assertEqual((done.returncode, done.stderr), (0, ""), name)

    def test_everySubcommandAndOption(self):
        """
        Every leaf subcommand of the admin parser, with each of its
        options, and every global option; the daemon page's C{--config}.
        """
        text = joined(render(self, "digipoort-msa-admin.1")[0])
        parser = command._parser()
        commands = list(manpage._commands(parser))
        self.assertIn("queue verify", [words for words, _, _ in commands])
        self.assertGreater(len(commands), 15)
        for words, _, subparser in commands:
            self.assertIn(words, text)
            for action in subparser._actions:
                for option in action.option_strings:
                    if option not in ("-h", "--help"):
                        self.assertIn(option, text, words)
        for option in ("--accounts", "--realm", "--config"):
            self.assertIn(option, text)
        daemon = joined(render(self, "digipoort-msa.8")[0])
        for long, short, _, doc in tap.Options.optParameters:
            self.assertIn(f"-{short}, --{long} FILE", daemon)
            self.assertIn(joined(doc), daemon)

    def test_installed(self):
        """
        The package built as C{pip install .} builds it (a wheel, in a
        directory of the test's own: installing would replace the project's
        editable install) carries both pages for C{share/man}.
        """
        directory = os.path.abspath(self.mktemp())

        def build():
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "--wheel-dir",
                    directory,
                    ROOT,
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )

        def check(done):
            self.assertEqual(done.returncode, 0, done.stderr)
            [wheel] = [n for n in os.listdir(directory) if n.endswith(".whl")]
            with zipfile.ZipFile(os.path.join(directory, wheel)) as archive:
                for name, make in PAGES.items():
                    section = "man" + name[-1]
                    member = (
                        f"digipoort_msa-{__version__}.data/data/share/man/"
                        f"{section}/{name}"
                    )
                    self.assertEqual(archive.read(member).decode(), make())

        return threads.deferToThread(build).addCallback(check)

    test_installed.timeout = 300  # type: ignore[attr-defined]
