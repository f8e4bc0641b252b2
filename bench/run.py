"""
Benchmark of the MSA against aiosmtpd, side by side in one run.

Each scenario starts, one after the other, the MSA (``twistd -n
digipoort-msa`` with a generated TOML configuration) and the peer
(``bench/peer_aiosmtpd.py``) as separate processes on loopback ports, with
the same ECDSA P-256 self-signed certificate, and drives each with the load
generator (``bench/loadgen.py``, its own process).  Measured from
``/proc/<pid>``: server CPU (utime+stime, all threads) over the batch, and
peak RSS (VmHWM).  A fresh pair of server processes per scenario, so VmHWM is
that scenario's peak.

Scenarios:

  a  C=50 concurrent sessions, 10 KB, 1 message per connection, N=1000
  b  C=1, 10 KB, N=200 (latency)
  c  one 50 MB message (peak RSS)
  d  1000 idle authenticated connections held open (RSS)
  e  as a, but 10 messages per connection (no target: shows the cost of
     everything but the login, which dominates a)

And, on its own (``--drain N``): the relay's drain rate.  N messages (10 KB)
are submitted while the core MTA is down (the relay's first attempts fail
and are deferred for an hour), then a fast sink (``bench/sink.py``, STARTTLS)
starts on the core's port and the queue is flushed; measured: messages/s from
the flush's reply until the spool's queue is empty (the flush itself, which
rewrites each entry's state, is timed apart), and the MSA's CPU.

Usage::

    .venv/bin/python bench/run.py                # all scenarios, full size
    .venv/bin/python bench/run.py --quick        # smaller N, < ~2 minutes
    .venv/bin/python bench/run.py -s a -s b      # some scenarios
    .venv/bin/python bench/run.py --implicit     # implicit TLS instead of STARTTLS
    .venv/bin/python bench/run.py --profile cprofile   # MSA only, scenario a, profiled
    .venv/bin/python bench/run.py --profile py-spy --py-spy /path/to/py-spy
    .venv/bin/python bench/run.py --drain 2000   # relay drain of a backlog

Exits non-zero when any session had an error (and says so loudly); target
misses are reported, not fatal, unless ``--strict``.
"""

import argparse
import collections
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import attrs  # noqa: E402

from msa.accounts import makeAccount, writeAccounts  # noqa: E402
from msa.config import writeConfig  # noqa: E402
from msa.tls import ensureSelfSignedCertificate  # noqa: E402

PYTHON = sys.executable
TWISTD = os.path.join(os.path.dirname(PYTHON), "twistd")
USER, PASSWORD = "bench", "bench-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB = 1024
MB = 1024 * 1024

FULL = {
    "a": dict(concurrency=50, messages=1000, size=10 * KB, per_connection=1),
    "b": dict(concurrency=1, messages=200, size=10 * KB, per_connection=1),
    "c": dict(concurrency=1, messages=1, size=50_000_000, per_connection=1),
    "d": dict(concurrency=50, idle=1000),
    "e": dict(concurrency=50, messages=1000, size=10 * KB, per_connection=10),
}
QUICK = {
    "a": dict(concurrency=50, messages=200, size=10 * KB, per_connection=1),
    "b": dict(concurrency=1, messages=40, size=10 * KB, per_connection=1),
    "c": dict(concurrency=1, messages=1, size=50_000_000, per_connection=1),
    "d": dict(concurrency=50, idle=300),
    "e": dict(concurrency=50, messages=500, size=10 * KB, per_connection=10),
}
TITLES = {
    "a": "C=50, 10 KB, 1 message/connection",
    "b": "C=1, 10 KB (latency)",
    "c": "one 50 MB message (peak RSS)",
    "d": "idle authenticated connections (RSS)",
    "e": "C=50, 10 KB, 10 messages/connection (login cost amortised; no target)",
}


# -- /proc -----------------------------------------------------------------


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory(pid: int) -> dict:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
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


