"""
A throwaway Redis for tests: Debian's C{redis-server} on a free loopback
port, with its directory under the test's temporary directory, nothing
saved to disk, and killed in the test's cleanup.  It can be stopped and
started again on the same port (Redis going away and coming back).
"""

import os
import socket
import subprocess

from tests.e2e import freePort, requireProgram
from tests.waiting import listening, waitUntilBlocking


class RedisServer:
    """
    One C{redis-server} process.

    @ivar port: its port on 127.0.0.1.
    @ivar url: the C{[limits] url} for it.
    """

    def __init__(self, testCase) -> None:
        self.testCase = testCase
        self.program = requireProgram(testCase, "redis-server")
        self.directory = os.path.abspath(testCase.mktemp())
        os.makedirs(self.directory)
        self.port = freePort()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        testCase.addCleanup(self.stop)
        self.start()

    def start(self) -> None:
        """
        Start it and wait until it takes connections.
        """
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        self.process = subprocess.Popen(
            [
                self.program,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.directory,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        waitUntilBlocking(
            lambda: listening(self.port), what=f"redis-server on port {self.port}"
        )

    def stop(self) -> None:
        """
        Kill it (SIGKILL: nothing is saved, as in a crash) and wait for it.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def command(self, *args: str) -> bytes:
        """
        One command over a socket of its own, blocking; returns the raw
        RESP reply (for assertions on the counters a test reads back).
        """
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"".join(parts))
            reply = b""
            while not reply.endswith(b"\r\n") or not _complete(reply):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply

    def integer(self, *args: str) -> int:
        """
        A command whose reply is an integer (ZCARD, GET of a counter...);
        a nil reply is 0.
        """
        reply = self.command(*args)
        if reply.startswith(b":"):
            return int(reply[1:-2])
        if reply.startswith(b"$-1"):
            return 0
        if reply.startswith(b"$"):
            return int(reply.split(b"\r\n")[1])
        raise AssertionError(f"not an integer reply: {reply!r}")


def _complete(reply: bytes) -> bool:
    """
    Whether a RESP reply of the simple kinds the tests use (status, error,
    integer, bulk string) has arrived whole.
    """
    if reply[:1] in (b"+", b"-", b":"):
        return reply.endswith(b"\r\n")
    if reply.startswith(b"$-1"):
        return True
    if reply.startswith(b"$"):
        header, _, rest = reply.partition(b"\r\n")
        return len(rest) >= int(header[1:]) + 2
    return True
