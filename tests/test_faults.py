# -*- test-case-name: tests.test_faults -*-
"""
Fault injection on the real spool and relay (issue 10): a full disk, a
full file table, EIO on fsync, a spool remounted read-only at runtime, and
a core MTA that hangs after the final dot or closes right after its 250.

Each test states what happens to the message: refused with 4xx (never
acknowledged, nothing left behind), kept and retried, or bounced.  None may
count a message acknowledged and then lost, or delivered twice outside the
one window SMTP leaves open (the core took the data but its 250 never
arrived).
"""

import errno
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa.envelope import Envelope
from msa.queue.spool import FAILED, PENDING, Spool
from msa.relay.client import SMTPDownstream
from msa.relay.runner import RelayRunner
from msa.tls import clientContextFactory
from tests import waiting
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, RunningMSA, freePort
from tests.faultfs import (
    FailingFsync,
    fileTableFull,
    fillFileSystem,
    mountTmpfs,
    remount,
)
from tests.test_e2e import submit
from tests.test_integrity import admin

SENDER = "alice@example.com"
BOB = "bob@example.org"
BODY = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: fault\r\n"
    b"\r\n"
    b"body\r\n"
)


def waitUntil(testCase, predicate, timeout=10.0, what="the condition"):
    """
    L{waiting.waitUntil}, called here with the test case first.
    """
    return waiting.waitUntil(predicate, timeout, what)