# -- servers ----------------------------------------------------------------


class Server:
    name = ""

    def __init__(
        self, work: str, cert: str, key: str, implicit: bool, env: dict | None = None
    ) -> None:
        self.env = env or {}
        self.work = work
        self.cert, self.key = cert, key
        self.implicit = implicit
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def pid(self) -> int:
        return self.proc.pid

    def delivered(self) -> int:
        return 0

    def waitDelivered(self, count: int, timeout: float = 120) -> None:
        pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class MSA(Server):
    name = "MSA"

    def start(self, profile: str | None = None) -> None:
        state = os.path.join(self.work, "msa-state")
        os.makedirs(state, mode=0o700, exist_ok=True)
        self.outbox = os.path.join(state, "outbox")
        starttlsPort, implicitPort = freePort(), freePort()
        self.port = implicitPort if self.implicit else starttlsPort
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
                "starttls_listeners": [f"tcp:{starttlsPort}:interface=127.0.0.1"],
                "implicit_tls_listeners": [f"tcp:{implicitPort}:interface=127.0.0.1"],
                "max_connections": 5000,
                "max_connections_per_client": 5000,
                "shutdown_grace": 1,
            },
            "tls": {"certificate": self.cert, "key": self.key},
            "accounts": {"file": accounts},
        }
        for item in MSA_OPTIONS:
            key, _, value = item.partition("=")
            section, _, name = key.partition(".")
            config.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
        path = os.path.join(self.work, "msa.toml")
        writeConfig(path, config)
        command = [
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile",
            os.path.join(self.work, "msa.log"),
        ]
        if profile:
            command += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        command += ["digipoort-msa", "--config", path]
        env = dict(os.environ, PYTHONPATH=ROOT, **self.env)
        self.proc = subprocess.Popen(
            command,
            cwd=self.work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.work, "msa.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        waitForPort(self.port, self.proc)

    def delivered(self) -> int:
        try:
            return sum(1 for n in os.listdir(self.outbox) if n.endswith(".eml"))
        except FileNotFoundError:
            return 0

    def waitDelivered(self, count: int, timeout: float = 120) -> None:
        # The 250 comes after the spool commit; the relay runner then writes
        # the outbox file.  Wait for that too, so its CPU is counted.
        deadline = time.monotonic() + timeout
        while self.delivered() < count and time.monotonic() < deadline:
            time.sleep(0.05)


class Peer(Server):
    name = "aiosmtpd"

    def start(self, profile: str | None = None) -> None:
        self.port = freePort()
        command = [
            PYTHON,
            os.path.join(HERE, "peer_aiosmtpd.py"),
            "--port", str(self.port),
            "--cert", self.cert,
            "--key", self.key,
            "--dir", os.path.join(self.work, "peer-out"),
            "--user", USER,
            "--password", PASSWORD,
            "--log", os.path.join(self.work, "peer.log"),
        ]  # fmt: skip
        if self.implicit:
            command.append("--implicit")
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
        waitForPort(self.port, self.proc)


# -- one measurement --------------------------------------------------------


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
    if server.implicit:
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


def measure(server: Server, params: dict, timeout: float) -> dict:
    pid = server.pid()
    time.sleep(0.5)  # let the start settle
    base = memory(pid)
    cpu0 = cpuSeconds(pid)
    delivered0 = server.delivered()
    command = clientCommand(server, params, timeout)
    result: dict = {}
    if "idle" in params:
        client = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = client.stdout.readline()
        if not line.startswith("HOLDING"):
            client.kill()
            raise RuntimeError(f"load generator: {line!r}")
        time.sleep(2)  # let the server settle with all sessions open
        held = memory(pid)
        result["rss_held"] = held["VmRSS"]
        result["hwm_held"] = held["VmHWM"]
        result["cpu_auth"] = cpuSeconds(pid) - cpu0
        client.stdin.write("release\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=timeout + 30)
    else:
        client = subprocess.run(
            command, stdout=subprocess.PIPE, text=True, timeout=timeout + 30
        )
        out = client.stdout
    data = json.loads(out.strip().splitlines()[-1])
    if "idle" not in params:
        # Everything the MSA does for the batch, including the outbox write
        # after the 250 (the peer writes its one file before the 250).
        server.waitDelivered(delivered0 + data["sent"])
    cpu1 = cpuSeconds(pid)
    mem = memory(pid)
    if client.returncode:
        data["errors"].append(f"load generator exited with {client.returncode}")
    result.update(
        wall=data["wall"],
        sent=data["sent"],
        errors=data["errors"],
        client_cpu=data["client_cpu"],
        cpu=cpu1 - cpu0,
        rss_base=base["VmRSS"],
        hwm=mem["VmHWM"],
        p50=percentile(data["latencies"], 50),
        p99=percentile(data["latencies"], 99),
    )
    if "idle" in params:
        result["held"] = data["held"]
        result["alive"] = data["alive"]
    else:
        result["rate"] = data["sent"] / data["wall"] if data["wall"] else 0
        result["cpu_per_msg"] = result["cpu"] / data["sent"] if data["sent"] else None
    return result


#: --msa-option overrides of the MSA's configuration.
MSA_OPTIONS: list[str] = []


def serverEnv(args) -> dict:
    env = {}
    for item in args.server_env or []:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def runScenario(key: str, params: dict, args, cert: str, keyFile: str) -> dict:
    results = {}
    for cls in (MSA, Peer):
        work = tempfile.mkdtemp(prefix=f"bench-{key}-{cls.name}-", dir=args.tmp)
        server = cls(work, cert, keyFile, args.implicit, serverEnv(args))
        try:
            server.start()
            results[cls.name] = measure(server, params, args.timeout)
        finally:
            server.stop()
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        r = results[cls.name]
        print(
            f"  [{key}] {cls.name}: "
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in r.items()
                if k != "errors"
            )
            + f", errors={len(r['errors'])}",
            file=sys.stderr,
            flush=True,
        )
    return results


# -- report -----------------------------------------------------------------


def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if unit == "MB":
        return f"{value / MB:.1f} MB"
    if unit == "KB":
        return f"{value / KB:.0f} KB"
    if unit == "/s":
        return f"{value:.1f} /s"
    if unit == "s":
        return f"{value:.2f} s"
    return str(value)


def rows(key: str, params: dict, r: dict) -> list[tuple[str, str, object, object]]:
    """
    (metric, unit, MSA value, aiosmtpd value)
    """
    m, p = r["MSA"], r["aiosmtpd"]
    if "idle" in params:
        n = params["idle"]

        def perConn(x):
            return (x["rss_held"] - x["rss_base"]) / max(1, x["held"])

        return [
            ("connections held / alive after hold", "",
             f"{m['held']}/{m['alive']}", f"{p['held']}/{p['alive']}"),
            (f"time to open+authenticate {n}", "s", m["wall"], p["wall"]),
            ("server CPU to authenticate all", "s", m["cpu_auth"], p["cpu_auth"]),
            ("server RSS before", "MB", m["rss_base"], p["rss_base"]),
            ("server RSS while holding", "MB", m["rss_held"], p["rss_held"]),
            ("server peak RSS (VmHWM) while holding", "MB",
             m["hwm_held"], p["hwm_held"]),
            ("RSS per held connection", "KB", perConn(m), perConn(p)),
            ("errors", "", len(m["errors"]), len(p["errors"])),
        ]  # fmt: skip
    return [
        ("messages sent", "", m["sent"], p["sent"]),
        ("messages/s", "/s", m["rate"], p["rate"]),
        ("p50 latency", "ms", m["p50"], p["p50"]),
        ("p99 latency", "ms", m["p99"], p["p99"]),
        ("server CPU per message", "ms", m["cpu_per_msg"], p["cpu_per_msg"]),
        ("server RSS before", "MB", m["rss_base"], p["rss_base"]),
        ("server peak RSS (VmHWM)", "MB", m["hwm"], p["hwm"]),
        ("load generator CPU", "s", m["client_cpu"], p["client_cpu"]),
        ("errors", "", len(m["errors"]), len(p["errors"])),
    ]


def ratio(a, b) -> str:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return f"{a / b:.2f}"
    return "-"


def targets(key: str, params: dict, r: dict) -> list[tuple[str, bool | None, str]]:
    m, p = r["MSA"], r["aiosmtpd"]
    full = params == FULL[key]
    out = []
    if key == "a":
        q = m["rate"] / p["rate"] if p["rate"] else 0
        out.append(("MSA messages/s >= 1.5 x aiosmtpd", q >= 1.5, f"{q:.2f} x"))
        c = m["cpu_per_msg"] or 0
        out.append(
            ("MSA server CPU per message <= 4 ms", c <= 0.004, f"{c * 1000:.1f} ms")
        )
    elif key == "b":
        ok = m["p50"] is not None and p["p50"] is not None and m["p50"] <= p["p50"]
        out.append(
            (
                "MSA p50 <= aiosmtpd p50",
                ok,
                f"{fmt(m['p50'], 'ms')} vs {fmt(p['p50'], 'ms')}",
            )
        )
    elif key == "c":
        ok = m["sent"] == 1 and not m["errors"] and m["hwm"] < 80 * MB
        out.append(("50 MB accepted, MSA peak RSS < 80 MB", ok, fmt(m["hwm"], "MB")))
    elif key == "d":
        n = params["idle"]
        ok = m["held"] == n and m["alive"] == n and m["rss_held"] < 150 * MB
        peak = fmt(m["hwm_held"], "MB")
        out.append(
            (
                f"{n} idle authenticated held in MSA RSS < 150 MB",
                ok,
                f"{fmt(m['rss_held'], 'MB')}; peak during the logins {peak}",
            )
        )
    if not full:
        out = [
            (name, None, value + " (not the full-size scenario)")
            for name, _, value in out
        ]
    return out  # fmt: skip


def markdown(allResults: dict, scenarios: dict) -> str:
    lines = []
    for key, r in allResults.items():
        params = scenarios[key]
        desc = ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"### ({key}) {TITLES[key]}  \n`{desc}`\n")
        lines.append("| metric | MSA | aiosmtpd | MSA / aiosmtpd |")
        lines.append("| --- | ---: | ---: | ---: |")
        for name, unit, mv, pv in rows(key, params, r):
            lines.append(
                f"| {name} | {fmt(mv, unit)} | {fmt(pv, unit)} | {ratio(mv, pv)} |"
            )
        lines.append("")
        for name, ok, value in targets(key, params, r):
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[ok]
            lines.append(f"- target: {name}: **{verdict}** ({value})")
        lines.append("")
    return "\n".join(lines)


