# -*- test-case-name: tests.test_auditthreads -*-
"""
The audit log's disk work stays off the reactor thread (issue 18, 11): the
records of the operator's commands (hold, release, delete through the
control socket) are written and fdatasync'ed in the thread pool, and the
audit log's stop does not block the reactor while a write is in progress.
"""

import io
import os
import threading

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.admin import command as admin
from msa.audit import AuditLog, chainFiles, verifyFiles
from msa.queue.spool import Spool
from msa.service.services import AuditLogService
from tests.downstream import DownstreamServer
from tests.e2e import RunningMSA
from tests.test_audit import auditPath, queueIdOf, records
from tests.test_e2e import RECIPIENT, SENDER, submit
from tests.waiting import waitUntil, waitUntilBlocking


class SyncThreads:
    """
    Wrap C{os.fsync} and C{os.fdatasync} for the test: record, for each
    sync of a file under C{directory}, whether it ran on the reactor's
    thread (the test's main thread).

    @ivar calls: C{(onReactorThread, path)} per sync of a file there.
    """

    def __init__(self, testCase: unittest.TestCase, directory: str) -> None:
        self.directory = os.path.realpath(directory) + os.sep
        self.reactorThread = threading.current_thread()
        self.calls: list[tuple[bool, str]] = []
        for name in ("fsync", "fdatasync"):
            testCase.patch(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, sync):
        def recording(fd):
            fd = fd if isinstance(fd, int) else fd.fileno()
            path = os.readlink(f"/proc/self/fd/{fd}")
            if (path + os.sep).startswith(self.directory):
                onReactor = threading.current_thread() is self.reactorThread
                self.calls.append((onReactor, path))
            return sync(fd)

        return recording


class OperatorRecordTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_operatorRecordsOffTheReactor(self):
        """
        hold, release and delete through C{digipoort-msa-admin} (the
        control socket) against the daemon from TOML are recorded, each in
        the file when the command returns, after the acceptance, with the
        envelope; and no fsync or fdatasync of the audit log ran on the
        reactor thread.
        """
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.mailReply = (451, "4.3.0 later")
        core.start()
        self.addCleanup(core.stop)
        msa = RunningMSA(
            self,
            relay=core.relayConfig(retry_base=3600),
        )
        queueId = queueIdOf(
            (
                yield threads.deferToThread(
                    submit, port=msa.starttlsPort, context=msa.clientContext()
                )
            )
        )
        yield waitUntil(lambda: core.commands, 10, "an attempt")
        syncs = SyncThreads(self, os.path.dirname(auditPath(msa)))
        for command, event in (
            ("hold", "held"),
            ("release", "released"),
            ("delete", "deleted"),
        ):
            before = len(syncs.calls)
            out, err = io.StringIO(), io.StringIO()
            code = yield threads.deferToThread(
                admin.main,
                ["--config", msa.configFile, "queue", command, queueId],
                out,
                err,
            )
            self.assertEqual(code, 0, err.getvalue())
            last = records(auditPath(msa))[-1]
            self.assertEqual((last["event"], last["queueId"]), (event, queueId))
            self.assertGreater(len(syncs.calls), before, f"{command}: no sync seen")
        self.assertEqual([c for c in syncs.calls if c[0]], [])
        mine = [r for r in records(auditPath(msa)) if r.get("queueId") == queueId]
        self.assertEqual(
            [(r["event"], r.get("by")) for r in mine],
            [
                ("accepted", None),
                ("held", "operator"),
                ("released", "operator"),
                ("deleted", "operator"),
            ],
        )
        self.assertEqual(
            (mine[-1]["sender"], mine[-1]["recipients"]), (SENDER, [RECIPIENT])
        )
        self.assertIsNone(verifyFiles(chainFiles(auditPath(msa))).error)


class StopTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_stopWhileWriting(self):
        """
        The audit log's service stops while a record's fdatasync is in
        progress: C{stopService} returns at once (the reactor goes on) with
        a L{Deferred} that fires after the write, once the files are
        closed in the thread pool.
        """
        directory = os.path.abspath(self.mktemp())
        started, gate, finished = threading.Event(), threading.Event(), []

        def slowSync(fd):
            if not started.is_set():
                started.set()
                gate.wait(10)
                finished.append(True)
            os.fsync(fd)

        audit = AuditLog(os.path.join(directory, "audit.jsonl"), fdatasync=slowSync)
        service = AuditLogService(Spool(os.path.join(directory, "spool")), audit)
        service.startService()
        writing = threads.deferToThread(audit.append, "accepted", queueId="Q1")
        yield threads.deferToThread(
            waitUntilBlocking, started.is_set, 10, "the write in progress"
        )
        stopped = service.stopService()
        self.assertEqual(finished, [], "stopService waited for the write")
        self.assertFalse(stopped.called)
        gate.set()
        yield stopped
        self.assertEqual((yield writing), 1)
        self.assertEqual(finished, [True])
        self.assertIsNone(audit._fd)
        self.assertEqual([r["event"] for r in records(audit.path)], ["accepted"])
