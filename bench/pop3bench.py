"""
Benchmark of the return channel (issue 19): the MSA's POP3 and LMTP
against Dovecot's (``bench/peer_dovecot.py``), like with like on the same
mailbox contents.

Both servers run as their own process(es) on loopback with the same ECDSA
P-256 self-signed certificate (STLS, TLS 1.2 minimum, login only after
STLS) and serve Maildirs in the MSA's layout
(``<mailboxes>/<account>/{tmp,new,cur}``, files ``<uid>,S=<size>,H=<sha256>``),
written afresh for every run by this script (the same bytes for both):

  MSA      ``twistd -n digipoort-msa`` from a generated TOML file:
           ``[pop3] starttls_listeners``, ``[lmtp] listeners`` (TCP,
           ``allow_from`` 127.0.0.1), ``[mailbox] directory``.
  Dovecot  ``dovecot -F -c <dir>/dovecot.conf`` (2.3, Debian): POP3 with
           STLS, LMTP on TCP, ``mail_location = maildir:<mailboxes>/%u``;
           see ``bench/peer_dovecot.py`` for the password scheme (bcrypt
           cost 10 against the MSA's scrypt, ~60 ms each), the auth cache
           (300 s on both) and ``mail_fsync = always``.

The clients are Python's ``poplib`` and ``smtplib.LMTP`` in threads of this
process (the same client for both servers; the client's own CPU is not
counted).  Scenarios (``-s NAME``, repeatable; default all):

  fetch  1000 messages of 10 KB in 50 mailboxes (20 each), fetched and
         deleted by 50 parallel sessions: STLS, USER/PASS, UIDL, RETR and
         DELE each, QUIT.  msgs/s (first connect to the last QUIT's +OK),
         server CPU per message; every message compared with what was
         stored, and no file may be left.
  big    one 50 MB message, RETR, DELE, QUIT: peak memory (MSA: VmHWM of
         its one process, reset before the session; Dovecot: the peak of
         its process tree's summed PSS sampled every 0.2 s, as
         ``bench/run.py`` does for Postfix) and its growth over the memory
         before the session.  With cheap password hashes on both sides, as
         in ``idle``: the MSA's scrypt holds 16 MiB while it runs (N=2**14,
         r=8), bcrypt 4 KiB, and that, not the message, would be the MSA's
         growth (measured: +16.1 MiB with the full hash, the size of
         scrypt's buffer).
  idle   1000 authenticated sessions (1000 accounts, empty mailboxes) held
         open: memory per session (MSA: RSS; Dovecot: summed PSS of the
         tree, its one ``pop3`` process per session included), then NOOP on
         each (all must answer) and QUIT.  Here both sides have cheap
         password hashes (scrypt N=16, bcrypt cost 4): login CPU is not
         what is measured, and 1000 full checks would take minutes.
  lmtp   1000 messages of 10 KB delivered over LMTP by 10 parallel
         connections (100 transactions each, one recipient of 50 each):
         msgs/s and server CPU per message, every file on disk counted.

Each scenario runs ``--repeat`` times (default 3), the servers alternated
(MSA, Dovecot, MSA, ...), each run on a fresh server and directory; the
report gives the median, [min-max] and the ratio MSA/Dovecot of the
medians.  The process sampling and the report's number format are
``bench/run.py``'s.

Usage (as root: Dovecot's master must start as root)::

    .venv/bin/python bench/pop3bench.py                 # all, 3 repetitions
    .venv/bin/python bench/pop3bench.py --quick         # small, 1 repetition
    .venv/bin/python bench/pop3bench.py -s idle -s big --repeat 5

Exits non-zero when any session had an error or a server did not return
or store every message (the run is then not valid).
"""

import argparse
import base64
import hashlib
import json
import os
import poplib
import shutil
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import attrs
import run  # bench/run.py: it puts the checkout on sys.path
from peer_dovecot import COST, dovecotMissing, passwordHash
from run import (
    KB,
    MB,
    TWISTD,
    PeakSampler,
    cpuSeconds,
    freePort,
    memory,
    summary,
    treePss,
    waitForPort,
)

from msa.accounts.model import makeAccount, writeAccounts  # noqa: E402
from msa.mailbox.names import accountDirectoryName, newUid  # noqa: E402
from msa.service.config import writeConfig  # noqa: E402
from msa.tls import ensureSelfSignedCertificate
from tests.dovecotserver import ThrowawayDovecot  # noqa: E402

