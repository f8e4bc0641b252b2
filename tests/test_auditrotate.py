# -*- test-case-name: tests.test_auditrotate -*-
"""
The audit log rotates on demand (issue 22, item 5): C{digipoort-msa-admin
audit rotate} asks the running daemon over its control socket, SIGHUP does
the same; the daemon rotates in its own rounds, so that the messages
accepted before, during and after are each recorded once, the new file's
first record chains to the old file's last, and the rotated file takes the
next C{<path>.NNNNNN}, as a rotation by size does.
"""

import io
import json
import os
import signal
import subprocess
import sys
import threading

import attrs
from twisted.internet import defer, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from msa.accounts.model import makeAccount, readAccounts, writeAccounts
from msa.admin import command as admin
from msa.audit import AuditError, AuditLog, chainFiles, lineHash, verifyFiles
from msa.audit.log import _Job
from msa.service.config import writeConfig
from tests.e2e import RunningMSA
from tests.test_accounts_e2e import accountsReloaded
from tests.test_audit import auditPath, queueIdOf, readLines, records
from tests.test_crash import PASSWORD, USER, startWithCore
from tests.test_e2e import RECIPIENT, submit
from tests.waiting import waitUntil

ADMIN = os.path.join(os.path.dirname(sys.executable), "digipoort-msa-admin")


def runAdmin(configFile: str, *argv: str) -> tuple[int, str, str]:
    """
    C{digipoort-msa-admin --config configFile argv...}, in the calling
    thread (blocking: run it in a thread beside a running daemon).
    """
    out, err = io.StringIO(), io.StringIO()
    code = admin.main(["--config", configFile, *argv], out, err)
    return code, out.getvalue(), err.getvalue()


