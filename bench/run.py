"""
Benchmark of the MSA against aiosmtpd and Postfix on the same work.

Every server runs as its own process(es) on loopback with the same ECDSA
P-256 self-signed certificate (STARTTLS, TLS 1.2 minimum), is driven by the
same load generator (``bench/loadgen.py``, its own process: connect,
STARTTLS, EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT) and, in relay mode,
relays to the same kind of sink (``bench/sink.py``, asyncio, STARTTLS and
PIPELINING, a
fresh one per run, counting messages in memory):

  MSA       ``twistd -n digipoort-msa`` from a generated TOML file; relay
            mode: ``[relay] host/port`` = the sink, ``ca_file`` = the
            certificate (verified), concurrency 4 (its default).
  aiosmtpd  ``bench/peer_aiosmtpd.py``: one spool file per message (file +
            directory fsync before the 250); relay mode: 4 workers with
            reused STARTTLS connections (certificate verified) send each
            file to the sink and remove it (directory fsync) after the
            sink's 250.
  Postfix   (when ``/usr/sbin/postfix`` is installed, e.g. ``apt-get install
            postfix``; otherwise the column is skipped with the reason
            printed) a throwaway instance in a temp dir (``postfix -c DIR
            start-fg``, its own main.cf/master.cf, smtpd on a loopback port,
            smtpd_tls with the same certificate, SASL through Cyrus sasldb
            (``saslpasswd2 -f DIR/sasldb2``) or Dovecot when ``--postfix-sasl
            dovecot``), relayhost = the sink over STARTTLS, 4 connections.
  MSA x2    (``--servers msa,msa2``; not in the default list) two MSA
            instances behind HAProxy (TCP, round robin, send-proxy-v2), each
            with its own state directory and spool and relaying on its own:
            README.rst's "Running more than one instance" on one host.
  MSA workers=2  (``--servers msa,msaw``; not in the default list) one MSA
            with ``[server] workers = 2``: two processes accepting on the
            same sockets, each with its own spool and relay, their limits
            kept by worker 0 (``msaw-redis``: in a Redis started beside
            them, its CPU and memory counted with the tree).

Password checks cost the same on every side: the MSA caches successful
PLAIN/LOGIN checks for ``[accounts] auth_cache_ttl`` (300 s); the peer has the
same cache (HMAC-keyed dict with a TTL, concurrent identical checks sharing
one scrypt); Postfix's sasldb check is a cheap lookup.  The ``nocache``
scenario is the exception, labelled as such: the MSA with
``accounts.auth_cache_ttl=0`` and the peer uncached, an scrypt (~40 ms of CPU)
on every login; Postfix does not take part in it.

Scenarios (``-s NAME``, repeatable; default all; relay mode unless said):

  relay     MAIN. C=50, 10 KB, 1 message per connection, a 2000-message
            burst: accepted msgs/s (first connect to last 250), server CPU per
            message (until the sink has every message), time until the sink
            has every message, and the lag after the last 250 (the queue left
            behind; target: empty within 2 s).
  outbox    the same load with no relay (MSA: outbox directory; aiosmtpd:
            spool file kept; Postfix: n/a).  Target: relay within 10%.
  a         C=50, 10 KB, 1 message per connection, N=1000.
  a1        C=1, 10 KB, N=200: latency p50/p99 (connect to the 250).
  b         C=50, 10 KB, 20 messages per connection, N=2000.
  size-1k, size-10k, size-100k, size-1m
            the size sweep: C=20, 1 message per connection.
  big       one 50 MB message: peak RSS and CPU, until the sink has it.
  idle      1000 idle authenticated connections held: RSS (and PSS).
  drain     a backlog of 2000 10 KB messages queued while the sink is down
            (MSA: the first attempts fail and wait an hour, and the release
            waits until every message has had one; aiosmtpd: relay
            held; Postfix: defer_transports = smtp, lifted with postconf and
            a reload once every message is deferred, before the timing
            starts), then the sink starts and the queue is released (MSA:
            ``flush`` on its control socket, what ``digipoort-msa-admin
            queue flush`` sends; aiosmtpd: SIGUSR1; Postfix: ``postqueue
            -f``): msgs/s from the release until the sink has every message.
  nocache   (extra, labelled) as ``a`` with scrypt on every login: MSA
            ``auth_cache_ttl=0``, aiosmtpd ``--auth-cache-ttl 0``.

Each scenario runs ``--repeat`` times (default 3), the servers alternated
and their order rotated each round (MSA, aiosmtpd, Postfix; aiosmtpd,
Postfix, MSA; ...), each run on a fresh server, sink and directory, after
an ``os.sync()`` (no run pays for the write-back of the one before); the
report gives the median and [min-max] of each metric.  The
machine (nproc, CPU, kernel, load average, file system of the temp dir) and
the versions are printed with the results.

Measured from ``/proc``: server CPU = utime+stime(+cutime+cstime) summed over
the server's process tree (Postfix is many processes), and for the one-process
servers split by thread (``bench/threadcpu.py``: the event-loop thread, i.e.
the MSA's reactor, against the others, i.e. its thread pool); peak memory = VmHWM
for a single-process server, and for Postfix the peak of the summed PSS of
its processes, sampled every 0.2 s.

Usage::

    .venv/bin/python bench/run.py                  # everything, 3 repetitions
    .venv/bin/python bench/run.py --quick          # everything small, 1 repetition
    .venv/bin/python bench/run.py -s relay -s drain --repeat 5
    .venv/bin/python bench/run.py --servers msa,aiosmtpd    # no Postfix
    .venv/bin/python bench/run.py --profile cprofile -s relay   # MSA only, profiled
    .venv/bin/python bench/run.py --profile py-spy --py-spy /path/to/py-spy
    .venv/bin/python bench/run.py --syscalls       # + file-system calls per message
    .venv/bin/python bench/run.py -s relay --strace       # every syscall (slow)
    .venv/bin/python bench/run.py -s relay -s a --servers msa,msa-noaudit
    git worktree add /tmp/before HEAD~1 && \
        .venv/bin/python bench/run.py -s relay --servers msa,msa@/tmp/before

Exits non-zero when any session had an error or a sink did not get every
message (the run is then not valid); target misses are reported, not fatal,
unless ``--strict``.
"""

import argparse
import collections
import json
import os
import platform
import pstats
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import attrs  # noqa: E402
from threadcpu import BurstWindow, ThreadSplit  # noqa: E402  (bench/, the script's directory)

from msa.accounts.model import makeAccount, writeAccounts  # noqa: E402
from msa.service.config import writeConfig  # noqa: E402
from msa.service.controlsocket import SOCKET_NAME, request  # noqa: E402
from msa.tls import ensureSelfSignedCertificate  # noqa: E402
from tests.postfixserver import ThrowawayPostfix  # noqa: E402
from tests.postfixserver import postfixMissing as throwawayPostfixMissing  # noqa: E402

PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)
TWISTD = os.path.join(BIN, "twistd")
USER, PASSWORD = "bench", "bench-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB = 1024
MB = 1024 * 1024


def load(c, n, size=10 * KB, m=1, mode="relay", **extra) -> dict:
    return dict(
        concurrency=c, messages=n, size=size, per_connection=m, mode=mode, **extra
    )