PASSWORD = "bench-password"
DOMAIN = "bench.invalid"

SCENARIOS = {
    "fetch": dict(accounts=50, per_account=20, size=10 * KB),
    "big": dict(accounts=1, per_account=1, size=50 * MB, cheap_login=True),
    "idle": dict(accounts=1000, cheap_login=True),
    "lmtp": dict(accounts=50, messages=1000, size=10 * KB, connections=10),
}
QUICK = {
    "fetch": dict(accounts=10, per_account=5, size=10 * KB),
    "big": dict(accounts=1, per_account=1, size=5 * MB, cheap_login=True),
    "idle": dict(accounts=50, cheap_login=True),
    "lmtp": dict(accounts=10, messages=100, size=10 * KB, connections=4),
}
TITLES = {
    "fetch": "fetch and delete 10 KB messages, 50 parallel POP3 sessions",
    "big": "RETR of one 50 MB message",
    "idle": "1000 idle authenticated POP3 sessions",
    "lmtp": "LMTP delivery, 10 parallel connections",
}


def accountName(index: int) -> str:
    return f"u{index:04d}"


def messageBytes(index: int, size: int) -> bytes:
    """
    A message of C{size} octets (CRLF lines of 78, some starting with a
    dot, to be stuffed), different for every C{index}.
    """
    head = (
        f"From: <douane@overheid.nl>\r\nTo: <{accountName(0)}@{DOMAIN}>\r\n"
        f"Subject: return message {index}\r\n\r\n"
    ).encode()
    line = (b".%08d " % index) + b"x" * 66 + b"\r\n"
    body = line * max(0, (size - len(head)) // len(line))
    return (head + body).ljust(size - 2, b"y")[: size - 2] + b"\r\n"


def fillMailboxes(mailboxes: str, params: dict) -> dict[str, list[bytes]]:
    """
    Write each account's Maildir in the MSA's layout, as LMTP delivery
    leaves it (C{new/<uid>,S=<size>,H=<sha256>}).

    @return: account -> its messages, in delivery order.
    """
    stored: dict[str, list[bytes]] = {}
    perAccount = params.get("per_account", 0)
    for a in range(params["accounts"]):
        name = accountName(a)
        top = os.path.join(mailboxes, accountDirectoryName(name))
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(top, sub), exist_ok=True)
        stored[name] = []
        for m in range(perAccount):
            data = messageBytes(a * 1000 + m, params["size"])
            digest = hashlib.sha256(data).hexdigest()
            path = os.path.join(top, "new", f"{newUid()},S={len(data)},H={digest}")
            with open(path, "wb") as f:
                f.write(data)
            stored[name].append(data)
    return stored


def messageFiles(mailboxes: str) -> int:
    return sum(
        len(files)
        for top, _, files in os.walk(mailboxes)
        if os.path.basename(top) in ("new", "cur")
    )


def cheapScrypt(password: str) -> str:
    """
    An scrypt hash the MSA accepts with N=16, r=1: a login costing
    microseconds (the idle scenario).
    """
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=16, r=1, p=1, dklen=32)
    b64 = base64.b64encode
    return f"scrypt$16$1$1${b64(salt).decode()}${b64(digest).decode()}"


# -- the servers --------------------------------------------------------------


class MSAServer:
    """
    The MSA as C{twistd -n digipoort-msa}, POP3 and LMTP on.
    """

    name = "MSA"

    def __init__(self, work: str, cert: str, key: str, cheap: bool) -> None:
        self.work, self.cert, self.key, self.cheap = work, cert, key, cheap
        self.mailboxes = os.path.join(work, "mailboxes")
        self.proc: subprocess.Popen | None = None

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def multiProcess(self) -> bool:
        return False

    def start(self, accounts: int) -> None:
        state = os.path.join(self.work, "msa-state")
        os.makedirs(state, mode=0o700)
        self.pop3Port, self.lmtpPort = freePort(), freePort()
        base = makeAccount("u", PASSWORD, ["localhost"])
        if self.cheap:
            base = attrs.evolve(base, passwordHash=cheapScrypt(PASSWORD))
        accountsFile = os.path.join(self.work, "accounts.json")
        writeAccounts(
            accountsFile,
            {
                accountName(a): attrs.evolve(
                    base,
                    name=accountName(a),
                    extra={"mailboxes": [f"{accountName(a)}@{DOMAIN}"]},
                )
                for a in range(accounts)
            },
        )
        config = os.path.join(self.work, "msa.toml")
        writeConfig(
            config,
            {
                "server": {
                    "hostname": "localhost",
                    "state_dir": state,
                    "starttls_listeners": [f"tcp:{freePort()}:interface=127.0.0.1"],
                    "shutdown_grace": 1,
                },
                "tls": {"certificate": self.cert, "key": self.key},
                "accounts": {"file": accountsFile},
                "mailbox": {"directory": self.mailboxes},
                "lmtp": {
                    "listeners": [f"tcp:{self.lmtpPort}:interface=127.0.0.1"],
                    "allow_from": ["127.0.0.1/32"],
                },
                "pop3": {
                    "starttls_listeners": [f"tcp:{self.pop3Port}:interface=127.0.0.1"],
                    "max_connections": 5000,
                    "max_connections_per_client": 5000,
                },
            },
        )
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", "msa.log"]
            + ["digipoort-msa", "--config", config],
            cwd=self.work,
            env=dict(os.environ, PYTHONPATH=run.ROOT),
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.work, "msa.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        waitForPort(self.pop3Port, self.proc)
        waitForPort(self.lmtpPort, self.proc)

    def stop(self) -> None:
        run.stopProcess(self.proc)


