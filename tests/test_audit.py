# -*- test-case-name: tests.test_audit -*-
"""
The tamper-evident audit log (L{msa.audit}): the chain and its verifier
against each kind of tampering, rotation, several writers, the group
commit, write failures; then the daemon started from TOML over real
STARTTLS+AUTH sessions (accepted, relayed, bounced, operator and account
records, a full disk), and C{twistd} killed with SIGKILL under load.
"""

import errno
import hashlib
import io
import json
import os
import signal
import sys
import threading

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.model import readAccounts
from msa.admin import command as admin
from msa.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    chainFiles,
    lineHash,
    recoverRecords,
    rotatedFiles,
    timestamp,
    verifyFiles,
)
from msa.audit.chain import lastLine, predecessorHead
from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.queue.spool import Spool
from msa.relay.results import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
)
from msa.service.config import ConfigError, loadConfig
from msa.service.startupchecks import StartupCheckError
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, USERS, AiosmtpdCore, RunningMSA
from tests.faultfs import fillFileSystem, mountTmpfs
from tests.relaydata import RunnerFixture, allWith
from tests.test_crash import sleep, startWithCore
from tests.test_e2e import RECIPIENT, SENDER, submit
from tests.waiting import waitUntil, waitUntilBlocking

BOUNCING = "onbekend@overheid.nl"
STUCK = "later@overheid.nl"


def readLines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.read().split(b"\n")[:-1]


