# -*- test-case-name: tests.test_integrity -*-
"""
Integrity at hand-off (L{msa.queue.integrity}): the SHA-256 of the bytes
acknowledged with the 250 is recorded with the message in the spool
commit, and the relay (to a real core MTA), the outbox and the delivery
status notifications check it before they hand anything over.  One byte
changed in a queued message: the relay hashes the bytes once, as it sends
them, the core never gets the final dot (so nothing), and the message is
held (across restarts, SIGKILL included) with its reason in C{queue list},
and a critical line is logged.  C{queue verify}
through the real admin command.  A spool written by the previous version
(tests/fixtures/spool-v1) is read and relayed byte for byte.
"""

import hashlib
import io
import os
import shutil
import sys

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.trial import unittest

from msa.audit import chainFiles, verifyFiles
from msa.envelope import Envelope
from msa.queue import integrity, queuefile
from msa.queue.spool import DELIVERED, PENDING, Spool
from msa.relay import protocol
from msa.relay.client import SMTPDownstream
from msa.tls import clientContextFactory
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, AiosmtpdCore, RunningMSA, freePort, runProgram
from tests.test_audit import auditPath, records
from tests.test_crash import Core, MSAProcess
from tests.test_e2e import RECIPIENT, SENDER, splitReceived, submit
from tests.waiting import waitUntil

ADMIN = os.path.join(os.path.dirname(sys.executable), "digipoort-msa-admin")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "spool-v1", "queue")
DIGEST = hashlib.sha256(MESSAGE).hexdigest()


def tamper(path: str, fromEnd: int = 5) -> bytes:
    """
    Flip one bit of one byte of the file at C{path}, C{fromEnd} bytes
    before its end (in the message body), in place, as a bad disk would.

    @return: the file's new bytes.
    """
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[-fromEnd] ^= 0x01
        f.seek(0)
        f.write(data)
    return bytes(data)


class LogRecorder:
    """
    The log events of the running MSA, observed in this process.
    """

    def __init__(self, testCase: unittest.TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


@defer.inlineCallbacks
def relayedFromOldSpool(testCase: unittest.TestCase, fixture: str, count: int):
    """
    Start the daemon, relaying to a real core, on a copy of the spool queue
    C{fixture} written by an earlier version, and wait for C{count}
    messages at the core.

    @return: a L{Deferred} firing with the spool directory and the messages
        by their recipients (C{(sender, recipients, data, ...)}).
    """
    directory = os.path.abspath(testCase.mktemp())
    shutil.copytree(fixture, os.path.join(directory, "queue"))
    os.chmod(directory, 0o700)
    core = AiosmtpdCore(testCase)
    RunningMSA(testCase, relay=core.relayConfig(), spool={"directory": directory})
    messages = yield core.waitForMessages(count)
    return directory, {tuple(m[1]): m for m in messages}


def submitTo(msa: RunningMSA, message: bytes = MESSAGE, recipients=(RECIPIENT,)):
    """
    Submit over STARTTLS with smtplib (in a thread).

    @return: a L{Deferred} of the queue id of the 250.
    """
    d = threads.deferToThread(
        submit,
        port=msa.starttlsPort,
        context=msa.clientContext(),
        message=message,
        recipients=recipients,
    )

    def queued(reply):
        code, text = reply
        assert code == 250, reply
        return text.split()[-1].decode()

    return d.addCallback(queued)


def admin(msa: RunningMSA, *args: str):
    """
    The real C{digipoort-msa-admin} on C{msa}'s configuration.

    @return: a L{Deferred} of (stdout, stderr, exit code), as text.
    """
    d = runProgram(ADMIN, ["--config", msa.configFile, *args])
    return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))


def spoolOf(msa: RunningMSA) -> Spool:
    return Spool(os.path.join(msa.state, "spool"), reactor=object())


def unreachable(caFile: str, port: int | None = None) -> dict:
    """
    A relay section for a core MTA that is not listening (yet): the first
    attempt fails and the next one is an hour away, so the message stays
    queued until the test flushes it.
    """
    return {
        "host": "127.0.0.1",
        "port": port or freePort(),
        "tls": "starttls",
        "server_name": "localhost",
        "ca_file": caFile,
        "retry_base": 3600,
        "retry_max": 3600,
        # A test reusing the connection may take longer than the default
        # 5 s under load (admin commands in between).
        "idle_timeout": 120,
    }


