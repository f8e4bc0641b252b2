"""
End-to-end fixtures: the whole MSA as C{twistd digipoort-msa} builds it
(L{msa.service.tap.buildService} from a real configuration file), listening on
loopback ports with real TLS, and an independent downstream SMTP server
(aiosmtpd, in its own thread) standing in for the Digipoort core MTA.
"""

import fcntl
import functools
import http.client
import os
import random
import shutil
import socket
import ssl
import threading

import attrs
from twisted.internet import defer, utils
from twisted.trial.unittest import SkipTest

from msa.accounts.model import Account, makeAccount, writeAccounts
from msa.service.config import _tomlValue, loadConfig, writeConfig
from msa.service.tap import buildService
from msa.tls import ensureSelfSignedCertificate
from tests.reactorguard import guardReactorThread
from tests.waiting import waitUntil

USERS = {"alice": "wonderland", "bob": "builder pass"}
SENDERS = ["@mijnbedrijf.nl"]
MESSAGE = (
    b"From: ik@mijnbedrijf.nl\r\n"
    b"To: belastingdienst@overheid.nl\r\n"
    b"Subject: aangifte\r\n"
    b"Message-ID: <1@mijnbedrijf.nl>\r\n"
    b"\r\n"
    b"Regel een\r\n"
    b".regel met punt\r\n"
    b"..twee punten\r\n"
    b"\xc3\xa9\xc3\xa9n 8-bit regel\r\n"
)


@functools.cache
def fixtureAccount(
    name: str,
    password: str,
    realms: tuple[str, ...] = ("localhost",),
    mechanisms: tuple[str, ...] | None = None,
) -> Account:
    """
    L{makeAccount}C{(name, password, realms, mechanisms)} (its default
    mechanisms when L{None}), made once per process: its
    secrets (an scrypt hash with the daemon's parameters, the SCRAM keys)
    cost about 70 ms of CPU, and most daemons the tests start have the
    same accounts.  An L{Account} is frozen, so sharing it is safe; only
    its salts are the same in every daemon of the process.
    """
    if mechanisms is None:
        return makeAccount(name, password, realms)
    return makeAccount(name, password, realms, mechanisms)


#: Ports handed out in this process, never handed out twice.
_given: set[int] = set()

#: Where L{freePort} picks: below Linux's ephemeral range (32768-60999),
#: one share per C{trial -j} worker.
PORTS = range(20000, 32000)
WORKER_SHARE = 2000