def writeLines(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def records(path: str) -> list[dict]:
    """
    Every record of the log at C{path} and its rotated predecessors.
    """
    out = []
    for name in chainFiles(path):
        out.extend(json.loads(line) for line in readLines(name))
    return out


class ChainTests(unittest.TestCase):
    """
    The writer: numbering, the hash chain, rotation, several writers, the
    group commit, failures and a torn tail.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")

    def makeLog(self, count: int = 6, **kwargs) -> AuditLog:
        log = AuditLog(self.path, **kwargs)
        self.addCleanup(log.close)
        for i in range(count):
            log.append("test", number=i)
        return log

    def test_chain(self):
        """
        Records are numbered from 1, the first carries the genesis, each
        the SHA-256 of the previous line's exact bytes.
        """
        log = self.makeLog(4)
        lines = readLines(self.path)
        parsed = [json.loads(line) for line in lines]
        self.assertEqual([r["seq"] for r in parsed], [1, 2, 3, 4])
        self.assertEqual(parsed[0]["prev"], GENESIS)
        self.assertEqual(GENESIS, "0" * 64)
        for before, record in zip(lines, parsed[1:], strict=False):
            self.assertEqual(record["prev"], hashlib.sha256(before).hexdigest())
        self.assertEqual(
            [list(r)[:4] for r in parsed], [["seq", "time", "prev", "event"]] * 4
        )
        self.assertEqual(parsed[2]["number"], 2)
        self.assertEqual((log.seq, log.head), (4, lineHash(lines[-1])))
        self.assertRegex(parsed[0]["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_timestampRoundsIntoTheNextSecond(self):
        """
        A time that rounds up to a whole second is that second, with six
        digits of microseconds, not a seventh.
        """
        self.assertEqual(timestamp(1.9999999), "1970-01-01T00:00:02.000000Z")
        self.assertEqual(timestamp(1.25), "1970-01-01T00:00:01.250000Z")

    def test_lastLine(self):
        """
        The last complete line and the offset after it, read backwards in
        chunks: a single line, a torn tail, a line longer than a chunk, an
        empty first line before a torn tail, no complete line.
        """
        path = os.path.abspath(self.mktemp())
        for content, expected in [
            (b'{"seq":1}\n', (b'{"seq":1}', 10)),
            (b"one\ntwo\ntorn", (b"two", 8)),
            (b"one\n" + b"x" * 20000 + b"\n", (b"x" * 20000, 20005)),
            # Its first byte alone left after the first chunk.
            (b"x" * 8192 + b"\n", (b"x" * 8192, 8193)),
            (b"\ntorn", (b"", 1)),
            (b"torn", (None, 0)),
        ]:
            with open(path, "wb") as f:
                f.write(content)
            fd = os.open(path, os.O_RDONLY)
            try:
                self.assertEqual(lastLine(fd, len(content)), expected, content[:20])
            finally:
                os.close(fd)

    def test_reopenContinues(self):
        """
        A new writer (a restart) continues the chain from the file.
        """
        self.makeLog(3)
        again = AuditLog(self.path)
        self.addCleanup(again.close)
        again.open()
        self.assertEqual(again.seq, 3)
        self.assertEqual(again.append("later"), 4)
        self.assertIsNone(verifyFiles([self.path]).error)

    def test_twoWriters(self):
        """
        Two writers on one file (the daemon and the admin command) keep
        one chain: each re-reads the head another appended.
        """
        first = self.makeLog(2)
        second = AuditLog(self.path)
        self.addCleanup(second.close)
        self.assertEqual(second.append("admin"), 3)
        self.assertEqual(first.append("daemon"), 4)
        self.assertEqual(second.append("admin"), 5)
        result = verifyFiles([self.path])
        self.assertIsNone(result.error)
        self.assertEqual(result.records, 5)

    def test_rotation(self):
        """
        Past max_bytes the file is renamed to .000001, .000002...; each new
        file starts with a rotated record naming its predecessor and
        chained to its last line; the whole chain verifies.
        """
        log = self.makeLog(60, maxBytes=4096)
        older = rotatedFiles(self.path)
        self.assertGreaterEqual(len(older), 2)
        self.assertEqual(
            [os.path.basename(p) for p in older],
            [f"audit.jsonl.{n:06d}" for n in range(1, len(older) + 1)],
        )
        for before, after in zip(older, older[1:] + [self.path], strict=True):
            first = json.loads(readLines(after)[0])
            self.assertEqual(first["event"], "rotated")
            self.assertEqual(first["previousFile"], os.path.basename(before))
            self.assertEqual(first["prev"], lineHash(readLines(before)[-1]))
            self.assertEqual(first["previousSeq"], first["seq"] - 1)
            self.assertLessEqual(os.path.getsize(before), 4096)
        files = chainFiles(self.path)
        result = verifyFiles(files)
        self.assertIsNone(result.error)
        self.assertEqual(result.records, log.seq)
        self.assertEqual((result.lastSeq, result.head), (log.seq, log.head))

    def test_groupCommit(self):
        """
        Callers that arrive while a round's fdatasync runs share the next
        round: eight records, two fdatasyncs.
        """
        release = threading.Event()
        calls = []

        def slowSync(fd):
            calls.append(fd)
            if len(calls) == 1:
                release.wait(10)
            os.fsync(fd)

        log = AuditLog(self.path, fdatasync=slowSync)
        self.addCleanup(log.close)
        log.open()
        threads_ = [
            threading.Thread(target=log.append, args=("message",), kwargs={"n": i})
            for i in range(8)
        ]
        threads_[0].start()
        waitUntilBlocking(lambda: calls, what="the first round's fdatasync")
        for t in threads_[1:]:
            t.start()
        waitUntilBlocking(
            lambda: (
                log._commits._pending is not None
                and len(log._commits._pending.jobs) == 7
            ),
            what="the seven other records queued for the next round",
        )
        release.set()
        for t in threads_:
            t.join(10)
            self.assertFalse(t.is_alive())
        self.assertEqual(len(calls), 2)
        result = verifyFiles([self.path])
        self.assertIsNone(result.error)
        self.assertEqual(result.records, 8)

    def test_syncFails(self):
        """
        An fdatasync that fails (EIO): L{AuditError}, the record is cut
        off again, the head is unchanged, and the next append chains on
        the last durable record.
        """
        failing = [True]

        def sync(fd):
            if failing[0]:
                raise OSError(errno.EIO, "Input/output error")
            os.fsync(fd)

        log = self.makeLog(2)
        log._fdatasync = sync
        size = os.path.getsize(self.path)
        error = self.assertRaises(AuditError, log.append, "lost")
        self.assertIn("Input/output error", str(error))
        self.assertEqual(os.path.getsize(self.path), size)
        self.assertEqual(log.seq, 2)
        failing[0] = False
        self.assertEqual(log.append("kept"), 3)
        result = verifyFiles([self.path])
        self.assertIsNone(result.error)
        self.assertEqual(
            [r["event"] for r in records(self.path)], ["test", "test", "kept"]
        )

    def test_tornTailCutOff(self):
        """
        A last line without its LF (a crash mid-write) is cut off by the
        next writer, which records that (length and SHA-256 of the bytes).
        """
        self.makeLog(2)
        with open(self.path, "ab") as f:
            f.write(b'{"seq":3,"time":"2026')
        log = AuditLog(self.path)
        self.addCleanup(log.close)
        log.open()
        last = records(self.path)[-1]
        self.assertEqual(last["event"], "torn-tail-removed")
        self.assertEqual(last["seq"], 3)
        self.assertEqual(last["bytes"], 21)
        self.assertEqual(
            last["sha256"], hashlib.sha256(b'{"seq":3,"time":"2026').hexdigest()
        )
        self.assertIsNone(verifyFiles([self.path]).error)

    def test_unreadableHead(self):
        """
        A last record that is not JSON: the chain cannot be continued, the
        writer refuses (the daemon does not start).
        """
        self.makeLog(2)
        with open(self.path, "ab") as f:
            f.write(b"garbage\n")
        log = AuditLog(self.path)
        self.addCleanup(log.close)
        error = self.assertRaises(AuditError, log.open)
        self.assertIn("the last record is unreadable", str(error))


class RecoveryTests(unittest.TestCase):
    """
    A crash between a message's commit and its acceptance record: the next
    start records it as recovered.
    """

    @defer.inlineCallbacks
    def test_queuedWithoutRecord(self):
        directory = os.path.abspath(self.mktemp())
        spool = Spool(os.path.join(directory, "spool"))
        audit = AuditLog(os.path.join(directory, "audit.jsonl"))
        self.addCleanup(audit.close)
        spool.audit = audit
        recorded = yield queueOne(spool, "a@mijnbedrijf.nl")
        # The crash window: committed, but no record (as if the process
        # died before the record's fdatasync).
        spool.audit = None
        lost = yield queueOne(spool, "b@mijnbedrijf.nl")
        self.assertEqual(recoverRecords(audit, spool), [lost])
        last = records(audit.path)[-1]
        self.assertEqual(
            (last["event"], last["queueId"], last["sender"], last["recipients"]),
            ("recovered", lost, "b@mijnbedrijf.nl", [RECIPIENT]),
        )
        self.assertNotEqual(recorded, lost)
        # Once only.
        self.assertEqual(recoverRecords(audit, spool), [])
        self.assertIsNone(verifyFiles([audit.path]).error)

    @defer.inlineCallbacks
    def test_olderThanTheLog(self):
        """
        Messages queued before the log's first record (the log was just
        enabled) are not recovered.
        """
        directory = os.path.abspath(self.mktemp())
        spool = Spool(os.path.join(directory, "spool"))
        yield queueOne(spool, "a@mijnbedrijf.nl")
        audit = AuditLog(os.path.join(directory, "audit.jsonl"))
        self.addCleanup(audit.close)
        self.assertEqual(recoverRecords(audit, spool), [])
        audit.append("account", action="added", account="x")
        self.assertEqual(recoverRecords(audit, spool), [])

    def test_unreadableLogStopsTheStart(self):
        """
        A log whose last record cannot be read: the daemon does not start
        (it could not continue the chain).
        """
        directory = os.path.abspath(self.mktemp())
        path = os.path.join(directory, "audit.jsonl")
        os.makedirs(directory)
        with open(path, "wb") as f:
            f.write(b"garbage\n")
        error = self.assertRaises(
            StartupCheckError, RunningMSA, self, audit={"path": path}
        )
        self.assertIn("audit log: ", str(error))
        self.assertIn("the last record is unreadable", str(error))


class RunnerRecordTests(RunnerFixture, unittest.TestCase):
    """
    The queue runner's records, with a fake clock and downstream: relayed,
    bounced, expired.
    """

    def setUp(self):
        RunnerFixture.setUp(self)
        self.audit = AuditLog(os.path.join(os.path.abspath(self.mktemp()), "a.jsonl"))
        self.addCleanup(self.audit.close)
        self.spool.audit = self.audit
        self.runner.dsnHostname = "localhost"

    def events(self, queueId):
        return [
            (r["event"], r.get("recipients"), r.get("reply"))
            for r in records(self.audit.path)
            if r.get("queueId") == queueId
        ]

    def test_relayedAndBounced(self):
        self.runner.startService()
        queueId = self.queue(["ok@example.org", "bad@example.org"])
        self.clock.advance(0)
        entry, _, d = self.downstream.calls[-1]
        d.callback(
            DeliveryResult(
                {
                    "ok@example.org": RecipientResult(ACCEPTED, 250, "2.0.0 ok"),
                    "bad@example.org": RecipientResult(PERMANENT, 550, "5.1.1 no"),
                },
                "250 2.0.0 queued as C1",
            )
        )
        self.assertEqual(
            self.events(queueId),
            [
                ("accepted", ["ok@example.org", "bad@example.org"], None),
                ("relayed", ["ok@example.org"], "250 2.0.0 queued as C1"),
                ("bounced", ["bad@example.org"], "250 2.0.0 queued as C1"),
            ],
        )
        bounced = records(self.audit.path)[2]
        self.assertEqual(bounced["replies"], {"bad@example.org": "550 5.1.1 no"})
        self.assertEqual(records(self.audit.path)[3]["event"], "dsn-queued")

    def test_expired(self):
        self.runner.maxLifetime = 300
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        for _ in range(10):
            if not self.downstream.calls[-1][2].called:
                entry, _, d = self.downstream.calls[-1]
                d.callback(allWith(entry, TEMPORARY, 421, "down"))
            self.clock.advance(3600)
        [expired] = [e for e in self.events(queueId) if e[0] == "expired"]
        self.assertEqual(expired[1], ["bob@example.org"])
        self.assertTrue(expired[2].startswith("expired after "), expired)
        self.assertIsNone(verifyFiles([self.audit.path]).error)


class SpoolCommitTests(unittest.TestCase):
    """
    The acceptance record inside the spool's commit.
    """

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.spool = Spool(os.path.join(directory, "spool"))
        self.audit = AuditLog(os.path.join(directory, "audit.jsonl"))
        self.addCleanup(self.audit.close)
        self.spool.audit = self.audit

    @defer.inlineCallbacks
    def test_recordBeforeTheCommitReturns(self):
        queueId = yield queueOne(self.spool, "a@mijnbedrijf.nl")
        [record] = records(self.audit.path)
        self.assertEqual(
            {k: record[k] for k in ("event", "queueId", "account", "sender")},
            {
                "event": "accepted",
                "queueId": queueId,
                "account": "alice",
                "sender": "a@mijnbedrijf.nl",
            },
        )
        self.assertEqual(record["size"], len(b"Subject: x\r\n\r\nbody\r\n"))

    @defer.inlineCallbacks
    def test_recordFails(self):
        """
        The record cannot be made durable (EIO on fdatasync): the commit
        fails with 451 4.3.0, the message's files are gone, the log is as
        it was.
        """

        def failing(fd):
            raise OSError(errno.EIO, "Input/output error")

        self.audit.open()
        self.audit._fdatasync = failing
        error = yield self.assertFailure(
            queueOne(self.spool, "a@mijnbedrijf.nl"), SMTPReply
        )
        self.assertEqual(
            (error.code, error.status, error.text),
            (451, "4.3.0", "Cannot queue the message, try again later"),
        )
        self.assertEqual(os.listdir(self.spool.tmpDirectory), [])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])
        self.assertEqual(os.path.getsize(self.audit.path), 0)


def queueOne(spool: Spool, sender: str):
    writer = spool.newMessage(Envelope(sender, [RECIPIENT], account="alice"))
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    return writer.commit()


class VerifyTests(unittest.TestCase):
    """
    The verifier against each kind of tampering, and its command.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")
        log = AuditLog(self.path)
        for i in range(6):
            log.append("accepted", queueId=f"Q{i}", sender="ik@mijnbedrijf.nl")
        log.close()
        self.head = log.head
        self.lines = readLines(self.path)

    def verify(self):
        return verifyFiles([self.path])

    def admin(self, *files):
        out, err = io.StringIO(), io.StringIO()
        code = admin.main(["audit", "verify", *files], out, err)
        return code, out.getvalue(), err.getvalue()

    def test_clean(self):
        result = self.verify()
        self.assertEqual(
            (result.error, result.records, result.firstSeq, result.lastSeq),
            (None, 6, 1, 6),
        )
        self.assertEqual(result.head, self.head)
        code, out, err = self.admin(self.path)
        self.assertEqual((code, err), (0, ""))
        first = json.loads(self.lines[0])["time"]
        last = json.loads(self.lines[-1])["time"]
        self.assertEqual(
            out.splitlines()[:2],
            [
                f"OK: 6 record(s) in 1 file(s), seq 1..6, {first} .. {last}",
                f"head: seq 6 sha256 {self.head}",
            ],
        )

    def test_emptyLog(self):
        """
        An empty log verifies as no records, seq 0..0, its head the genesis.
        """
        open(self.path, "w").close()
        code, out, err = self.admin(self.path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines()[:3],
            [
                f"note: {self.path}: empty",
                "OK: 0 record(s) in 1 file(s), seq 0..0, - .. -",
                f"head: seq 0 sha256 {GENESIS}",
            ],
        )

    def test_splitWithoutRotatedRecord(self):
        """
        A log cut in two by hand still links, but the second file does not
        start with a rotated record: verified, with a note saying so.
        """
        first = self.path + ".000001"
        writeLines(first, self.lines[:3])
        writeLines(self.path, self.lines[3:])
        result = verifyFiles([first, self.path])
        self.assertEqual((result.error, result.records), (None, 6))
        self.assertEqual(
            result.notes,
            [f"{self.path}:1: a file that does not start with a rotated record"],
        )

    def assertBroken(self, where: int, what: str) -> str:
        result = self.verify()
        self.assertIsNotNone(result.error)
        self.assertTrue(result.error.startswith(f"{self.path}:{where}: "), result.error)
        self.assertIn(what, result.error)
        code, out, _ = self.admin(self.path)
        self.assertEqual(code, 1)
        self.assertIn(f"BROKEN: {result.error}\n", out)
        return result.error

    def test_editedField(self):
        """
        A field of record 3 changed (still valid JSON): record 4's link
        breaks.
        """
        self.lines[2] = self.lines[2].replace(b'"Q2"', b'"Q9"')
        writeLines(self.path, self.lines)
        self.assertBroken(4, "its prev does not match the previous line")

    def test_editedSeq(self):
        """
        A sequence number changed, with the next link recomputed.
        """
        record = json.loads(self.lines[3])
        record["seq"] = 40
        self.lines[3] = json.dumps(record, separators=(",", ":")).encode()
        writeLines(self.path, self.lines)
        self.assertBroken(4, "seq 40")

    def test_removed(self):
        """
        Record 3 removed: the record now on line 3 (seq 4) does not follow.
        """
        del self.lines[2]
        writeLines(self.path, self.lines)
        self.assertBroken(3, "seq 4 ('accepted') follows seq 2: records removed")

    def test_removedFirst(self):
        del self.lines[0]
        writeLines(self.path, self.lines)
        self.assertBroken(1, "records removed from the start")

    def test_reordered(self):
        self.lines[2], self.lines[3] = self.lines[3], self.lines[2]
        writeLines(self.path, self.lines)
        self.assertBroken(3, "seq 4 ('accepted') follows seq 2")

    def test_truncatedInTheMiddle(self):
        """
        Bytes cut out of the middle (from within record 3 into record 4):
        the join is not a JSON record.
        """
        data = b"\n".join(self.lines) + b"\n"
        start = data.index(self.lines[2]) + 30
        end = data.index(self.lines[3]) + 5
        with open(self.path, "wb") as f:
            f.write(data[:start] + data[end:])
        self.assertBroken(3, "not a JSON record")

    def test_badJSON(self):
        self.lines.insert(3, b"{not json")
        writeLines(self.path, self.lines)
        self.assertBroken(4, "not a JSON record")

    def test_missingField(self):
        self.lines[1] = self.lines[1].replace(b'"event"', b'"evnt"')
        writeLines(self.path, self.lines)
        self.assertBroken(2, "field 'event' missing")

    def test_forgedAppend(self):
        """
        A record appended with a wrong prev (a forger without the last
        line's hash).
        """
        forged = {"seq": 7, "time": "2026-01-01T00:00:00.000000Z"}
        forged.update(prev="ab" * 32, event="accepted", queueId="FORGED")
        self.lines.append(json.dumps(forged, separators=(",", ":")).encode())
        writeLines(self.path, self.lines)
        self.assertBroken(7, "its prev does not match")

    def test_truncatedTail(self):
        """
        The documented limit: whole records removed from the end leave a
        valid chain; only the head hash (printed by verify, logged by the
        daemon) kept elsewhere shows it.  Likewise an edit of the last
        record.
        """
        writeLines(self.path, self.lines[:4])
        result = self.verify()
        self.assertIsNone(result.error)
        self.assertEqual(result.lastSeq, 4)
        self.assertNotEqual(result.head, self.head)
        self.lines[-1] = self.lines[-1].replace(b'"Q5"', b'"Q7"')
        writeLines(self.path, self.lines)
        result = self.verify()
        self.assertIsNone(result.error)
        self.assertNotEqual(result.head, self.head)

    def test_incompleteTail(self):
        """
        A last line without LF (a crash mid-write): a note, not a break;
        the chain up to it verifies.
        """
        with open(self.path, "ab") as f:
            f.write(b'{"seq":7,"ti')
        result = self.verify()
        self.assertIsNone(result.error)
        self.assertEqual(result.records, 6)
        self.assertEqual(len(result.notes), 1)
        self.assertIn(f"{self.path}:7: incomplete last line (12 bytes", result.notes[0])
        code, out, _ = self.admin(self.path)
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("note: "), out)