FULL = {
    "relay": load(50, 2000),
    "outbox": load(50, 2000, mode="outbox"),
    "a": load(50, 1000),
    "a1": load(1, 200),
    "b": load(50, 2000, m=20),
    "size-1k": load(20, 1000, size=KB),
    "size-10k": load(20, 1000, size=10 * KB),
    "size-100k": load(20, 500, size=100 * KB),
    "size-1m": load(20, 100, size=MB),
    "big": load(1, 1, size=50_000_000),
    "idle": dict(concurrency=50, idle=1000, mode="relay"),
    "drain": load(50, 2000, m=20, drain=True),
    "nocache": load(50, 1000, nocache=True),
}
QUICK = {
    "relay": load(50, 200),
    "outbox": load(50, 200, mode="outbox"),
    "a": load(50, 200),
    "a1": load(1, 40),
    "b": load(50, 300, m=20),
    "size-1k": load(20, 100, size=KB),
    "size-10k": load(20, 100, size=10 * KB),
    "size-100k": load(20, 60, size=100 * KB),
    "size-1m": load(10, 20, size=MB),
    "big": load(1, 1, size=50_000_000),
    "idle": dict(concurrency=50, idle=200, mode="relay"),
    "drain": load(50, 200, m=20, drain=True),
    "nocache": load(50, 100, nocache=True),
}
TITLES = {
    "relay": "MAIN: relay mode, C=50, 10 KB, 1 message/connection (burst)",
    "outbox": "outbox mode (no relay), C=50, 10 KB, 1 message/connection",
    "a": "(a) C=50, 10 KB, 1 message/connection",
    "a1": "(a1) C=1, 10 KB (latency)",
    "b": "(b) C=50, 10 KB, 20 messages/connection",
    "size-1k": "size sweep: 1 KB",
    "size-10k": "size sweep: 10 KB",
    "size-100k": "size sweep: 100 KB",
    "size-1m": "size sweep: 1 MB",
    "big": "one 50 MB message (peak memory, CPU)",
    "idle": "idle authenticated connections (memory)",
    "drain": "drain of a queued backlog (10 KB) once the sink is up",
    "nocache": "EXTRA, NOT LIKE FOR LIKE IN POLICY: (a) with an uncached scrypt "
    "on every login (MSA auth_cache_ttl=0, aiosmtpd uncached)",
}


