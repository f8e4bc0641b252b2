# -*- test-case-name: tests.test_adminprogress -*-
"""
The admin command's long runs (C{queue verify}, C{accounts import},
C{audit verify}) show progress on a terminal and stay quiet in
scripts (issue 22, item 6): the real C{digipoort-msa-admin} run under a
pseudo-terminal (the C{pty} module) writes a carriage-return progress line,
and the same run with pipes writes only its results.
"""

import io
import os
import pty
import subprocess
import sys

import attrs
from twisted.internet import defer
from twisted.trial import unittest

from msa.accounts.model import makeAccount, writeAccounts
from msa.admin.progress import Progress
from msa.audit import AuditLog, chainFiles
from msa.queue.spool import Spool
from msa.service.config import writeConfig
from tests.e2e import SENDERS
from tests.test_audit import queueOne

ADMIN = os.path.join(os.path.dirname(sys.executable), "digipoort-msa-admin")
QUEUED = 25


def underTerminal(argv: list[str]) -> bytes:
    """
    Run C{argv} with its standard streams on a new pseudo-terminal.

    @return: everything it wrote, as the terminal received it.
    """
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        argv, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            # EIO: the program closed the terminal (it exited).
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    process.wait(60)
    return output


def throughPipes(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=60, check=False)


class AdminProgressTests(unittest.TestCase):
    timeout = 120

    def configure(self) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.spoolDirectory = os.path.join(directory, "spool")
        self.accountsFile = os.path.join(directory, "accounts.json")
        configFile = os.path.join(directory, "msa.toml")
        writeConfig(
            configFile,
            {
                "server": {"state_dir": os.path.join(directory, "state")},
                "spool": {"directory": self.spoolDirectory},
                "accounts": {"file": self.accountsFile},
                "audit": {"path": os.path.join(directory, "audit.jsonl")},
            },
        )
        return configFile

    @defer.inlineCallbacks
    def test_queueVerify(self):
        """
        C{queue verify} over a spool of 25 messages: on a terminal a line
        C{verifying the queue: n/25} rewritten with carriage returns, ending
        at 100% and cleared before the summary; through pipes the summary
        alone.
        """
        config = self.configure()
        spool = Spool(self.spoolDirectory)
        for _ in range(QUEUED):
            yield queueOne(spool, "a@mijnbedrijf.nl")
        argv = [ADMIN, "--config", config, "queue", "verify"]
        summary = (
            f"{QUEUED} message(s): {QUEUED} verified, 0 mismatch(es), 0 unverifiable"
        )
        shown = underTerminal(argv).decode()
        self.assertIn(f"\rverifying the queue: {QUEUED}/{QUEUED} (100%)", shown)
        self.assertIn("\rverifying the queue: 1/25 (4%)", shown)
        # Cleared, then the summary on a clean line.
        self.assertTrue(shown.endswith(f"\r{summary}\r\n"), repr(shown[-200:]))
        piped = throughPipes(argv)
        self.assertEqual(
            (piped.returncode, piped.stdout.decode(), piped.stderr),
            (0, summary + "\n", b""),
        )

    def test_accountsImport(self):
        """
        C{accounts import} of a file of 25 accounts (one durable audit
        record each): a progress line on a terminal, none through pipes.
        """
        config = self.configure()
        source = os.path.join(os.path.dirname(self.accountsFile), "new.json")
        account = makeAccount("template", "a password", ["localhost"])
        writeAccounts(
            source,
            {
                f"company{n}": attrs.evolve(
                    account, name=f"company{n}", extra={"senders": SENDERS}
                )
                for n in range(QUEUED)
            },
        )
        argv = [ADMIN, "--config", config, "accounts", "import", source]
        shown = underTerminal(argv).decode()
        self.assertIn(
            f"\rrecording the imported accounts: {QUEUED}/{QUEUED} (100%)", shown
        )
        os.remove(self.accountsFile)
        piped = throughPipes(argv)
        self.assertEqual(piped.returncode, 0, piped.stderr)
        self.assertNotIn(b"\r", piped.stdout + piped.stderr)
        self.assertEqual(piped.stderr, b"")
        self.assertEqual(
            piped.stdout.decode(),
            f"imported {QUEUED} account(s) from {source} into {self.accountsFile}\n",
        )

    def test_auditVerify(self):
        """
        C{audit verify} over a chain of many files (a small C{max_bytes}):
        a progress line per file on a terminal, ending at 100% and cleared
        before the summary; through pipes the results alone.
        """
        config = self.configure()
        path = os.path.join(os.path.dirname(config), "audit.jsonl")
        log = AuditLog(path, maxBytes=4096)
        for n in range(250):
            log.append("accepted", queueId=f"Q{n:04d}")
        log.close()
        files = len(chainFiles(path))
        self.assertGreaterEqual(files, 10)
        argv = [ADMIN, "--config", config, "audit", "verify"]
        shown = underTerminal(argv).decode()
        self.assertIn(f"\rverifying the audit log: 1/{files} (", shown)
        self.assertIn(f"\rverifying the audit log: {files}/{files} (100%)", shown)
        # The appended records and a rotated record atop each later file.
        total = 250 + files - 1
        summary = f"\rOK: {total} record(s) in {files} file(s), seq 1..{total}, "
        self.assertIn(summary, shown)
        piped = throughPipes(argv)
        self.assertEqual((piped.returncode, piped.stderr), (0, b""))
        self.assertNotIn(b"\r", piped.stdout)
        self.assertTrue(
            piped.stdout.startswith(summary[1:].encode()), piped.stdout[:200]
        )


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class ProgressTests(unittest.TestCase):
    """
    L{Progress} itself, on a clock the test moves.
    """

    def test_atMostEveryInterval(self):
        now = [0.0]
        stream = FakeTerminal()
        progress = Progress("x", 4, stream, clock=lambda: now[0], interval=1.0)
        progress.step()
        progress.step()
        now[0] = 1.0
        progress.step()
        progress.step()
        progress.finish()
        self.assertEqual(
            stream.getvalue(),
            "\rx: 1/4 (25%)\rx: 3/4 (75%)\rx: 4/4 (100%)\r" + " " * 13 + "\r",
        )

    def test_notATerminal(self):
        stream = io.StringIO()
        self.assertEqual(list(Progress("x", 2, stream).over("ab")), ["a", "b"])
        self.assertEqual(stream.getvalue(), "")