def writeRotatedChain(testCase: unittest.TestCase) -> tuple[str, list[str]]:
    """
    Write 60 records with C{max_bytes} 4096: at least three files.

    @return: the log's path and the chain's files, oldest first.
    """
    path = os.path.join(os.path.abspath(testCase.mktemp()), "audit.jsonl")
    log = AuditLog(path, maxBytes=4096)
    for i in range(60):
        log.append("accepted", queueId=f"Q{i:03d}")
    log.close()
    files = chainFiles(path)
    testCase.assertGreaterEqual(len(files), 3)
    return path, files


class RotatedVerifyTests(unittest.TestCase):
    """
    Verification across rotated files.
    """

    def setUp(self):
        self.path, self.files = writeRotatedChain(self)

    def test_clean(self):
        result = verifyFiles(self.files)
        self.assertIsNone(result.error)
        self.assertEqual(result.records, 60 + len(self.files) - 1)
        self.assertEqual(result.notes, [])

    def test_noDirectoryNoRotatedFiles(self):
        """
        A log whose directory does not exist (yet) has no predecessors.
        """
        missing = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")
        self.assertEqual(rotatedFiles(missing), [])

    def test_emptyPredecessor(self):
        """
        A log after an empty rotated file continues from the genesis, as
        after none.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        open(os.path.join(directory, "audit.jsonl.000001"), "wb").close()
        self.assertEqual(
            predecessorHead(os.path.join(directory, "audit.jsonl")), (0, GENESIS)
        )

    def test_rotatedNamesOnly(self):
        """
        Only the log's name, a dot and six or more digits name a rotated
        file: other files beside it are not read as part of the chain.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name in (
            "audit.jsonl.0000010",
            "audit.jsonl.000002",
            "audit.jsonl.copy.000003",
            "audit.jsonl.00004",
            "other.jsonl.000005",
        ):
            open(os.path.join(directory, name), "w").close()
        self.assertEqual(
            rotatedFiles(os.path.join(directory, "audit.jsonl")),
            [
                os.path.join(directory, n)
                for n in ("audit.jsonl.000002", "audit.jsonl.0000010")
            ],
        )

    def test_defaultFilesFromConfiguration(self):
        """
        Without FILE arguments, verify reads the configured log and its
        rotated predecessors in order.
        """
        config = os.path.join(os.path.dirname(self.path), "msa.toml")
        with open(config, "w") as f:
            f.write(f'[server]\nstate_dir = "state"\n[audit]\npath = "{self.path}"\n')
        out, err = io.StringIO(), io.StringIO()
        code = admin.main(["--config", config, "audit", "verify"], out, err)
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertIn(f"in {len(self.files)} file(s)", out.getvalue())

    def test_lastRecordOfRotatedFileRemoved(self):
        """
        Removing the last record of a rotated file (its tail, which the
        file alone cannot show) breaks the link of the next file's first
        record.
        """
        lines = readLines(self.files[1])
        writeLines(self.files[1], lines[:-1])
        result = verifyFiles(self.files)
        self.assertTrue(
            result.error.startswith(f"{self.files[2]}:1: broken link"), result.error
        )

    def test_filesOutOfOrder(self):
        """
        The files in the wrong order: the first given does not start the
        chain; from its anchor, the next one does not follow.
        """
        result = verifyFiles([self.files[1], self.files[0], *self.files[2:]])
        self.assertTrue(result.error.startswith(f"{self.files[1]}:1: "), result.error)
        anchor = json.loads(readLines(self.files[1])[0])["prev"]
        result = verifyFiles(
            [self.files[1], self.files[0], *self.files[2:]], anchor=anchor
        )
        self.assertTrue(result.error.startswith(f"{self.files[0]}:1: "), result.error)

    def test_rotatedFileRemoved(self):
        result = verifyFiles([self.files[0], *self.files[2:]])
        self.assertTrue(
            result.error.startswith(f"{self.files[2]}:1: broken link"), result.error
        )

    def test_startsAtRotatedFile(self):
        """
        The oldest file removed: a chain that starts at a rotated record is
        broken without an anchor (anybody can write a rotated record at the
        top of a file); see L{tests.test_auditverify} for the anchor.
        """
        result = verifyFiles(self.files[1:])
        self.assertTrue(
            result.error.startswith(f"{self.files[1]}:1: the chain starts at seq "),
            result.error,
        )
        self.assertIn("not at the genesis", result.error)
        self.assertIn("--anchor", result.error)