def plain(allResults: dict, scenarios: dict) -> str:
    out = []
    for key, r in allResults.items():
        params = scenarios[key]
        out.append(f"({key}) {TITLES[key]}")
        out.append(f"  {'metric':44} {'MSA':>14} {'aiosmtpd':>14} {'ratio':>7}")
        for name, unit, mv, pv in rows(key, params, r):
            out.append(
                f"  {name:44} {fmt(mv, unit):>14} {fmt(pv, unit):>14} "
                f"{ratio(mv, pv):>7}"
            )
        for name, ok, value in targets(key, params, r):
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[ok]
            out.append(f"  target {name}: {verdict} ({value})")
        out.append("")
    return "\n".join(out)


def versions() -> str:
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
    return "\n".join(
        [
            f"- nproc: {os.cpu_count()}; CPU: {model}; kernel {platform.release()}",
            f"- Python {platform.python_version()}; Twisted {twisted.__version__}; "
            f"aiosmtpd {aiosmtpd.__version__}; pyOpenSSL {OpenSSL.__version__}; "
            f"cryptography {cryptography.__version__}",
            "- OpenSSL: MSA (pyOpenSSL/cryptography) "
            f"{backend.openssl_version_text()}; "
            f"aiosmtpd and load generator (stdlib ssl) {ssl.OPENSSL_VERSION}",
        ]
    )


