# -*- test-case-name: tests.test_logrotate -*-
"""
The shipped C{etc/logrotate.d/digipoort-msa} (issue 22, item 5): Debian's
C{logrotate} accepts it, and, run for real against a running daemon with
its paths moved to a temporary directory, rotates the JSON event log
(copytruncate: the daemon goes on writing at the start of the emptied
file, no hole) and leaves the audit log alone, byte for byte.
"""

import os
import subprocess

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.audit import chainFiles, verifyFiles
from tests.e2e import RunningMSA, requireProgram
from tests.test_audit import auditPath, queueIdOf
from tests.test_e2e import submit
from tests.waiting import waitUntil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "etc", "logrotate.d", "digipoort-msa")
JSON_LOG = "/var/log/digipoort-msa/events.json"


def runLogrotate(testCase: unittest.TestCase, *argv: str) -> str:
    """
    C{logrotate argv...} with a state file in a temporary directory.

    @return: what it wrote (it exits 0, or the test fails).
    """
    logrotate = requireProgram(testCase, "logrotate")
    state = os.path.join(os.path.abspath(testCase.mktemp()), "state")
    os.makedirs(os.path.dirname(state))
    done = subprocess.run(
        [logrotate, "--state", state, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    testCase.assertEqual(done.returncode, 0, output)
    return output


def readBytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def snapshot(path: str) -> dict[str, bytes]:
    """
    The audit log's files (and nothing else in its directory but the lock).
    """
    directory = os.path.dirname(path)
    return {
        name: readBytes(os.path.join(directory, name))
        for name in sorted(os.listdir(directory))
    }


class ShippedFileTests(unittest.TestCase):
    def test_debugAccepts(self):
        """
        C{logrotate --debug} reads the shipped file without an error and
        would rotate the JSON event log, and only that.
        """
        output = runLogrotate(self, "--debug", SHIPPED)
        self.assertNotIn("error", output.lower())
        self.assertIn(f"rotating pattern: {JSON_LOG}  after 1 days", output)
        self.assertEqual(output.count("rotating pattern:"), 1)
        self.assertNotIn("audit", output.replace(SHIPPED, ""))

    @defer.inlineCallbacks
    def test_rotatesTheJSONLogNotTheAuditLog(self):
        """
        The daemon writes its JSON event log into a temporary directory and
        its audit log under its state directory; C{logrotate -f} with the
        shipped file (its path moved there) renames a copy of the JSON log
        to C{events.json.1} and empties the file, and the daemon's next
        events start it again from the first byte, with no NUL bytes; the
        audit log's files are as they were, and its chain verifies.
        """
        logDirectory = os.path.abspath(self.mktemp())
        os.makedirs(logDirectory)
        jsonLog = os.path.join(logDirectory, "events.json")
        msa = RunningMSA(self, logging={"json_file": jsonLog})
        first = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        # The first message's last event (its delivery to the outbox), so
        # that what follows the rotation is the second message's alone.
        relayed = f'"event": "relay", "queue_id": "{queueIdOf(first)}"'.encode()
        yield waitUntil(
            lambda: relayed in readBytes(jsonLog), what="the first message relayed"
        )
        audit = auditPath(msa)
        before = snapshot(audit)
        config = os.path.join(logDirectory, "logrotate.conf")
        with open(SHIPPED, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(text.count(JSON_LOG), 1)
        with open(config, "w", encoding="utf-8") as f:
            f.write(text.replace(JSON_LOG, jsonLog))
        runLogrotate(self, "--force", config)
        self.assertIn(relayed, readBytes(jsonLog + ".1"))
        self.assertEqual(os.path.getsize(jsonLog), 0)
        second = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        written = readBytes(jsonLog)
        self.assertTrue(written.startswith(b"{"), written[:40])
        self.assertNotIn(b"\0", written)
        self.assertIn(f'"queue_id": "{queueIdOf(second)}"'.encode(), written)
        self.assertNotIn(f'"queue_id": "{queueIdOf(first)}"'.encode(), written)
        after = snapshot(audit)
        for name, data in before.items():
            self.assertTrue(after[name].startswith(data), name)
        self.assertEqual(sorted(after), sorted(before))
        self.assertIsNone(verifyFiles(chainFiles(audit)).error)
