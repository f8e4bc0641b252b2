"""
A program for L{tests.test_forked}: what worker 0 does with a forked
worker, in a process without a reactor until the fork.

    python tests/forkedhelper.py MODE DIRECTORY

prints a JSON report on its standard output.  Modes: C{report} (the worker
reports what it was given and exits 3), C{signal} (the worker waits and is
sent SIGTERM), C{discard} (the parked worker is let go), C{memory} (the
worker reports how much of its memory it shares), C{uid} (as C{report},
worker 0 having switched to user and group 65534 before the start, as
C{twistd --uid} does; run as root).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from twisted.logger import Logger

import msa.service.tap  # noqa: F401  (what worker 0 has loaded when it forks)
from msa.service.forked import parkWorkers

mode, directory = sys.argv[1], sys.argv[2]
# Logged before logging began, as worker 0's start-up is: kept for
# replay in this process, not for the worker.
Logger().info("an early event of worker 0's")


def target(args: list[str]) -> None:
    if mode == "signal":
        time.sleep(60)
        return
    if mode == "memory":
        import twisted.internet.reactor  # noqa: F401  (as a worker's start does)

        with open("/proc/self/smaps_rollup") as f:
            shared = [
                int(line.split()[1]) for line in f if line.startswith("Shared_Dirty")
            ]
        print(json.dumps({"sharedDirty": shared[0] * 1024}), flush=True)
        return
    from twisted.logger import globalLogBeginner

    seen: list[dict] = []
    globalLogBeginner.beginLoggingTo([seen.append], redirectStandardIO=False)
    listener = socket.socket(fileno=3)
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    report = {
        "args": args,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "umask": os.umask(0),
        "fds": sorted(int(n) for n in os.listdir("/proc/self/fd"))[:-1],
        "listener": list(listener.getsockname()),
        "ppid": os.getppid(),
        "comm": comm,
        "replayed": [e.get("log_format") for e in seen],
        "ids": [list(os.getresuid()), list(os.getresgid()), os.getgroups()],
    }
    listener.detach()
    print(json.dumps(report), flush=True)
    print("from the worker's standard error", file=sys.stderr, flush=True)
    raise SystemExit(3)


def main() -> None:
    parked = parkWorkers(range(1, 2), target=target)[1]
    if mode == "discard":
        parked.discard()
        _, status = os.waitpid(parked.pid, 0)
        print(json.dumps({"status": status, "ran": False}))
        return

    from twisted.internet import reactor
    from twisted.internet.error import ProcessExitedAlready
    from twisted.internet.protocol import ProcessProtocol

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    report: dict = {"pid": os.getpid(), "listener": list(listener.getsockname())}
    output: list[bytes] = []
    started: list = []

    class Proto(ProcessProtocol):
        def childDataReceived(self, childFD: int, data: bytes) -> None:
            output.append(data)

        def processEnded(self, reason) -> None:
            report["ended"] = {
                "exitCode": getattr(reason.value, "exitCode", 0),
                "signal": getattr(reason.value, "signal", None),
            }
            if mode == "signal":
                try:
                    started[0].signalProcess("TERM")
                except ProcessExitedAlready:
                    report["exitedAlready"] = True
            reactor.stop()

    os.umask(0o027)
    if mode == "uid":
        # As twistd --uid/--gid does before the services start.
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)

    def start() -> None:
        forked = parked.start(
            Proto(),
            [sys.executable, "-m", "msa.service.worker", "--worker", "1"]
            + ["--listener", "k=3"],
            {"ONLY": "this"},
            os.path.abspath(directory),
            {0: "w", 1: "r", 2: "r", 3: listener.fileno()},
            reactor,
        )
        started.append(forked)
        if mode == "signal":
            reactor.callLater(0.5, forked.signalProcess, "TERM")

    reactor.callWhenRunning(start)
    reactor.callLater(30, reactor.stop)
    reactor.run()
    text = b"".join(output).decode()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if lines:
        report["child"] = json.loads(lines[0])
        if mode == "memory":
            report.update(report["child"])
    report["output"] = text
    print(json.dumps(report))


main()
