"""
Memory soak of the assembled daemon (issue 18 defect 15): does the MSA's
memory level off under a steady load, and if not, what holds it?

The MSA runs in this process (``buildService(loadConfig(toml))``, logging to
a file as under twistd) in relay mode to ``bench/sink.py``, configured as
``bench/run.py`` configures it; ``bench/loadgen.py`` sends the messages in
batches over STARTTLS.  After each batch, once the sink has every message
(the queue is empty), a garbage collection and a tracemalloc snapshot: the
traced memory and the process's RSS per batch, then the growth from the
first snapshot (after a warm-up batch) to the last, per message, and the
allocation sites that grew most, by line and by traceback.

    python bench/soak_memory.py [--messages 20000] [--batch 2000]
        [--concurrency 20] [--size 1024] [--top 15] [--msa-option KEY=VALUE]
        [--frames 12] [--deadline SECONDS] [--idle SECONDS]

With C{--idle}, the RSS after the last batch and that many idle seconds,
then again after C{malloc_trim(0)}: memory that comes back then was free
memory glibc's allocator kept, not memory the MSA holds.
"""

import argparse
import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: the sink, the MSA's configuration)
from twisted.internet import defer, reactor, threads  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from msa.service.config import loadConfig  # noqa: E402
from msa.service.tap import buildService  # noqa: E402
from msa.tls import ensureSelfSignedCertificate  # noqa: E402

FRAMES = 12


def rss() -> int:
    return run.memory(os.getpid())["VmRSS"]


def sendBatch(server, args, count: int) -> None:
    params = run.load(args.concurrency, count, size=args.size)
    result = subprocess.run(
        run.clientCommand(server, params, 600), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr[-2000:]}")


def snapshot() -> tracemalloc.Snapshot | None:
    gc.collect()
    if not tracemalloc.is_tracing():
        return None
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


def report(first, last, messages: int, top: int) -> None:
    grown = sum(s.size_diff for s in last.compare_to(first, "filename"))
    print(
        f"\ngrowth from the first snapshot to the last: {grown / 1e6:.2f} MB over "
        f"{messages} messages, {grown / messages:.1f} bytes per message"
    )
    print(f"\n== top {top} by line ==")
    for stat in last.compare_to(first, "lineno")[:top]:
        print(stat)
    print(f"\n== top {min(top, 5)} by traceback ==")
    for stat in last.compare_to(first, "traceback")[: min(top, 5)]:
        print(f"{stat.size_diff / 1e3:+.1f} KB in {stat.count_diff:+d} blocks")
        for line in stat.traceback.format():
            print("   ", line)


@defer.inlineCallbacks
def soak(args, work: str):
    cert, key = ensureSelfSignedCertificate(work, "localhost")
    sinkPort = run.freePort()
    sink = run.Sink(sinkPort, cert, key)
    server = run.MSA(work, cert, key, args)
    server.port, config = server.configure(
        os.path.join(work, "msa-state"),
        os.path.join(work, "msa.toml"),
        run.load(args.concurrency, args.batch),
        sinkPort,
    )
    service = buildService(loadConfig(config))
    service.startService()
    try:
        print(f"{'messages':>9} {'traced MB':>10} {'RSS MB':>8} {'s':>6}")
        sent = 0
        first = None
        firstAt = 0
        started = time.monotonic()
        while sent < args.messages + args.batch:
            if args.deadline and time.monotonic() - started > args.deadline:
                print(f"(stopped at the deadline of {args.deadline:.0f} s)")
                break
            yield threads.deferToThread(sendBatch, server, args, args.batch)
            sent += args.batch
            done = yield threads.deferToThread(sink.waitFor, sent, 600)
            if done is None:
                raise RuntimeError(f"the sink did not get {sent} messages")
            # Let the relay settle its last outcomes.
            yield threads.deferToThread(time.sleep, 1)
            shot = snapshot()
            traced = tracemalloc.get_traced_memory()[0]
            print(
                f"{sent:>9} {traced / 1e6:>10.2f} {rss() / 1e6:>8.1f} "
                f"{time.monotonic() - started:>6.0f}",
                flush=True,
            )
            if first is None:
                first, firstAt = shot, sent
        if args.idle:
            yield threads.deferToThread(time.sleep, args.idle)
            snapshot()
            print(f"idle {args.idle:.0f} s: RSS {rss() / 1e6:.1f} MB", flush=True)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            print(f"after malloc_trim(0): RSS {rss() / 1e6:.1f} MB", flush=True)
        if first is not None:
            report(first, shot, sent - firstAt, args.top)
    finally:
        yield service.stopService()
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--msa-option", action="append", default=[])
    parser.add_argument("--tmp", default=None)
    parser.add_argument(
        "--deadline",
        type=float,
        default=0,
        help="send no further batch after this many seconds",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0,
        help="then idle this many seconds, and give glibc's free memory back",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=FRAMES,
        help="frames kept per allocation (0: no tracemalloc, RSS only)",
    )
    args = parser.parse_args()
    # What bench/run.py's MSA reads from its own options.
    args.implicit = False
    args.server_env = []
    work = tempfile.mkdtemp(prefix="soak-", dir=args.tmp)
    os.chmod(work, 0o755)
    log = open(os.path.join(work, "msa.log"), "a", encoding="utf-8")
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(log)], redirectStandardIO=False
    )
    if args.frames:
        tracemalloc.start(args.frames)
    outcome: list = []

    def done(result):
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: soak(args, work).addBoth(done))
    reactor.run()
    print(f"(work directory {work})")
    if outcome and isinstance(outcome[0], Failure):
        outcome[0].raiseException()


if __name__ == "__main__":
    main()