def pause(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


def listing(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


class RelayWithCore:
    """
    A real spool and relay runner delivering to a real downstream
    (L{DownstreamServer}) over STARTTLS.
    """

    def __init__(self, testCase, spoolDirectory=None, **runnerArgs):
        self.testCase = testCase
        self.server = DownstreamServer(testCase.mktemp())
        self.port = self.server.start()
        testCase.addCleanup(self.server.stop)
        self.spool = Spool(spoolDirectory or testCase.mktemp())
        self.downstream = SMTPDownstream(
            "127.0.0.1",
            self.port,
            contextFactory=clientContextFactory("localhost", caFile=self.server.caFile),
            connectTimeout=2,
            commandTimeout=2,
            dataTimeout=2,
        )
        runnerArgs.setdefault("dsnHostname", "msa.example.nl")
        self.runner = RelayRunner(self.spool, self.downstream, reactor, **runnerArgs)
        self.runner.startService()
        testCase.addCleanup(self.runner.stopService)

    @defer.inlineCallbacks
    def queue(self, recipients=(BOB,), data=BODY):
        writer = self.spool.newMessage(
            Envelope(sender=SENDER, recipients=list(recipients))
        )
        writer.write(data)
        queueId = yield writer.commit()
        return queueId

    def entry(self, queueId):
        try:
            return self.spool.load(queueId)
        except FileNotFoundError:
            return None

    def attempts(self, queueId) -> int:
        """
        The failed attempts of C{queueId} so far (-1 when it is gone).
        """
        entry = self.entry(queueId)
        return -1 if entry is None else entry.attempts

    def bounces(self):
        return [m for m in self.server.messages if m.sender == ""]

    def originals(self):
        return [m for m in self.server.messages if m.sender == SENDER]


class FileTableTests(unittest.TestCase):
    """
    EMFILE: the relay cannot open a queued message.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_emfileRetriedAndDelivered(self):
        """
        The kernel refuses the message file with EMFILE (the file table is
        really full at that moment): the attempt is a temporary failure,
        counted and rescheduled with the backoff; once descriptors are free
        again the retry delivers the message, once.
        """
        relay = RelayWithCore(self, retryBase=0.3)
        spool = relay.spool
        realOpen = spool.openMessage
        errors = []

        def openWithFullTable(queueId, entry=None):
            spool.openMessage = realOpen
            with fileTableFull():
                try:
                    return realOpen(queueId, entry)
                except OSError as e:
                    errors.append(e.errno)
                    raise

        spool.openMessage = openWithFullTable
        queueId = yield relay.queue()
        yield waitUntil(
            self,
            lambda: relay.attempts(queueId) == 1,
            what="the failed attempt",
        )
        self.assertEqual(errors, [errno.EMFILE])
        entry = relay.entry(queueId)
        self.assertEqual(entry.recipients, {BOB: PENDING})
        self.assertIn("Too many open files", entry.lastError)
        self.assertEqual(relay.server.messages, [])
        yield waitUntil(self, lambda: not spool.pending(), what="the retry")
        [message] = relay.server.messages
        self.assertEqual((message.sender, message.data), (SENDER, BODY))
        self.assertEqual(relay.bounces(), [])

    def test_startupRaisesSoftLimit(self):
        """
        In a process whose limit is really set low (soft 100, hard 200), the
        start-up check raises the soft limit to the hard one and still warns:
        max_connections 1000 needs more.
        """
        code = (
            "import resource\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))\n"
            "from msa.service.startupchecks import checkFileLimit\n"
            "print(checkFileLimit(1000, 4))\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        self.assertIn("the open files limit (RLIMIT_NOFILE) is 200", out[0])
        self.assertIn("may need 2268", out[0])
        self.assertEqual(out[1], "(200, 200)")


class FullDiskTests(unittest.TestCase):
    """
    ENOSPC: the spool is on a 1 MB tmpfs that is filled up.
    """

    timeout = 40

    def startMSA(self):
        self.spoolDirectory = mountTmpfs(self)
        self.msa = RunningMSA(self, spool={"directory": self.spoolDirectory})
        self.tmp = os.path.join(self.spoolDirectory, "tmp")
        self.queue = os.path.join(self.spoolDirectory, "queue")

    def submit(self, message):
        return threads.deferToThread(
            submit,
            port=self.msa.starttlsPort,
            context=self.msa.clientContext(),
            message=message,
        )

    @defer.inlineCallbacks
    def test_fullWhileReceiving(self):
        """
        A 300 KB message on a disk with about 100 KB left: the writes fail
        mid-data, the client gets 452 4.3.1 (mail system full, RFC 3463)
        after its final dot, the message is not queued and nothing of it
        stays in spool/tmp; once space is freed the same message is accepted
        and delivered.
        """
        self.startMSA()
        filler = fillFileSystem(self.spoolDirectory)
        os.truncate(filler, os.path.getsize(filler) - 100 * 1024)
        big = MESSAGE + (b"z" * 98 + b"\r\n") * 3000
        for _ in range(3):
            code, text = yield self.submit(big)
            self.assertEqual((code, text[:5]), (452, b"4.3.1"))
            self.assertEqual(listing(self.tmp), [])
            self.assertEqual(listing(self.queue), [])
        self.assertEqual(self.msa.outboxFiles(), [])
        os.unlink(filler)
        code, _ = yield self.submit(big)
        self.assertEqual(code, 250)
        [name] = yield self.msa.waitForOutbox(1)
        self.assertTrue(self.msa.readOutbox(name).endswith(big))
        self.assertEqual(listing(self.tmp), [])

    @defer.inlineCallbacks
    def test_fullAtCommit(self):
        """
        The disk is completely full and the message small enough to sit in
        the write buffer until the commit: the commit's flush fails with
        ENOSPC, the client gets 452 4.3.1, nothing stays in spool/tmp or
        spool/queue; after space is freed the message is accepted.
        """
        self.startMSA()
        filler = fillFileSystem(self.spoolDirectory)
        code, text = yield self.submit(MESSAGE)
        self.assertEqual((code, text), (452, b"4.3.1 Insufficient system storage"))
        self.assertEqual(listing(self.tmp), [])
        self.assertEqual(listing(self.queue), [])
        os.unlink(filler)
        code, _ = yield self.submit(MESSAGE)
        self.assertEqual(code, 250)
        yield self.msa.waitForOutbox(1)


class FsyncErrorTests(unittest.TestCase):
    """
    EIO on fsync, injected for the spool's files only (see L{FailingFsync}
    for why it cannot be produced for real here).
    """

    timeout = 30

    @defer.inlineCallbacks
    def check(self, failDirectory):
        """
        The client gets 451 4.3.0; nothing is left in the spool, nothing is
        relayed (the message was never acknowledged); without the fault the
        next submission is accepted.
        """
        msa = RunningMSA(self)
        spoolDirectory = os.path.join(msa.state, "spool")
        failing = FailingFsync(self, os.path.join(spoolDirectory, failDirectory))
        code, text = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 451)
        self.assertTrue(text.startswith(b"4.3.0"), text)
        self.assertTrue(failing.calls)
        self.assertEqual(listing(os.path.join(spoolDirectory, "tmp")), [])
        self.assertEqual(listing(os.path.join(spoolDirectory, "queue")), [])
        self.assertEqual(msa.outboxFiles(), [])
        failing.active = False
        code, _ = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250)
        yield msa.waitForOutbox(1)

    def test_messageFile(self):
        """
        The fsync of the message file (in spool/tmp) fails.
        """
        return self.check("tmp")

    def test_queueDirectory(self):
        """
        The fsync of spool/queue after the renames fails: the renamed files
        are removed again.
        """
        return self.check("queue")


class OwedNoticeTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_dsnRetriedUntilQueued(self):
        """
        The core refuses the recipient for good (550) and the failure
        notice cannot be queued (EIO on fsync in spool/tmp): the original
        stays in the queue, its recipient failed and the notice owed, and
        is not sent to the core again; once the fault is gone the retry
        queues the notice, which is relayed to the sender, and only then is
        the original removed.
        """
        relay = RelayWithCore(self, retryBase=0.3)
        relay.server.rcptReplies = {BOB: (550, "5.1.1 no such user")}
        failing = FailingFsync(self, relay.spool.tmpDirectory)
        writer = relay.spool.newMessage(Envelope(sender=SENDER, recipients=[BOB]))
        writer.write(BODY)
        # The original itself must be committed without the fault.
        failing.active = False
        queueId = yield writer.commit()
        failing.active = True
        yield waitUntil(
            self,
            lambda: getattr(relay.entry(queueId), "owedNotices", None),
            what="the owed notice",
        )
        entry = relay.entry(queueId)
        self.assertEqual(entry.recipients, {BOB: FAILED})
        self.assertEqual(entry.owedNotices, [BOB])
        self.assertEqual(relay.spool.pending(), [queueId])
        self.assertTrue(failing.calls)
        # A second failed try keeps it too.
        tries = len(failing.calls)
        yield waitUntil(self, lambda: len(failing.calls) > tries, what="a second try")
        self.assertEqual(relay.spool.pending(), [queueId])
        failing.active = False
        relay.server.rcptReplies = {}
        yield waitUntil(self, lambda: relay.bounces(), what="the DSN relayed")
        yield waitUntil(self, lambda: not relay.spool.pending(), what="empty queue")
        [bounce] = relay.bounces()
        self.assertEqual(bounce.recipients, [SENDER])
        self.assertIn(b"Action: failed", bounce.data)
        self.assertIn(b"Status: 5.1.1", bounce.data)
        # The refused original went to the core once, at the first attempt.
        rcpts = [c for _, c in relay.server.commands if c.startswith(b"RCPT")]
        self.assertEqual(
            rcpts, [b"RCPT TO:<bob@example.org>", b"RCPT TO:<alice@example.com>"]
        )


class ReadOnlySpoolTests(unittest.TestCase):
    """
    The spool is remounted read-only under the running daemon.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_noDuplicateStorm(self):
        """
        Five messages wait in the queue (the core answers 421); the spool is
        remounted read-only; the core recovers.  Each message is delivered
        exactly once: the core's 250 is kept in memory when the spool
        cannot remove the message, which is held (never sent again by this
        process, even on a flush), logged at critical level, and /health
        answers 503 with the reason.
        """
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.greeting = (421, "4.3.2 Not now")
        corePort = core.start()
        self.addCleanup(core.stop)
        critical = []

        def observe(event):
            if event.get("event") == "unremovable":
                critical.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        spoolDirectory = mountTmpfs(self, "4m")
        metricsPort = freePort()
        msa = RunningMSA(
            self,
            spool={"directory": spoolDirectory},
            metrics={"listen": f"tcp:{metricsPort}:interface=127.0.0.1"},
            relay={
                "host": "127.0.0.1",
                "port": corePort,
                "tls": "starttls",
                "server_name": "localhost",
                "ca_file": core.caFile,
                "retry_base": 0.2,
                "retry_max": 0.5,
            },
        )
        runner = msa.service.getServiceNamed("relay")
        for _ in range(5):
            code, _ = yield threads.deferToThread(
                submit, port=msa.starttlsPort, context=msa.clientContext()
            )
            self.assertEqual(code, 250)
        queued = msa.service.getServiceNamed("relay").spool.pending()
        self.assertEqual(len(queued), 5)
        remount(spoolDirectory, "ro")
        self.addCleanup(remount, spoolDirectory, "rw")
        core.greeting = (220, "localhost ESMTP test core")
        yield waitUntil(
            self, lambda: len(runner.unremovable) == 5, what="five held messages"
        )
        self.assertEqual(sorted(runner.unremovable), queued)
        self.assertEqual(runner.control.flush(), [])
        # Several retry periods later: still one copy each.
        yield pause(1.5)
        self.assertEqual(len(core.messages), 5)
        self.assertEqual({m.data[-len(MESSAGE) :] for m in core.messages}, {MESSAGE})
        self.assertEqual(sorted(e["queueId"] for e in critical), queued)
        self.assertEqual({e["log_level"].name for e in critical}, {"critical"})
        self.assertEqual(msa.service.getServiceNamed("relay").spool.pending(), queued)

        def get():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/health"):
                    return 200, ""
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, body = yield threads.deferToThread(get)
        self.assertEqual(status, 503)
        self.assertIn("spool cannot be changed: 5 message(s)", body)
        self.assertIn("Read-only file system", body)


class ReadOnlyRestartTests(unittest.TestCase):
    """
    After a read-only spool episode, the daemon is restarted (issue 18,
    item 10).
    """

    timeout = 90

    def startMSA(self, spoolDirectory, state, corePort, caFile):
        return RunningMSA(
            self,
            spool={"directory": spoolDirectory},
            server={"state_dir": state} if state else None,
            relay={
                "host": "127.0.0.1",
                "port": corePort,
                "tls": "starttls",
                "server_name": "localhost",
                "ca_file": caFile,
                "retry_base": 0.2,
                "retry_max": 0.5,
            },
        )

    @defer.inlineCallbacks
    def test_deliveredStayDelivered(self):
        """
        Five messages wait (the core answers 421); the spool is remounted
        read-only; the core takes all five.  The daemon cannot remove them
        and records their outcome under its state directory: C{queue list}
        shows each recipient delivered and the entry held, with the
        reason, while the daemon runs and after it stopped.  The spool is
        writable again and the daemon restarted: it removes the five
        without sending any again: five deliveries for five
        acknowledgements, and nothing left in the spool or the ledger.
        """
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.greeting = (421, "4.3.2 Not now")
        corePort = core.start()
        self.addCleanup(core.stop)
        spoolDirectory = mountTmpfs(self, "4m")
        msa = self.startMSA(spoolDirectory, None, corePort, core.caFile)
        runner = msa.service.getServiceNamed("relay")
        for _ in range(5):
            code, _ = yield threads.deferToThread(
                submit, port=msa.starttlsPort, context=msa.clientContext()
            )
            self.assertEqual(code, 250)
        queued = runner.spool.pending()
        self.assertEqual(len(queued), 5)
        remount(spoolDirectory, "ro")
        self.addCleanup(remount, spoolDirectory, "rw")
        core.greeting = (220, "localhost ESMTP test core")
        ledger = os.path.join(msa.state, "unrecorded-outcomes")
        yield waitUntil(
            self, lambda: len(runner.unremovable) == 5, what="five held messages"
        )
        self.assertEqual(sorted(runner.unremovable), queued)
        self.assertEqual(len(core.messages), 5)

        def assertListedDelivered(out):
            rows = {
                line.split()[0]: line
                for line in out.splitlines()
                if line.split()[:1] and line.split()[0] in queued
            }
            self.assertEqual(sorted(rows), queued)
            for row in rows.values():
                self.assertIn("  belastingdienst@overheid.nl (delivered)  ", row)
                self.assertRegex(row, r"  held +yes +decided by the core, but the ")

        out, err, code = yield admin(msa, "queue", "list")
        self.assertEqual(code, 0, err)
        assertListedDelivered(out)
        self.assertEqual(len(os.listdir(ledger)), 5)
        yield msa.service.stopService()
        out, err, code = yield admin(msa, "queue", "list")
        self.assertEqual(code, 0, err)
        self.assertIn("the MSA is not running", err)
        assertListedDelivered(out)

        remount(spoolDirectory, "rw")
        again = self.startMSA(spoolDirectory, msa.state, corePort, core.caFile)
        spool = again.service.getServiceNamed("relay").spool
        yield waitUntil(self, lambda: not spool.pending(), what="the five removed")
        # Several retry periods later: still one copy each.
        yield pause(1.5)
        self.assertEqual(len(core.messages), 5)
        self.assertEqual(os.listdir(ledger), [])
        self.assertEqual(listing(os.path.join(spoolDirectory, "queue")), [])


class AuditFailureTests(unittest.TestCase):
    """
    The acceptance record cannot be appended after the spool's commit
    (issue 18, item 9 (d)).
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_removalDurableBefore451(self):
        """
        The audit log's file system is full (a real ENOSPC): the message
        had reached C{queue/}; the client gets 451 4.3.0 only after its
        queue file is removed from C{queue/} and the directory is fsynced, so
        that no crash can bring back (and deliver) a message answered 451.
        The fsyncs of C{queue/} are observed with what the directory held
        at each.
        """
        directory = mountTmpfs(self, "1m")
        msa = RunningMSA(self, audit={"path": os.path.join(directory, "a.jsonl")})
        queue = os.path.realpath(os.path.join(msa.state, "spool", "queue"))
        seen = []
        realFsync = os.fsync

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}") == queue:
                seen.append(listing(queue))
            return realFsync(fd)

        self.patch(os, "fsync", fsync)
        fillFileSystem(directory)
        code, text = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(
            (code, text), (451, b"4.3.0 Cannot queue the message, try again later")
        )
        [published, removed] = seen
        self.assertEqual(len(published), 1)
        self.assertNotIn(".", published[0])
        self.assertEqual(removed, [])
        self.assertEqual(listing(queue), [])
        self.assertEqual(msa.outboxFiles(), [])


class CoreMisbehaviourTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_hangsAfterFinalDot(self):
        """
        The core takes the data and never answers the final dot: the relay
        times out (data time-out, 2 s here), the message stays queued with
        a temporary error and is retried.  The core did keep the first copy,
        so the retry delivers it a second time: the one duplicate window
        SMTP leaves open (RFC 1047), which no client can close.  Nothing is
        lost and there is no third copy.
        """
        relay = RelayWithCore(self, retryBase=0.3)
        relay.server.hangOn = b"."
        queueId = yield relay.queue()
        yield waitUntil(
            self,
            lambda: relay.attempts(queueId) == 1,
            what="the timed-out attempt",
        )
        entry = relay.entry(queueId)
        self.assertEqual(entry.recipients, {BOB: PENDING})
        self.assertIn("timed out", entry.lastError)
        self.assertEqual(len(relay.server.messages), 1)
        relay.server.hangOn, relay.server.hung = None, False
        yield waitUntil(self, lambda: not relay.spool.pending(), what="the retry")
        self.assertEqual(
            [(m.sender, m.data) for m in relay.server.messages], [(SENDER, BODY)] * 2
        )
        self.assertEqual(relay.bounces(), [])

    @defer.inlineCallbacks
    def test_closesAfter250(self):
        """
        The core closes the connection right after its 250 to the data: the
        message counts as delivered and is removed, never sent again; the
        next message goes over a new connection.
        """
        relay = RelayWithCore(self)
        relay.server.closeAfterData = True
        queueId = yield relay.queue()
        yield waitUntil(self, lambda: not relay.spool.pending(), what="delivery")
        self.assertIsNone(relay.entry(queueId))
        self.assertEqual(relay.runner.control.flush(), [])
        yield relay.queue()
        yield waitUntil(self, lambda: not relay.spool.pending(), what="delivery")
        self.assertEqual(
            [(m.sender, m.data) for m in relay.server.messages], [(SENDER, BODY)] * 2
        )
        self.assertEqual(relay.server.connections, 2)


def tcpSocket(transport) -> socket.socket:
    """
    The socket under C{transport}, through a TLS wrapper if any.
    """
    while not isinstance(getattr(transport, "socket", None), socket.socket):
        transport = transport.transport
    return transport.socket


class NoDelayTests(unittest.TestCase):
    """
    The relay's connections to the core have TCP_NODELAY set, read back
    from the real socket while connected to a real downstream.
    """

    timeout = 20

    @defer.inlineCallbacks
    def check(self, tlsMode):
        server = DownstreamServer(self.mktemp(), tlsMode=tlsMode)
        port = server.start()
        self.addCleanup(server.stop)
        downstream = SMTPDownstream(
            "127.0.0.1",
            port,
            tlsMode=tlsMode,
            contextFactory=clientContextFactory("localhost", caFile=server.caFile),
            idleTimeout=30,
        )
        self.addCleanup(downstream.close)
        spool = Spool(self.mktemp())
        writer = spool.newMessage(Envelope(sender=SENDER, recipients=[BOB]))
        writer.write(BODY)
        queueId = yield writer.commit()
        with spool.openMessage(queueId) as f:
            result = yield downstream.deliver(spool.load(queueId), f)
        self.assertEqual(result.reply[:3], "250")
        # The connection is kept for the next message: still open.
        [conn] = downstream._pool.parked
        sock = tcpSocket(conn.proto.transport)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    def test_starttls(self):
        return self.check("starttls")

    def test_implicitTLS(self):
        return self.check("implicit")
