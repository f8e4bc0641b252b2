# -*- test-case-name: tests.test_auditgaps -*-
"""
Records that could not be written (issue 18, 9b; L{msa.audit.lost}): a
fact whose record fails is counted, and the next write puts a C{lost}
record into the chain; an acknowledgement's record that fails is refused,
not counted.  Then the daemon from TOML delivering to a real core over
STARTTLS while its audit file system (a real tmpfs) is full: every
message is delivered once, and once space is freed C{audit verify}
reports exactly the records that were lost.
"""

import errno
import io
import os

from twisted.internet import defer, task, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from msa import metrics
from msa.admin import command as admin
from msa.audit import AuditError, AuditLog, verifyFiles
from msa.audit.lost import MAX_QUEUE_IDS, LostRecords
from msa.queue.spool import Spool
from msa.service.services import AuditLogService
from tests.downstream import DownstreamServer
from tests.e2e import RunningMSA
from tests.faultfs import fillFileSystem, mountTmpfs
from tests.test_audit import queueIdOf, records
from tests.test_e2e import RECIPIENT, submit
from tests.waiting import waitUntil


class FailingSync:
    """
    An fdatasync for L{AuditLog} that fails with C{errno} while C{failing}.
    """

    def __init__(self, code: int = errno.ENOSPC) -> None:
        self.failing = False
        self.code = code

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(self.code, os.strerror(self.code))
        os.fsync(fd)


