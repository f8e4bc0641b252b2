# -*- test-case-name: tests.test_crash -*-
"""
Crash safety with the real server process: C{twistd -n digipoort-msa} is
killed with SIGKILL at each stage of a message's life, started again, and
what the core MTA (a L{DownstreamServer} in this process) finally received
is counted and compared byte for byte.

    a. mid-DATA, before the final dot: nothing queued, the client saw no
       250, nothing delivered; the half-written file in tmp/ is removed at
       the restart (and the log says so).
    b. right after the client's 250, the core down: delivered exactly once
       after the restart.
    c. mid-relay, the core stalled after the data (no reply yet): delivered
       once after the restart (the stalled copy was never accepted).
    d. after the core accepted the message, before the MSA removed its
       entry: delivered twice.  This is the documented window: the MSA
       cannot know that the core has the message, so it sends it again.

And SIGTERM with a client in the middle of a message: new connections are
refused at once, the client may still finish within the grace period and
gets 250, the process stops cleanly, and the message is delivered.
"""

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading

import attrs
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.trial import unittest

from msa.accounts.model import makeAccount, writeAccounts
from msa.queue import queuefile
from msa.queue.spool import Spool
from tests.downstream import DownstreamServer, _ServerProtocol
from tests.e2e import MESSAGE, freePort, writeConfig
from tests.test_e2e import SENDER, splitReceived, submit
from tests.test_spool import MESSAGE as SPOOLED
from tests.test_spool import makeEnvelope
from tests.waiting import waitUntil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
USER, PASSWORD = "crash", "crash test pw"
RECIPIENT = "belastingdienst@overheid.nl"

#: Enough to pass the spool writer's 64 KiB buffer, so that part of it is
#: on disk when the process dies.
LONG_BODY = b"".join(b"regel %06d " % i + b"x" * 60 + b"\r\n" for i in range(2000))


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def waitFor(condition, what: str, timeout: float = 10.0):
    """
    L{waitUntil} in this module's argument order: a L{Deferred}, which the
    C{async def} helpers here can await.
    """
    return waitUntil(condition, timeout, what)


class _Recorded(list):
    """
    The core's list of messages, calling C{onAppend(message)} as each is
    recorded (before the 250 is written).
    """

    onAppend = None

    def append(self, item) -> None:
        super().append(item)
        if self.onAppend is not None:
            self.onAppend(item)


class _CoreProtocol(_ServerProtocol):
    def _endOfData(self) -> None:
        server = self.server
        if server.stallAfterData:
            # Keep the data, never answer: the MSA waits for the reply.
            server.stalled += 1
            self._reset()
            return
        super()._endOfData()


class Core(DownstreamServer):
    """
    The core MTA stand-in, on a port fixed for the whole test (the MSA's
    configuration names it), so that it can be down and come back.

    @ivar stallAfterData: take the message data and never answer it.
    @ivar stalled: how many messages were stalled.
    """

    def __init__(self, directory: str, port: int) -> None:
        super().__init__(directory)
        self.portNumber = port
        self.messages = _Recorded()
        self.stallAfterData = False
        self.stalled = 0

    def start(self) -> int:
        factory = protocol.Factory()

        def build(addr):
            p = _CoreProtocol(self)
            p.factory = factory
            self._protocols.append(p)
            return p

        factory.buildProtocol = build
        self._port = reactor.listenTCP(self.portNumber, factory, interface="127.0.0.1")
        return self.portNumber

    def stop(self):
        if self._port is None:
            return defer.succeed(None)
        port, self._port = self._port, None
        for p in self._protocols:
            if p.transport is not None and p.connected:
                p.transport.abortConnection()
        return defer.maybeDeferred(port.stopListening)