def workerPorts() -> range:
    """
    This process's share of L{PORTS}: a C{trial -j} worker runs in a
    directory named after its number (0, 1, ...), and each number has
    ports of its own, so that two workers never pick the same port (one
    did, between another's check and its listen()).  A single trial
    process takes the first share.
    """
    name = os.path.basename(os.getcwd())
    index = int(name) % (len(PORTS) // WORKER_SHARE) if name.isdigit() else 0
    start = PORTS.start + index * WORKER_SHARE
    return range(start, start + WORKER_SHARE)


def freePort() -> int:
    """
    A free loopback port for a server the test starts, chosen below Linux's
    ephemeral range (32768-60999) so that no client connection of this or
    another test can take it between now and the server's listen(), and
    in this trial worker's share of them (L{workerPorts}).
    """
    ports = workerPorts()
    while True:
        if _given.issuperset(ports):
            raise RuntimeError(f"every port of {ports} was handed out")
        port = random.randrange(ports.start, ports.stop)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port


def requireProgram(testCase, name: str) -> str:
    """
    The path of a client program, or skip; under CI=true a missing program
    fails the test instead of skipping it.
    """
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            testCase.fail(
                f"{name} is not installed (CI must install it: see run-tests.sh)"
            )
        raise SkipTest(f"{name} not installed")
    return path


class RunningMSA:
    """
    The MSA, configured through a real TOML file in a temporary directory.

    @ivar starttlsPort: the STARTTLS listener's port.
    @ivar implicitPort: the implicit-TLS listener's port.
    @ivar certFile: the self-signed certificate clients can trust.
    @ivar guard: the L{tests.reactorguard.ReactorThreadGuard}: the test
        fails at its end if the daemon did blocking disk work on the
        reactor thread.
    """

    def __init__(
        self,
        testCase,
        relay: dict | None = None,
        server: dict | None = None,
        accounts: dict | None = None,
        tls: dict | None = None,
        extraAccounts: dict | None = None,
        logging: dict | None = None,
        metrics: dict | None = None,
        spool: dict | None = None,
        content: list[dict] | None = None,
        baseConfig: str | None = None,
        audit: dict | None = None,
        limits: dict | None = None,
        pop3: dict | None = None,
        lmtp: dict | None = None,
        mailbox: dict | None = None,
    ):
        self.testCase = testCase
        self.directory = os.path.abspath(testCase.mktemp())
        os.makedirs(self.directory)
        self.state = os.path.join(self.directory, "state")
        self.starttlsPort = freePort()
        self.implicitPort = freePort()
        serverSection = {
            "hostname": "localhost",
            "state_dir": self.state,
            "starttls_listeners": [f"tcp:{self.starttlsPort}:interface=127.0.0.1"],
            "implicit_tls_listeners": [f"tcp:{self.implicitPort}:interface=127.0.0.1"],
        }
        serverSection.update(server or {})
        self.accountsFile = os.path.join(self.directory, "accounts.json")
        sections = {
            "server": serverSection,
            "accounts": {"file": self.accountsFile, **(accounts or {})},
        }
        if relay:
            sections["relay"] = relay
        if tls:
            sections["tls"] = tls
        if logging:
            sections["logging"] = logging
        if metrics:
            sections["metrics"] = metrics
        if spool:
            sections["spool"] = spool
        if audit:
            sections["audit"] = audit
        if limits:
            sections["limits"] = limits
        if lmtp:
            sections["lmtp"] = lmtp
        if mailbox:
            sections["mailbox"] = mailbox
        #: The POP3 listeners' ports (STLS, implicit TLS) when C{pop3} is
        #: given, and the mailboxes they read.
        self.pop3Port = self.pop3sPort = 0
        self.mailboxes = (mailbox or {}).get("directory") or os.path.join(
            self.state, "mailboxes"
        )
        if pop3 is not None:
            self.pop3Port, self.pop3sPort = freePort(), freePort()
            sections["pop3"] = {
                "starttls_listeners": [f"tcp:{self.pop3Port}:interface=127.0.0.1"],
                "implicit_tls_listeners": [f"tcp:{self.pop3sPort}:interface=127.0.0.1"],
                **pop3,
            }
        self.configFile = os.path.join(self.directory, "msa.toml")
        if baseConfig is None:
            writeConfig(self.configFile, sections)
        else:
            with open(baseConfig, encoding="utf-8") as f:
                text = rewriteConfig(f.read(), sections)
            with open(self.configFile, "w", encoding="utf-8") as f:
                f.write(text)
        if content:
            with open(self.configFile, "a", encoding="utf-8") as f:
                f.write(policyTables(content))
        writeAccounts(
            self.accountsFile,
            {
                name: attrs.evolve(fixtureAccount(name, pw), extra={"senders": SENDERS})
                for name, pw in USERS.items()
            }
            | (extraAccounts or {}),
        )
        self.certFile, _ = ensureSelfSignedCertificate(self.state, "localhost")
        self.outbox = os.path.join(self.state, "outbox")
        self.service = buildService(loadConfig(self.configFile))
        testCase.addCleanup(lambda: self.service.stopService())
        self.service.startService()
        # Checked before the stop above (cleanups run last first).
        self.guard = guardReactorThread(testCase)

    @defer.inlineCallbacks
    def restart(self):
        """
        Stop the service and build it again from the same configuration
        file and state, as a restart of the daemon does.
        """
        yield self.service.stopService()
        self.service = buildService(loadConfig(self.configFile))
        self.service.startService()

    def clientContext(self) -> ssl.SSLContext:
        """
        What a careful client uses: verify our certificate (R14).
        """
        context = ssl.create_default_context(cafile=self.certFile)
        return context

    def outboxFiles(self) -> list[str]:
        if not os.path.isdir(self.outbox):
            return []
        return sorted(f for f in os.listdir(self.outbox) if f.endswith(".eml"))

    def readOutbox(self, name: str) -> bytes:
        with open(os.path.join(self.outbox, name), "rb") as f:
            return f.read()

    @defer.inlineCallbacks
    def waitForOutbox(self, count: int, timeout: float = 10.0):
        yield waitUntil(
            lambda: len(self.outboxFiles()) >= count,
            timeout,
            lambda: f"{count} file(s) in the outbox (has {self.outboxFiles()})",
        )
        return self.outboxFiles()


def httpGet(port: int, path: str) -> tuple[int, bytes]:
    """
    GET C{path} on 127.0.0.1:C{port} (blocking): (status, body).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def runProgram(executable: str, args: list[str]):
    """
    Run a client program without blocking the reactor.

    @return: Deferred of (stdout, stderr, exit code).
    """
    return utils.getProcessOutputAndValue(executable, args, env=os.environ)


class AiosmtpdCore:
    """
    The Digipoort core MTA stand-in: aiosmtpd with STARTTLS required and a
    certificate for localhost, recording each message as it arrived.
    """

    def __init__(
        self,
        testCase,
        requireStartTLS: bool = True,
        clientCA: str | None = None,
        alpnProtocols: list[str] | None = None,
    ):
        from aiosmtpd.controller import Controller

        directory = os.path.abspath(testCase.mktemp())
        self.certFile, self.keyFile = ensureSelfSignedCertificate(
            directory, "localhost"
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certFile, self.keyFile)
        if clientCA:
            # Two-way TLS: the core wants the MSA's client certificate.
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(clientCA)
        if alpnProtocols:
            # A core that speaks ALPN (selects when a client offers).
            context.set_alpn_protocols(alpnProtocols)
        self.messages: list = []
        #: RSET commands seen (a reused connection starts with one).
        self.resets = 0
        self.port = freePort()
        self._lock = threading.Lock()
        core = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                with core._lock:
                    core.messages.append(
                        (
                            envelope.mail_from,
                            list(envelope.rcpt_tos),
                            envelope.original_content,
                            session.ssl is not None,
                        )
                    )
                return "250 2.0.0 Ok: queued as CORE%d" % len(core.messages)

            async def handle_RSET(self, server, session, envelope):
                with core._lock:
                    core.resets += 1
                return "250 OK"

        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            tls_context=context,
            require_starttls=requireStartTLS,
            decode_data=False,
        )
        self.controller.start()
        testCase.addCleanup(self.controller.stop)

    def waitForMessages(self, count: int, timeout: float = 10.0):
        """
        Wait without blocking the reactor until the core has C{count}
        messages.

        @return: a L{Deferred} firing with a copy of the list of messages.
        """

        def enough():
            with self._lock:
                return list(self.messages) if len(self.messages) >= count else None

        return waitUntil(
            enough,
            timeout,
            lambda: f"the core to receive {count} (has {len(self.messages)})",
        )

    def relayConfig(self) -> dict:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "tls": "starttls",
            "server_name": "localhost",
            "ca_file": self.certFile,
            "retry_base": 1,
        }


def policyTables(policies: list[dict]) -> str:
    """
    C{[[content.policy]]} tables for a configuration file, one per L{dict}
    of the policy's keys (C{name} and its options).
    """
    lines = []
    for table in policies:
        lines.append("[[content.policy]]")
        lines.extend(f"{key} = {_tomlValue(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def rewriteConfig(text: str, sections: dict[str, dict]) -> str:
    """
    A configuration file's text with some keys changed, everything else
    (comments, C{[[content.policy]]} tables) as it was: for etc/
    digipoort-msa.toml with its paths pointed at a test's directory.

    @param sections: C{{section: {key: value}}}; a value replaces the key's
        line in that section, or is added after the section's header when
        the key is not set there; L{None} removes the key.
    """

    def parse(line: str) -> tuple[str | None, str | None]:
        stripped = line.strip()
        if stripped.startswith("[["):
            return "", None
        if stripped.startswith("["):
            return stripped.strip("[]").strip(), None
        if stripped.startswith("#") or "=" not in stripped:
            return None, None
        return None, stripped.split("=", 1)[0].strip()

    lines = text.splitlines()
    present, section = set(), ""
    for line in lines:
        header, key = parse(line)
        if header is not None:
            section = header
        elif key:
            present.add((section, key))
    out: list[str] = []
    section = ""
    for line in lines:
        header, key = parse(line)
        if header is not None:
            section = header
            out.append(line)
            for name, value in sections.get(section, {}).items():
                if (section, name) not in present and value is not None:
                    out.append(f"{name} = {_tomlValue(value)}")
            continue
        changed = sections.get(section, {})
        if key and key in changed:
            if changed[key] is not None:
                out.append(f"{key} = {_tomlValue(changed[key])}")
            continue
        out.append(line)
    for name, keys in sections.items():
        if not any(parse(line)[0] == name for line in lines):
            out.append(f"[{name}]")
            out.extend(
                f"{k} = {_tomlValue(v)}" for k, v in keys.items() if v is not None
            )
    return "\n".join(out) + "\n"


def auditLockFree(audit: str) -> bool:
    """
    Whether no process holds the lock of the audit log C{audit} (a worker
    stopped while it holds it holds up every worker's commits; a test
    that stops one waits for this first).  True when there is no lock file.
    """
    try:
        lock = open(audit + ".lock", "a")
    except FileNotFoundError:
        return True
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
    return True