# -- the daemon -------------------------------------------------------------


def logText(msa: RunningMSA) -> bytes:
    data = b""
    for name in chainFiles(auditPath(msa)):
        with open(name, "rb") as f:
            data += f.read()
    return data


def auditPath(msa: RunningMSA) -> str:
    return os.path.join(msa.state, "audit", "audit.jsonl")


def queueIdOf(reply: tuple[int, bytes]) -> str:
    code, text = reply
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), reply
    return text.split()[-1].decode()


def waitForRecord(msa: RunningMSA, match, what: str):
    def found():
        return [r for r in records(auditPath(msa)) if match(r)] or None

    return waitUntil(found, 15, what)


class DaemonTests(unittest.TestCase):
    """
    The assembled service from TOML, over real STARTTLS+AUTH sessions.
    """

    timeout = 60

    def submit(self, msa, **kwargs):
        return threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext(), **kwargs
        )

    @defer.inlineCallbacks
    def test_acceptedAndRelayed(self):
        """
        The accepted record is in the file when the 250 arrives, with the
        session's facts and the digest of the exact bytes; the relayed
        record follows once the core (aiosmtpd) took it, with its reply.
        No password, hash or SASL data in the log.
        """
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        reply = yield self.submit(msa, recipients=[RECIPIENT, "ander@overheid.nl"])
        queueId = queueIdOf(reply)
        # Read at once: durable before the 250.
        accepted = [r for r in records(auditPath(msa)) if r["event"] == "accepted"]
        self.assertEqual(len(accepted), 1)
        record = accepted[0]
        self.assertEqual(
            {k: record[k] for k in record if k not in ("time", "prev", "seq")},
            {
                "event": "accepted",
                "queueId": queueId,
                "account": "alice",
                "client": "127.0.0.1",
                "sender": SENDER,
                "recipients": [RECIPIENT, "ander@overheid.nl"],
                "size": len(MESSAGE),
                "session": record["session"],
                "clientPort": record["clientPort"],
                "mechanism": "PLAIN",
                "tls": "TLSv1.3",
                "cipher": record["cipher"],
                "sha256": hashlib.sha256(MESSAGE).hexdigest(),
            },
        )
        self.assertGreater(record["clientPort"], 0)
        yield core.waitForMessages(1)
        [relayed] = yield waitForRecord(
            msa, lambda r: r["event"] == "relayed", "the relayed record"
        )
        self.assertEqual(relayed["queueId"], queueId)
        self.assertEqual(relayed["recipients"], [RECIPIENT, "ander@overheid.nl"])
        self.assertIn("CORE1", relayed["reply"])
        self.assertEqual(relayed["seq"], record["seq"] + 1)
        text = logText(msa)
        for secret in [*USERS.values(), "d29uZGVybGFuZA", "AGFsaWNl"]:
            self.assertNotIn(secret.encode(), text)
        for account in readAccounts(msa.accountsFile).values():
            self.assertNotIn(account.passwordHash.encode(), text)
            for variants in account.digestHA1.values():
                for secret in variants:
                    self.assertNotIn(secret.encode(), text)
            for keys in account.scram.values():
                self.assertNotIn(keys["storedKey"].encode(), text)
                self.assertNotIn(keys["serverKey"].encode(), text)
        self.assertIsNone(verifyFiles(chainFiles(auditPath(msa))).error)

    def withCore(self, recipient: str, reply: tuple[int, str], retryBase: float):
        """
        The MSA relaying to a core (L{DownstreamServer}, C{self.core}) that
        answers C{reply} to RCPT C{recipient}.
        """
        self.core = DownstreamServer(os.path.abspath(self.mktemp()))
        self.core.rcptReplies[recipient] = reply
        self.core.start()
        self.addCleanup(self.core.stop)
        return RunningMSA(self, relay=self.core.relayConfig(retry_base=retryBase))

    @defer.inlineCallbacks
    def test_bounced(self):
        """
        A recipient the core refuses for good: a bounced record with the
        core's reply, and the notification's own dsn-queued record.
        """
        msa = self.withCore(BOUNCING, (550, "5.1.1 no such user"), retryBase=1)
        queueId = queueIdOf((yield self.submit(msa, recipients=[BOUNCING])))
        [bounced] = yield waitForRecord(
            msa, lambda r: r["event"] == "bounced", "the bounced record"
        )
        self.assertEqual(
            (bounced["queueId"], bounced["recipients"]), (queueId, [BOUNCING])
        )
        self.assertEqual(bounced["replies"], {BOUNCING: "550 5.1.1 no such user"})
        [notice] = yield waitForRecord(
            msa, lambda r: r["event"] == "dsn-queued", "the DSN's record"
        )
        self.assertEqual((notice["sender"], notice["recipients"]), ("", [SENDER]))
        self.assertIsNone(verifyFiles(chainFiles(auditPath(msa))).error)

    def runAdmin(self, msa, *argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        code = admin.main(["--config", msa.configFile, *argv], out, err)
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_accountChanges(self):
        """
        add, passwd, set, disable, enable and remove by the admin command
        append account records to the log the daemon writes (one chain,
        two writers), with the settings but never the password.
        """
        msa = RunningMSA(self)
        queueIdOf((yield self.submit(msa)))
        steps = [
            (("accounts", "add", "carol", "--sender", "@mijnbedrijf.nl"), "s3cret one"),
            (("accounts", "passwd", "carol"), "s3cret two"),
            (("accounts", "set", "carol", "--max-recipients", "5"), ""),
            (("accounts", "disable", "carol"), ""),
            (("accounts", "enable", "carol"), ""),
            (("accounts", "remove", "carol"), ""),
        ]
        for argv, password in steps:
            code, _, err = self.runAdmin(msa, *argv, stdin=password + "\n")
            self.assertEqual((code, err), (0, ""), argv)
        # The daemon appends after the admin command did.
        queueIdOf((yield self.submit(msa)))
        found = [
            (r["event"], r.get("action"), r.get("account"))
            for r in records(auditPath(msa))
            if r["event"] != "relayed"
        ]
        self.assertEqual(
            found,
            [("accepted", None, "alice")]
            + [
                ("account", action, "carol")
                for action in (
                    "added",
                    "password-changed",
                    "changed",
                    "disabled",
                    "enabled",
                    "removed",
                )
            ]
            + [("accepted", None, "alice")],
        )
        changes = {
            r["action"]: r for r in records(auditPath(msa)) if r["event"] == "account"
        }
        added = changes["added"]
        self.assertEqual(added["settings"], {"senders": ["@mijnbedrijf.nl"]})
        self.assertEqual(added["enabled"], True)
        self.assertIn("by", added)
        changed = changes["changed"]
        self.assertEqual(changed["settings"]["maxRecipients"], 5)
        text = logText(msa)
        for secret in (b"s3cret one", b"s3cret two", b"scrypt", b"storedKey"):
            self.assertNotIn(secret, text)
        self.assertIsNone(verifyFiles(chainFiles(auditPath(msa))).error)

    @defer.inlineCallbacks
    def test_auditDiskFull(self):
        """
        The audit log's file system is full: the client gets 451 4.3.0 and
        nothing stays queued (nothing is acknowledged without its record);
        once space is freed the next message is accepted and recorded, and
        the chain verifies.
        """
        directory = mountTmpfs(self, "1m")
        path = os.path.join(directory, "audit.jsonl")
        msa = RunningMSA(self, audit={"path": path})
        spool = os.path.join(msa.state, "spool")
        # Full before the first record: the file has no page to spare.
        filler = fillFileSystem(directory)
        code, text = yield self.submit(msa)
        self.assertEqual(
            (code, text), (451, b"4.3.0 Cannot queue the message, try again later")
        )
        self.assertEqual(os.listdir(os.path.join(spool, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(spool, "queue")), [])
        self.assertEqual(records(path), [])
        self.assertEqual(msa.outboxFiles(), [])
        os.unlink(filler)
        queueId = queueIdOf((yield self.submit(msa)))
        self.assertEqual(
            [(r["seq"], r["event"], r["queueId"]) for r in records(path)][:1],
            [(1, "accepted", queueId)],
        )
        yield msa.waitForOutbox(1)
        yield waitUntil(lambda: len(records(path)) == 2, 10, "the relayed record")
        self.assertEqual(
            [(r["seq"], r["event"], r["queueId"]) for r in records(path)],
            [(1, "accepted", queueId), (2, "relayed", queueId)],
        )
        self.assertIsNone(verifyFiles([path]).error)


class KillTests(unittest.TestCase):
    """
    C{twistd digipoort-msa} killed with SIGKILL while several clients
    submit: the log verifies (at most an incomplete last line, cut off at
    the next start) and has an accepted record for every 250.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_sigkillUnderLoad(self):
        msa = yield defer.ensureDeferred(startWithCore(self))
        path = os.path.join(msa.state, "audit", "audit.jsonl")
        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client():
            while not stop.is_set():
                try:
                    code, text = submit(
                        port=msa.port,
                        context=msa.clientContext(),
                        user="crash",
                        password="crash test pw",
                        recipients=[RECIPIENT],
                    )
                except Exception:
                    continue
                if code == 250:
                    with lock:
                        acknowledged.append(text.split()[-1].decode())

        workers = [threading.Thread(target=client) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            yield waitUntil(lambda: len(acknowledged) >= 30, 60, "30 messages")
            msa.kill(signal.SIGKILL)
        finally:
            stop.set()
            yield threads.deferToThread(lambda: [w.join(15) for w in workers])
        self.assertGreaterEqual(len(acknowledged), 30)
        result = verifyFiles(chainFiles(path))
        self.assertIsNone(result.error)
        accepted = {r["queueId"] for r in records(path) if r["event"] == "accepted"}
        self.assertEqual(sorted(set(acknowledged) - accepted), [])
        # The next start continues the chain (cutting off a torn tail).
        yield defer.ensureDeferred(msa.start())
        yield sleep(0.5)
        msa.kill(signal.SIGTERM)
        yield defer.ensureDeferred(msa.waitForExit())
        result = verifyFiles(chainFiles(path))
        self.assertIsNone(result.error)
        self.assertEqual(result.notes, [])


class ConfigTests(unittest.TestCase):
    """
    The [audit] keys: defaults and validation.
    """

    def load(self, text: str):
        path = os.path.join(os.path.abspath(self.mktemp()), "msa.toml")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write('[server]\nstate_dir = "state"\n' + text)
        return path, loadConfig(path)

    def test_defaults(self):
        path, config = self.load("")
        state = os.path.join(os.path.dirname(path), "state")
        self.assertEqual(
            config["audit"],
            {
                "enabled": True,
                "path": os.path.join(state, "audit", "audit.jsonl"),
                "max_bytes": 64 * 1024 * 1024,
            },
        )

    def test_relativePath(self):
        path, config = self.load('[audit]\npath = "trail/a.jsonl"\n')
        self.assertEqual(
            config["audit"]["path"],
            os.path.join(os.path.dirname(path), "trail", "a.jsonl"),
        )

    def test_invalid(self):
        for text, message in [
            ("max_bytes = 100", "[audit] max_bytes: must be an integer from 4096 "),
            ('enabled = "yes"', "[audit] enabled: must be true or false"),
            ("path = 3", "[audit] path: must be a path"),
            ("rotate = 1", "[audit] rotate: unknown key"),
        ]:
            error = self.assertRaises(ConfigError, self.load, "[audit]\n" + text)
            self.assertIn(message, str(error))