@attrs.define(slots=False)
class MSAProcess:
    """
    C{twistd -n digipoort-msa --config ...} as a child process, started as
    often as the test likes on the same configuration and state.

    @ivar sections: more configuration, per section (merged into the
        defaults here).
    @ivar accountExtra: more of the account's C{extra} (rates, ...).
    """

    testCase: unittest.TestCase
    directory: str
    corePort: int
    coreCA: str
    grace: float = 5
    process: subprocess.Popen | None = None
    starts: int = 0
    logs: list = attrs.Factory(list)
    sections: dict = attrs.Factory(dict)
    accountExtra: dict = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.state = os.path.join(self.directory, "state")
        self.spool = os.path.join(self.state, "spool")
        self.port = freePort()
        self.configFile = os.path.join(self.directory, "msa.toml")
        accountsFile = os.path.join(self.directory, "accounts.json")
        account = makeAccount(USER, PASSWORD, ["localhost"])
        extra = {"senders": ["@mijnbedrijf.nl"], **self.accountExtra}
        account = attrs.evolve(account, extra=extra)
        writeAccounts(accountsFile, {USER: account})
        sections = {
            "server": {
                "hostname": "localhost",
                "state_dir": self.state,
                "starttls_listeners": [f"tcp:{self.port}:interface=127.0.0.1"],
                "implicit_tls_listeners": [f"tcp:{freePort()}:interface=127.0.0.1"],
                "shutdown_grace": self.grace,
            },
            "accounts": {"file": accountsFile, "watch_interval": 60},
            "relay": {
                "host": "127.0.0.1",
                "port": self.corePort,
                "tls": "starttls",
                "server_name": "localhost",
                "ca_file": self.coreCA,
                "retry_base": 1,
                "retry_max": 2,
            },
        }
        for name, keys in self.sections.items():
            sections[name] = {**sections.get(name, {}), **keys}
        writeConfig(self.configFile, sections)
        self.testCase.addCleanup(self.kill)

    async def start(self) -> None:
        """
        Start the server and wait until it accepts connections.
        """
        self.starts += 1
        logPath = os.path.join(self.directory, f"twistd-{self.starts}.log")
        self.logs.append(logPath)
        with open(logPath, "wb") as logFile:
            self.process = subprocess.Popen(
                [
                    TWISTD,
                    "-n",
                    "--pidfile=",
                    "digipoort-msa",
                    "--config",
                    self.configFile,
                ],
                cwd=self.directory,
                env=dict(os.environ, PYTHONPATH=ROOT),
                stdout=logFile,
                stderr=subprocess.STDOUT,
            )

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(f"the MSA exited: {self.log()[-3000:]!r}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        await waitFor(listening, "the MSA to listen", timeout=20)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            if sig == signal.SIGKILL:
                self.process.wait(10)

    async def waitForExit(self, timeout: float = 15) -> int:
        await waitFor(lambda: self.process.poll() is not None, "exit", timeout)
        return self.process.returncode

    def log(self, index: int = -1) -> str:
        with open(self.logs[index], "rb") as f:
            return f.read().decode("utf-8", "replace")

    def files(self, where: str) -> list[str]:
        path = os.path.join(self.spool, where)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def clientContext(self) -> ssl.SSLContext:
        return ssl.create_default_context(
            cafile=os.path.join(self.state, "selfsigned-cert.pem")
        )

    def submit(self):
        """
        A whole submission with smtplib, in a thread.

        @return: a L{Deferred} of the reply to the final dot.
        """
        return threads.deferToThread(
            submit,
            port=self.port,
            context=self.clientContext(),
            user=USER,
            password=PASSWORD,
            recipients=[RECIPIENT],
        )

    def submitInTwoParts(self):
        """
        A submission, in a thread, that sends the first bytes of its data
        and then waits to be told to send the rest.

        @return: the event set once the first part is sent, the event that
            lets it finish, and a L{Deferred} of the reply to the final dot.
        """
        partSent, finish = threading.Event(), threading.Event()
        stuffed = re.sub(rb"(?m)^\.", b"..", MESSAGE)

        def client():
            c = self.openTransaction()
            try:
                c.send(stuffed[:40])
                partSent.set()
                if not finish.wait(15):
                    raise AssertionError("never told to finish")
                c.send(stuffed[40:] + b".\r\n")
                return c.getreply()
            finally:
                c.close()

        return partSent, finish, threads.deferToThread(client)

    def openTransaction(self) -> smtplib.SMTP:
        """
        Blocking: a session that has sent MAIL, RCPT and DATA (354).
        """
        client = smtplib.SMTP("localhost", self.port, timeout=10)
        client.ehlo("mijnbedrijf.nl")
        client.starttls(context=self.clientContext())
        client.ehlo("mijnbedrijf.nl")
        client.esmtp_features["auth"] = "PLAIN"
        client.login(USER, PASSWORD)
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text = client.docmd("DATA")
        assert code == 354, (code, text)
        return client


async def startWithCore(testCase: unittest.TestCase) -> MSAProcess:
    """
    A core (L{Core}, listening) and C{twistd digipoort-msa} relaying to it,
    started, in a new temporary directory; both stopped at the test's end.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    core = Core(os.path.join(directory, "core"), freePort())
    core.start()
    testCase.addCleanup(core.stop)
    msa = MSAProcess(testCase, directory, core.portNumber, core.caFile)
    await msa.start()
    return msa


class CrashTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.core = Core(os.path.join(directory, "core"), freePort())
        self.addCleanup(self.core.stop)
        self.msa = MSAProcess(self, directory, self.core.portNumber, self.core.caFile)

    def assertDelivered(self, count: int) -> list:
        """
        The core got C{count} copies of L{MESSAGE} from the MSA, each with
        one Received header and exactly the submitted bytes after it.
        """
        messages = list(self.core.messages)
        self.assertEqual(len(messages), count, messages)
        for m in messages:
            self.assertEqual((m.sender, m.recipients), (SENDER, [RECIPIENT]))
            self.assertEqual(m.data.count(b"Received: "), 1)
            self.assertEqual(splitReceived(m.data)[1], MESSAGE)
        return messages

    async def drained(self, copies: int) -> None:
        """
        Wait for C{copies} deliveries and an empty queue, and a little
        longer to catch any further copy.
        """
        await self.core.waitForMessages(copies, timeout=15)
        await waitFor(lambda: not self.msa.files("queue"), "an empty queue", timeout=10)
        await sleep(1.5)

    @defer.inlineCallbacks
    def test_a_midData(self):
        """
        Killed while the client is in DATA: the client never saw a 250,
        nothing is queued, the partial file is removed at the restart and
        the core receives nothing.
        """
        self.core.start()
        yield defer.ensureDeferred(self.msa.start())
        client = yield threads.deferToThread(self.msa.openTransaction)
        partial = MESSAGE + LONG_BODY
        yield threads.deferToThread(client.send, partial)

        def written():
            for name in self.msa.files("tmp"):
                path = os.path.join(self.msa.spool, "tmp", name)
                if os.path.getsize(path) >= 64 * 1024:
                    return name
            return None

        name = yield defer.ensureDeferred(waitFor(written, "a partial message"))
        self.msa.kill()
        self.assertIn(name, self.msa.files("tmp"))
        self.assertEqual(self.msa.files("queue"), [])

        reply = yield threads.deferToThread(endAfterKill, client, b"\r\n.\r\n")
        self.assertIsInstance(reply, smtplib.SMTPServerDisconnected | OSError)

        yield defer.ensureDeferred(self.msa.start())
        self.assertIn(f"recover: removing unacknowledged {name}", self.msa.log())
        self.assertEqual(self.msa.files("tmp"), [])
        self.assertEqual(self.msa.files("queue"), [])
        # Nothing must be delivered: give a wrong delivery time to show,
        # then assert it did not happen.
        yield defer.ensureDeferred(sleep(1.5))
        self.assertDelivered(0)
        self.assertEqual(self.core.connections, 0)

    @defer.inlineCallbacks
    def test_b_afterAcknowledgement(self):
        """
        Killed right after the client got its 250, with the core down (its
        port refuses connections): the message is only in the queue; after
        a restart with the core up it is delivered exactly once.
        """
        yield defer.ensureDeferred(self.msa.start())
        code, text = yield self.msa.submit()
        self.msa.kill()
        self.assertEqual(code, 250)
        queueId = text.split()[-1].decode()
        self.assertEqual(self.msa.files("queue"), [queueId])
        self.core.start()
        yield defer.ensureDeferred(self.msa.start())
        yield defer.ensureDeferred(self.drained(1))
        [m] = self.assertDelivered(1)
        self.assertIn(f"id {queueId}".encode(), splitReceived(m.data)[0])

    @defer.inlineCallbacks
    def test_c_midRelay(self):
        """
        Killed while the core holds the data without answering: after a
        restart with a working core, delivered once (the core never
        accepted the first copy).
        """
        self.core.stallAfterData = True
        self.core.start()
        yield defer.ensureDeferred(self.msa.start())
        code, _ = yield self.msa.submit()
        self.assertEqual(code, 250)
        yield defer.ensureDeferred(
            waitFor(lambda: self.core.stalled, "the core to stall")
        )
        self.msa.kill()
        self.assertEqual(len(self.msa.files("queue")), 1)
        self.core.stallAfterData = False
        yield defer.ensureDeferred(self.msa.start())
        yield defer.ensureDeferred(self.drained(1))
        self.assertDelivered(1)
        self.assertEqual(self.core.stalled, 1)

    @defer.inlineCallbacks
    def test_d_afterCoreAccepted(self):
        """
        Killed the moment the core has the message, before the MSA hears
        the 250 (so, as at any point before its entry is removed): after
        the restart the MSA sends it again, one duplicate.
        """
        self.core.start()
        killed = []

        def kill(message):
            self.core.messages.onAppend = None
            self.msa.kill()
            killed.append(len(self.msa.files("queue")))

        self.core.messages.onAppend = kill
        yield defer.ensureDeferred(self.msa.start())
        code, _ = yield self.msa.submit()
        self.assertEqual(code, 250)
        yield defer.ensureDeferred(waitFor(lambda: killed, "the kill"))
        self.assertEqual(killed, [1])
        yield defer.ensureDeferred(self.msa.start())
        yield defer.ensureDeferred(self.drained(2))
        first, second = self.assertDelivered(2)
        # The same message: the same queue id in the same Received header.
        self.assertEqual(first.data, second.data)

    @defer.inlineCallbacks
    def test_sigterm(self):
        """
        SIGTERM with a client in the middle of its message: the listener
        refuses new connections at once, the client finishes within the
        grace period and gets its 250, the process stops cleanly, and the
        message is delivered (now or after the next start) exactly once.
        """
        self.core.start()
        yield defer.ensureDeferred(self.msa.start())
        partSent, finish, replied = self.msa.submitInTwoParts()
        yield defer.ensureDeferred(waitFor(partSent.is_set, "the client"))
        self.msa.kill(signal.SIGTERM)

        def refused():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.msa.port)) != 0

        yield defer.ensureDeferred(waitFor(refused, "new connections refused", 3))
        finish.set()
        code, text = yield replied
        self.assertEqual(code, 250, text)
        status = yield defer.ensureDeferred(self.msa.waitForExit())
        # A clean stop.  twistd ends a stop caused by a signal by raising
        # that signal again (twisted.application.app._exitWithSignal), so
        # the status says "terminated by SIGTERM", which supervisors such as
        # systemd count as a clean exit; 0 is accepted too.
        self.assertIn(status, (0, -signal.SIGTERM), self.msa.log()[-3000:])
        self.assertIn("Server Shut Down.", self.msa.log())
        self.assertNotIn("Traceback", self.msa.log())
        if not self.core.messages:
            self.assertEqual(len(self.msa.files("queue")), 1)
            yield defer.ensureDeferred(self.msa.start())
        yield defer.ensureDeferred(self.drained(1))
        self.assertDelivered(1)


class CommitCrashPointTests(unittest.TestCase):
    """
    What a crash at each step of a spool commit leaves in C{queue/}: a file
    there is whole (its state readable, its bytes the message), because it
    is renamed there only once written and fsynced (issue 18, item 14, for
    the earlier .msg/.json pair: swapping its renames survived every other
    test; issue 20: one queue file per message).  SIGKILL leaves exactly
    what the file system holds at that instant (the page cache survives
    the process), so the test reads C{queue/} at each step instead of
    killing a process there: before and after each write, rename and fsync
    of the commit.
    """

    def test_queueFileWhole(self):
        clock = task.Clock()
        spool = Spool(self.mktemp(), reactor=clock)
        queue = spool.queueDirectory
        crashPoints: list[list[str]] = []
        events: list[tuple[str, str]] = []
        realReplace, realFsync, realPwrite = os.replace, os.fsync, os.pwrite

        def crashHere():
            names = sorted(os.listdir(queue))
            crashPoints.append(names)
            for name in names:
                entry, _ = queuefile.loadEntry(os.path.join(queue, name))
                with queuefile.openContent(entry) as f:
                    self.assertEqual(f.read(), SPOOLED)

        def replace(source, target):
            crashHere()
            events.append(("replace", source))
            realReplace(source, target)
            crashHere()

        def fsync(fd):
            crashHere()
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            realFsync(fd)

        def pwrite(fd, data, offset):
            crashHere()
            result = realPwrite(fd, data, offset)
            crashHere()
            return result

        self.patch(os, "replace", replace)
        self.patch(os, "fsync", fsync)
        self.patch(os, "pwrite", pwrite)
        writer = spool.newMessage(makeEnvelope())
        writer.write(SPOOLED)
        queueId = self.successResultOf(writer.commit())
        crashHere()
        # Nothing, then the whole entry.
        self.assertEqual(
            [list(p) for p in dict.fromkeys(tuple(p) for p in crashPoints)],
            [[], [queueId]],
        )
        # Its one file was fsynced before it was renamed into queue/.
        tmpPath = os.path.join(os.path.realpath(spool.tmpDirectory), queueId)
        renamed = events.index(("replace", os.path.join(spool.tmpDirectory, queueId)))
        self.assertIn(("fsync", tmpPath), events[:renamed])


def endAfterKill(client: smtplib.SMTP, ending: bytes):
    """
    Send the end of DATA to a server that was killed meanwhile: its reply,
    or the error that took its place (what a client sees).
    """
    try:
        client.send(ending)
        return client.getreply()
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        return e
    finally:
        client.close()
