"""
C{[server] workers} (L{msa.service.workers}): the real C{twistd -n
digipoort-msa} from a TOML file with two workers, their limits in a
throwaway Redis, relaying over STARTTLS (the core's certificate verified)
to the test core; submissions over STARTTLS and AUTH with smtplib.

Which worker takes a connection is the kernel's choice; the tests make it
theirs by stopping the other worker (SIGSTOP) while they connect: a
stopped process accepts nothing, and its peer must.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import smtplib
import subprocess
import time

import attrs
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.error import ProcessTerminated
from twisted.logger import (
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial import unittest

from msa.queue.commits import COMMIT_DELAY
from msa.queue.entry import DELIVERED, PENDING, encodeState
from msa.queue.outcomes import OutcomeLedger, outcomesDirectoryIn
from msa.queue.spool import Spool
from msa.service.config import loadConfig
from msa.service.logs import FlatJSONObserver
from msa.service.supervisor import (
    RESTART_DELAY,
    RESTART_DELAY_MAX,
    SIGNAL_SKEW,
    STEADY,
    STOP_MARGIN,
    WorkerFailure,
    Workers,
    _Worker,
)
from msa.service.worker import toWorkerZero
from msa.service.workers import (
    leftoverSpools,
    relayLeftovers,
    workerConfig,
    workerDirectory,
    workerEndpoint,
)
from tests.e2e import MESSAGE, auditLockFree, freePort, httpGet, writeConfig
from tests.redisserver import RedisServer
from tests.test_crash import (
    LONG_BODY,
    PASSWORD,
    ROOT,
    TWISTD,
    USER,
    Core,
    MSAProcess,
    endAfterKill,
    sleep,
    waitFor,
)
from tests.test_e2e import SENDER
from tests.test_integrity import admin
from tests.test_spool import MESSAGE as SPOOLED
from tests.test_spool import makeEnvelope

WORKERS = 2


def children(pid: int) -> list[int]:
    """
    The worker processes C{pid} started: forked (named C{msa-worker-N}) or
    a new process (C{python -m msa.service.worker}).
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read()
            with open(f"/proc/{name}/comm", "rb") as f:
                command += b" " + f.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and (
            b"msa.service.worker" in command or b"msa-worker-" in command
        ):
            found.append(int(name))
    return found


