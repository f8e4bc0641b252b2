# -*- test-case-name: tests.test_workers -*-
"""
Worker 0's part of C{[server] workers} (L{msa.service.workers}): start the
other workers over the listening sockets, put their log events into this
process's log, start one again when it ends, and stop them all with this
process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import (
    InvalidLogLevelError,
    Logger,
    LogLevel,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from msa.policy.keptlimits import LimitsKeeper
from msa.service.forked import ParkedWorker
from msa.service.workers import KeptPort

log = Logger()

#: Seconds before an ended worker is started again, at first.
RESTART_DELAY = 0.5
#: The longest wait before a start, for a worker that keeps ending.
RESTART_DELAY_MAX = 30.0
#: A worker that ran this long before it ended starts again after
#: L{RESTART_DELAY}; one that ended sooner waits twice as long as before.
STEADY = 10.0
#: Seconds past C{shutdown_grace} that a stop waits for a worker to end
#: before it is killed.
STOP_MARGIN = 10.0
#: Seconds after a worker's end that it is reported as an error, unless
#: this process is stopping by then (L{Workers.ended}).
SIGNAL_SKEW = 0.2
#: The longest line a worker may send (a log event with a traceback).
MAX_LINE = 1024 * 1024
#: The field of a worker's log event that carries its failure's traceback
#: as text (JSON cannot carry the exception).
TRACEBACK = "worker_traceback"


class WorkerFailure(Exception):
    """
    A worker's failure in worker 0's log: the exception of a L{Failure}
    whose message is the worker's traceback, as text (every observer that
    shows a failure's traceback shows it).
    """


#: systemd's socket-activation variables: for worker 0 only (a worker is
#: given its sockets by worker 0).
_SYSTEMD = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def workerEnvironment() -> dict[str, str]:
    """
    A worker's environment: worker 0's, without systemd's sockets.
    """
    return {k: v for k, v in os.environ.items() if k not in _SYSTEMD}


class _Worker(protocol.ProcessProtocol):
    """
    One worker process: its log lines in, its end noticed.
    """

    def __init__(self, owner: Workers, number: int) -> None:
        self.owner = owner
        self.number = number
        self.started = owner.clock()
        self.buffers = {1: b"", 2: b""}
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.gone = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self.buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self.buffers[childFD] = rest
        for line in lines:
            self.owner.logFrom(self.number, line)

    def processEnded(self, reason: Failure) -> None:
        for rest in self.buffers.values():
            if rest:
                self.owner.logFrom(self.number, rest)
        self.gone = True
        self.owner.ended(self, reason)
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        if self.gone or self.transport is None:
            return
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


class Workers(service.Service):
    """
    Worker 0's part: start workers 1 to C{count - 1} over the listening
    sockets of C{ports}, start each again when it ends while this runs,
    and stop them all when this stops (L{msa.service.workers} says how).

    @ivar processes: the running workers, by number.
    @ivar starts: how many times each was started.
    """

    name = "workers"

    def __init__(
        self,
        count: int,
        configPath: str | None,
        ports: list[KeptPort],
        reactor: Any,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
        parked: dict[int, ParkedWorker] | None = None,
    ) -> None:
        """
        @param parked: the workers forked before the reactor, waiting for
            their first start (L{msa.service.forked}); the others, and a
            worker started again, are new processes.
        """
        self.count = count
        self.parked = dict(parked or {})
        #: Worker 0's limits, which the workers ask for over a socket pair
        #: each (C{[limits] backend = "memory"}), or L{None} (Redis).
        self.keeper: LimitsKeeper | None = None
        self.configPath = None if configPath is None else os.path.abspath(configPath)
        self.ports = ports
        self.reactor = reactor
        self.grace = grace
        self.clock = clock
        self.processes: dict[int, _Worker] = {}
        self.starts: dict[int, int] = {}
        self._delays: dict[int, float] = {}
        self._pending: dict[int, Any] = {}
        self._kill: Any = None

    def command(self, number: int) -> tuple[list[str], dict[int, Any]]:
        """
        The command line that starts worker C{number}, and the descriptors
        it gets: its standard input (its life line), output and error (its
        log), then the listening sockets from 3 on.
        """
        args = [sys.executable, "-m", "msa.service.worker", "--worker", str(number)]
        if self.configPath is not None:
            args += ["--config", self.configPath]
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for position, kept in enumerate(self.ports, start=3):
            fds[position] = kept.port.fileno()
            args += ["--listener", f"{kept.key}={position}"]
        return args, fds

    def missing(self) -> list[int]:
        """
        The workers not running steadily: ended and not yet started again,
        or started again less than L{STEADY} seconds ago (a worker that
        keeps ending is missing all the time, not only between its
        starts).
        """
        now = self.clock()
        missing = []
        for number in range(1, self.count):
            worker = self.processes.get(number)
            if worker is None or (
                self.starts[number] > 1 and now - worker.started < STEADY
            ):
                missing.append(number)
        return missing

    def startService(self) -> None:
        super().startService()
        for number in range(1, self.count):
            self._start(number)

    def _start(self, number: int) -> None:
        self._pending.pop(number, None)
        if not self.running:
            return
        args, fds = self.command(number)
        worker = _Worker(self, number)
        parked = self.parked.pop(number, None)
        ours = theirs = None
        if self.keeper is not None:
            ours, theirs = socket.socketpair()
            position = max(fds) + 1
            fds[position] = theirs.fileno()
            args += ["--limits", str(position)]
        try:
            if parked is not None and parked.usable():
                how = "forked from worker 0"
                transport = parked.start(
                    worker, args, workerEnvironment(), os.getcwd(), fds, self.reactor
                )
            else:
                if parked is not None:
                    log.info(
                        "worker {number} starts as a new process: twistd has "
                        "forked into the background since it was forked",
                        number=number,
                    )
                    parked.discard()
                how = "a new process"
                transport = self.reactor.spawnProcess(
                    worker,
                    sys.executable,
                    args,
                    env=workerEnvironment(),
                    path=os.getcwd(),
                    childFDs=fds,
                )
        except OSError:
            log.failure("cannot start worker {number}", number=number)
            for end in (ours, theirs):
                if end is not None:
                    end.close()
            self._later(number)
            return
        if self.keeper is not None and ours is not None and theirs is not None:
            theirs.close()
            self.keeper.channel(number, ours, self.reactor)
        self.processes[number] = worker
        self.starts[number] = self.starts.get(number, 0) + 1
        log.info(
            "worker {number} started (process {pid}, {how})",
            number=number,
            pid=transport.pid,
            how=how,
        )

    def _later(self, number: int, ranFor: float = 0.0) -> float:
        delay = self._delays.get(number, RESTART_DELAY / 2) * 2
        if ranFor >= STEADY:
            delay = RESTART_DELAY
        delay = min(delay, RESTART_DELAY_MAX)
        self._delays[number] = delay
        self._pending[number] = self.reactor.callLater(delay, self._start, number)
        return delay

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if self.processes.get(worker.number) is worker:
            del self.processes[worker.number]
        if not self.running:
            return
        ranFor = self.clock() - worker.started
        delay = self._later(worker.number, ranFor)
        # Said a moment later: a signal to the whole process group (a
        # terminal's Ctrl-C, kill of the group) may reach the worker before
        # it reaches this process, whose stop then makes it no error.
        self.reactor.callLater(
            SIGNAL_SKEW, self._reportEnd, worker.number, reason, ranFor, delay
        )

    def _reportEnd(
        self, number: int, reason: Failure, ranFor: float, delay: float
    ) -> None:
        if not self.running:
            log.info("worker {number} has stopped", number=number)
            return
        log.error(
            "worker {number} ended ({reason}) after {ranFor:.1f} s; the messages "
            "its spool holds wait for it; starting it again in {delay} s",
            number=number,
            reason=reason.getErrorMessage(),
            ranFor=ranFor,
            delay=delay,
        )

    def logFrom(self, number: int, line: bytes) -> None:
        """
        One line from worker C{number}: a log event (into this process's
        log, marked as the worker's), or anything else it wrote (logged as
        text).
        """
        text = line.strip(b"\x1e \r\n\t").decode("utf-8", "replace")
        if not text:
            return
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError(text)
            event["log_level"] = LogLevel.levelWithName(event["log_level"])
        except (ValueError, KeyError, TypeError, InvalidLogLevelError):
            log.warn("worker {number}: {text}", number=number, text=text)
            return
        event["log_system"] = f"worker-{number}"
        event["worker"] = number
        traceback = event.pop(TRACEBACK, None)
        if isinstance(traceback, str):
            event["log_failure"] = Failure(WorkerFailure(traceback))
        globalLogPublisher(event)

    def stopService(self):
        super().stopService()
        for parked in self.parked.values():
            parked.discard()
        self.parked.clear()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        workers = list(self.processes.values())
        for worker in workers:
            worker.signal("TERM")
        if workers:
            # From the stop's start, not from worker 0's own end of it.
            self._kill = self.reactor.callLater(
                self.grace + STOP_MARGIN, self._killHung, workers
            )

    def _killHung(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.gone:
                log.error(
                    "worker {number} did not end within {seconds} s of the "
                    "stop: killed",
                    number=worker.number,
                    seconds=self.grace + STOP_MARGIN,
                )
                worker.signal("KILL")

    def whenGone(self) -> defer.Deferred[None]:
        """
        A L{Deferred} that fires once every worker has ended (those still
        there C{grace} plus L{STOP_MARGIN} seconds into the stop are
        killed).
        """
        workers = list(self.processes.values())

        def over(_: object) -> None:
            if self._kill is not None and self._kill.active():
                self._kill.cancel()

        return defer.gatherResults([w.ended for w in workers]).addCallback(over)


class WorkersGone(service.Service):
    """
    Worker 0's last step of a stop: wait until every worker has ended
    (L{Workers.whenGone}).  It is added before the other services, so that
    it stops after them: the workers finish their sessions while worker 0
    finishes its own, not one after the other.
    """

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    def stopService(self):
        super().stopService()
        return self.workers.whenGone()