class RotateTests(unittest.TestCase):
    """
    L{AuditLog.rotate} on the file alone.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")
        self.log = AuditLog(self.path, maxBytes=4096)
        self.addCleanup(self.log.close)

    def test_rotateFollowsSizeNaming(self):
        """
        After rotations by size, a rotation on demand renames the file to
        the next number; the new file starts with a C{rotated} record
        whose C{reason} says who asked and whose C{prev} is the hash of
        the old file's last line; the whole chain verifies.
        """
        for i in range(40):
            self.log.append("accepted", queueId=f"Q{i:03d}")
        bySize = chainFiles(self.path)[:-1]
        self.assertGreaterEqual(len(bySize), 1)
        rotation = self.log.rotate("admin")
        assert rotation is not None
        expected = f"{self.path}.{len(bySize) + 1:06d}"
        self.assertEqual(rotation.file, expected)
        last = readLines(expected)[-1]
        self.assertEqual(
            (rotation.seq, rotation.head, rotation.reason),
            (json.loads(last)["seq"], lineHash(last), "admin"),
        )
        self.log.append("accepted", queueId="Q040")
        [first, after] = [json.loads(line) for line in readLines(self.path)]
        self.assertEqual(
            {k: first[k] for k in first if k != "time"},
            {
                "seq": rotation.seq + 1,
                "prev": rotation.head,
                "event": "rotated",
                "previousFile": os.path.basename(expected),
                "previousSeq": rotation.seq,
                "reason": "admin",
            },
        )
        self.assertEqual((after["seq"], after["queueId"]), (rotation.seq + 2, "Q040"))
        result = verifyFiles(chainFiles(self.path))
        self.assertEqual((result.error, result.notes), (None, []))
        accepted = [r["queueId"] for r in records(self.path) if "queueId" in r]
        self.assertEqual(accepted, [f"Q{i:03d}" for i in range(41)])

    def test_nothingToRotate(self):
        """
        A file without a record is not rotated: no empty file in the chain.
        """
        self.log.open()
        self.assertIsNone(self.log.rotate("admin"))
        self.assertEqual(chainFiles(self.path), [self.path])
        self.assertEqual(os.path.getsize(self.path), 0)

    def test_failedRotationKeepsTheRecords(self):
        """
        A rotation that fails (the rename refused) fails only the job that
        asked for it: the records of the same round are durable and get
        their C{seq}, and the log goes on in the same file.
        """
        self.log.append("accepted", queueId="Q000")
        realRename = os.rename

        def refuse(source, target):
            raise PermissionError(13, "Permission denied", target)

        self.patch(os, "rename", refuse)
        results = self.log._runRound(
            [_Job({"event": "accepted", "queueId": "Q001"}), _Job(rotate="admin")]
        )
        self.patch(os, "rename", realRename)
        self.assertEqual(results[0], 2)
        self.assertIsInstance(results[1], AuditError)
        self.assertIn("cannot rotate", str(results[1]))
        self.log.append("accepted", queueId="Q002")
        self.assertEqual(chainFiles(self.path), [self.path])
        self.assertEqual(
            [r["queueId"] for r in records(self.path)], ["Q000", "Q001", "Q002"]
        )
        self.assertIsNone(verifyFiles(chainFiles(self.path)).error)


class DaemonRotateTests(unittest.TestCase):
    """
    The assembled daemon from TOML, over real STARTTLS+AUTH sessions.
    """

    timeout = 120

    def setUp(self):
        self.msa = RunningMSA(self, accounts={"watch_interval": 3600})
        self.path = auditPath(self.msa)

    def submit(self):
        return threads.deferToThread(
            submit, port=self.msa.starttlsPort, context=self.msa.clientContext()
        )

    @defer.inlineCallbacks
    def submitMany(self, count: int):
        replies = yield defer.gatherResults([self.submit() for _ in range(count)])
        return [queueIdOf(reply) for reply in replies]

    def assertChainContinues(self, queued: list[str], reason: str) -> dict:
        """
        Two files, the old one renamed as a rotation by size would; the
        new one starts with the C{rotated} record chained to the old one's
        last line; C{audit verify} passes over both; every message queued
        has exactly one C{accepted} record.

        @return: the C{rotated} record.
        """
        rotated = f"{self.path}.000001"
        self.assertEqual(chainFiles(self.path), [rotated, self.path])
        first = json.loads(readLines(self.path)[0])
        last = readLines(rotated)[-1]
        self.assertEqual(
            (first["event"], first["reason"], first["previousFile"], first["prev"]),
            ("rotated", reason, "audit.jsonl.000001", lineHash(last)),
        )
        self.assertEqual(first["seq"], json.loads(last)["seq"] + 1)
        code, out, err = runAdmin(self.msa.configFile, "audit", "verify")
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn(" in 2 file(s), seq 1..", out)
        accepted = [
            r["queueId"] for r in records(self.path) if r["event"] == "accepted"
        ]
        self.assertEqual(sorted(accepted), sorted(queued))
        return first

    @defer.inlineCallbacks
    def test_adminRotate(self):
        """
        C{audit rotate} with messages accepted before, during (sessions in
        flight while the daemon rotates) and after: the command prints the
        renamed file and the hash it ends with, and the chain continues.
        """
        before = yield self.submitMany(2)
        during = [self.submit() for _ in range(4)]
        code, out, err = yield threads.deferToThread(
            runAdmin, self.msa.configFile, "audit", "rotate"
        )
        during = yield defer.gatherResults(during)
        after = yield self.submitMany(2)
        self.assertEqual((code, err), (0, ""))
        rotated = f"{self.path}.000001"
        last = readLines(rotated)[-1]
        self.assertEqual(
            out,
            f"rotated: {rotated} ends at seq {json.loads(last)['seq']} sha256 "
            f"{lineHash(last)} (the --anchor of audit verify once it is archived)\n",
        )
        queued = before + [queueIdOf(reply) for reply in during] + after
        self.assertChainContinues(queued, "admin")

    @defer.inlineCallbacks
    def test_sighupRotatesAndReloads(self):
        """
        SIGHUP rotates the audit log and still reloads the accounts (both
        services answer the signal); messages accepted before and after
        are each recorded once in the chain.
        """
        before = yield self.submitMany(2)
        accounts = readAccounts(self.msa.accountsFile)
        accounts["carol"] = attrs.evolve(
            makeAccount("carol", "carol pass", ["localhost"]),
            extra={"senders": ["@mijnbedrijf.nl"]},
        )
        writeAccounts(self.msa.accountsFile, accounts)
        os.kill(os.getpid(), signal.SIGHUP)
        yield waitUntil(
            lambda: len(chainFiles(self.path)) == 2, what="the audit log rotated"
        )
        yield accountsReloaded(self.msa)
        after = yield self.submitMany(2)
        self.assertChainContinues(before + after, "SIGHUP")

    @defer.inlineCallbacks
    def test_nothingToRotate(self):
        """
        A log without a record yet (a fresh start) rotates nothing, by
        SIGHUP (which logs so) or by C{audit rotate} (which says so): no
        empty file in the chain.
        """
        said: list[dict] = []

        def observe(event):
            if event.get("log_format", "").startswith("audit log: SIGHUP"):
                said.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        os.kill(os.getpid(), signal.SIGHUP)
        yield waitUntil(lambda: said, what="the daemon's answer to SIGHUP")
        self.assertEqual(
            formatEvent(said[0]),
            f"audit log: SIGHUP: nothing to rotate, {self.path} holds no record",
        )
        code, out, err = yield threads.deferToThread(
            runAdmin, self.msa.configFile, "audit", "rotate"
        )
        self.assertEqual(
            (code, out, err),
            (0, f"nothing to rotate: {self.path} holds no record yet\n", ""),
        )
        self.assertEqual(chainFiles(self.path), [self.path])
        self.assertEqual(os.path.getsize(self.path), 0)


class OfflineRotateTests(unittest.TestCase):
    """
    C{audit rotate} when no daemon runs.
    """

    def configure(self, **audit) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "audit", "audit.jsonl")
        configFile = os.path.join(directory, "msa.toml")
        writeConfig(
            configFile,
            {
                "server": {"state_dir": os.path.join(directory, "state")},
                "audit": {"path": self.path, **audit},
            },
        )
        return configFile

    def test_rotatesUnderTheLock(self):
        """
        The command says the daemon is not running and rotates the file
        itself; the chain continues.
        """
        config = self.configure()
        log = AuditLog(self.path)
        log.append("accepted", queueId="Q000")
        log.close()
        code, out, err = runAdmin(config, "audit", "rotate")
        self.assertEqual(code, 0, err)
        self.assertIn("the MSA is not running; rotating the file under its lock", err)
        self.assertTrue(out.startswith(f"rotated: {self.path}.000001 ends at seq 1 "))
        self.assertEqual(chainFiles(self.path), [f"{self.path}.000001", self.path])
        self.assertIsNone(verifyFiles(chainFiles(self.path)).error)

    def test_auditOff(self):
        """
        With the audit log off there is nothing to rotate: exit 1, said.
        """
        code, out, err = runAdmin(self.configure(enabled=False), "audit", "rotate")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("the audit log is off ([audit] enabled = false)", err)


class TwistdRotateTests(unittest.TestCase):
    """
    A real C{twistd digipoort-msa} process under a steady load of
    submissions: SIGHUP, then the real C{digipoort-msa-admin audit rotate},
    each rotate while sessions are in flight.
    """

    timeout = 180

    @defer.inlineCallbacks
    def test_rotateUnderLoad(self):
        """
        Two rotations while two clients keep submitting: three files named
        as rotations by size would be, C{audit verify} (the installed
        command) passes over them, and every message that got a 250 has
        exactly one C{accepted} record, none more.
        """
        msa = yield defer.ensureDeferred(startWithCore(self))
        path = os.path.join(msa.state, "audit", "audit.jsonl")
        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        failures: list[str] = []

        def client():
            while not stop.is_set():
                try:
                    reply = submit(
                        port=msa.port,
                        context=msa.clientContext(),
                        user=USER,
                        password=PASSWORD,
                        recipients=[RECIPIENT],
                    )
                    queueId = queueIdOf(reply)
                except Exception as e:
                    failures.append(repr(e))
                    return
                with lock:
                    acknowledged.append(queueId)

        def acknowledgedAtLeast(count):
            return waitUntil(
                lambda: len(acknowledged) >= count, 60, f"{count} messages"
            )

        workers = [threading.Thread(target=client) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            yield acknowledgedAtLeast(5)
            msa.kill(signal.SIGHUP)
            yield waitUntil(
                lambda: len(chainFiles(path)) == 2, 30, "the rotation by SIGHUP"
            )
            yield acknowledgedAtLeast(len(acknowledged) + 5)
            rotated = yield threads.deferToThread(
                subprocess.run,
                [ADMIN, "--config", msa.configFile, "audit", "rotate"],
                capture_output=True,
                timeout=60,
            )
            yield acknowledgedAtLeast(len(acknowledged) + 5)
        finally:
            stop.set()
            yield threads.deferToThread(lambda: [w.join(30) for w in workers])
        self.assertEqual(failures, [])
        self.assertEqual((rotated.returncode, rotated.stderr), (0, b""))
        self.assertTrue(rotated.stdout.startswith(f"rotated: {path}.000002 ".encode()))
        msa.kill(signal.SIGTERM)
        yield defer.ensureDeferred(msa.waitForExit())
        self.assertEqual(chainFiles(path), [f"{path}.000001", f"{path}.000002", path])
        reasons = [json.loads(readLines(name)[0]) for name in chainFiles(path)[1:]]
        self.assertEqual(
            [(r["event"], r["reason"]) for r in reasons],
            [("rotated", "SIGHUP"), ("rotated", "admin")],
        )
        verified = yield threads.deferToThread(
            subprocess.run,
            [ADMIN, "--config", msa.configFile, "audit", "verify"],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(verified.returncode, 0, verified.stdout)
        self.assertIn(b" in 3 file(s), seq 1..", verified.stdout)
        accepted = [r["queueId"] for r in records(path) if r["event"] == "accepted"]
        self.assertEqual(sorted(accepted), sorted(acknowledged))