class DovecotServer:
    """
    The throwaway Dovecot (C{tests/dovecotserver.py}) on the same mailboxes.
    """

    name = "Dovecot"

    def __init__(self, work: str, cert: str, key: str, cheap: bool) -> None:
        self.work, self.cert, self.key, self.cheap = work, cert, key, cheap
        self.mailboxes = os.path.join(work, "mailboxes")
        self.dovecot: ThrowawayDovecot | None = None

    def pid(self) -> int:
        assert self.dovecot is not None and self.dovecot.proc is not None
        return self.dovecot.proc.pid

    def multiProcess(self) -> bool:
        return True

    def start(self, accounts: int) -> None:
        hashed = passwordHash(PASSWORD, 4 if self.cheap else COST)
        users = {accountName(a): hashed for a in range(accounts)}
        self.dovecot = ThrowawayDovecot(
            os.path.join(self.work, "dovecot"),
            self.mailboxes,
            self.cert,
            self.key,
            users,
            freePort(),
            freePort(),
        )
        self.pop3Port, self.lmtpPort = self.dovecot.pop3Port, self.dovecot.lmtpPort
        self.dovecot.start()

    def stop(self) -> None:
        if self.dovecot is not None:
            self.dovecot.stop()


SERVERS = [MSAServer, DovecotServer]
SERVER_NAMES = [cls.name for cls in SERVERS]


def currentMemory(server) -> int:
    """
    RSS of the MSA's one process; the summed PSS of Dovecot's tree.
    """
    if server.multiProcess():
        return treePss(server.pid())
    return memory(server.pid())["VmRSS"]


# -- the clients --------------------------------------------------------------


def clientContext(cert: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    return context


def login(server, account: str, context: ssl.SSLContext) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.pop3Port, timeout=300)
    client.stls(context)
    client.user(account)
    client.pass_(PASSWORD)
    return client


def fetchAndDelete(server, account: str, expected: list[bytes], context) -> list[str]:
    """
    One session: every message RETRed, compared, DELEd; QUIT.

    @return: the errors (empty when all went right).
    """
    errors = []
    try:
        client = login(server, account, context)
        count = len(client.uidl()[1])
        got = []
        for number in range(1, count + 1):
            _, lines, _ = client.retr(number)
            got.append(b"".join(line + b"\r\n" for line in lines))
            client.dele(number)
        reply = client.quit()
        if not reply.startswith(b"+OK"):
            errors.append(f"{account}: QUIT {reply!r}")
        if sorted(got) != sorted(expected):
            errors.append(f"{account}: {len(got)} messages differ from the stored")
    except (OSError, poplib.error_proto) as e:
        errors.append(f"{account}: {e}")
    return errors


def measureFetch(server, params: dict, stored, context) -> dict:
    pid = server.pid()
    cpu0, t0 = cpuSeconds(pid), time.monotonic()
    with ThreadPoolExecutor(params["accounts"]) as pool:
        results = list(
            pool.map(
                lambda a: fetchAndDelete(server, a, stored[a], context), sorted(stored)
            )
        )
    wall = time.monotonic() - t0
    cpu = cpuSeconds(pid) - cpu0
    total = sum(len(v) for v in stored.values())
    errors = [e for r in results for e in r]
    left = messageFiles(server.mailboxes)
    if left:
        errors.append(f"{left} message files left after DELE and QUIT")
    return dict(
        messages=total, rate=total / wall, wall=wall, cpu_per_msg=cpu / total
    ) | {"errors": errors}