def attempted(spool: Spool, queueId: str):
    """
    Wait until the first (failed) attempt of C{queueId} is recorded.
    """
    return waitUntil(
        lambda: spool.load(queueId).attempts >= 1,
        10,
        f"the first attempt of {queueId}",
    )


@defer.inlineCallbacks
def queuedAndTampered(msa: RunningMSA, spool: Spool):
    """
    Submit L{MESSAGE} to C{msa} (whose core is unreachable), wait for the
    first failed attempt, and flip a bit of the queued message.

    @return: a L{Deferred} of the queue id and the SHA-256 of the changed
        message (after the trace header).
    """
    queueId = yield submitTo(msa)
    yield attempted(spool, queueId)
    tampered = tamper(spool.load(queueId).messagePath)
    return queueId, hashlib.sha256(splitReceived(tampered)[1]).hexdigest()


def held(spool: Spool, queueId: str):
    return waitUntil(lambda: spool.load(queueId).held, 10, f"{queueId} to be held")


class CountingForwarder(portforward.ProxyFactory):
    """
    A TCP forwarder to the core, started when the test wants the core
    reachable; counts the connections through it.
    """

    connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


@defer.inlineCallbacks
def flushedToCore(testCase, msa: RunningMSA, corePort: int, port: int):
    """
    Make the core at C{corePort} reachable on C{port} (where C{msa}'s
    relay looks for it) and flush the queue with the admin command.

    @return: a L{Deferred} of the L{CountingForwarder}.
    """
    forwarder = CountingForwarder("127.0.0.1", corePort)
    listening = reactor.listenTCP(port, forwarder, interface="127.0.0.1")
    testCase.addCleanup(listening.stopListening)
    yield admin(msa, "queue", "flush")
    return forwarder


class IntegrityAssertions:
    """
    Shared checks of a message held because of a mismatch.
    """

    def assertHeldForMismatch(
        self, spool: Spool, logs: LogRecorder, queueId: str, actual: str
    ):
        entry = spool.load(queueId)
        self.assertTrue(entry.held)
        self.assertEqual(entry.sha256, DIGEST)
        self.assertEqual(
            entry.heldReason,
            f"integrity mismatch: sha256 of the queued message is {actual}, "
            f"acknowledged {DIGEST}",
        )
        [critical] = logs.named("integrity")
        self.assertEqual(critical["log_level"].name, "critical")
        self.assertEqual(
            (critical["queueId"], critical["expected"], critical["actual"]),
            (queueId, DIGEST, actual),
        )
        self.assertIn(f"INTEGRITY MISMATCH: {queueId}", formatEvent(critical))

    @defer.inlineCallbacks
    def assertListed(self, msa: RunningMSA, queueId: str):
        out, err, code = yield admin(msa, "queue", "list")
        self.assertEqual(code, 0, err)
        [row] = [line for line in out.splitlines() if line.startswith(queueId)]
        self.assertRegex(
            row, r"  held +yes +integrity mismatch: sha256 of the queued message is "
        )