def directoryAndCore(testCase: unittest.TestCase) -> tuple[str, Core]:
    """
    A test's directory and its core (not started), stopped at its end.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    core = Core(os.path.join(directory, "core"), freePort())
    testCase.addCleanup(core.stop)
    return directory, core


def processesOf(configFile: str) -> list[int]:
    """
    The processes whose command line names C{configFile} (twistd, and the
    workers forked from it, which keep its command line).
    """
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    command = f.read()
            except OSError:
                continue
            if configFile.encode() in command and alive(int(name)):
                found.append(int(name))
    return found


def sharedDirty(pid: int) -> int:
    """
    The bytes of C{pid}'s written pages that it shares with another process
    (C{Shared_Dirty}).
    """
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Shared_Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no Shared_Dirty for {pid}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class EndpointTests(unittest.TestCase):
    """
    A worker's metrics endpoint (L{workerEndpoint}).
    """

    def test_tcpPortMovesUp(self):
        self.assertEqual(
            workerEndpoint("tcp:9100:interface=127.0.0.1", 3),
            "tcp:9103:interface=127.0.0.1",
        )
        self.assertEqual(workerEndpoint("tcp6:port=9100", 1), "tcp6:port=9101")

    def test_anyPortStaysAny(self):
        self.assertEqual(workerEndpoint("tcp:0", 2), "tcp:0")

    def test_unixPathSuffixed(self):
        self.assertEqual(
            workerEndpoint("unix:/run/msa/metrics.sock:mode=600", 2),
            "unix:/run/msa/metrics.sock.2:mode=600",
        )

    def test_otherKindNone(self):
        self.assertIsNone(workerEndpoint("systemd:domain=INET:index=2", 1))


class ConfigTests(unittest.TestCase):
    """
    What a worker is given (L{workerConfig}), and what more than one
    worker needs.
    """

    def write(self, **sections) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "msa.toml")
        writeConfig(path, {"server": {"state_dir": directory}, **sections})
        return path

    def test_memoryLimitsKeptByWorkerZero(self):
        """
        More than one worker with the memory backend starts: worker 0 keeps
        the limits for all of them (L{KeptLimitsTests}).
        """
        config = loadConfig(self.write(server={"workers": 2}))
        self.assertEqual(config["server"]["workers"], 2)
        self.assertEqual(config["limits"]["backend"], "memory")

    def test_oneWorkerAnyBackend(self):
        self.assertEqual(loadConfig(self.write())["server"]["workers"], 1)

    def test_workerHasItsOwn(self):
        """
        Worker 2's spool and state are its own, its metrics port is moved
        up by 2, it has no return channel listener and no log file of its
        own, starts no further worker, and keeps worker 0's certificate;
        the rest (the audit log, the accounts, the relay) is as given.
        """
        path = self.write(
            server={"workers": 3},
            limits={"backend": "redis"},
            metrics={"listen": "tcp:9100:interface=127.0.0.1"},
            lmtp={"listeners": ["unix:/tmp/lmtp.sock"]},
            pop3={"starttls_listeners": ["tcp:2110"]},
            logging={"json_file": "log.json"},
        )
        config = loadConfig(path)
        worker = workerConfig(config, 2, ("/c/cert.pem", "/c/key.pem"))
        state = config["server"]["state_dir"]
        self.assertEqual(worker["server"]["state_dir"], f"{state}/workers/2")
        self.assertEqual(worker["spool"]["directory"], f"{state}/spool/workers/2")
        self.assertEqual(worker["server"]["workers"], 1)
        self.assertEqual(worker["metrics"]["listen"], "tcp:9102:interface=127.0.0.1")
        self.assertEqual(worker["lmtp"]["listeners"], [])
        self.assertEqual(worker["pop3"]["starttls_listeners"], [])
        self.assertIsNone(worker["logging"]["json_file"])
        self.assertEqual(
            (worker["tls"]["certificate"], worker["tls"]["key"]),
            ("/c/cert.pem", "/c/key.pem"),
        )
        self.assertEqual(worker["audit"]["path"], config["audit"]["path"])
        self.assertEqual(worker.accountsFile, config.accountsFile)
        self.assertEqual(
            worker["server"]["starttls_listeners"],
            config["server"]["starttls_listeners"],
        )
        # worker 0's configuration is left as it was.
        self.assertEqual(config["server"]["workers"], 3)
        self.assertEqual(config["lmtp"]["listeners"], ["unix:/tmp/lmtp.sock"])

    def test_commitDelayPerWorker(self):
        """
        The commit delay's default is L{COMMIT_DELAY} per worker (each
        worker's commits wait for its own sessions' messages only), at most
        1 s; a delay given is kept.
        """
        redis = {"backend": "redis"}
        one = loadConfig(self.write())
        self.assertEqual(one["spool"]["commit_delay"], COMMIT_DELAY)
        two = loadConfig(self.write(server={"workers": 2}, limits=redis))
        self.assertEqual(two["spool"]["commit_delay"], 2 * COMMIT_DELAY)
        many = loadConfig(self.write(server={"workers": 64}, limits=redis))
        self.assertEqual(many["spool"]["commit_delay"], 1.0)
        given = self.write(
            server={"workers": 2}, limits=redis, spool={"commit_delay": 0.01}
        )
        self.assertEqual(loadConfig(given)["spool"]["commit_delay"], 0.01)

    def test_leftoverSpoolKeepsItsLedger(self):
        """
        A former worker's spool relayed by worker 0 reads that worker's
        ledger of outcomes it could not record (C{<state_dir>/workers/N}):
        a recipient the ledger says was delivered is not delivered again.
        """
        config = loadConfig(self.write())
        state, spool = config["server"]["state_dir"], config["spool"]["directory"]
        former = Spool(workerDirectory(spool, 1), reactor=task.Clock())
        writer = former.newMessage(makeEnvelope())
        writer.write(SPOOLED)
        queueId = self.successResultOf(writer.commit())
        entry = former.load(queueId)
        entry.recipients["bob@example.org"] = DELIVERED
        OutcomeLedger(outcomesDirectoryIn(workerDirectory(state, 1))).record(
            queueId, encodeState(entry)
        )
        [runner] = relayLeftovers(
            config, None, task.Clock(), lambda c, spool, r: RelayedFrom(spool)
        )
        relayed = runner.spool.load(queueId)
        self.assertEqual(
            relayed.recipients,
            {"bob@example.org": DELIVERED, "carol@example.org": PENDING},
        )

    def test_leftoverSpools(self):
        """
        The spools of workers numbered C{workers} and up that hold a queue
        directory, in number order; nothing else there.
        """
        base = os.path.abspath(self.mktemp())
        for number in (1, 2, 10, 3):
            os.makedirs(os.path.join(workerDirectory(base, number), "queue"))
        os.makedirs(workerDirectory(base, 4))  # no queue: never used
        os.makedirs(os.path.join(base, "workers", "notes", "queue"))
        self.assertEqual(
            leftoverSpools(base, 2),
            [workerDirectory(base, n) for n in (2, 3, 10)],
        )
        self.assertEqual(leftoverSpools(base, 11), [])
        self.assertEqual(leftoverSpools(os.path.join(base, "none"), 1), [])


class LogForwardingTests(unittest.TestCase):
    """
    A worker's log event through its pipe to worker 0's log
    (L{msa.service.worker.toWorkerZero}, L{Workers.logFrom}).
    """

    def forwarded(self, event: dict) -> dict:
        out = io.StringIO()
        toWorkerZero(event, out)
        published: list[dict] = []
        globalLogPublisher.addObserver(published.append)
        self.addCleanup(globalLogPublisher.removeObserver, published.append)
        workers = Workers(2, None, [], reactor=None, grace=1)
        for line in out.getvalue().encode().splitlines():
            workers.logFrom(1, line)
        [event] = [e for e in published if e.get("worker") == 1]
        return event

    def test_failureKeepsItsText(self):
        """
        An error with a traceback keeps its exception's message and its
        traceback in worker 0's text log and JSON log lines.
        """
        try:
            raise ValueError("the disk said no")
        except ValueError:
            failure = Failure()
        event = self.forwarded(
            {
                "log_format": "cannot commit {queueId}",
                "log_level": LogLevel.error,
                "log_namespace": "msa.queue.spool",
                "log_failure": failure,
                "log_time": 1.0,
                "queueId": "ABC",
                "client": object(),
            }
        )
        self.assertEqual(len(self.flushLoggedErrors(WorkerFailure)), 1)
        text = formatEventAsClassicLogText(event)
        self.assertIn("[worker-1] cannot commit ABC", text)
        self.assertIn("ValueError: the disk said no", text)
        self.assertIn("test_failureKeepsItsText", text)
        line = FlatJSONObserver(io.StringIO()).flatten(event)
        assert line is not None
        self.assertIn("ValueError: the disk said no", line["traceback"])
        self.assertEqual(line["worker"], 1)
        self.assertEqual(line["queue_id"], "ABC")
        self.assertTrue(line["client"].startswith("<object object at "))

    def test_textAsInTheWorker(self):
        """
        An event's text reaches worker 0's text log and JSON log as the
        worker formatted it, braces in its values included, and its fields
        as the JSON log writes them.
        """
        thing = object()
        event = self.forwarded(
            {
                "log_format": "{a!r} and {thing} from {client}",
                "log_level": LogLevel.info,
                "log_namespace": "msa.submission.server",
                "log_time": 1.0,
                "a": "x",
                "thing": thing,
                "client": "{0} {client}",
            }
        )
        expected = f"'x' and {thing} from {{0}} {{client}}"
        text = formatEventAsClassicLogText(event)
        self.assertTrue(text.endswith(f"[worker-1] {expected}\n"), text)
        line = FlatJSONObserver(io.StringIO()).flatten(event)
        assert line is not None
        self.assertEqual(line["text"], expected)
        self.assertEqual(line["client"], "{0} {client}")
        self.assertEqual(line["thing"], repr(thing))
        self.assertEqual(line["level"], "info")


class EndedTests(unittest.TestCase):
    """
    How worker 0 reports a worker's end (L{Workers.ended}), on a fake
    clock: the process itself is not needed for this.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.workers = Workers(
            2, None, [], reactor=self.clock, grace=1, clock=self.clock.seconds
        )
        self.workers.running = True
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def end(self) -> None:
        worker = _Worker(self.workers, 1)
        self.workers.processes[1] = worker
        self.clock.advance(3)
        self.workers.ended(worker, Failure(ProcessTerminated(signal=9)))

    def said(self) -> list[tuple[str, str]]:
        return [
            (e["log_level"].name, formatEvent(e))
            for e in self.events
            if e.get("log_namespace") == "msa.service.supervisor"
        ]

    def test_unexpectedEndIsAnError(self):
        """
        A worker that ends while worker 0 runs: an error naming why and
        when it starts again, and a start L{RESTART_DELAY} later.
        """
        self.end()
        self.assertEqual(self.said(), [])
        self.clock.advance(SIGNAL_SKEW)
        [(level, text)] = self.said()
        self.assertEqual(level, "error")
        self.assertIn("worker 1 ended (", text)
        self.assertIn("after 3.0 s", text)
        self.assertIn(f"starting it again in {RESTART_DELAY} s", text)
        self.assertEqual(self.workers.missing(), [1])

    def test_endBeforeTheStopIsNoError(self):
        """
        A worker that ends a moment before worker 0's own stop (the same
        signal to the whole process group): said at info level, and not
        started again.
        """
        self.end()
        self.workers.stopService()
        self.clock.advance(SIGNAL_SKEW + RESTART_DELAY_MAX)
        self.assertEqual(self.said(), [("info", "worker 1 has stopped")])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StopTimingTests(unittest.TestCase):
    """
    When worker 0 kills a worker that does not end (L{Workers.stopService}),
    on a fake clock and a fake process transport.
    """

    def test_killedGracePlusMarginIntoTheStop(self):
        """
        SIGTERM at the stop; SIGKILL C{grace} + L{STOP_MARGIN} seconds
        after it, however long worker 0's own stop took before it asked
        L{Workers.whenGone}; C{whenGone} fires once the worker has ended.
        """
        clock = task.Clock()
        workers = Workers(2, None, [], reactor=clock, grace=3, clock=clock.seconds)
        workers.running = True
        worker = _Worker(workers, 1)
        sent: list[str] = []
        worker.transport = FakeProcess(sent)  # type: ignore[assignment]
        workers.processes[1] = worker
        workers.stopService()
        self.assertEqual(sent, ["TERM"])
        clock.advance(3)  # worker 0's own sessions took the whole grace
        gone = workers.whenGone()
        clock.advance(STOP_MARGIN - 0.1)
        self.assertEqual(sent, ["TERM"])
        clock.advance(0.1)
        self.assertEqual(sent, ["TERM", "KILL"])
        self.assertNoResult(gone)
        worker.processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(gone)
        self.assertEqual(self.flushLoggedErrors(), [])


