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

L{BurstWindow} says, for the load generator's run alone (the window that
decides the accepted rate), how the event-loop thread spent its time:
running, waiting in the run queue for a CPU (``schedstat``), or neither
(waiting for the network, or for the GIL a pool thread holds), and how
busy the machine was (``/proc/stat``).  A loop thread that neither runs
nor waits for a CPU while the machine has CPU to spare is waiting for
something else: in the MSA's (b), the GIL (bench/RESULTS.md, the night run).
"""

import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def threadCpu(pid: int, tid: int) -> float:
    """
    @return: the CPU seconds (user + system) of thread C{tid} of C{pid}.
    """
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runQueueWait(pid: int, tid: int) -> float:
    """
    @return: the seconds thread C{tid} of C{pid} has spent runnable but
        waiting for a CPU (the second field of its ``schedstat``).
    """
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def machineTimes(stat: str | None = None) -> tuple[int, int]:
    """
    @param stat: the text of ``/proc/stat`` (read when L{None}).
    @return: (busy, total) clock ticks of all CPUs since boot; idle and
        iowait are the ticks not busy.
    """
    if stat is None:
        with open("/proc/stat") as f:
            stat = f.read()
    ticks = [int(t) for t in stat.splitlines()[0].split()[1:9]]
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


class BurstWindow:
    """
    How the event-loop thread C{loopThread} of C{pid} (the main thread by
    default) and the machine spent the time from L{__init__} to L{stop};
    the machine alone when C{pid} is L{None} (a server of many processes).
    """

    def __init__(self, pid: int | None, loopThread: int | None = None) -> None:
        self.pid = pid
        self.loopThread = loopThread or pid
        self.started = time.monotonic()
        if pid is not None and self.loopThread is not None:
            self.cpu = threadCpu(pid, self.loopThread)
            self.waited = runQueueWait(pid, self.loopThread)
        self.machine = machineTimes()

    def stop(self) -> dict[str, float]:
        """
        @return: C{loop_running} and C{loop_runqueue}: the event-loop
            thread's CPU and its wait for a CPU, each as a fraction of the
            window's wall time; C{machine_busy}: the fraction of all CPUs'
            time that was busy.
        """
        wall = time.monotonic() - self.started
        busy, total = machineTimes()
        busy -= self.machine[0]
        total -= self.machine[1]
        out = {"machine_busy": busy / total if total else 0.0}
        if self.pid is not None and self.loopThread is not None and wall:
            cpu = threadCpu(self.pid, self.loopThread) - self.cpu
            waited = runQueueWait(self.pid, self.loopThread) - self.waited
            out.update(loop_running=cpu / wall, loop_runqueue=waited / wall)
        return out


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