def measureBig(server, params: dict, stored, context) -> dict:
    pid = server.pid()
    base = currentMemory(server)
    if not server.multiProcess():
        # Reset VmHWM (proc(5), clear_refs): the peak of this session
        # only, not of the start.
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    sampler = PeakSampler(pid) if server.multiProcess() else None
    cpu0, t0 = cpuSeconds(pid), time.monotonic()
    [account] = stored
    errors = fetchAndDelete(server, account, stored[account], context)
    wall = time.monotonic() - t0
    cpu = cpuSeconds(pid) - cpu0
    peak = sampler.stop() if sampler is not None else memory(pid)["VmHWM"]
    return dict(
        mem_base=base, peak=peak, growth=peak - base, wall=wall, cpu=cpu, errors=errors
    )


def measureIdle(server, params: dict, stored, context) -> dict:
    pid = server.pid()
    base = currentMemory(server)
    cpu0, t0 = cpuSeconds(pid), time.monotonic()
    errors: list[str] = []
    lock = threading.Lock()

    def open(account: str):
        try:
            return login(server, account, context)
        except (OSError, poplib.error_proto) as e:
            with lock:
                errors.append(f"{account}: {e}")
            return None

    with ThreadPoolExecutor(50) as pool:
        sessions = [s for s in pool.map(open, sorted(stored)) if s is not None]
    openWall = time.monotonic() - t0
    cpuLogin = cpuSeconds(pid) - cpu0
    time.sleep(2)  # as bench/run.py: let the server settle, all sessions open
    held = currentMemory(server)
    rss = treePss(pid) if server.multiProcess() else held

    def close(client: poplib.POP3) -> bool:
        try:
            client.noop()
            client.quit()
            return True
        except (OSError, poplib.error_proto):
            return False

    with ThreadPoolExecutor(50) as pool:
        alive = sum(pool.map(close, sessions))
    if alive != len(stored):
        errors.append(f"{alive} of {len(stored)} sessions answered NOOP")
    n = max(1, len(sessions))
    return dict(
        held=len(sessions),
        alive=alive,
        open_wall=openWall,
        cpu_login=cpuLogin,
        mem_base=base,
        mem_held=held,
        pss_held=rss,
        per_session=(held - base) / n,
        errors=errors,
    )


def measureLMTP(server, params: dict, stored, context) -> dict:
    accounts = sorted(stored)
    total, connections = params["messages"], params["connections"]
    errors: list[str] = []
    lock = threading.Lock()

    def deliverMany(c: int) -> None:
        try:
            client = smtplib.LMTP("127.0.0.1", server.lmtpPort, timeout=300)
            client.ehlo("core.bench.invalid")  # LHLO
            for i in range(c, total, connections):
                rcpt = f"{accounts[i % len(accounts)]}@{DOMAIN}"
                refused = client.sendmail(
                    "core@digipoort.invalid", [rcpt], messageBytes(i, params["size"])
                )
                if refused:
                    raise smtplib.SMTPException(f"refused {refused}")
            client.quit()
        except (OSError, smtplib.SMTPException) as e:
            with lock:
                errors.append(f"connection {c}: {e}")

    pid = server.pid()
    cpu0, t0 = cpuSeconds(pid), time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(deliverMany, range(connections)))
    wall = time.monotonic() - t0
    cpu = cpuSeconds(pid) - cpu0
    stored = messageFiles(server.mailboxes)
    if stored != total:
        errors.append(f"{stored} message files on disk, {total} delivered")
    return dict(
        messages=total, rate=total / wall, wall=wall, cpu_per_msg=cpu / total
    ) | {"errors": errors}