# -- profiling ----------------------------------------------------------------


def profile(args, cert: str, keyFile: str) -> None:
    key = (args.scenario or ["a"])[0]
    params = (QUICK if args.quick else FULL)[key]
    work = tempfile.mkdtemp(prefix="bench-profile-", dir=args.tmp)
    server = MSA(work, cert, keyFile, args.implicit, serverEnv(args))
    stats = os.path.join(work, "msa.pstats")
    spy = None
    try:
        if args.profile == "cprofile":
            server.start(profile=stats)
        else:
            server.start()
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
        r = measure(server, params, args.timeout)
        print(
            json.dumps({k: v for k, v in r.items() if k != "errors"}), file=sys.stderr
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
    print("-- by thread --")
    for name, n in threads.most_common(top):
        print(f"{100 * n / total:6.1f}%  {n / rate:7.2f} s  {name}")
    print("-- by own time --")
    for name, n in own.most_common(top):
        print(f"{100 * n / total:6.1f}%  {n / rate:7.2f} s  {name}")
    print("-- by inclusive time --")
    for name, n in inclusive.most_common(top * 3):
        print(f"{100 * n / total:6.1f}%  {n / rate:7.2f} s  {name}")


# -- drain ------------------------------------------------------------------


def drain(args, cert: str, keyFile: str, count: int) -> dict:
    """
    The drain measurement (see the module docstring).
    """
    work = tempfile.mkdtemp(prefix="bench-drain-", dir=args.tmp)
    certDir = os.path.dirname(cert)
    sinkPort = freePort()
    MSA_OPTIONS.extend(
        [
            'relay.host="127.0.0.1"',
            f"relay.port={sinkPort}",
            'relay.server_name="localhost"',
            f"relay.ca_file={json.dumps(cert)}",
            "relay.retry_base=3600",
            "relay.retry_max=3600",
        ]
    )
    msa = MSA(work, cert, keyFile, args.implicit, serverEnv(args))
    sink = None
    try:
        msa.start()
        queueDir = os.path.join(work, "msa-state", "spool", "queue")

        def queued() -> int:
            return sum(1 for n in os.listdir(queueDir) if n.endswith(".json"))

        params = dict(concurrency=50, messages=count, size=10 * KB, per_connection=10)
        loaded = subprocess.run(
            clientCommand(msa, params, args.timeout),
            stdout=subprocess.PIPE,
            text=True,
            timeout=args.timeout + 30,
        )
        sent = json.loads(loaded.stdout.strip().splitlines()[-1])["sent"]
        backlog = queued()
        print(f"  [drain] {sent} sent, {backlog} queued", file=sys.stderr)
        sink = subprocess.Popen(
            [PYTHON, os.path.join(HERE, "sink.py"), "--port", str(sinkPort)]
            + ["--dir", certDir],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        if not sink.stdout.readline().startswith("READY"):
            raise RuntimeError("sink did not start")
        cpu0 = cpuSeconds(msa.pid())
        started = time.monotonic()
        subprocess.run(
            [os.path.join(os.path.dirname(PYTHON), "digipoort-msa-admin")]
            + ["--config", os.path.join(work, "msa.toml"), "queue", "flush"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # The flush itself rewrites every entry's state (2 fsyncs each):
        # the deliveries are timed from its reply on.
        flushed = time.monotonic()
        deadline = started + args.timeout
        while queued() and time.monotonic() < deadline:
            time.sleep(0.02)
        end = time.monotonic()
        left = queued()
        cpu = cpuSeconds(msa.pid()) - cpu0
        sink.send_signal(signal.SIGTERM)
        received = int(sink.communicate(timeout=30)[0].split()[-1])
    finally:
        msa.stop()
        if sink is not None and sink.poll() is None:
            sink.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return dict(
        backlog=backlog,
        drained=backlog - left,
        received=received,
        flush=flushed - started,
        wall=end - flushed,
        rate=(backlog - left) / (end - flushed),
        cpu_per_msg=cpu / max(1, backlog - left),
    )


# -- main -------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-s", "--scenario", action="append", choices=list(FULL))
    parser.add_argument("--quick", action="store_true", help="smaller N (a, b)")
    parser.add_argument("--implicit", action="store_true", help="implicit TLS")
    parser.add_argument("--timeout", type=float, default=300, help="per batch")
    parser.add_argument("--tmp", default=None, help="where the temp dirs go")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    parser.add_argument("--markdown", default=None, help="also write the tables here")
    parser.add_argument("--strict", action="store_true", help="fail on a missed target")
    parser.add_argument("--profile", choices=["cprofile", "py-spy"], default=None)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--drain",
        type=int,
        metavar="N",
        default=None,
        help="only measure the relay draining a backlog of N messages",
    )
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
        help="environment for both servers (experiments, e.g. MALLOC_ARENA_MAX=2)",
    )
    args = parser.parse_args()
    MSA_OPTIONS.extend(args.msa_option or [])

    certDir = tempfile.mkdtemp(prefix="bench-cert-", dir=args.tmp)
    cert, keyFile = ensureSelfSignedCertificate(certDir, "localhost")
    try:
        if args.profile:
            profile(args, cert, keyFile)
            return 0
        if args.drain:
            r = drain(args, cert, keyFile, args.drain)
            print(
                f"drain: {r['drained']} of a {r['backlog']}-message backlog in "
                f"{r['wall']:.2f} s = {r['rate']:.0f} messages/s after a flush of "
                f"{r['flush']:.2f} s "
                f"(sink received {r['received']}; MSA CPU "
                f"{1000 * r['cpu_per_msg']:.2f} ms/message)"
            )
            return 0 if r["drained"] == r["backlog"] == r["received"] else 1
        scenarios = QUICK if args.quick else FULL
        keys = args.scenario or list(scenarios)
        command = " ".join(["bench/run.py"] + sys.argv[1:])
        print(f"# {command}", file=sys.stderr)
        allResults = {}
        started = time.monotonic()
        for key in keys:
            print(f"scenario ({key}) {TITLES[key]}: {scenarios[key]}", file=sys.stderr)
            allResults[key] = runScenario(key, scenarios[key], args, cert, keyFile)
        elapsed = time.monotonic() - started
    finally:
        shutil.rmtree(certDir, ignore_errors=True)

    print(plain(allResults, scenarios))
    md = (
        f"Command: `.venv/bin/python {command}` "
        f"({'STARTTLS' if not args.implicit else 'implicit TLS'}; "
        f"took {elapsed:.0f} s)\n\n{versions()}\n\n{markdown(allResults, scenarios)}"
    )
    print("---- Markdown ----")
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    errors = {
        (k, name): r["errors"]
        for k, rs in allResults.items()
        for name, r in rs.items()
        if r["errors"]
    }
    if errors:
        print("\n!!!!!!!! ERRORS: the benchmark is not valid !!!!!!!!", file=sys.stderr)
        for (k, name), errs in errors.items():
            counts = collections.Counter(errs)
            print(
                f"  ({k}) {name}: {len(errs)} errors: {counts.most_common(3)}",
                file=sys.stderr,
            )
        return 1
    if args.strict:
        missed = [
            name
            for k, r in allResults.items()
            for name, ok, _ in targets(k, scenarios[k], r)
            if ok is False
        ]
        if missed:
            print(f"targets missed: {missed}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