# -- /proc -----------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def tree(pid: int) -> list[int]:
    """
    C{pid} and its descendants.
    """
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                children[int(_stat(int(name))[1])].append(int(name))
            except (OSError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpuSeconds(pid: int) -> float:
    """
    utime+stime+cutime+cstime summed over the process tree of C{pid}: the
    CPU of every process of the server, live or already reaped.
    """
    total = 0
    for p in tree(pid):
        try:
            fields = _stat(p)
        except OSError:
            continue
        # fields[0] is field 3 (state); fields 14-17 are utime..cstime.
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def memory(pid: int) -> dict:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def treePss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class PeakSampler:
    """
    The peak of the summed PSS of a process tree (for the servers of more
    than one process): sampled every 0.2 s in a thread, which misses a
    short peak (a login's scrypt takes 16 MB for about 50 ms), so also
    bounded from the processes' own high-water marks: the tree's PSS at the
    start plus each process's growth from its resident size at the start
    to its peak (C{VmHWM}, reset at the start through C{clear_refs}).  The
    larger of the two.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rssAtStart: dict[int, int] = {}
        for p in tree(pid):
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current VmRSS
                self.rssAtStart[p] = memory(p)["VmRSS"]
            except (OSError, KeyError):
                pass
        self.pssAtStart = treePss(pid)
        self.peak = self.pssAtStart
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.peak = max(self.peak, treePss(self.pid))

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join()
        growth = 0
        for p, rss in self.rssAtStart.items():
            try:
                growth += max(0, memory(p)["VmHWM"] - rss)
            except (OSError, KeyError):
                pass
        return max(self.peak, treePss(self.pid), self.pssAtStart + growth)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout} s")


def stopProcess(proc: subprocess.Popen | None, sig=signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -- the sink -----------------------------------------------------------------

#: --sink-no-pipelining: options for every sink
SINK_OPTIONS: list[str] = []


class Sink:
    """
    C{bench/sink.py} in its own process; L{count} asks it how many
    messages it has.
    """

    def __init__(self, port: int, cert: str, key: str) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(HERE, "sink.py"), "--port", str(port)]
            + ["--cert", cert, "--key", key]
            + SINK_OPTIONS,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if not self.proc.stdout.readline().startswith("READY"):
            raise RuntimeError("sink did not start")

    def count(self) -> int:
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def waitFor(self, n: int, timeout: float) -> float | None:
        """
        @return: the monotonic time at which the sink had C{n} messages, or
            L{None} after C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return time.monotonic()
            time.sleep(0.01)
        return None

    def stop(self) -> None:
        stopProcess(self.proc)


# -- servers ----------------------------------------------------------------


class Server:
    name = ""
    #: the modes (relay, outbox) this server can run in
    modes: tuple[str, ...] = ("relay", "outbox")
    #: the thread running the event loop, when not the main thread
    loopThread: int | None = None

    def prepareRelease(self, queued: int) -> None:
        """
        Whatever must change before the queue can be released (not timed):
        the drain is timed from L{release} alone.
        """

    def __init__(self, work: str, cert: str, key: str, args) -> None:
        self.work = work
        self.cert, self.key = cert, key
        self.args = args
        self.env = serverEnv(args)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def pid(self) -> int:
        return self.proc.pid

    def multiProcess(self) -> bool:
        return False

    def stop(self) -> None:
        stopProcess(self.proc)


class MSA(Server):
    name = "MSA"
    #: the checkout whose C{msa} package runs (C{msa@PATH}: another one)
    root = ROOT

    def start(self, params: dict, sinkPort: int | None, profile: str | None = None):
        self.state = os.path.join(self.work, "msa-state")
        self.port, self.config = self.configure(
            self.state, os.path.join(self.work, "msa.toml"), params, sinkPort
        )
        command = [TWISTD, "-n", "--pidfile=", "--logfile"]
        command.append(os.path.join(self.work, "msa.log"))
        if profile:
            command += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        command += ["digipoort-msa", "--config", self.config]
        self.proc = subprocess.Popen(
            command,
            cwd=self.work,
            env=dict(os.environ, PYTHONPATH=self.root, **self.env),
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.work, "msa.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        waitForPort(self.port, self.proc)

    def configure(
        self, state: str, path: str, params: dict, sinkPort: int | None, proxy=False
    ) -> tuple[int, str]:
        """
        Write the configuration of one instance (state directory C{state})
        to C{path}; with C{proxy}, its listeners take a PROXY header.

        @return: the port the load goes to, and C{path}.
        """
        os.makedirs(state, mode=0o700, exist_ok=True)
        starttlsPort, implicitPort = freePort(), freePort()
        port = implicitPort if self.args.implicit else starttlsPort
        prefix = "haproxy:" if proxy else ""
        accounts = os.path.join(self.work, "accounts.json")
        account = attrs.evolve(
            makeAccount(USER, PASSWORD, ["localhost"]),
            extra={"senders": ["@mijnbedrijf.nl"]},
        )
        writeAccounts(accounts, {USER: account})
        os.chmod(accounts, 0o600)
        config = {
            "server": {
                "hostname": "localhost",
                "state_dir": state,
                "starttls_listeners": [
                    f"{prefix}tcp:{starttlsPort}:interface=127.0.0.1"
                ],
                "implicit_tls_listeners": [
                    f"{prefix}tcp:{implicitPort}:interface=127.0.0.1"
                ],
                "max_connections": 5000,
                "max_connections_per_client": 5000,
                "shutdown_grace": 1,
            },
            "tls": {"certificate": self.cert, "key": self.key},
            "accounts": {"file": accounts},
        }
        options = list(self.args.msa_option or [])
        if sinkPort is not None:
            options = [
                'relay.host="127.0.0.1"',
                f"relay.port={sinkPort}",
                'relay.server_name="localhost"',
                f"relay.ca_file={json.dumps(self.cert)}",
            ] + options
            if params.get("drain"):
                options += ["relay.retry_base=3600", "relay.retry_max=3600"]
        if params.get("nocache"):
            options.append("accounts.auth_cache_ttl=0")
        for item in options:
            key, _, value = item.partition("=")
            section, _, name = key.partition(".")
            config.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
        writeConfig(path, config)
        return port, path

    def delivered(self) -> int:
        try:
            outbox = os.path.join(self.state, "outbox")
            return sum(1 for n in os.listdir(outbox) if n.endswith(".eml"))
        except FileNotFoundError:
            return 0

    def controlSockets(self) -> list[str]:
        return [os.path.join(self.state, SOCKET_NAME)]

    def prepareRelease(self, queued: int) -> None:
        """
        Wait until every queued message has had its first attempt (failed:
        the sink is down) and none is in flight, so that the drain is of
        deferred messages only: a message still waiting for its first
        attempt at the release would be delivered without the flush, and
        one in flight then would be deferred for an hour after it.
        """
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            entries = [e for s in self.controlSockets() for e in request(s, "list")]
            if len(entries) >= queued and all(
                e["attempts"] >= 1 and not e["inFlight"] for e in entries
            ):
                return
            time.sleep(0.2)
        raise RuntimeError("the backlog's first attempts did not end in 600 s")

    def release(self) -> None:
        # What `digipoort-msa-admin queue flush` sends, without the start of
        # a Python program (0.35-0.45 s) that postqueue -f or the peer's
        # SIGUSR1 do not pay.
        for path in self.controlSockets():
            request(path, "flush")


class MSANoAudit(MSA):
    """
    The MSA with C{[audit] enabled = false}: beside L{MSA} in the same
    alternated run, the audit log's cost as measured.
    """

    name = "MSA no audit"

    def configure(self, state, path, params, sinkPort, proxy=False):
        self.args = argparse.Namespace(**vars(self.args))
        self.args.msa_option = [*(self.args.msa_option or []), "audit.enabled=false"]
        return super().configure(state, path, params, sinkPort, proxy)


class MSANoDelay(MSA):
    """
    The MSA with C{[spool] commit_delay = 0}: beside L{MSA} in the same
    alternated run, what the commit delay costs and saves (fsyncs per
    message, latency, throughput).  Not in the default C{--servers}.
    """

    name = "MSA no commit delay"

    def configure(self, state, path, params, sinkPort, proxy=False):
        self.args = argparse.Namespace(**vars(self.args))
        self.args.msa_option = [*(self.args.msa_option or []), "spool.commit_delay=0"]
        return super().configure(state, path, params, sinkPort, proxy)


def msaVariant(option: str, base: type[MSA] | None = None) -> type[MSA]:
    """
    The MSA (or C{base}, an MSA column's class) with C{option}
    (C{SECTION.KEY=VALUE}, as C{--msa-option}) on top of the others:
    C{--servers msa,msa+spool.commit_delay=0.05}, C{msaw+...}.
    """
    base = base or MSA

    class Variant(base):
        name = f"{base.name} {option}"

        def configure(self, state, path, params, sinkPort, proxy=False):
            self.args = argparse.Namespace(**vars(self.args))
            self.args.msa_option = [*(self.args.msa_option or []), option]
            return super().configure(state, path, params, sinkPort, proxy)

    return Variant


def msaCheckout(path: str, base: type[MSA] | None = None) -> type[MSA]:
    """
    The MSA of another checkout (C{--servers msa,msa@/tmp/old}, e.g. a
    C{git worktree} of the commit before a change): the two versions side
    by side in the same alternated run.  C{msaw@PATH}: with workers
    (L{MSAWorkers}).
    """
    root = os.path.abspath(path)
    try:
        revision = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = os.path.basename(root)

    base = MSA if base is None else base

    class Checkout(base):  # type: ignore[valid-type,misc]
        name = f"{base.name}@{revision}"

    Checkout.root = root
    return Checkout


def shellTree(server: MSA, script: str) -> subprocess.Popen:
    """
    The processes of C{script} under one shell in a session of their own
    (stopped together by L{stopShellTree}), in the server's directory and
    environment, their output in C{msa.out}.
    """
    return subprocess.Popen(
        ["sh", "-c", script],
        cwd=server.work,
        env=dict(os.environ, PYTHONPATH=server.root, **server.env),
        stdin=subprocess.DEVNULL,
        stdout=open(os.path.join(server.work, "msa.out"), "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stopShellTree(proc: subprocess.Popen | None) -> None:
    """
    SIGTERM to every process of a L{shellTree}, SIGKILL 30 s later.
    """
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class MSAPair(MSA):
    """
    Two MSA instances on this machine behind HAProxy (TCP mode, round
    robin, C{send-proxy-v2}), as README.rst "Running more than one
    instance" describes: one state directory and spool each, the same
    certificate and accounts file, each relaying to the sink on its own.
    The three processes run under one shell, so that CPU and memory are
    those of the whole tree.  Not in the default C{--servers}.
    """

    name = "MSA x2"

    def start(self, params: dict, sinkPort: int | None, profile: str | None = None):
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise RuntimeError("MSA x2 needs haproxy (apt-get install haproxy)")
        self.instances = []
        for i in (1, 2):
            state = os.path.join(self.work, f"msa{i}-state")
            port, config = self.configure(
                state, os.path.join(self.work, f"msa{i}.toml"), params, sinkPort, True
            )
            self.instances.append((state, port, config))
        self.state, self.config = self.instances[0][0], self.instances[0][2]
        self.port = freePort()
        cfg = os.path.join(self.work, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(
                "global\n  maxconn 6000\n  nbthread 1\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 300s\n  timeout server 300s\n"
                f"frontend submission\n  bind 127.0.0.1:{self.port}\n"
                "  maxconn 6000\n  default_backend msa\n"
                "backend msa\n  balance roundrobin\n"
                + "".join(
                    f"  server msa{i} 127.0.0.1:{port} send-proxy-v2\n"
                    for i, (_, port, _) in enumerate(self.instances)
                )
            )
        commands = [
            shlex.join(
                [
                    TWISTD,
                    "-n",
                    "--pidfile=",
                    "--logfile",
                    os.path.join(self.work, f"msa{i}.log"),
                ]
                + ["digipoort-msa", "--config", config]
            )
            for i, (_, _, config) in enumerate(self.instances, 1)
        ] + [shlex.join([haproxy, "-db", "-f", cfg])]
        self.proc = shellTree(self, " & ".join(commands) + " & wait")
        for _, port, _ in self.instances:
            waitForPort(port, self.proc)
        waitForPort(self.port, self.proc)

    def multiProcess(self) -> bool:
        return True

    def stop(self) -> None:
        stopShellTree(self.proc)

    def delivered(self) -> int:
        total = 0
        for state, _, _ in self.instances:
            try:
                outbox = os.path.join(state, "outbox")
                total += sum(1 for n in os.listdir(outbox) if n.endswith(".eml"))
            except FileNotFoundError:
                pass
        return total

    def controlSockets(self) -> list[str]:
        return [os.path.join(state, SOCKET_NAME) for state, _, _ in self.instances]


class MSAWorkers(MSA):
    """
    One MSA with C{[server] workers = WORKERS} (L{msa.service.workers}):
    worker 0 and the others it starts, accepting on the same listening
    sockets, each with its own spool and relaying on its own, their limits
    kept by worker 0 (or, C{msaw-redis}, in a Redis started beside them).
    The processes run under one shell, so that CPU and memory are those of
    the whole tree, Redis's included.  Not in the default C{--servers}.
    """

    workers = 2
    name = f"MSA workers={workers}"
    #: Whether the limits are in a Redis started beside it (C{msaw-redis}),
    #: or kept by worker 0 (the default, C{backend = "memory"}).
    redis = False

    def start(self, params: dict, sinkPort: int | None, profile: str | None = None):
        self.args = argparse.Namespace(**vars(self.args))
        self.args.msa_option = [
            *(self.args.msa_option or []),
            f"server.workers={self.workers}",
        ]
        redisCommand = None
        if self.redis:
            redis = shutil.which("redis-server")
            if redis is None:
                raise RuntimeError(
                    "msaw-redis needs redis-server (apt-get install redis)"
                )
            redisPort = freePort()
            self.args.msa_option += [
                'limits.backend="redis"',
                f'limits.url="redis://127.0.0.1:{redisPort}/0"',
            ]
            redisCommand = [redis, "--port", str(redisPort), "--bind", "127.0.0.1"]
            redisCommand += ["--save", "", "--appendonly", "no"]
        self.state = os.path.join(self.work, "msa-state")
        self.port, self.config = self.configure(
            self.state, os.path.join(self.work, "msa.toml"), params, sinkPort
        )
        twistd = [TWISTD, "-n", "--pidfile=", "--logfile"]
        twistd += [os.path.join(self.work, "msa.log")]
        twistd += ["digipoort-msa", "--config", self.config]
        script = f"{shlex.join(twistd)} & wait"
        if redisCommand is not None:
            script = f"{shlex.join(redisCommand)} & sleep 0.3; {script}"
        self.proc = shellTree(self, script)
        waitForPort(self.port, self.proc)
        # Every worker listening: each has its control socket.
        deadline = time.monotonic() + 30
        while not all(os.path.exists(p) for p in self.controlSockets()):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start in 30 s")
            time.sleep(0.1)

    def multiProcess(self) -> bool:
        return True

    def stop(self) -> None:
        stopShellTree(self.proc)

    def controlSockets(self) -> list[str]:
        return [os.path.join(self.state, SOCKET_NAME)] + [
            os.path.join(self.state, "workers", str(n), SOCKET_NAME)
            for n in range(1, self.workers)
        ]


class MSAWorkersRedis(MSAWorkers):
    """
    L{MSAWorkers} with its limits in a Redis started beside it (C{[limits]
    backend = "redis"}), counted in its CPU and memory (C{msaw-redis}).
    """

    redis = True
    name = f"MSA workers={MSAWorkers.workers}+Redis"


def msaWorkers(count: int) -> type[MSAWorkers]:
    """
    L{MSAWorkers} with C{count} workers (C{--servers msa,msaw3}).
    """

    class Workers(MSAWorkers):
        workers = count
        name = f"MSA workers={count}"

    return Workers


class Peer(Server):
    name = "aiosmtpd"

    def start(self, params: dict, sinkPort: int | None, profile=None) -> None:
        self.port = freePort()
        self.spool = os.path.join(self.work, "peer-spool")
        command = [
            PYTHON,
            os.path.join(HERE, "peer_aiosmtpd.py"),
            "--port", str(self.port),
            "--cert", self.cert,
            "--key", self.key,
            "--dir", self.spool,
            "--user", USER,
            "--password", PASSWORD,
            "--log", os.path.join(self.work, "peer.log"),
        ]  # fmt: skip
        if self.args.implicit:
            command.append("--implicit")
        if params.get("nocache"):
            command += ["--auth-cache-ttl", "0"]
        if sinkPort is not None:
            command += ["--relay-port", str(sinkPort), "--relay-ca", self.cert]
            if params.get("drain"):
                command.append("--relay-held")
        self.proc = subprocess.Popen(
            command,
            cwd=self.work,
            env=dict(os.environ, **self.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(self.work, "peer.err"), "wb"),
        )
        line = self.proc.stdout.readline()
        if not line.startswith(b"READY"):
            raise RuntimeError(f"peer did not start: {line!r}")
        self.loopThread = int(line.split()[2])
        waitForPort(self.port, self.proc)

    def delivered(self) -> int:
        try:
            return sum(1 for n in os.listdir(self.spool) if n.endswith(".eml"))
        except FileNotFoundError:
            return 0

    def release(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)


def postfixMissing(args) -> str | None:
    """
    Why the Postfix column cannot run here, or L{None}.
    """
    if args.postfix_sasl == "dovecot" and not os.path.exists("/usr/sbin/dovecot"):
        return "dovecot missing (apt-get install dovecot-core)"
    return throwawayPostfixMissing(cyrus=args.postfix_sasl == "cyrus")


class Postfix(Server):
    """
    A throwaway Postfix: C{postfix -c DIR/etc start-fg} with its own
    main.cf/master.cf, queue and data directories under the temp dir; smtpd
    on a loopback port with the bench certificate (STARTTLS required, AUTH
    only over TLS), SASL through Cyrus sasldb in the temp dir; everything
    relayed to the sink over STARTTLS (smtp_tls_security_level = secure, the
    certificate verified for localhost),
    4 connections at a time, cached for reuse.
    """

    name = "Postfix"
    modes = ("relay",)

    def multiProcess(self) -> bool:
        return True

    def start(self, params: dict, sinkPort: int | None, profile=None) -> None:
        settings = {
            "message_size_limit": "52428800",
            "mailbox_size_limit": "0",
            "default_process_limit": "5000",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_event_limit_exceptions": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{sinkPort}",
            # Verified like the MSA's relay: the sink's certificate against
            # the CA file, for the name localhost.
            "smtp_tls_security_level": "secure",
            "smtp_tls_secure_cert_match": "localhost",
            "smtp_tls_CAfile": self.cert,
            "smtp_tls_loglevel": "0",
            "default_destination_concurrency_limit": "4",
            "smtp_destination_concurrency_limit": "4",
            "initial_destination_concurrency": "4",
            "smtp_connection_cache_on_demand": "yes",
            "smtp_connection_reuse_count_limit": "100",
        }
        if params.get("drain"):
            settings["defer_transports"] = "smtp relay"
        account: tuple[str, str] | None = (USER, PASSWORD)
        if self.args.postfix_sasl == "dovecot":
            sasl = os.path.join(self.work, "etc", "sasl")
            os.makedirs(sasl, exist_ok=True)
            settings["smtpd_sasl_type"] = "dovecot"
            settings["smtpd_sasl_path"] = self.startDovecot(sasl)
            account = None
        os.chmod(self.work, 0o755)
        self.postfix = ThrowawayPostfix(
            self.work, freePort(), self.cert, self.key, settings, account
        )
        self.port = self.postfix.port
        self.postfix.start(self.env)
        self.proc = self.postfix.process

    def startDovecot(self, directory: str) -> str:
        # Dovecot as the SASL server: a passwd-file with the password in
        # PLAIN scheme (a cheap check, as Cyrus sasldb), its auth socket in
        # the temp dir.  (Untested here: the machine had no dovecot.)
        users = os.path.join(directory, "users")
        with open(users, "w") as f:
            f.write(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        conf = os.path.join(directory, "dovecot.conf")
        socketPath = os.path.join(directory, "auth")
        with open(conf, "w") as f:
            f.write(
                f"base_dir = {directory}/run\nprotocols =\n"
                "auth_mechanisms = plain login\n"
                f"passdb {{\n  driver = passwd-file\n  args = {users}\n}}\n"
                "service auth {\n"
                f"  unix_listener {socketPath} {{\n    mode = 0666\n  }}\n}}\n"
                f"log_path = {directory}/dovecot.log\n"
            )
        self.dovecot = subprocess.Popen(
            ["/usr/sbin/dovecot", "-F", "-c", conf], stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while not os.path.exists(socketPath) and time.monotonic() < deadline:
            time.sleep(0.05)
        return socketPath

    def prepareRelease(self, queued: int) -> None:
        """
        Wait until the backlog is in the deferred queue, then lift
        C{defer_transports} and reload: the deferred messages wait for
        their retry time (minutes) or a flush, so that L{release} is
        C{postqueue -f} alone.
        """
        deferred = os.path.join(self.work, "queue", "deferred")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            count = sum(len(files) for _, _, files in os.walk(deferred))
            if count >= queued:
                break
            time.sleep(0.1)
        self.postfix.postconf("-X", "defer_transports")
        self.postfix.reload()
        time.sleep(2)  # the reload's new qmgr

    def release(self) -> None:
        self.postfix.flush()

    def stop(self) -> None:
        self.postfix.stop()
        if getattr(self, "dovecot", None) is not None:
            stopProcess(self.dovecot)


SERVERS = {
    "msa": MSA,
    "aiosmtpd": Peer,
    "postfix": Postfix,
    "msa2": MSAPair,
    "msaw": MSAWorkers,
    "msaw-redis": MSAWorkersRedis,
    "msa-noaudit": MSANoAudit,
    "msa-nodelay": MSANoDelay,
}


# -- one measurement --------------------------------------------------------

#: Seconds after the sink has every message before the CPU and system calls
#: stop being counted: the work after the hand-off is the server's too.
SETTLE = 0.3

#: --syscalls: the file-system calls counted during load batches (perf's
#: syscall tracepoints, counted in the kernel); --strace: every system call
#: ("all" in the list), with strace -f -c
SYSCALLS: list[str] = []
COUNTED = "fsync,fdatasync,flock,openat,rename,renameat2,unlink,unlinkat,mkdir"
#: --strace: the calls shown beside the total (the loop, the sockets, locks)
BUSIEST = "epoll_wait,epoll_ctl,futex,recvfrom,sendto,read,write,getpid"


class SyscallCounter:
    """
    The system calls of every process and thread of a server during one
    batch, per message: how many fsyncs, opens, renames and unlinks it
    makes.

    C{--syscalls}: C{perf stat} on the C{syscalls:sys_enter_*} tracepoints
    of the counted calls, attached to the server's processes (threads and
    children started later are counted too: perf's counters are
    inherited).  The kernel counts; the server runs at full speed, so the
    batch's timings stand and the group commits carry what they carry in
    a run without it.

    C{--strace}: C{strace -f -c} (ptrace: every call stops the server), for
    the total and the busiest calls.  strace slows the server down by a
    factor of 5 to 10: no timings from such runs, and the group commits
    carry fewer messages than at full speed.
    """

    def __init__(self, pid: int, work: str) -> None:
        self.out = os.path.join(work, "syscalls.txt")
        if "all" in SYSCALLS:
            command = ["strace", "-f", "-qq", "-c", "-o", self.out]
            for p in tree(pid):
                command += ["-p", str(p)]
        else:
            events = ",".join(f"syscalls:sys_enter_{n}" for n in COUNTED.split(","))
            command = ["perf", "stat", "-x", ",", "-e", events, "-o", self.out]
            command += ["-p", ",".join(str(p) for p in tree(pid))]
        self.proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        time.sleep(1)

    def stop(self, messages: int) -> dict:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        with open(self.out) as f:
            counts = parseSyscallCounts(f.read(), strace="all" in SYSCALLS)
        names = COUNTED.split(",")
        if "all" in SYSCALLS:
            names += ["total", *BUSIEST.split(",")]
        return {f"sys_{name}": counts.get(name, 0) / max(1, messages) for name in names}


def parseSyscallCounts(text: str, strace: bool) -> dict[str, int]:
    """
    The calls per system call name in C{perf stat -x ,} output (C{strace}
    false: C{count,,syscalls:sys_enter_NAME,...}; C{<not counted>} is 0) or
    in C{strace -c} output (C{strace} true: the calls column; C{total} too).
    """
    counts = {}
    for line in text.splitlines():
        if strace:
            fields = line.split()
            if len(fields) >= 5 and fields[3].isdigit():
                counts[fields[-1]] = int(fields[3])
            continue
        fields = line.strip().split(",")
        if len(fields) >= 3 and fields[2].startswith("syscalls:sys_enter_"):
            name = fields[2].removeprefix("syscalls:sys_enter_")
            counts[name] = int(fields[0]) if fields[0].isdigit() else 0
    return counts


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def clientCommand(server: Server, params: dict, timeout: float) -> list[str]:
    command = [
        PYTHON,
        os.path.join(HERE, "loadgen.py"),
        "--port", str(server.port),
        "--cafile", server.cert,
        "--user", USER,
        "--password", PASSWORD,
        "--concurrency", str(params["concurrency"]),
        "--timeout", str(timeout),
    ]  # fmt: skip
    if server.args.implicit:
        command.append("--implicit")
    if "idle" in params:
        command += ["--idle", str(params["idle"])]
    else:
        command += [
            "--messages", str(params["messages"]),
            "--size", str(params["size"]),
            "--per-connection", str(params["per_connection"]),
        ]  # fmt: skip
    return command


def peakMemory(server: Server, sampler: PeakSampler | None) -> int:
    if sampler is not None:
        return sampler.stop()
    return memory(server.pid())["VmHWM"]


def currentMemory(server: Server) -> int:
    if server.multiProcess():
        return treePss(server.pid())
    return memory(server.pid())["VmRSS"]


def measureIdle(server: Server, params: dict, timeout: float) -> dict:
    pid = server.pid()
    base = currentMemory(server)
    cpu0 = cpuSeconds(pid)
    client = subprocess.Popen(
        clientCommand(server, params, timeout),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = client.stdout.readline()
    if not line.startswith("HOLDING"):
        client.kill()
        raise RuntimeError(f"load generator: {line!r}")
    time.sleep(2)  # let the server settle with all sessions open
    held = currentMemory(server)
    pss = treePss(pid)
    cpuAuth = cpuSeconds(pid) - cpu0
    client.stdin.write("release\n")
    client.stdin.flush()
    out, _ = client.communicate(timeout=timeout + 30)
    data = json.loads(out.strip().splitlines()[-1])
    if client.returncode:
        data["errors"].append(f"load generator exited with {client.returncode}")
    n = max(1, data["held"])
    return dict(
        held=data["held"],
        alive=data["alive"],
        open_wall=data["wall"],
        cpu_auth=cpuAuth,
        mem_base=base,
        mem_held=held,
        pss_held=pss,
        per_conn=(held - base) / n,
        errors=data["errors"],
    )


def measure(server: Server, params: dict, sink: Sink | None, timeout: float) -> dict:
    """
    One batch against a started server: the load generator's run, then (in
    relay mode) the wait until the sink has every message.
    """
    pid = server.pid()
    sampler = PeakSampler(pid) if server.multiProcess() else None
    time.sleep(0.5)  # let the start settle
    if "idle" in params:
        result = measureIdle(server, params, timeout)
        result["peak"] = peakMemory(server, sampler)
        return result
    base = currentMemory(server)
    counter = SyscallCounter(pid, server.work) if SYSCALLS else None
    split = None if server.multiProcess() else ThreadSplit(pid, server.loopThread)
    window = BurstWindow(None if server.multiProcess() else pid, server.loopThread)
    cpu0 = cpuSeconds(pid)
    started = time.monotonic()
    client = subprocess.run(
        clientCommand(server, params, timeout),
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout + 30,
    )
    loaded = time.monotonic()
    burst = window.stop()
    data = json.loads(client.stdout.strip().splitlines()[-1])
    if client.returncode:
        data["errors"].append(f"load generator exited with {client.returncode}")
    sent = data["sent"]
    result = dict(sent=sent, errors=data["errors"], client_cpu=data["client_cpu"])
    result.update(burst)
    cpuLoad = cpuSeconds(pid) - cpu0
    done = None
    if sink is not None:
        done = sink.waitFor(sent, timeout)
        if done is None:
            result["errors"].append(f"sink has {sink.count()} of {sent} messages")
        # What a server still does after the hand-off (the removal of the
        # delivered files, the MSA's relayed records: each gathered up to
        # 0.1 s) is counted too, on every side alike.
        time.sleep(SETTLE)
    elif isinstance(server, MSA):
        # Outbox mode: the MSA's relay runner writes the outbox after the 250;
        # wait for it, so that its CPU is counted.
        deadline = time.monotonic() + timeout
        while server.delivered() < sent and time.monotonic() < deadline:
            time.sleep(0.02)
    cpu = cpuSeconds(pid) - cpu0
    if split is not None and sent:
        loop, other = split.stop()
        result.update(
            cpu_loop_per_msg=loop / sent,
            cpu_other_per_msg=other / sent,
            loop_share=loop / (loop + other) if loop + other else None,
        )
    if counter is not None:
        result.update(counter.stop(sent))
    result.update(
        wall=data["wall"],
        rate=sent / data["wall"] if data["wall"] else 0,
        p50=percentile(data["latencies"], 50),
        p99=percentile(data["latencies"], 99),
        cpu_per_msg=cpu / sent if sent else None,
        cpu_load_per_msg=cpuLoad / sent if sent else None,
        cpu=cpu,
        mem_base=base,
        peak=peakMemory(server, sampler),
    )
    if done is not None:
        result["complete"] = done - started
        result["lag"] = max(0.0, done - loaded)
    return result


def measureDrain(server: Server, params: dict, sinkPort: int, args, cert, key):
    """
    Queue a backlog while the sink is down, start the sink, release the
    queue, and time until the sink has every message.
    """
    pid = server.pid()
    sampler = PeakSampler(pid) if server.multiProcess() else None
    client = subprocess.run(
        clientCommand(server, params, args.timeout),
        stdout=subprocess.PIPE,
        text=True,
        timeout=args.timeout + 30,
    )
    data = json.loads(client.stdout.strip().splitlines()[-1])
    sent = data["sent"]
    server.prepareRelease(sent)
    sink = Sink(sinkPort, cert, key)
    try:
        cpu0 = cpuSeconds(pid)
        started = time.monotonic()
        server.release()
        released = time.monotonic()
        done = sink.waitFor(sent, args.timeout)
        errors = list(data["errors"])
        if done is None:
            errors.append(f"sink has {sink.count()} of {sent} messages")
            done = time.monotonic()
        cpu = cpuSeconds(pid) - cpu0
    finally:
        sink.stop()
    peak = peakMemory(server, sampler)
    return dict(
        sent=sent,
        errors=errors,
        release=released - started,
        drain_wall=done - started,
        drain_rate=sent / (done - started) if done > started else 0,
        cpu_per_msg=cpu / sent if sent else None,
        peak=peak,
    )


def runOnce(cls, key: str, params: dict, args, cert: str, keyFile: str) -> dict:
    # The previous run's files (and their removal) are written back before
    # this one starts, not during it at the cost of this server's fsyncs.
    os.sync()
    work = tempfile.mkdtemp(prefix=f"bench-{key}-{cls.name}-", dir=args.tmp)
    server = cls(work, cert, keyFile, args)
    sink = None
    relay = params["mode"] == "relay"
    sinkPort = freePort() if relay else None
    try:
        if relay and not params.get("drain"):
            sink = Sink(sinkPort, cert, keyFile)
        server.start(params, sinkPort)
        if params.get("drain"):
            return measureDrain(server, params, sinkPort, args, cert, keyFile)
        return measure(server, params, sink, args.timeout)
    finally:
        server.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"    (kept {work})", file=sys.stderr)


def runScenario(key: str, params: dict, servers, args, cert, keyFile) -> dict:
    """
    C{args.repeat} alternated rounds: every server once per round, the
    order rotated by one each round (no server always runs first, after
    the same one).
    @return: C{{server name: [result per repetition]}}
    """
    results: dict = {cls.name: [] for cls in servers}
    for rep in range(args.repeat):
        shift = rep % len(servers)
        for cls in servers[shift:] + servers[:shift]:
            if params["mode"] not in cls.modes:
                continue
            if params.get("nocache") and cls is Postfix:
                continue
            r = runOnce(cls, key, params, args, cert, keyFile)
            results[cls.name].append(r)
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in r.items()
                if k != "errors"
            )
            print(
                f"  [{key} #{rep + 1}] {cls.name}: {shown}, errors={len(r['errors'])}",
                file=sys.stderr,
                flush=True,
            )
    return {name: rs for name, rs in results.items() if rs}


# -- report -----------------------------------------------------------------

LOAD_METRICS = (
    [
        ("sent", "messages accepted (per run)", ""),
        ("rate", "accepted msgs/s (first connect to last 250)", "/s"),
        ("p50", "p50 latency (to the 250)", "ms"),
        ("p99", "p99 latency", "ms"),
        ("cpu_per_msg", "server CPU per message (until the sink has all)", "ms"),
        ("cpu_loop_per_msg", "... event-loop thread (MSA: reactor), /proc", "ms"),
        ("cpu_other_per_msg", "... other threads (MSA: thread pool), /proc", "ms"),
        ("loop_share", "event-loop thread's share of the threads' CPU", "%"),
        ("loop_running", "during the load: event-loop thread running", "%"),
        ("loop_runqueue", "... waiting in the run queue for a CPU", "%"),
        ("machine_busy", "... the machine's CPUs busy (all processes)", "%"),
        ("complete", "time until the sink has every message", "s"),
        ("lag", "... of which after the last 250 (queue left)", "s"),
        ("mem_base", "server memory before", "MB"),
        ("peak", "server peak memory", "MB"),
    ]
    + [
        (f"sys_{name}", f"{name} calls per message (--strace)", "")
        for name in ["total", *BUSIEST.split(",")]
    ]
    + [
        (f"sys_{name}", f"{name} calls per message (--syscalls)", "")
        for name in COUNTED.split(",")
    ]
)
IDLE_METRICS = [
    ("held", "connections held", ""),
    ("alive", "alive after the hold (NOOP answered)", ""),
    ("open_wall", "time to open + authenticate all", "s"),
    ("cpu_auth", "server CPU to open + authenticate all", "s"),
    ("mem_base", "server memory before", "MB"),
    ("mem_held", "server memory while holding", "MB"),
    ("pss_held", "server PSS (all processes) while holding", "MB"),
    ("per_conn", "memory per held connection", "KB"),
    ("peak", "server peak memory", "MB"),
]
DRAIN_METRICS = [
    ("sent", "backlog (messages)", ""),
    ("drain_rate", "drain msgs/s (release to the sink having all)", "/s"),
    ("drain_wall", "drain time", "s"),
    ("release", "... of which the release command (MSA: its control socket)", "s"),
    ("cpu_per_msg", "server CPU per message drained", "ms"),
    ("peak", "server peak memory", "MB"),
]


def metricsFor(params: dict) -> list:
    if "idle" in params:
        return IDLE_METRICS
    if params.get("drain"):
        return DRAIN_METRICS
    return LOAD_METRICS


def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.1f}"
    if unit == "%":
        return f"{value * 100:.0f}%"
    if unit == "MB":
        return f"{value / MB:.1f}"
    if unit == "KB":
        return f"{value / KB:.0f}"
    if unit in ("/s", "s"):
        return f"{value:.3g}" if value < 10 else f"{value:.0f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(runs: list[dict], key: str, unit: str) -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "-"
    mid = fmt(statistics.median(values), unit)
    if len(values) == 1:
        return mid
    return f"{mid} [{fmt(min(values), unit)}-{fmt(max(values), unit)}]"


def table(key: str, params: dict, results: dict, markdownStyle: bool) -> list[str]:
    names = list(results)
    unitName = {"ms": " (ms)", "MB": " (MB)", "KB": " (KB)", "/s": "", "s": " (s)"}
    unitName["%"] = ""
    rowsOut = [
        [label + unitName.get(unit, ""), *(summary(results[n], k, unit) for n in names)]
        for k, label, unit in metricsFor(params)
        if not k.startswith("sys_") or SYSCALLS
    ]
    rowsOut.append(
        [
            "errors (all runs)",
            *(str(sum(len(r["errors"]) for r in results[n])) for n in names),
        ]
    )
    rowsOut.append(["runs", *(str(len(results[n])) for n in names)])
    if markdownStyle:
        out = ["| metric | " + " | ".join(names) + " |"]
        out.append("| --- |" + " ---: |" * len(names))
        out += ["| " + " | ".join(row) + " |" for row in rowsOut]
        return out
    width = max(len(r[0]) for r in rowsOut)
    out = ["  " + "metric".ljust(width) + "".join(f"{n:>22}" for n in names)]
    out += [
        "  " + r[0].ljust(width) + "".join(f"{v:>22}" for v in r[1:]) for r in rowsOut
    ]
    return out


def targets(allResults: dict, scenarios: dict) -> list[tuple[str, bool | None, str]]:
    """
    The targets of issue 20, judged on medians.  L{None}: not judged (a
    scenario or a server missing).
    """

    def med(key, server, metric):
        runs = allResults.get(key, {}).get(server)
        return median(runs, metric) if runs else None

    out = []

    def compare(name, a, b, factor=1.0, lower=False):
        if a is None or b is None:
            out.append((name, None, "not measured"))
            return
        ok = a <= b * factor if lower else a >= b * factor
        out.append((name, ok, f"{a:.4g} vs {b:.4g}"))

    def bound(name, value, limit, unit=""):
        out.append((name, None if value is None else value <= limit, fmt(value, unit)))

    for key in ("relay", "a"):
        for peer in ("aiosmtpd", "Postfix"):
            compare(
                f"{key}: MSA msgs/s >= {peer}",
                med(key, "MSA", "rate"),
                med(key, peer, "rate"),
            )
        compare(
            f"{key}: MSA CPU/message <= 1.1 x aiosmtpd",
            med(key, "MSA", "cpu_per_msg"),
            med(key, "aiosmtpd", "cpu_per_msg"),
            1.1,
            lower=True,
        )
        bound(
            f"{key}: MSA queue empty within 1 s after the burst",
            med(key, "MSA", "lag"),
            1.0,
        )
    for peer in ("aiosmtpd", "Postfix"):
        compare(
            f"(b): MSA msgs/s >= {peer}",
            med("b", "MSA", "rate"),
            med("b", peer, "rate"),
        )
    compare(
        "(a1): MSA p50 <= aiosmtpd",
        med("a1", "MSA", "p50"),
        med("a1", "aiosmtpd", "p50"),
        lower=True,
    )
    compare(
        "drain: MSA >= Postfix",
        med("drain", "MSA", "drain_rate"),
        med("drain", "Postfix", "drain_rate"),
    )
    syncs = [med("relay", "MSA", f"sys_{n}") for n in ("fsync", "fdatasync")]
    bound(
        "relay: MSA fsync + fdatasync per message <= 1.5 (--syscalls)",
        None if None in syncs else sum(syncs),
        1.5,
    )
    for call in ("rename", "unlink", "flock"):
        bound(
            f"relay: MSA {call} per message <= 1 (--syscalls)",
            med("relay", "MSA", f"sys_{call}"),
            1.0,
        )
    big = med("big", "MSA", "peak")
    out.append(
        (
            "50 MB message: MSA peak RSS < 80 MB",
            None if big is None else big < 80 * MB,
            fmt(big, "MB") + " MB",
        )
    )
    idle = med("idle", "MSA", "mem_held")
    out.append(
        (
            "1000 idle connections: MSA RSS < 100 MB",
            None
            if idle is None or scenarios["idle"]["idle"] != 1000
            else idle < 100 * MB,
            fmt(idle, "MB") + " MB",
        )
    )
    return out  # fmt: skip


def report(allResults: dict, scenarios: dict, markdownStyle: bool) -> str:
    lines = []
    for key, results in allResults.items():
        params = scenarios[key]
        desc = ", ".join(f"{k}={v}" for k, v in params.items())
        if markdownStyle:
            lines.append(f"### {key}: {TITLES[key]}  \n`{desc}`\n")
        else:
            lines.append(f"{key}: {TITLES[key]}\n  ({desc})")
        lines += table(key, params, results, markdownStyle)
        lines.append("")
    lines.append(
        "Targets (issue 20), on medians:"
        if not markdownStyle
        else "#### Targets (issue 20), on medians\n"
    )
    for name, ok, value in targets(allResults, scenarios):
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[ok]
        lines.append(f"- {name}: {verdict} ({value})")
    return "\n".join(lines)


def fileSystem(path: str) -> str:
    path = os.path.realpath(path)
    best = ("", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            device, mount, kind, options = line.split()[:4]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(
                mount
            ) >= len(best[0]):
                best = (mount, kind, options.split(",")[0])
    return f"{best[1]} ({best[2]}) mounted on {best[0]}"


def versions(tmp: str, servers) -> str:
    import ssl

    import aiosmtpd
    import cryptography
    import OpenSSL
    from cryptography.hazmat.backends.openssl import backend

    import twisted

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    lines = [
        f"- nproc {os.cpu_count()}; CPU {model}; kernel {platform.release()}; "
        f"load average at the start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- temp dir {os.path.realpath(tmp)}: {fileSystem(tmp)}",
        f"- Python {platform.python_version()}; Twisted {twisted.__version__}; "
        f"aiosmtpd {aiosmtpd.__version__}; pyOpenSSL {OpenSSL.__version__}; "
        f"cryptography {cryptography.__version__}",
        "- OpenSSL: MSA (pyOpenSSL/cryptography) "
        f"{backend.openssl_version_text()}; "
        f"aiosmtpd, sink and load generator (stdlib ssl) {ssl.OPENSSL_VERSION}",
    ]
    if Postfix in servers:
        version = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], stdout=subprocess.PIPE, text=True
        ).stdout.strip()
        sasl = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "libsasl2-2"],
            stdout=subprocess.PIPE,
            text=True,
        ).stdout.strip()
        lines.append(f"- Postfix {version}; Cyrus SASL (libsasl2-2) {sasl}")
    return "\n".join(lines)


# -- profiling ----------------------------------------------------------------


def profile(args, cert: str, keyFile: str) -> None:
    key = (args.scenario or ["relay"])[0]
    params = (QUICK if args.quick else FULL)[key]
    if "idle" in params or params.get("drain"):
        raise SystemExit("--profile takes a load scenario (relay, a, b, ...)")
    work = tempfile.mkdtemp(prefix="bench-profile-", dir=args.tmp)
    server = MSA(work, cert, keyFile, args)
    stats = os.path.join(work, "msa.pstats")
    spy = sink = None
    sinkPort = freePort() if params["mode"] == "relay" else None
    try:
        if sinkPort is not None:
            sink = Sink(sinkPort, cert, keyFile)
        if args.profile == "cprofile":
            server.start(params, sinkPort, profile=stats)
        else:
            server.start(params, sinkPort)
            spyOut = os.path.join(work, "py-spy.txt")
            spy = subprocess.Popen(
                [args.py_spy, "record", "--format", "raw", "--rate", "200",
                 "--nonblocking",
                 "--threads", "-o", spyOut, "-p", str(server.pid())]
                + (["--native"] if args.native else []),
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(work, "py-spy.err"), "wb"),
            )  # fmt: skip
            time.sleep(1)
        r = measure(server, params, sink, args.timeout)
        print(
            json.dumps({k: v for k, v in r.items() if k != "errors"}), file=sys.stderr
        )
        if r.get("loop_share") is not None:
            print(
                "== CPU by thread, from /proc (exact): reactor thread "
                f"{r['cpu_loop_per_msg'] * 1000:.2f} ms/message "
                f"({r['loop_share']:.0%}), the other threads (the pool) "
                f"{r['cpu_other_per_msg'] * 1000:.2f} ms/message =="
            )
        if r["errors"]:
            print(f"ERRORS: {r['errors'][:5]}", file=sys.stderr)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
        server.stop()
        if sink is not None:
            sink.stop()
    if args.profile == "cprofile":
        s = pstats.Stats(stats)
        print("== cProfile (main thread only), by total (own) time ==")
        s.sort_stats("tottime").print_stats(args.top)
        print("== cProfile (main thread only), by cumulative time ==")
        s.sort_stats("cumulative").print_stats(args.top)
    else:
        summarisePySpy(spyOut, args.top)
    print(f"(profile data kept in {work})")


IDLE_LEAVES = ("Condition.wait (", "EPollReactor.doPoll (")


def summarisePySpy(path: str, top: int, rate: int = 200) -> None:
    """
    Own and inclusive time per function from py-spy's collapsed stacks,
    counting only busy samples (threads waiting for work or in epoll_wait
    are left out), in seconds of CPU.
    """
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            if frames[-1].startswith(IDLE_LEAVES):
                idle += n
                continue
            total += n
            thread = frames[0].split(":")[-1].strip()
            threads[thread.rstrip("-0123456789")] += n
            own[frames[-1]] += n
            for frame in set(frames[1:]):
                inclusive[frame] += n
    print(
        f"== py-spy, all threads: {total} busy samples ({total / rate:.1f} s), "
        f"{idle} idle samples left out; % of busy samples =="
    )
    print(
        "-- by thread (samples, not CPU: a pool thread waiting in fsync or "
        "fdatasync counts as busy; the /proc line above is the CPU) --"
    )
    for name, n in threads.most_common(top):
        print(f"{100 * n / total:6.1f}%  {n / rate:7.2f} s  {name}")
    print("-- by own time --")
    for name, n in own.most_common(top):
        print(f"{100 * n / total:6.1f}%  {n / rate:7.2f} s  {name}")
    print("-- by inclusive time --")
    for name, n in inclusive.most_common(top * 3):
        print(f"{100 * n / total:6.1f}%  {n / rate:7.2f} s  {name}")


# -- main -------------------------------------------------------------------


def serverEnv(args) -> dict:
    env = {}
    for item in args.server_env or []:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-s",
        "--scenario",
        action="append",
        choices=list(FULL),
        help="a scenario to run (repeatable; default: all, in the order above)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every scenario small, 1 repetition unless --repeat (a smoke "
        "test of the harness, not a result)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="alternated repetitions per scenario (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--servers",
        default="msa,aiosmtpd,postfix",
        help="comma-separated, in the order they alternate (default "
        "msa,aiosmtpd,postfix; postfix is skipped, with the reason, when "
        "it cannot run here); msa2 adds two MSA instances behind HAProxy "
        "(README.rst, 'Running more than one instance'); msaw the MSA with "
        "[server] workers = 2 (its limits kept by worker 0), msaw-redis the "
        "same with its limits in a Redis started beside it, msawN with N; "
        "msa-noaudit the "
        "MSA with [audit] enabled = false (the audit log's cost); "
        "msa-nodelay the MSA with [spool] commit_delay = 0; msa+SECTION.KEY="
        "VALUE the MSA with that option (a column of its own); msa@PATH the "
        "MSA of another checkout (e.g. a git worktree of an earlier commit), "
        "msaw@PATH the same with workers = 2",
    )
    parser.add_argument(
        "--postfix-sasl",
        choices=["cyrus", "dovecot"],
        default="cyrus",
        help="Postfix's SASL: Cyrus sasldb in the temp dir (default) or a "
        "Dovecot auth process in the temp dir",
    )
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="count the file-system calls per message (fsync, openat, rename, "
        "unlink, ...) of every server during the load scenarios, with perf "
        "stat on the syscall tracepoints: counted in the kernel, the servers "
        "run at full speed (needs perf and root)",
    )
    parser.add_argument(
        "--strace",
        action="store_true",
        help="count every system call per message (the total, the busiest "
        "and the file-system ones) of every server with strace -f -c during "
        "the load scenarios; run it for one scenario (-s relay): strace "
        "slows the servers, so timings from such a run are not results",
    )
    parser.add_argument(
        "--sink-no-pipelining",
        action="store_true",
        help="the sink does not offer PIPELINING (the relays go lock-step)",
    )
    parser.add_argument("--implicit", action="store_true", help="implicit TLS")
    parser.add_argument("--timeout", type=float, default=300, help="per batch, s")
    parser.add_argument(
        "--tmp", default=None, help="where the temp dirs (and spools) go"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    parser.add_argument("--markdown", default=None, help="also write the report here")
    parser.add_argument("--json", default=None, help="write every run's numbers here")
    parser.add_argument(
        "--strict", action="store_true", help="exit 2 on a missed target"
    )
    parser.add_argument(
        "--profile",
        choices=["cprofile", "py-spy"],
        default=None,
        help="profile the MSA alone in the first -s scenario (default relay)",
    )
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    parser.add_argument("--top", type=int, default=15, help="profile lines shown")
    parser.add_argument(
        "--msa-option",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override the MSA's configuration (TOML value), e.g. "
        "accounts.auth_cache_ttl=0",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        metavar="NAME=VALUE",
        help="environment for the servers (experiments, e.g. MALLOC_ARENA_MAX=2)",
    )
    args = parser.parse_args()
    if args.syscalls or args.strace:
        SYSCALLS.append("all" if args.strace else "on")
    if args.sink_no_pipelining:
        SINK_OPTIONS.append("--no-pipelining")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.tmp = args.tmp or tempfile.gettempdir()

    servers = []
    notes = []
    for name in args.servers.split(","):
        name = name.strip()
        if name.lower().startswith("msa+"):
            # The MSA with one more --msa-option, as a column of its own.
            servers.append(msaVariant(name[4:]))
            continue
        if name.lower().startswith("msaw+"):
            servers.append(msaVariant(name[5:], MSAWorkers))
            continue
        if re.fullmatch(r"msaw\d+", name.lower()):
            # msaw3: the MSA with [server] workers = 3.
            servers.append(msaWorkers(int(name[4:])))
            continue
        if name.lower().startswith("msa@"):
            servers.append(msaCheckout(name[4:]))
            continue
        if name.lower().startswith("msaw@"):
            servers.append(msaCheckout(name[5:], MSAWorkers))
            continue
        cls = SERVERS[name.lower()]
        if cls is Postfix:
            why = postfixMissing(args)
            if why:
                notes.append(f"- Postfix column skipped: {why}")
                print(notes[-1], file=sys.stderr)
                continue
            notes.append(f"- Postfix SASL: {args.postfix_sasl}")
        servers.append(cls)
    if args.quick:
        notes.append(
            "- QUICK RUN: small N, targets judged on other sizes than theirs; "
            "a smoke test of the harness, not a result"
        )

    certDir = tempfile.mkdtemp(prefix="bench-cert-", dir=args.tmp)
    os.chmod(certDir, 0o755)
    cert, keyFile = ensureSelfSignedCertificate(certDir, "localhost")
    os.chmod(cert, 0o644)
    machine = "\n".join([versions(args.tmp, servers), *notes])
    try:
        if args.profile:
            profile(args, cert, keyFile)
            return 0
        scenarios = QUICK if args.quick else FULL
        keys = args.scenario or list(scenarios)
        command = " ".join(["bench/run.py"] + sys.argv[1:])
        print(f"# {command}\n{machine}", file=sys.stderr)
        allResults = {}
        started = time.monotonic()
        for key in keys:
            print(f"scenario {key}: {TITLES[key]}: {scenarios[key]}", file=sys.stderr)
            allResults[key] = runScenario(
                key, scenarios[key], servers, args, cert, keyFile
            )
        elapsed = time.monotonic() - started
    finally:
        shutil.rmtree(certDir, ignore_errors=True)

    head = (
        f"Command: `.venv/bin/python {command}` "
        f"({'STARTTLS' if not args.implicit else 'implicit TLS'}; "
        f"{args.repeat} repetition(s), servers alternated; took {elapsed:.0f} s; "
        f"cells: median [min-max])\n\n{machine}\n"
    )
    print(head)
    print(report(allResults, scenarios, markdownStyle=False))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(head + "\n" + report(allResults, scenarios, markdownStyle=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "results": allResults}, f, indent=1)
    errors = {
        (k, name): [e for r in runs for e in r["errors"]]
        for k, rs in allResults.items()
        for name, runs in rs.items()
    }
    errors = {k: v for k, v in errors.items() if v}
    if errors:
        print("\n!!!!!!!! ERRORS: the benchmark is not valid !!!!!!!!", file=sys.stderr)
        for (k, name), errs in errors.items():
            counts = collections.Counter(errs)
            print(
                f"  {k} {name}: {len(errs)} errors: {counts.most_common(3)}",
                file=sys.stderr,
            )
        return 1
    if args.strict and any(ok is False for _, ok, _ in targets(allResults, scenarios)):
        print("targets missed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