class RelayIntegrityTests(IntegrityAssertions, unittest.TestCase):
    """
    The relay to a real core (aiosmtpd over STARTTLS).
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_unchangedDeliveredWithDigest(self):
        """
        An unchanged message is delivered byte for byte, and the relay's
        log line carries the digest of the acceptance line, which is the
        SHA-256 of the bytes the client sent and the spool recorded.
        """
        logs = LogRecorder(self)
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        queueId = yield submitTo(msa)
        [(_, _, data, _)] = yield core.waitForMessages(1)
        self.assertEqual(splitReceived(data)[1], MESSAGE)
        yield waitUntil(lambda: logs.named("relay"), 10, "the relay line")
        [accepted] = logs.named("accepted")
        [relayed] = logs.named("relay")
        self.assertEqual(accepted["queueId"], queueId)
        self.assertEqual(relayed["queueId"], queueId)
        self.assertEqual(accepted["sha256"], DIGEST)
        self.assertEqual(relayed["sha256"], DIGEST)
        self.assertIn(f"sha256 {DIGEST}", formatEvent(accepted))
        self.assertTrue(formatEvent(relayed).endswith(f" sha256={DIGEST}"))
        self.assertEqual(core.resets, 0)
        self.assertEqual(logs.named("integrity"), [])

    @defer.inlineCallbacks
    def test_oneByteChangedHeld(self):
        """
        One byte of a queued message changed on disk while the core was
        unreachable; when the core is reachable and the queue is flushed
        (the real admin command), the relay hashes the bytes as it sends
        them and, before the final dot, drops the connection: the core gets
        no message; the message is held with the reason in C{queue list},
        logged at critical level, and C{queue verify} exits 1.  The next
        message goes over a new connection.
        """
        logs = LogRecorder(self)
        core = AiosmtpdCore(self)
        port = freePort()
        msa = RunningMSA(self, relay=unreachable(core.certFile, port))
        spool = spoolOf(msa)
        queueId, actual = yield queuedAndTampered(msa, spool)
        self.assertNotEqual(actual, DIGEST)

        forwarder = CountingForwarder("127.0.0.1", core.port)
        listening = reactor.listenTCP(port, forwarder, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        out, err, code = yield admin(msa, "queue", "flush")
        self.assertEqual((out.strip(), code), (f"flushed 1 message(s): {queueId}", 0))
        yield held(spool, queueId)
        self.assertEqual(core.messages, [])
        self.assertHeldForMismatch(spool, logs, queueId, actual)
        yield self.assertListed(msa, queueId)
        out, err, code = yield admin(msa, "queue", "verify")
        self.assertEqual(code, 1, out + err)
        self.assertIn(f"MISMATCH {queueId}: integrity mismatch", out)
        self.assertIn("1 message(s): 0 verified, 1 mismatch(es), 0 unverifiable", out)

        # The next message goes over a new connection.
        second = yield submitTo(msa)
        [(_, _, data, _)] = yield core.waitForMessages(1)
        self.assertEqual(splitReceived(data)[1], MESSAGE)
        self.assertIn(f"id {second} for".encode(), data)
        self.assertEqual(forwarder.connections, 2)
        self.assertEqual(core.resets, 0)
        # Still held; flushing does not touch it.
        yield admin(msa, "queue", "flush")
        self.assertTrue(spool.load(queueId).held)
        self.assertEqual(len(core.messages), 1)

    @defer.inlineCallbacks
    def test_holdAudited(self):
        """
        The hold the MSA puts on a tampered message is in the audit log: a
        C{held} record with the queue id, C{by} C{integrity} and the
        reason, after the acceptance record; and the chain verifies.
        """
        core = AiosmtpdCore(self)
        port = freePort()
        msa = RunningMSA(self, relay=unreachable(core.certFile, port))
        spool = spoolOf(msa)
        queueId, actual = yield queuedAndTampered(msa, spool)
        yield flushedToCore(self, msa, core.port, port)
        yield held(spool, queueId)
        path = auditPath(msa)
        yield waitUntil(
            lambda: [r for r in records(path) if r["event"] == "held"],
            10,
            "the held record",
        )
        [accepted, record] = [r for r in records(path) if r["queueId"] == queueId]
        self.assertEqual(accepted["event"], "accepted")
        self.assertEqual(
            (record["event"], record["queueId"], record["by"], record["reason"]),
            (
                "held",
                queueId,
                "integrity",
                f"integrity mismatch: sha256 of the queued message is {actual}, "
                f"acknowledged {DIGEST}",
            ),
        )
        self.assertIsNone(verifyFiles(chainFiles(path)).error)
        self.assertEqual(core.messages, [])

    @defer.inlineCallbacks
    def test_heldAcrossRestart(self):
        """
        A message held for a mismatch stays held when the MSA is stopped
        and started again on the same spool: not attempted, still listed
        with its reason.
        """
        logs = LogRecorder(self)
        core = AiosmtpdCore(self)
        port = freePort()
        directory = os.path.abspath(self.mktemp())
        relay = unreachable(core.certFile, port)
        msa = RunningMSA(self, relay=relay, spool={"directory": directory})
        spool = Spool(directory, reactor=object())
        queueId, actual = yield queuedAndTampered(msa, spool)
        forwarder = yield flushedToCore(self, msa, core.port, port)
        yield held(spool, queueId)
        yield msa.service.stopService()

        again = RunningMSA(self, relay=relay, spool={"directory": directory})
        out, err, code = yield admin(again, "queue", "flush")
        self.assertEqual((out.strip(), code), ("flushed 0 message(s)", 0))
        out, err, code = yield admin(again, "queue", "show", queueId)
        self.assertIn("state: held", out)
        self.assertIn(
            f"held because: integrity mismatch: sha256 of the queued message is "
            f"{actual}, acknowledged {DIGEST}",
            out,
        )
        [started] = [t for t in logs.texts() if t.startswith("relay to")][-1:]
        self.assertTrue(started.endswith(" 0 message(s) queued, 1 held"), started)
        self.assertEqual(core.messages, [])
        self.assertEqual(forwarder.connections, 1)
        # Released by the operator, the check runs again: held again.
        out, err, code = yield admin(again, "queue", "release", queueId)
        self.assertEqual(code, 0, err)
        yield waitUntil(lambda: len(logs.named("integrity")) == 2, 10, "a new check")
        yield held(spool, queueId)
        self.assertEqual(core.messages, [])


class CrashTests(unittest.TestCase):
    """
    The real server process (C{twistd -n digipoort-msa}) killed with SIGKILL
    after it held a message: the hold is in the spool, so the message is
    still held after the restart and never reaches the core.
    """

    timeout = 90

    @defer.inlineCallbacks
    def test_heldAfterSigkill(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        core = Core(os.path.join(directory, "core"), freePort())
        self.addCleanup(core.stop)
        msa = MSAProcess(self, directory, core.portNumber, core.caFile)
        yield defer.ensureDeferred(msa.start())
        code, text = yield msa.submit()
        self.assertEqual(code, 250)
        queueId = text.split()[-1].decode()
        spool = Spool(msa.spool, reactor=object())
        tamper(spool.load(queueId).messagePath)
        core.start()
        yield held(spool, queueId)
        lines = [line for _, line in core.commands]
        self.assertEqual(lines.count(b"DATA"), 1)
        self.assertEqual(core.messages, [])
        self.assertIn("INTEGRITY MISMATCH: " + queueId, msa.log())
        msa.kill()

        yield defer.ensureDeferred(msa.start())
        yield waitUntil(
            lambda: "0 message(s) queued, 1 held" in msa.log(), 20, "the restart"
        )
        out, err, code = yield runProgram(
            ADMIN, ["--config", msa.configFile, "queue", "flush"]
        )
        self.assertEqual((out, code), (b"flushed 0 message(s)\n", 0))
        out, err, code = yield runProgram(
            ADMIN, ["--config", msa.configFile, "queue", "list"]
        )
        self.assertIn(b"integrity mismatch: sha256 of the queued message", out)
        self.assertTrue(spool.load(queueId).held)
        self.assertEqual(core.messages, [])
        self.assertEqual([line for _, line in core.commands].count(b"DATA"), 1)


class StreamCheckTests(unittest.TestCase):
    """
    The check, over the bytes as they are sent (the one pass over them):
    when they are not the acknowledged ones, the final dot is never sent.
    """

    def test_changedDuringSend(self):
        """
        A small message, sent in one write: the write does not happen.
        """
        return self.changedDuringSend()

    def test_changedDuringStreamedSend(self):
        """
        A message streamed through the producer (larger than
        L{protocol.WHOLE_AT_ONCE}): the final dot is not sent.
        """
        self.patch(protocol, "WHOLE_AT_ONCE", 16)
        return self.changedDuringSend()

    @defer.inlineCallbacks
    def changedDuringSend(self):
        server = DownstreamServer(os.path.abspath(self.mktemp()))
        port = server.start()
        self.addCleanup(server.stop)
        spool = Spool(os.path.abspath(self.mktemp()))
        writer = spool.newMessage(Envelope(SENDER, [RECIPIENT]))
        writer.write(MESSAGE)
        queueId = yield writer.commit()
        entry = spool.load(queueId)
        tamper(entry.messagePath)
        downstream = SMTPDownstream(
            "127.0.0.1",
            port,
            contextFactory=clientContextFactory("localhost", caFile=server.caFile),
        )
        self.addCleanup(downstream.close)
        with spool.openMessage(queueId) as f:
            result = yield downstream.deliver(entry, f)
        self.assertIsNotNone(result.mismatch)
        self.assertEqual(result.mismatch.expected, DIGEST)
        yield waitUntil(lambda: not any(p.connected for p in server._protocols), 10)
        self.assertEqual(server.messages, [])
        self.assertIn((True, b"DATA"), server.commands)
        self.assertEqual(downstream.idleConnections, 0)


class OutboxIntegrityTests(IntegrityAssertions, unittest.TestCase):
    """
    Outbox mode (no core MTA): the same check before the hard link or copy.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_oneByteChangedHeld(self):
        """
        Two messages queued while the relay was unreachable; the MSA comes
        back in outbox mode with one of them changed on disk: after a flush
        the unchanged one is in the outbox byte for byte, the changed one is
        held and nothing of it is in the outbox.
        """
        logs = LogRecorder(self)
        directory = os.path.abspath(self.mktemp())
        ca = DownstreamServer(os.path.abspath(self.mktemp())).caFile
        first = RunningMSA(self, relay=unreachable(ca), spool={"directory": directory})
        spool = Spool(directory, reactor=object())
        clean = yield submitTo(first)
        bad = yield submitTo(first)
        yield attempted(spool, clean)
        yield attempted(spool, bad)
        yield first.service.stopService()
        tampered = tamper(spool.load(bad).messagePath)
        actual = hashlib.sha256(splitReceived(tampered)[1]).hexdigest()

        msa = RunningMSA(self, spool={"directory": directory})
        out, err, code = yield admin(msa, "queue", "flush")
        self.assertEqual(code, 0, err)
        [name] = yield msa.waitForOutbox(1)
        self.assertEqual(name, clean + ".eml")
        self.assertEqual(splitReceived(msa.readOutbox(name))[1], MESSAGE)
        yield held(spool, bad)
        self.assertEqual(os.listdir(msa.outbox), [clean + ".eml"])
        self.assertHeldForMismatch(spool, logs, bad, actual)
        yield self.assertListed(msa, bad)


