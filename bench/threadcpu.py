"""
CPU time per thread of a server under test, read from
``/proc/<pid>/task/<tid>/stat`` (utime + stime): exact, where a sampling
profiler's share depends on how it tells a waiting thread from a busy
one (py-spy's samples of idle pool threads sitting in ``Condition.wait``
were once counted as work, and the split came out the wrong way round).

``bench/run.py`` takes a snapshot before a batch and one after it and
splits the server's CPU into its event-loop thread (the MSA's reactor, the
main thread of ``twistd -n``; aiosmtpd's loop thread, whose id
``bench/peer_aiosmtpd.py`` prints when it is ready) and every other thread
(the MSA's thread pool: spool commits, fsyncs, audit records; aiosmtpd's
executor and scrypt pool).  A thread that ends between the snapshots is
not counted; the pools' threads live as long as the server.
"""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def threadTimes(pid: int) -> dict[int, tuple[str, float]]:
    """
    @return: thread id to (its name, its CPU seconds so far), for every
        thread of process C{pid}.
    """
    out = {}
    base = f"/proc/{pid}/task"
    for name in os.listdir(base):
        try:
            with open(f"{base}/{name}/stat") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue
        fields = rest.split()
        comm = head.partition("(")[2]
        out[int(name)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


class ThreadSplit:
    """
    The CPU a single-process server spends from L{__init__} to L{stop},
    split between its event-loop thread (C{loopThread}, by default the
    main thread) and the others.
    """

    def __init__(self, pid: int, loopThread: int | None = None) -> None:
        self.pid = pid
        self.loopThread = loopThread or pid
        self.before = threadTimes(pid)

    def stop(self) -> tuple[float, float]:
        """
        @return: CPU seconds of the event-loop thread and of all the other
            threads since the start.
        """
        after = threadTimes(self.pid)
        loop = other = 0.0
        for tid, (comm, seconds) in after.items():
            spent = seconds - self.before.get(tid, (comm, 0.0))[1]
            if tid == self.loopThread:
                loop += spent
            else:
                other += spent
        return loop, other
