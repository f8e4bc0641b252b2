# -*- test-case-name: tests.test_forked,tests.test_workers -*-
"""
Workers forked from worker 0 before its reactor exists (C{[server]
workers}), so that they share its memory.

A worker started as a new interpreter (C{python -m msa.service.worker})
loads every module again: some 40 MB of heap per process, each its own.
So worker 0, while twistd has it make its service (L{parkWorkers}, from
L{msa.service.tap.makeService}), forks its workers before it has a reactor,
a thread or a socket of its own.  Each forked worker shares, copy-on-write,
the pages of the modules loaded so far (C{gc.freeze} before the fork keeps
the collector from writing to them), closes every descriptor but its
standard ones and its end of a socket pair, and waits there.  When worker
0 starts it (L{ParkedWorker.start}, from
L{msa.service.supervisor.Workers.startService}: its listeners bound,
twistd's privileges shed, no client served yet), it sends what a started
worker would be given: its arguments, environment, working directory and
umask, its user and groups, and, with C{SCM_RIGHTS}, its standard input
(worker 0 holds the other end: its close is the worker's life line), its
output (its log events) and the listening sockets, which the worker puts
from descriptor 3 on as a started worker has them.  Then it becomes that
worker (L{msa.service.worker.main}).  Worker 0 is its parent, as of a
started worker: it reaps it, and a signal cannot reach another process.
Measured in bench/RESULTS.md.

A forked worker is used once.  A worker that ended is started again as a
new interpreter, as are all of them where none could be forked: where the
reactor was already there (the service made in a running program), or
where twistd forked itself into the background after they were (without
C{--nodaemon}: they are not its children; they end, unused).
"""

from __future__ import annotations

import atexit
import fcntl
import gc
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

from twisted.internet import error, process, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: The largest start message.
MAX_MESSAGE = 1024 * 1024
#: The most descriptors one start passes (input, output, the listeners).
MAX_FDS = 250


