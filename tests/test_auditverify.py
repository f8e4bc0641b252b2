# -*- test-case-name: tests.test_auditverify -*-
"""
C{digipoort-msa-admin audit verify} once the oldest files are archived
(issue 18, 9a): a chain that does not start at the genesis fails unless
the operator gives the anchor it must start from, the hash that C{verify}
prints per file and the daemon logs at each rotation; and the gaps the
writer recorded (C{lost} records, 9b) are reported with their own exit
code.
"""

import io
import json
import os
import re
import sys

from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa.admin import command as admin
from msa.audit import AuditLog, chainFiles, encodeRecord, lineHash, verifyFiles
from tests.test_audit import writeRotatedChain


def runVerify(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = admin.main(["audit", "verify", *argv], out, err)
    return code, out.getvalue(), err.getvalue()


class AnchorTests(unittest.TestCase):
    """
    A rotated chain whose oldest files are archived (removed).
    """

    def setUp(self):
        self.rotations: list[dict] = []

        def observe(event):
            if event.get("event") == "audit-rotated":
                self.rotations.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.path, self.files = writeRotatedChain(self)

    def archiveOldest(self, count: int) -> list[str]:
        """
        Remove the C{count} oldest files, as an operator archiving them.

        @return: the files left, oldest first.
        """
        for path in self.files[:count]:
            os.unlink(path)
        return chainFiles(self.path)

    def test_withoutAnchorFails(self):
        """
        The oldest file archived and no anchor: C{verify} exits 1 with a
        line naming the file, where the chain starts and what to pass.
        """
        left = self.archiveOldest(1)
        code, out, err = runVerify(*left)
        self.assertEqual((code, err), (1, ""))
        first = json.loads(open(left[0], "rb").readline())
        self.assertIn(
            f"BROKEN: {left[0]}:1: the chain starts at seq {first['seq']} "
            f"('rotated'), after 'audit.jsonl.000001', not at the genesis",
            out,
        )
        self.assertIn("with --anchor", out)

    def test_printedAnchorVerifies(self):
        """
        The operator's workflow: C{verify} of the whole chain prints, per
        file, the hash its successors start from; after archiving the
        oldest file, that hash as C{--anchor} makes the rest verify (exit
        0, a note that the chain starts from the anchor).  The daemon's
        rotation log line gives the same hash.
        """
        code, out, _ = runVerify(*self.files)
        self.assertEqual(code, 0)
        ends = re.findall(
            r"^file (\S+) ends at seq (\d+) sha256 ([0-9a-f]{64}) ", out, re.M
        )
        self.assertEqual([e[0] for e in ends], self.files[:-1])
        anchor = ends[0][2]
        self.assertEqual(
            anchor, lineHash(open(self.files[0], "rb").read().splitlines()[-1])
        )
        self.assertEqual(
            [(r["file"], r["anchor"]) for r in self.rotations][0],
            (self.files[0], anchor),
        )
        left = self.archiveOldest(1)
        code, out, err = runVerify("--anchor", anchor, *left)
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn(f"from the anchor {anchor}", out)
        kept = sum(len(open(name, "rb").readlines()) for name in left)
        self.assertIn(f"OK: {kept} record(s) in {len(left)} file(s)", out)

    def test_configuredFilesWithAnchor(self):
        """
        Without FILE arguments (the configured log and what is left of its
        predecessors), the anchor of the newest archived file.
        """
        config = os.path.join(os.path.dirname(self.path), "msa.toml")
        with open(config, "w") as f:
            f.write(f'[server]\nstate_dir = "state"\n[audit]\npath = "{self.path}"\n')
        anchor = verifyFiles(self.files).ends[1][2]
        self.archiveOldest(2)
        out, err = io.StringIO(), io.StringIO()
        argv = ["--config", config, "audit", "verify"]
        self.assertEqual(admin.main(argv, out, err), 1)
        out = io.StringIO()
        self.assertEqual(admin.main([*argv, "--anchor", anchor], out, err), 0)
        self.assertIn("OK: ", out.getvalue())

    def test_wrongAnchorFails(self):
        """
        An anchor the first record does not follow (the wrong file's, or a
        forged start): exit 1.
        """
        wrong = verifyFiles(self.files).ends[0][2]
        left = self.archiveOldest(2)
        code, out, _ = runVerify("--anchor", wrong, *left)
        self.assertEqual(code, 1)
        self.assertIn(
            f"BROKEN: {left[0]}:1: the chain does not start from the anchor {wrong}",
            out,
        )

    def test_forgedStartFails(self):
        """
        Someone who can write the files replaces the archived history with
        a new file that starts with a rotated record of their own and a
        chain computed from it: without the operator's anchor it does not
        verify, with it neither.
        """
        anchor = verifyFiles(self.files).ends[0][2]
        self.archiveOldest(len(self.files))
        lines, prev = [], "ab" * 32
        for seq, fields in enumerate(
            [{"event": "rotated", "previousFile": "audit.jsonl.000001"}]
            + [{"event": "accepted", "queueId": "FORGED"}],
            start=30,
        ):
            line = encodeRecord(
                {"seq": seq, "time": "2026-01-01T00:00:00.000000Z", "prev": prev}
                | fields
            )
            lines.append(line)
            prev = lineHash(line)
        with open(self.path, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
        self.assertEqual(runVerify(self.path)[0], 1)
        self.assertEqual(runVerify("--anchor", anchor, self.path)[0], 1)

    def test_anchorNotAHash(self):
        """
        An C{--anchor} that is not a SHA-256: a usage error (exit 2).
        """
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        code, _, _ = runVerify("--anchor", "abc", *self.files)
        self.assertEqual(code, 2)
        self.assertIn("not a SHA-256 (64 hex digits): 'abc'", stderr.getvalue())

    def test_anchorWithTheGenesisFails(self):
        """
        With an anchor, a chain that starts at the genesis does not start
        from it: the files given are not the ones the anchor is about.
        """
        anchor = verifyFiles(self.files).ends[0][2]
        code, out, _ = runVerify("--anchor", anchor, *self.files)
        self.assertEqual(code, 1)
        self.assertIn("does not start from the anchor", out)


class GapReportTests(unittest.TestCase):
    """
    C{lost} records in a chain: reported one by one, exit 3.
    """

    def test_gapsReported(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")
        log = AuditLog(path)
        log.append("accepted", queueId="Q1")
        log.append(
            "lost",
            count=2,
            first="2026-12-07T01:00:00.000000Z",
            last="2026-12-07T01:05:00.000000Z",
            events={"relayed": 2},
            queueIds=["Q1", "Q2"],
            queueIdsOmitted=0,
            error="No space left on device",
        )
        log.append("accepted", queueId="Q3")
        log.close()
        result = verifyFiles([path])
        self.assertIsNone(result.error)
        self.assertEqual(result.lost, 2)
        code, out, _ = runVerify(path)
        self.assertEqual(code, 3)
        self.assertIn(
            f"GAP: {path}:2: seq 2: 2 record(s) lost between "
            "2026-12-07T01:00:00.000000Z and 2026-12-07T01:05:00.000000Z "
            "(2 relayed); queue ids: Q1 Q2; error: No space left on device\n",
            out,
        )
        self.assertIn(
            "INCOMPLETE: 2 record(s) the MSA could not write, in 1 gap(s)", out
        )