class LostRecordTests(unittest.TestCase):
    """
    L{AuditLog}'s account of the facts it could not write.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")
        self.sync = FailingSync()
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.log = AuditLog(
            self.path, fdatasync=self.sync, clock=self.clock.seconds, reactor=self.clock
        )
        self.addCleanup(self.log.close)
        self.log.append("accepted", queueId="Q1")

    def test_factsCountedAndRecorded(self):
        """
        Two facts fail (the second a minute later): both are counted; the
        next append writes a C{lost} record for them first, chained, and
        verify reports the gap.
        """
        self.sync.failing = True
        self.assertRaises(AuditError, self.log.appendFact, "relayed", queueId="Q1")
        self.clock.advance(60)
        self.assertRaises(AuditError, self.log.appendFact, "held", queueId="Q2")
        self.assertEqual((self.log.lostPending, self.log.lostTotal), (2, 2))
        self.sync.failing = False
        self.assertEqual(self.log.append("accepted", queueId="Q3"), 3)
        lost, accepted = records(self.path)[1:]
        self.assertEqual(
            {k: v for k, v in lost.items() if k not in ("time", "prev")},
            {
                "seq": 2,
                "event": "lost",
                "count": 2,
                "first": "2027-01-15T08:00:00.000000Z",
                "last": "2027-01-15T08:01:00.000000Z",
                "events": {"held": 1, "relayed": 1},
                "queueIds": ["Q1", "Q2"],
                "queueIdsOmitted": 0,
                "error": f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}",
            },
        )
        self.assertEqual((accepted["seq"], accepted["queueId"]), (3, "Q3"))
        self.assertEqual((self.log.lostPending, self.log.lostTotal), (0, 2))
        result = verifyFiles([self.path])
        self.assertIsNone(result.error)
        self.assertEqual((result.lost, len(result.gaps)), (2, 1))

    def test_acknowledgementNotCounted(self):
        """
        A record whose event is refused when it fails (an acceptance: the
        client gets 451) is not a gap: nothing is counted.
        """
        self.sync.failing = True
        self.assertRaises(AuditError, self.log.append, "accepted", queueId="Q2")
        self.assertEqual(self.log.lostPending, 0)
        self.sync.failing = False
        self.log.append("accepted", queueId="Q3")
        self.assertEqual([r["event"] for r in records(self.path)], ["accepted"] * 2)

    def test_stillFailingKeepsTheCount(self):
        """
        While the disk still fails, a round that carries the owed C{lost}
        record fails with it and the count keeps growing; it is written
        once, whole.
        """
        self.sync.failing = True
        self.assertRaises(AuditError, self.log.appendFact, "relayed", queueId="Q1")
        self.assertRaises(AuditError, self.log.appendFact, "relayed", queueId="Q2")
        self.assertIsNone(self.successResultOf(self.log.flushLost()))
        self.assertEqual(self.log.lostPending, 2)
        self.sync.failing = False
        self.successResultOf(self.log.flushLost())
        [lost] = [r for r in records(self.path) if r["event"] == "lost"]
        self.assertEqual((lost["count"], lost["queueIds"]), (2, ["Q1", "Q2"]))
        self.assertEqual(self.log.lostPending, 0)

    def test_submitFactFromTheReactor(self):
        """
        L{AuditLog.submitFact}: the same account for a record submitted
        from the reactor (an operator's command).
        """
        self.sync.failing = True
        self.failureResultOf(self.log.submitFact("held", queueId="Q1"), AuditError)
        self.assertEqual(self.log.lostPending, 1)
        self.sync.failing = False
        self.assertEqual(
            self.successResultOf(self.log.submitFact("released", queueId="Q1")), 3
        )
        self.assertEqual(
            [r["event"] for r in records(self.path)], ["accepted", "lost", "released"]
        )

    def test_queueIdsBounded(self):
        """
        A C{lost} record names at most L{MAX_QUEUE_IDS} queue ids and
        counts the rest.
        """
        tally = LostRecords()
        for n in range(MAX_QUEUE_IDS + 5):
            tally.add({"event": "relayed", "queueId": f"Q{n}"}, "t", "full")
        later = LostRecords()
        later.add({"event": "held", "queueId": "X"}, "u", "still full")
        later.putBack(tally)
        self.assertEqual(later.count, MAX_QUEUE_IDS + 6)
        self.assertEqual(len(later.queueIds), MAX_QUEUE_IDS)
        self.assertEqual(later.queueIdsOmitted, 6)
        self.assertEqual(
            (later.first, later.last, later.error), ("t", "u", "still full")
        )
        self.assertEqual(later.events, {"relayed": MAX_QUEUE_IDS + 5, "held": 1})


class StopWhileFailingTests(unittest.TestCase):
    """
    The daemon stops while the audit disk still fails: the count that has
    no C{lost} record yet is logged at critical level, the one place left.
    """

    def test_countLoggedAtStop(self):
        directory = os.path.abspath(self.mktemp())
        sync = FailingSync(errno.EIO)
        clock = task.Clock()
        audit = AuditLog(
            os.path.join(directory, "audit.jsonl"), fdatasync=sync, reactor=clock
        )
        service = AuditLogService(Spool(os.path.join(directory, "spool")), audit, clock)
        service.startService()
        sync.failing = True
        self.assertRaises(AuditError, audit.appendFact, "relayed", queueId="Q1")
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.successResultOf(service.stopService())
        [critical] = [e for e in logged if e.get("log_level") == LogLevel.critical]
        self.assertEqual(critical["count"], 1)
        self.assertIn("could not be written", critical["log_format"])


def gauge(name: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name)


class FullAuditDiskTests(unittest.TestCase):
    """
    The assembled daemon delivers while the audit file system is full.
    """

    timeout = 90
    MESSAGES = 24

    @defer.inlineCallbacks
    def test_deliveriesWhileAuditDiskFull(self):
        """
        Messages accepted (their records written), held back by the
        core (451 to MAIL); the audit tmpfs fills up; the core takes them
        and an operator's flush delivers them: each reaches the core once
        and leaves the queue, though (almost) none of their C{relayed}
        records can be written.  Once the space is freed, a C{lost} record
        accounts for exactly the missing ones (count and queue ids),
        C{audit verify} reports the gap and exits 3, and the metrics
        showed the count.
        """
        self.patch(AuditLogService, "LOST_RETRY", 0.2)
        directory = mountTmpfs(self, "1m")
        path = os.path.join(directory, "audit.jsonl")
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.mailReply = (451, "4.3.0 not now")
        core.start()
        self.addCleanup(core.stop)
        msa = RunningMSA(
            self,
            audit={"path": path},
            relay=core.relayConfig(retry_base=3600),
        )
        queueIds = []
        for _ in range(self.MESSAGES):
            reply = yield threads.deferToThread(
                submit, port=msa.starttlsPort, context=msa.clientContext()
            )
            queueIds.append(queueIdOf(reply))
        yield waitUntil(
            lambda: (
                sum(line.startswith(b"MAIL") for _, line in core.commands)
                >= self.MESSAGES
            ),
            20,
            "an attempt of each",
        )
        filler = fillFileSystem(directory)
        core.mailReply = None
        code = yield threads.deferToThread(
            admin.main,
            ["--config", msa.configFile, "queue", "flush"],
            io.StringIO(),
            io.StringIO(),
        )
        self.assertEqual(code, 0)
        queue = os.path.join(msa.state, "spool", "queue")
        yield waitUntil(
            lambda: len(core.messages) >= self.MESSAGES and not os.listdir(queue),
            20,
            "every message delivered and removed from the queue",
        )
        relayed = {r["queueId"] for r in records(path) if r["event"] == "relayed"}
        missing = [q for q in queueIds if q not in relayed]
        self.assertTrue(missing, "the full disk took every relayed record")
        # The last relayed records' round (gathered for FACT_GATHER) may
        # fail just after the queue files are gone.
        yield waitUntil(
            lambda: gauge("msa_audit_records_lost_unrecorded") == len(missing),
            10,
            f"{len(missing)} records counted as lost",
        )
        os.unlink(filler)
        [lost] = yield waitUntil(
            lambda: [r for r in records(path) if r["event"] == "lost"],
            10,
            "the lost record",
        )
        self.assertEqual(lost["count"], len(missing))
        self.assertEqual(lost["events"], {"relayed": len(missing)})
        self.assertEqual(sorted(lost["queueIds"]), sorted(missing))
        self.assertEqual(gauge("msa_audit_records_lost_unrecorded"), 0)
        self.assertEqual(gauge("msa_audit_records_lost_total"), len(missing))
        # Each message reached the core exactly once.
        delivered = [q for m in core.messages for q in queueIds if q.encode() in m.data]
        self.assertEqual(sorted(delivered), sorted(queueIds))
        self.assertEqual(
            [m.recipients for m in core.messages], [[RECIPIENT]] * self.MESSAGES
        )
        out, err = io.StringIO(), io.StringIO()
        code = admin.main(["--config", msa.configFile, "audit", "verify"], out, err)
        self.assertEqual((code, err.getvalue()), (3, ""), out.getvalue())
        self.assertIn(
            f"INCOMPLETE: {len(missing)} record(s) the MSA could not write, "
            "in 1 gap(s)",
            out.getvalue(),
        )
        self.assertIn(f"{len(missing)} record(s) lost between", out.getvalue())