MEASURE = {
    "fetch": measureFetch,
    "big": measureBig,
    "idle": measureIdle,
    "lmtp": measureLMTP,
}
METRICS = {
    "fetch": [
        ("rate", "msgs/s fetched and deleted", "/s", "higher"),
        ("cpu_per_msg", "server CPU per message", "ms", "lower"),
        ("wall", "wall time", "s", "lower"),
    ],
    "big": [
        ("peak", "server peak memory", "MB", "lower"),
        ("growth", "... over the memory before the session", "MB", "lower"),
        ("mem_base", "server memory before", "MB", "lower"),
        ("wall", "wall time of the session", "s", "lower"),
        ("cpu", "server CPU", "s", "lower"),
    ],
    "idle": [
        ("held", "sessions held", "", None),
        ("per_session", "memory per idle session", "KB", "lower"),
        ("mem_held", "server memory while holding", "MB", "lower"),
        ("mem_base", "server memory before", "MB", "lower"),
        ("open_wall", "time to open and log in all", "s", "lower"),
        ("cpu_login", "server CPU to open and log in all", "s", "lower"),
    ],
    "lmtp": [
        ("rate", "msgs/s delivered", "/s", "higher"),
        ("cpu_per_msg", "server CPU per message", "ms", "lower"),
        ("wall", "wall time", "s", "lower"),
    ],
}


def runOnce(cls, key: str, params: dict, args, cert: str, keyFile: str) -> dict:
    work = tempfile.mkdtemp(prefix=f"pop3bench-{key}-{cls.name}-", dir=args.tmp)
    server = cls(work, cert, keyFile, cheap=params.get("cheap_login", False))
    try:
        stored = fillMailboxes(server.mailboxes, params)
        server.start(params["accounts"])
        return MEASURE[key](server, params, stored, clientContext(cert))
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"    (kept {work})", file=sys.stderr)


def ratio(results: dict, metric: str) -> str:
    values = {
        name: statistics.median(r[metric] for r in runs)
        for name, runs in results.items()
        if runs
    }
    if "MSA" not in values or not values.get("Dovecot"):
        return "-"
    return f"{values['MSA'] / values['Dovecot']:.2f}"


def report(allResults: dict, scenarios: dict) -> str:
    lines = []
    for key, results in allResults.items():
        desc = ", ".join(f"{k}={v}" for k, v in scenarios[key].items())
        lines += [
            f"### {key}: {TITLES[key]}  \n`{desc}`\n",
            "| metric | MSA | Dovecot | MSA/Dovecot |",
            "|---|---|---|---|",
        ]
        for metric, label, unit, better in METRICS[key]:
            shown = f"{label} ({unit})" if unit else label
            note = f" ({better} is better)" if better else ""
            cells = [
                summary(results.get(n, []), metric, unit) for n in ("MSA", "Dovecot")
            ]
            lines.append(
                f"| {shown} | {' | '.join(cells)} | {ratio(results, metric)}{note} |"
            )
        lines.append("")
    return "\n".join(lines)


def machine(tmp: str) -> str:
    version = subprocess.run(
        ["dovecot", "--version"], capture_output=True, text=True
    ).stdout.strip()
    return "\n".join(
        [
            run.versions(tmp, SERVERS).split("\n- OpenSSL")[0],
            f"- Dovecot {version}; clients: Python {sys.version.split()[0]} poplib, "
            f"smtplib.LMTP, OpenSSL {ssl.OPENSSL_VERSION}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-s", "--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tmp", default=None, help="where the work directories go")
    parser.add_argument("--keep", action="store_true", help="keep work directories")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results")
    args = parser.parse_args()
    missing = dovecotMissing()
    if missing:
        print(f"pop3bench: {missing}", file=sys.stderr)
        return 2
    scenarios = QUICK if args.quick else SCENARIOS
    if args.quick:
        args.repeat = 1
    chosen = args.scenario or list(SCENARIOS)
    certDir = tempfile.mkdtemp(prefix="pop3bench-cert-", dir=args.tmp)
    cert, keyFile = ensureSelfSignedCertificate(certDir, "localhost")
    allResults: dict = {}
    failed = False
    print(machine(certDir), file=sys.stderr)
    try:
        for key in chosen:
            results: dict = {cls.name: [] for cls in SERVERS}
            for rep in range(args.repeat):
                for cls in SERVERS:
                    r = runOnce(cls, key, scenarios[key], args, cert, keyFile)
                    results[cls.name].append(r)
                    failed = failed or bool(r["errors"])
                    shown = ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()
                        if k != "errors"
                    )
                    print(
                        f"  [{key} #{rep + 1}] {cls.name}: {shown}, "
                        f"errors={r['errors'][:3]}",
                        file=sys.stderr,
                        flush=True,
                    )
            allResults[key] = results
    finally:
        shutil.rmtree(certDir, ignore_errors=True)
    print(machine(args.tmp or tempfile.gettempdir()))
    print()
    print(report(allResults, scenarios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scenarios": scenarios, "results": allResults}, f, indent=1)
    if failed:
        print("pop3bench: some runs had errors; the results are not valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
