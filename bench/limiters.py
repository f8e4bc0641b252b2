"""
The memory limiters under a flood (issue 18 defect 2, issue 20 item 3), run
in-process against the classes directly, on a simulated clock:

  - ``throttle``: N failed logins with random user names from A client
    addresses, at R failures per second (default: 1,000,000 from 45
    addresses at 60 per second, about 4.6 hours of an attack).  Printed per
    block of failures: the cost per failure, the counters held and the
    memory traced (tracemalloc) of the throttle's tables.
  - ``rates``: N messages of one account at R per second with only a
    per-minute limit, then checks: the cost per check per block and the
    memory of the limiter.

    python bench/limiters.py throttle [--failures N] [--addresses A] [--rate R]
    python bench/limiters.py rates [--messages N] [--rate R]

``--no-trace`` measures the costs without tracemalloc (which slows every
allocation down); the memory column is then 0.  ``--baseline REV`` runs
the classes of git revision REV instead (for example ``90c6cbe``, before
the bounds), for a before/after figure.
"""

import argparse
import importlib.util
import os
import secrets
import subprocess
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msa.policy.authorization import AccountRules  # noqa: E402


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def limitersModule(baseline: str | None):
    """
    The module with C{AuthThrottle} and C{RateLimiter}: today's, or the one
    of git revision C{baseline}.
    """
    if baseline is None:
        from msa.policy import limits

        return limits
    source = subprocess.run(
        ["git", "show", f"{baseline}:msa/policy/authorization.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "baseline_authorization.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("baseline_authorization", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def startTracing(args) -> None:
    """
    Trace allocations, unless C{--no-trace} (tracemalloc slows every
    allocation down: the costs per call are then the untraced ones).
    """
    if args.trace:
        tracemalloc.start()


def throttle(args, module) -> None:
    clock = SimulatedClock()
    subject = module.AuthThrottle(clock=clock)
    addresses = [f"198.51.100.{i}" for i in range(args.addresses)]
    # The names are made beforehand, so that their cost is not measured.
    block = args.block
    step = 1.0 / args.rate
    startTracing(args)
    print(f"{'failures':>10} {'us/failure':>11} {'counters':>9} {'traced MB':>10}")
    done = 0
    while done < args.failures:
        names = [secrets.token_hex(8) for _ in range(block)]
        started = time.perf_counter()
        for i, name in enumerate(names):
            clock.now += step
            subject.failedLogin(addresses[(done + i) % len(addresses)], name)
        elapsed = time.perf_counter() - started
        done += block
        del names
        counters = (
            subject.counters()
            if hasattr(subject, "counters")
            else len(subject._failures)
        )
        current, _ = tracemalloc.get_traced_memory()
        print(
            f"{done:>10} {elapsed / block * 1e6:>11.2f} {counters:>9} "
            f"{current / 1e6:>10.1f}",
            flush=True,
        )


def rates(args, module) -> None:
    clock = SimulatedClock()
    limiter = module.RateLimiter(clock)
    rules = AccountRules(messagesPerMinute=10**9)
    step = 1.0 / args.rate
    startTracing(args)
    print(f"{'messages':>10} {'us/check':>9} {'traced MB':>10}")
    done = 0
    while done < args.messages:
        started = time.perf_counter()
        for _ in range(args.block):
            clock.now += step
            limiter.reserve("acme", rules).commit()
        elapsed = time.perf_counter() - started
        done += args.block
        current, _ = tracemalloc.get_traced_memory()
        print(
            f"{done:>10} {elapsed / args.block * 1e6:>9.2f} {current / 1e6:>10.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["throttle", "rates"])
    parser.add_argument("--failures", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--addresses", type=int, default=45)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--block", type=int, default=100_000)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    args = parser.parse_args()
    module = limitersModule(args.baseline)
    if args.what == "throttle":
        args.rate = args.rate or 60.0
        throttle(args, module)
    else:
        args.rate = args.rate or 50.0
        rates(args, module)


if __name__ == "__main__":
    main()