class DSNIntegrityTests(IntegrityAssertions, unittest.TestCase):
    """
    A delivery status notification quotes the original's header: it is
    not queued when the original's bytes are not the acknowledged ones.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_bounceOfChangedMessageHeld(self):
        """
        The core refuses the only recipient for good (550): a bounce is due,
        but the original was changed on disk: no bounce is queued, the
        original is held, and the core never got a line of its data.
        """
        logs = LogRecorder(self)
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.rcptReplies[RECIPIENT] = (550, "5.1.1 no such user")
        port = freePort()
        msa = RunningMSA(self, relay=unreachable(core.caFile, port))
        spool = spoolOf(msa)
        queueId, actual = yield queuedAndTampered(msa, spool)
        core.start(port)
        self.addCleanup(core.stop)
        yield admin(msa, "queue", "flush")
        yield held(spool, queueId)
        self.assertEqual(spool.pending(), [queueId])
        entry = spool.load(queueId)
        self.assertEqual(entry.owedNotices, [RECIPIENT])
        self.assertEqual(core.messages, [])
        verbs = {line.split(b" ")[0] for _, line in core.commands}
        self.assertLessEqual(verbs, {b"EHLO", b"STARTTLS", b"MAIL", b"RCPT", b"DATA"})
        self.assertHeldForMismatch(spool, logs, queueId, actual)
        yield self.assertListed(msa, queueId)

    @defer.inlineCallbacks
    def test_bounceOfUnchangedMessage(self):
        """
        The same with the original unchanged: the bounce is queued and
        relayed (its own digest checked like any message's).
        """
        logs = LogRecorder(self)
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.rcptReplies[RECIPIENT] = (550, "5.1.1 no such user")
        port = core.start()
        self.addCleanup(core.stop)
        relay = unreachable(core.caFile, port)
        msa = RunningMSA(self, relay=relay)
        queueId = yield submitTo(msa)
        [bounce] = yield core.waitForMessages(1)
        self.assertEqual((bounce.sender, bounce.recipients), ("", [SENDER]))
        self.assertIn(f"with queue id {queueId}.".encode(), bounce.data)
        yield waitUntil(lambda: len(logs.named("relay")) == 2, 10, "two relay lines")
        bounceLine = logs.named("relay")[1]
        self.assertEqual(bounceLine["sha256"], hashlib.sha256(bounce.data).hexdigest())
        self.assertEqual(logs.named("integrity"), [])


class VerifyCommandTests(unittest.TestCase):
    """
    C{digipoort-msa-admin queue verify}, the real program.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_cleanTamperedAndUnverifiable(self):
        ca = DownstreamServer(os.path.abspath(self.mktemp())).caFile
        msa = RunningMSA(self, relay=unreachable(ca))
        spool = spoolOf(msa)
        out, err, code = yield admin(msa, "queue", "verify")
        self.assertEqual(
            (out, code),
            ("0 message(s): 0 verified, 0 mismatch(es), 0 unverifiable\n", 0),
        )
        first = yield submitTo(msa)
        second = yield submitTo(msa, recipients=(RECIPIENT, "douane@overheid.nl"))
        yield attempted(spool, second)
        out, err, code = yield admin(msa, "queue", "verify")
        self.assertEqual(
            (out, code),
            ("2 message(s): 2 verified, 0 mismatch(es), 0 unverifiable\n", 0),
        )
        # Messages of the previous version: listed, not a failure.
        for name in os.listdir(FIXTURE):
            shutil.copy(os.path.join(FIXTURE, name), spool.queueDirectory)
        old = sorted(n[:-5] for n in os.listdir(FIXTURE) if n.endswith(".json"))
        out, err, code = yield admin(msa, "queue", "verify")
        self.assertEqual(code, 0, out)
        self.assertEqual(
            out.splitlines(),
            [f"UNVERIFIABLE {i}: {integrity.NO_DIGEST}" for i in old]
            + ["4 message(s): 2 verified, 0 mismatch(es), 2 unverifiable"],
        )
        # One bit flipped in the trace header of one, in the body of another.
        entry = spool.load(first)
        with open(entry.messagePath, "r+b") as f:
            f.seek(entry.contentOffset)
            f.write(b"r")
        tampered = tamper(spool.load(second).messagePath)
        out, err, code = yield admin(msa, "queue", "verify")
        self.assertEqual(code, 1, out)
        lines = out.splitlines()
        self.assertIn(
            f"MISMATCH {second}: integrity mismatch: sha256 of the queued message "
            f"is {hashlib.sha256(splitReceived(tampered)[1]).hexdigest()}, "
            f"acknowledged {DIGEST}",
            lines,
        )
        [trace] = [line for line in lines if line.startswith(f"MISMATCH {first}")]
        self.assertIn("sha256 of the queued trace header is", trace)
        self.assertEqual(
            lines[-1], "4 message(s): 0 verified, 2 mismatch(es), 2 unverifiable"
        )


class UpgradeTests(unittest.TestCase):
    """
    A spool written by the version before the integrity check
    (tests/fixtures/spool-v1, see its README) is read after the upgrade and
    relayed to a real core byte for byte, with a warning per message.
    """

    timeout = 60

    def test_loads(self):
        spool = Spool(os.path.abspath(self.mktemp()), reactor=object())
        for name in os.listdir(FIXTURE):
            shutil.copy(os.path.join(FIXTURE, name), spool.queueDirectory)
        ids = spool.pending()
        self.assertEqual(len(ids), 2)
        first, second = (spool.load(i) for i in ids)
        self.assertEqual(
            (first.sha256, first.traceLength, first.traceSha256), ("", 0, "")
        )
        self.assertEqual(first.recipients, {"belastingdienst@overheid.nl": PENDING})
        self.assertEqual(
            second.recipients,
            {"al-bezorgd@overheid.nl": DELIVERED, "nog-niet@overheid.nl": PENDING},
        )
        self.assertIsNone(integrity.verifyPath(first))

    @defer.inlineCallbacks
    def test_relayedAfterUpgrade(self):
        logs = LogRecorder(self)
        files = {}
        for name in os.listdir(FIXTURE):
            if name.endswith(".msg"):
                with open(os.path.join(FIXTURE, name), "rb") as f:
                    files[name[:-4]] = f.read()
        first, second = sorted(files)
        directory, byRecipients = yield relayedFromOldSpool(self, FIXTURE, 2)
        self.assertEqual(
            byRecipients[("belastingdienst@overheid.nl",)][:3],
            ("ik@mijnbedrijf.nl", ["belastingdienst@overheid.nl"], files[first]),
        )
        self.assertEqual(
            byRecipients[("nog-niet@overheid.nl",)][:3],
            ("ik@mijnbedrijf.nl", ["nog-niet@overheid.nl"], files[second]),
        )
        queue = os.path.join(directory, "queue")
        yield waitUntil(lambda: not os.listdir(queue), 10, "an empty queue")
        texts = logs.texts()
        for queueId in (first, second):
            self.assertIn(
                f"{queueId}: no recorded digest (spooled by an earlier version); "
                "handed over unverified",
                texts,
            )
        self.assertEqual(
            sorted(e["sha256"] for e in logs.named("relay")), ["unrecorded"] * 2
        )
        self.assertEqual(logs.named("integrity"), [])


class UnitTests(unittest.TestCase):
    """
    The digest recorded at commit, and the L{integrity.Digester}.
    """

    def test_recordedAtCommit(self):
        spool = Spool(os.path.abspath(self.mktemp()), reactor=Clock())
        writer = spool.newMessage(Envelope(SENDER, [RECIPIENT]))
        writer.writeTrace(b"Received: x\r\n")
        writer.write(MESSAGE[:10])
        writer.write(MESSAGE[10:])
        queueId = writer.commit().result
        state = queuefile.loadEntry(spool.queuePath(queueId))[0].toJSON()
        self.assertEqual(
            (state["sha256"], state["traceLength"], state["traceSha256"]),
            (DIGEST, 13, hashlib.sha256(b"Received: x\r\n").hexdigest()),
        )
        self.assertIsNone(integrity.verifyPath(spool.load(queueId)))

    def test_traceAfterMessage(self):
        spool = Spool(os.path.abspath(self.mktemp()), reactor=Clock())
        writer = spool.newMessage(Envelope(SENDER, [RECIPIENT]))
        writer.write(b"x")
        self.assertRaises(RuntimeError, writer.writeTrace, b"Received: x\r\n")
        writer.abort()

    def test_chunksAcrossTheTrace(self):
        """
        However the bytes are cut, the trace header and the message are
        hashed apart.
        """
        data = b"Received: x\r\n" + MESSAGE
        for size in (1, 2, 7, 13, 14, 64, len(data)):
            digester = integrity.Digester(13)
            for i in range(0, len(data), size):
                digester.update(data[i : i + size])
            self.assertEqual(digester.sha256(), DIGEST, size)
            self.assertEqual(
                digester.traceSha256(), hashlib.sha256(data[:13]).hexdigest(), size
            )

    def test_verifyFileRewinds(self):
        spool = Spool(os.path.abspath(self.mktemp()), reactor=Clock())
        writer = spool.newMessage(Envelope(SENDER, [RECIPIENT]))
        writer.write(MESSAGE)
        entry = spool.load(writer.commit().result)
        f = io.BytesIO(MESSAGE)
        f.read(5)
        self.assertIsNone(integrity.verifyFile(entry, f))
        self.assertEqual(f.tell(), 0)
        mismatch = integrity.verifyFile(entry, io.BytesIO(MESSAGE + b"x"))
        self.assertEqual(mismatch.expected, DIGEST)
        self.assertEqual(mismatch.actual, hashlib.sha256(MESSAGE + b"x").hexdigest())