def processName(name: str) -> None:
    """
    Name this process C{name} (its C{comm}, as C{ps -o comm} and C{top}
    show it), so that workers can be told apart from worker 0, whose
    command line a forked worker keeps.  Nothing where the C library has
    no C{prctl}.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def parkWorkers(
    numbers: range, target: Callable[[list[str]], object] | None = None
) -> dict[int, ParkedWorker]:
    """
    Fork the workers C{numbers} to wait for their start; none (an empty
    mapping) where the reactor is already there, since a fork would share
    its descriptors and threads.

    @param target: what a worker runs with its arguments once started
        (tests); by default L{msa.service.worker.main}.
    """
    if "twisted.internet.reactor" in sys.modules or not numbers:
        return {}
    if target is None:
        from msa.service.worker import main

        target = main
    gc.collect()
    # The objects made so far (the modules') are left alone by the
    # collector from here on, in every process: their pages stay shared.
    gc.freeze()
    parked = {}
    for number in numbers:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the forked worker; tests see it from outside)
            ours.close()
            _park(number, theirs, target)
        theirs.close()
        parked[number] = ParkedWorker(number, pid, ours)
    return parked


class ParkedWorker:
    """
    Worker 0's end of a forked worker waiting for its start.

    @ivar parent: the process that forked it (its parent, which alone can
        start it).
    """

    def __init__(self, number: int, pid: int, channel: socket.socket) -> None:
        self.number = number
        self.pid = pid
        self.channel: socket.socket | None = channel
        self.parent = os.getpid()

    def usable(self) -> bool:
        """
        Whether L{start} can start it: not yet started, and this process
        its parent (twistd has not forked into the background since).
        """
        return self.channel is not None and os.getpid() == self.parent

    def discard(self) -> None:
        """
        Let it end unused (its channel closes).
        """
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def start(
        self,
        processProtocol: protocol.ProcessProtocol,
        args: list[str],
        env: dict[str, str],
        path: str,
        childFDs: dict[int, Any],
        reactor: Any,
    ) -> ForkedProcess:
        """
        Start it as C{reactor.spawnProcess} would start C{args} (C{python
        -m msa.service.worker ...}, with the listening sockets of
        C{childFDs} from 3 on): its output to C{processProtocol} (as
        descriptor 2), its end to C{processEnded}.

        @raise OSError: it could not be told (it has ended).
        """
        channel = self.channel
        assert channel is not None and self.usable()
        self.channel = None
        lifeLine, theirLifeLine = socket.socketpair()
        output, theirOutput = socket.socketpair()
        listeners = [childFDs[n] for n in sorted(childFDs) if n >= 3]
        message = {
            "args": args[3:],
            "env": env,
            "cwd": path,
            "umask": _umask(),
            "uids": os.getresuid(),
            "gids": os.getresgid(),
            "groups": os.getgroups(),
        }
        try:
            socket.send_fds(
                channel,
                [json.dumps(message).encode()],
                [theirLifeLine.fileno(), theirOutput.fileno(), *listeners],
            )
        except OSError:
            # It has ended (killed while it waited): reap it, if it has.
            lifeLine.close()
            output.close()
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            raise
        finally:
            channel.close()
            theirLifeLine.close()
            theirOutput.close()
        forked = ForkedProcess(self.pid, processProtocol, lifeLine)
        processProtocol.makeConnection(forked)
        reactor.adoptStreamConnection(
            output.fileno(), socket.AF_UNIX, _OutputFactory(forked)
        )
        output.close()
        # Reaped as a spawned process is, on SIGCHLD; at once if it has
        # already ended.
        process.registerReapProcessHandler(self.pid, forked)
        return forked


def waitReason(status: int) -> Failure:
    """
    A process's end as L{ProcessProtocol.processEnded} has it.
    """
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return Failure(error.ProcessDone(status))
    if os.WIFSIGNALED(status):
        return Failure(
            error.ProcessTerminated(signal=os.WTERMSIG(status), status=status)
        )
    return Failure(
        error.ProcessTerminated(exitCode=os.WEXITSTATUS(status), status=status)
    )


def _umask() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # pragma: no cover (Linux has the line)
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


class ForkedProcess:
    """
    A started forked worker, as the transport of its L{ProcessProtocol}:
    C{pid}, C{signalProcess}; C{processEnded} once its output has closed
    and it has been reaped (L{twisted.internet.process.reapAllProcesses}
    calls L{reapProcess}).
    """

    def __init__(
        self,
        pid: int,
        processProtocol: protocol.ProcessProtocol,
        lifeLine: socket.socket,
    ) -> None:
        self.pid: int | None = pid
        self.proto: protocol.ProcessProtocol | None = processProtocol
        self.lifeLine: socket.socket | None = lifeLine
        self.status: int | None = None
        self._outputClosed = False

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        os.kill(self.pid, signal.Signals[f"SIG{name}"])

    def reapProcess(self) -> None:
        if self.pid is None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not a child of this process (any more): as Twisted's own
            # processes, nothing to reap.
            return
        if pid:
            if process.reapProcessHandlers.get(pid) is self:
                process.unregisterReapProcessHandler(pid, self)
            self.processEnded(status)

    def processEnded(self, status: int) -> None:
        self.status = status
        self.pid = None
        if self.lifeLine is not None:
            self.lifeLine.close()
            self.lifeLine = None
        self._maybeEnded()

    def output(self, data: bytes) -> None:
        if self.proto is not None:
            self.proto.childDataReceived(2, data)

    def outputClosed(self) -> None:
        self._outputClosed = True
        # A worker's output closes as it ends: reap it now rather than at
        # the next SIGCHLD.
        self.reapProcess()
        self._maybeEnded()

    def _maybeEnded(self) -> None:
        if self.status is None or not self._outputClosed or self.proto is None:
            return
        proto, self.proto = self.proto, None
        proto.processEnded(waitReason(self.status))


class _Output(protocol.Protocol):
    def __init__(self, forked: ForkedProcess) -> None:
        self.forked = forked

    def dataReceived(self, data: bytes) -> None:
        self.forked.output(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.forked.outputClosed()


class _OutputFactory(protocol.Factory):
    def __init__(self, forked: ForkedProcess) -> None:
        self.forked = forked

    def buildProtocol(self, addr: object) -> _Output:
        return _Output(self.forked)


def _park(
    number: int, channel: socket.socket, target: Callable[[list[str]], object]
) -> None:  # pragma: no cover (runs in the forked worker)
    """
    In the forked worker: wait for the start, then become the worker; never
    back into worker 0's code.
    """
    status = 1
    try:
        processName(f"msa-worker-{number}")
        keep = {0, 1, 2, channel.fileno()}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, MAX_FDS)
        channel.close()
        if not data:
            # Worker 0 let it go unused (or has gone).
            os._exit(0)
        status = _become(json.loads(data), fds, target)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _become(
    message: dict, fds: list[int], target: Callable[[list[str]], object]
) -> int:  # pragma: no cover (runs in the forked worker)
    """
    Take on what worker 0 sent (its user and groups first), put the
    descriptors in place (input 0, output 1 and 2, the listeners from 3
    on), and run the worker: its exit status.
    """
    if os.geteuid() == 0:
        os.setgroups(message["groups"])
        os.setresgid(*message["gids"])
        os.setresuid(*message["uids"])
    # Out of the way of the places they go to (0 to 2 + listeners).
    floor = 3 + len(fds)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in fds]
    for fd in fds:
        os.close(fd)
    os.dup2(high[0], 0)
    os.dup2(high[1], 1)
    os.dup2(high[1], 2)
    for position, fd in enumerate(high[2:], start=3):
        os.dup2(fd, position)
    for fd in high:
        os.close(fd)
    os.umask(message["umask"])
    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])
    from msa._compat import forgetEarlyLogEvents

    forgetEarlyLogEvents()
    status = 0
    try:
        target(message["args"])
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    atexit._run_exitfuncs()
    return status