@attrs.define
class FakeProcess:
    """
    A process transport that records the signals sent to it.
    """

    sent: list[str]
    pid: int = 12345

    def signalProcess(self, name: str) -> None:
        self.sent.append(name)


class RelayedFrom(service.Service):
    """
    A relay runner's stand-in for L{relayLeftovers}: the spool it was
    given.
    """

    def __init__(self, spool) -> None:
        self.spool = spool


class DaemonTests(unittest.TestCase):
    """
    The assembled daemon with two workers.
    """

    timeout = 90

    def setUp(self):
        self.directory, self.core = directoryAndCore(self)
        self.redis = RedisServer(self)
        self.jsonLog = os.path.join(self.directory, "log.jsonl")
        self.metricsPort = freePort()
        # Worker 1's metrics are on the next port: not the core's.
        while self.metricsPort + 1 == self.core.portNumber:
            self.metricsPort = freePort()
        self.msa = self.process(WORKERS)

    def process(self, workers: int, grace: float = 5) -> MSAProcess:
        return MSAProcess(
            self,
            self.directory,
            self.core.portNumber,
            self.core.caFile,
            grace=grace,
            sections={
                "server": {"workers": workers},
                "limits": {"backend": "redis", "url": self.redis.url},
                "metrics": {"listen": f"tcp:{self.metricsPort}:interface=127.0.0.1"},
                "logging": {"json_file": self.jsonLog},
            },
        )

    async def started(self) -> int:
        """
        Start it and wait for worker 1: its pid.
        """
        await self.msa.start()
        master = self.msa.process.pid
        await waitFor(lambda: len(children(master)) == 1, "worker 1", 20)
        await waitFor(
            lambda: os.path.exists(self.workerFile("control.sock", state=True)),
            "worker 1's control socket",
            20,
        )
        return children(master)[0]

    def workerFile(self, *names: str, state: bool = False) -> str:
        base = self.msa.state if state else self.msa.spool
        return os.path.join(workerDirectory(base, 1), *names)

    def stopped(self, pid: int):
        """
        SIGSTOP C{pid} until the test's end (or L{resume}), once no worker
        holds the shared audit log's lock: stopped with it, a worker would
        hold up the other's commits (the lock is taken only to append a
        record, so a short wait finds it free).
        """
        audit = os.path.join(self.msa.state, "audit", "audit.jsonl")
        deadline = time.monotonic() + 10
        while not auditLockFree(audit) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.resume, pid)

    def resume(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    async def killedAndStartedAgain(self, worker: int) -> None:
        """
        SIGKILL worker 1 (C{worker}) and wait until worker 0 has started
        another.
        """
        master = self.msa.process.pid
        os.kill(worker, signal.SIGKILL)
        await waitFor(
            lambda: (found := children(master)) and found != [worker],
            "worker 1 started again",
            15,
        )

    async def exitedCleanly(self, worker: int, timeout: float = 30) -> str:
        """
        Wait for worker 0's exit after a stop: its status a clean stop's,
        worker C{worker} gone too; worker 0's log.
        """
        status = await self.msa.waitForExit(timeout)
        self.assertIn(status, (0, -signal.SIGTERM), self.msa.log()[-3000:])
        self.assertFalse(alive(worker))
        return self.msa.log()

    async def submitWhileStopped(self, pid: int) -> str:
        """
        Submit a message while the worker C{pid} is stopped, so that the
        other takes it: its queue id (the 250 asserted).
        """
        self.stopped(pid)
        try:
            code, text = await self.msa.submit()
        finally:
            self.resume(pid)
        self.assertEqual(code, 250, text)
        return text.split()[-1].decode()

    def unknownUsersSalt(self) -> bytes:
        """
        Blocking: the salt of SCRAM-SHA-256's server-first message for a
        user that does not exist (the fake salt).
        """
        client = smtplib.SMTP("localhost", self.msa.port, timeout=10)
        try:
            client.ehlo("mijnbedrijf.nl")
            client.starttls(context=self.msa.clientContext())
            client.ehlo("mijnbedrijf.nl")
            first = base64.b64encode(b"n,,n=nobody-here,r=abcdefghijklmnop")
            code, text = client.docmd("AUTH", "SCRAM-SHA-256 " + first.decode())
            self.assertEqual(code, 334, text)
            fields = dict(
                f.split("=", 1) for f in base64.b64decode(text).decode().split(",")
            )
            return base64.b64decode(fields["s"])
        finally:
            client.close()

    async def saltWhileStopped(self, pid: int) -> bytes:
        """
        L{unknownUsersSalt} while the worker C{pid} is stopped (from the
        other).
        """
        self.stopped(pid)
        try:
            return await threads.deferToThread(self.unknownUsersSalt)
        finally:
            self.resume(pid)

    @defer.inlineCallbacks
    def test_sameFakeSaltInEveryWorker(self):
        """
        SCRAM's fake salt for an unknown user is the same whichever worker
        answers, also from a worker started again after its end (a new
        process, not forked): a salt that changed from one connection to
        the next would tell a client that the name is unknown (a real
        user's salt never changes).
        """
        worker = yield defer.ensureDeferred(self.started())
        master = self.msa.process.pid
        fromZero = yield defer.ensureDeferred(self.saltWhileStopped(worker))
        fromOne = yield defer.ensureDeferred(self.saltWhileStopped(master))
        self.assertEqual(fromOne, fromZero)
        yield defer.ensureDeferred(self.killedAndStartedAgain(worker))
        yield defer.ensureDeferred(
            waitFor(
                lambda: self.msa.log().count("[worker-1] queue control socket") == 2,
                "the new worker 1 serving",
                20,
            )
        )
        fromNew = yield defer.ensureDeferred(self.saltWhileStopped(master))
        self.assertEqual(fromNew, fromZero)

    @defer.inlineCallbacks
    def test_inTheBackground(self):
        """
        twistd without C{--nodaemon} forks itself after making the service,
        so the workers forked before are not its children: it starts them as
        new processes (and says so), they take submissions, the forked ones
        end unused, and a stop leaves no process of this configuration.
        """
        self.core.start()
        pidFile = os.path.join(self.directory, "twistd.pid")
        logFile = os.path.join(self.directory, "background.log")
        done = subprocess.run(
            [TWISTD, "--pidfile", pidFile, "--logfile", logFile, "digipoort-msa"]
            + ["--config", self.msa.configFile],
            cwd=self.directory,
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        yield defer.ensureDeferred(
            waitFor(lambda: os.path.exists(pidFile), "the pid file", 20)
        )
        with open(pidFile) as f:
            daemon = int(f.read())
        self.addCleanup(self.killQuietly, daemon)

        def log() -> str:
            with open(logFile, encoding="utf-8", errors="replace") as f:
                return f.read()

        yield defer.ensureDeferred(
            waitFor(
                lambda: "[worker-1] queue control socket" in log(),
                "worker 1 serving",
                30,
            )
        )
        self.assertIn("worker 1 starts as a new process: twistd has forked", log())
        [worker] = children(daemon)
        self.assertIn(f"worker 1 started (process {worker}, a new process)", log())
        yield defer.ensureDeferred(self.submitWhileStopped(daemon))
        yield self.core.waitForMessages(1, timeout=15)
        os.kill(daemon, signal.SIGTERM)
        yield defer.ensureDeferred(
            waitFor(lambda: not alive(daemon), "the daemon's exit", 30)
        )
        yield defer.ensureDeferred(
            waitFor(
                lambda: not processesOf(self.msa.configFile),
                "every process of this configuration gone",
                15,
            )
        )

    def killQuietly(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in processesOf(self.msa.configFile):
            self.killQuietly(pid)

    @defer.inlineCallbacks
    def test_eachWorkerTakesSubmissions(self):
        """
        With worker 0 stopped, worker 1 takes the submission (and the other
        way round): each relays what it took to the core, exactly, over
        TLS; worker 1's metrics are on the next port; worker 1's log
        lines are in worker 0's log, marked as its.
        """
        self.core.start()
        worker = yield defer.ensureDeferred(self.started())
        master = self.msa.process.pid
        queueId = yield defer.ensureDeferred(self.submitWhileStopped(master))
        yield defer.ensureDeferred(self.submitWhileStopped(worker))
        yield self.core.waitForMessages(2, timeout=15)
        yield defer.ensureDeferred(sleep(1))
        self.assertEqual(len(self.core.messages), 2)
        for message in self.core.messages:
            self.assertTrue(message.tls)
        status, body = yield deferHTTP(self.metricsPort + 1, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"# TYPE", body)
        log = self.msa.log()
        accepted = [line for line in log.splitlines() if queueId in line]
        self.assertTrue(accepted, log[-3000:])
        self.assertTrue(all("[worker-1]" in line for line in accepted), accepted)
        self.assertIn(f"worker 1 started (process {worker}, forked from worker 0)", log)
        with open(f"/proc/{worker}/comm") as f:
            self.assertEqual(f.read().strip(), "msa-worker-1")
        # Forked before the reactor was there: it shares the pages of worker
        # 0's modules (a new process would share none of its heap).
        self.assertGreater(sharedDirty(worker), 10 * 1024 * 1024)
        with open(self.jsonLog, encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
        [accepted] = [
            e
            for e in events
            if e["event"] == "accepted" and e.get("queue_id") == queueId
        ]
        self.assertEqual(accepted["worker"], 1)
        self.assertEqual(accepted["account"], USER)
        self.assertEqual(accepted["client"], "127.0.0.1")
        self.assertEqual(accepted["namespace"], "msa.submission.transaction")

    @defer.inlineCallbacks
    def test_killedWorkerStartedAgainNothingLost(self):
        """
        Worker 1 takes a message while the core is down (so it stays in
        worker 1's spool) and is killed (SIGKILL): worker 0 logs it and
        starts it again, and the new worker 1 relays the message once the
        core is back, exactly once.
        """
        worker = yield defer.ensureDeferred(self.started())
        master = self.msa.process.pid
        queueId = yield defer.ensureDeferred(self.submitWhileStopped(master))
        self.assertEqual(os.listdir(self.workerFile("queue")), [queueId])
        yield defer.ensureDeferred(self.killedAndStartedAgain(worker))
        self.assertIn("worker 1 ended", self.msa.log())
        # A forked worker is used once: the new worker 1 is a new process.
        [again] = children(master)
        self.assertIn(
            f"worker 1 started (process {again}, a new process)", self.msa.log()
        )
        self.core.start()
        yield self.core.waitForMessages(1, timeout=20)
        yield defer.ensureDeferred(
            waitFor(lambda: not os.listdir(self.workerFile("queue")), "empty", 10)
        )
        yield defer.ensureDeferred(sleep(1))
        self.assertEqual(len(self.core.messages), 1)

    @defer.inlineCallbacks
    def test_workerKilledMidData(self):
        """
        Worker 1 killed (SIGKILL) while its client is in DATA: the client
        sees the connection drop, never a 250; the partial file is removed
        when worker 0 starts worker 1 again, nothing is delivered; the
        client's retry is delivered once.
        """
        self.core.start()
        worker = yield defer.ensureDeferred(self.started())
        master = self.msa.process.pid
        self.stopped(master)
        try:
            client = yield threads.deferToThread(self.msa.openTransaction)
        finally:
            self.resume(master)
        yield threads.deferToThread(client.send, MESSAGE + LONG_BODY)

        def written():
            for name in os.listdir(self.workerFile("tmp")):
                if os.path.getsize(self.workerFile("tmp", name)) >= 64 * 1024:
                    return name
            return None

        name = yield defer.ensureDeferred(waitFor(written, "a partial message"))
        os.kill(worker, signal.SIGKILL)
        reply = yield threads.deferToThread(endAfterKill, client, b"\r\n.\r\n")
        self.assertIsInstance(reply, smtplib.SMTPServerDisconnected | OSError)
        # The recovery logs the file, then removes it: wait for both (the
        # log line can reach worker 0's log before the unlink is done).
        yield defer.ensureDeferred(
            waitFor(
                lambda: (
                    f"recover: removing unacknowledged {name}" in self.msa.log()
                    and not os.listdir(self.workerFile("tmp"))
                ),
                "worker 1's recovery",
                20,
            )
        )
        self.assertEqual(os.listdir(self.workerFile("tmp")), [])
        self.assertEqual(os.listdir(self.workerFile("queue")), [])
        yield defer.ensureDeferred(sleep(1))
        self.assertEqual(len(self.core.messages), 0)
        code, text = yield self.msa.submit()
        self.assertEqual(code, 250, text)
        yield self.core.waitForMessages(1, timeout=15)
        yield defer.ensureDeferred(sleep(1))
        self.assertEqual(len(self.core.messages), 1)

    @defer.inlineCallbacks
    def test_sigtermStopsEveryWorker(self):
        """
        SIGTERM to worker 0: every worker ends, and worker 0 exits cleanly
        after them.
        """
        worker = yield defer.ensureDeferred(self.started())
        self.msa.kill(signal.SIGTERM)
        log = yield defer.ensureDeferred(self.exitedCleanly(worker))
        self.assertIn("[worker-1] Main loop terminated.", log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("worker 1 ended", log)

    @defer.inlineCallbacks
    def test_hungWorkerKilledAtStop(self):
        """
        A worker that does not end on SIGTERM (stopped) is killed
        C{shutdown_grace} + L{STOP_MARGIN} seconds into the stop, and worker
        0 then exits; the log says so.
        """
        self.msa = self.process(WORKERS, grace=0.5)
        worker = yield defer.ensureDeferred(self.started())
        self.stopped(worker)
        self.msa.kill(signal.SIGTERM)
        log = yield defer.ensureDeferred(
            self.exitedCleanly(worker, timeout=STOP_MARGIN + 15)
        )
        self.assertIn(
            f"worker 1 did not end within {0.5 + STOP_MARGIN} s of the stop: killed",
            log,
        )

    @defer.inlineCallbacks
    def test_signalledTwice(self):
        """
        SIGTERM to the whole process group (as a terminal's Ctrl-C, or
        C{kill} of the group): worker 1 gets it from the group and again
        from worker 0; everything stops cleanly, no error logged.
        """
        worker = yield defer.ensureDeferred(self.started())
        os.kill(worker, signal.SIGTERM)
        self.msa.kill(signal.SIGTERM)
        log = yield defer.ensureDeferred(self.exitedCleanly(worker))
        self.assertNotIn("Traceback", log)
        self.assertNotIn("ReactorNotRunning", log)
        self.assertNotIn("worker 1 ended", log)

    @defer.inlineCallbacks
    def test_workerEndsWhenWorkerZeroIsKilled(self):
        """
        Worker 0 killed (SIGKILL, no stop of its own): worker 1 sees its
        standard input close and stops by itself.
        """
        worker = yield defer.ensureDeferred(self.started())
        self.msa.kill(signal.SIGKILL)
        yield defer.ensureDeferred(waitFor(lambda: not alive(worker), "worker 1", 20))

    @defer.inlineCallbacks
    def test_fewerWorkersLeftoverRelayed(self):
        """
        Worker 1 holds a message (the core down) when the MSA stops; started
        again with one worker, worker 0 relays it from worker 1's spool.
        """
        yield defer.ensureDeferred(self.started())
        yield defer.ensureDeferred(self.submitWhileStopped(self.msa.process.pid))
        self.msa.kill(signal.SIGTERM)
        yield defer.ensureDeferred(self.msa.waitForExit(30))
        self.assertEqual(len(os.listdir(self.workerFile("queue"))), 1)
        self.msa = self.process(1)
        self.core.start()
        yield defer.ensureDeferred(self.msa.start())
        yield self.core.waitForMessages(1, timeout=20)
        yield defer.ensureDeferred(
            waitFor(lambda: not os.listdir(self.workerFile("queue")), "empty", 10)
        )
        self.assertEqual(children(self.msa.process.pid), [])
        self.assertIn("of a worker no longer started holds 1 messages", self.msa.log())

    @defer.inlineCallbacks
    def test_adminCoversEveryWorker(self):
        """
        C{digipoort-msa-admin queue} on the configuration covers both
        workers' queues (the core down, a message in each): C{list} shows
        both, C{show} and C{hold} find the one in worker 1's spool, an
        unknown id is refused naming it; with the MSA stopped, C{list}
        reads both spools and says so, and C{verify} checks both.
        """
        worker = yield defer.ensureDeferred(self.started())
        master = self.msa.process.pid
        inWorker1 = yield defer.ensureDeferred(self.submitWhileStopped(master))
        inWorker0 = yield defer.ensureDeferred(self.submitWhileStopped(worker))
        self.assertEqual(os.listdir(self.workerFile("queue")), [inWorker1])
        out, err, code = yield admin(self.msa, "queue", "list")
        self.assertEqual(code, 0, err)
        self.assertIn(inWorker0, out)
        self.assertIn(inWorker1, out)
        self.assertIn("2 message(s)", out)
        out, err, code = yield admin(self.msa, "queue", "show", inWorker1)
        self.assertEqual(code, 0, err)
        self.assertIn(inWorker1, out)
        out, err, code = yield admin(self.msa, "queue", "hold", inWorker1)
        self.assertEqual((out, code), (f"held {inWorker1}\n", 0), err)
        out, err, code = yield admin(self.msa, "queue", "list")
        [line] = [line for line in out.splitlines() if inWorker1 in line]
        self.assertIn("held", line)
        unknown = "0" * 18
        out, err, code = yield admin(self.msa, "queue", "show", unknown)
        self.assertEqual(code, 1)
        self.assertIn(f"no message {unknown} in the queue", err)
        self.msa.kill(signal.SIGTERM)
        yield defer.ensureDeferred(self.msa.waitForExit(30))
        out, err, code = yield admin(self.msa, "queue", "list")
        self.assertEqual(code, 0, err)
        self.assertIn("2 message(s)", out)
        self.assertIn("the MSA is not running", err)
        out, err, code = yield admin(self.msa, "queue", "verify")
        self.assertEqual(code, 0, err)
        self.assertIn("2 message(s): 2 verified", out)

    @defer.inlineCallbacks
    def test_workerThatCannotStart(self):
        """
        A worker that cannot start (its state directory is a file) logs why
        and ends; worker 0 starts it again and again, C{/health} says
        C{workers} is degraded (200) meanwhile, worker 0 still takes
        submissions; once the cause is gone the worker runs again and
        C{/health} is ok.
        """
        worker = yield defer.ensureDeferred(self.started())
        state = self.workerFile(state=True)
        os.rename(state, state + ".aside")
        with open(state, "w") as f:
            f.write("in the way\n")
        os.kill(worker, signal.SIGKILL)
        yield defer.ensureDeferred(
            waitFor(
                lambda: self.msa.log().count("worker 1 cannot start") >= 2,
                "two failed starts",
                20,
            )
        )
        status, body = yield deferHTTP(self.metricsPort, "/health")
        self.assertEqual(status, 200, body)
        report = json.loads(body)
        self.assertEqual(report["components"]["workers"]["status"], "degraded")
        self.assertIn("worker(s) 1 of 2 not running steadily", body.decode())
        self.core.start()
        code, text = yield self.msa.submit()
        self.assertEqual(code, 250, text)
        os.remove(state)
        os.rename(state + ".aside", state)
        yield defer.ensureDeferred(
            waitFor(
                lambda: os.path.exists(self.workerFile("control.sock", state=True)),
                "worker 1 running again",
                40,
            )
        )

        def healthy():
            _, body = httpGet(self.metricsPort, "/health")
            return json.loads(body)["components"]["workers"]["status"] == "ok"

        # Ok once the new worker has run STEADY seconds.
        yield defer.ensureDeferred(waitFor(healthy, "/health ok", STEADY + 10))


def deferHTTP(port: int, path: str):
    """
    L{tests.e2e.httpGet} in a thread.
    """
    from twisted.internet import threads

    return threads.deferToThread(httpGet, port, path)


def loggedIn(msa: MSAProcess, stopped: int | None = None) -> smtplib.SMTP:
    """
    Blocking: a session of the test account, logged in; with C{stopped},
    accepted by the other worker than C{stopped}, which is stopped only
    until the greeting (it may be worker 0, which the other asks for the
    limits).
    """
    if stopped is not None:
        os.kill(stopped, signal.SIGSTOP)
    try:
        client = smtplib.SMTP("localhost", msa.port, timeout=10)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
    client.ehlo("mijnbedrijf.nl")
    client.starttls(context=msa.clientContext())
    client.ehlo("mijnbedrijf.nl")
    client.esmtp_features["auth"] = "PLAIN"
    client.login(USER, PASSWORD)
    return client


class KeptLimitsTests(unittest.TestCase):
    """
    Two workers without Redis (C{[limits] backend = "memory"}): worker 0
    keeps the limits, the other worker asks it (L{msa.policy.workerlimits}),
    so an account's limits hold across the workers.
    """

    timeout = 90

    def setUp(self):
        self.directory, self.core = directoryAndCore(self)
        self.msa = MSAProcess(
            self,
            self.directory,
            self.core.portNumber,
            self.core.caFile,
            sections={"server": {"workers": 2}},
            accountExtra={"messagesPerMinute": 2, "maxSessions": 1},
        )

    def submitted(self, stopped: int) -> int:
        client = loggedIn(self.msa, stopped)
        try:
            client.sendmail(SENDER, ["belastingdienst@overheid.nl"], MESSAGE)
            return 250
        finally:
            client.close()

    def mailReply(self, stopped: int) -> tuple[int, bytes]:
        client = loggedIn(self.msa, stopped)
        try:
            return client.mail(SENDER)
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_limitsHoldAcrossWorkers(self):
        """
        With 2 messages a minute: one through worker 1, one through worker
        0, and worker 1 refuses the third at MAIL with 451 4.7.1; with one
        session at most, a session held at worker 1 keeps worker 0 from
        admitting a second (454 4.7.0), and once it ends a new one is
        admitted.
        """
        self.core.start()
        yield defer.ensureDeferred(self.msa.start())
        master = self.msa.process.pid
        yield defer.ensureDeferred(
            waitFor(lambda: len(children(master)) == 1, "worker 1", 20)
        )
        [worker] = children(master)
        yield defer.ensureDeferred(
            waitFor(
                lambda: "[worker-1] queue control socket" in self.msa.log(),
                "worker 1 serving",
                20,
            )
        )
        self.assertIn("forked from worker 0", self.msa.log())
        yield threads.deferToThread(self.submitted, master)
        yield threads.deferToThread(self.submitted, worker)
        code, text = yield threads.deferToThread(self.mailReply, master)
        self.assertEqual(code, 451, text)
        self.assertTrue(text.startswith(b"4.7.1 "), text)
        yield self.core.waitForMessages(2, timeout=15)
        accepted = [
            line for line in self.msa.log().splitlines() if " accepted from " in line
        ]
        self.assertEqual(
            sorted("[worker-1]" in line for line in accepted), [False, True], accepted
        )

        held = yield threads.deferToThread(loggedIn, self.msa, master)
        try:
            with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                yield threads.deferToThread(loggedIn, self.msa, worker)
            self.assertEqual(caught.exception.smtp_code, 454)
            self.assertIn(b"Too many concurrent sessions", caught.exception.smtp_error)
        finally:
            held.close()

        def admitted() -> bool:
            try:
                loggedIn(self.msa).close()
            except smtplib.SMTPAuthenticationError:
                return False
            return True

        yield defer.ensureDeferred(
            waitFor(lambda: admitted(), "a session admitted again", 15)
        )
