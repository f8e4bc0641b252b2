"""
A throwaway Redis for tests: Debian's C{redis-server} on a free loopback
port, with its directory under the test's temporary directory, nothing
saved to disk, and killed in the test's cleanup.  It can be stopped and
started again on the same port (Redis going away and coming back), and
serve TLS only (L{RedisTLS}: C{--port 0 --tls-port}).
"""

import os
import socket
import ssl
import subprocess

import attrs

from tests.e2e import freePort, requireProgram
from tests.waiting import listening, waitUntilBlocking


@attrs.frozen
class RedisTLS:
    """
    What a TLS-only Redis serves: its certificate chain and key, and the CA
    of the client certificates it requires (L{None}: none required).
    """

    certificate: str
    key: str
    clientCA: str | None = None
    #: What the test's own connections (L{RedisServer.command}) trust and
    #: show.
    serverCA: str | None = None
    clientCertificate: str | None = None
    clientKey: str | None = None


class RedisServer:
    """
    One C{redis-server} process.

    @ivar port: its port on 127.0.0.1.
    @ivar url: the C{[limits] url} for it (C{rediss://localhost:...} with
        L{RedisTLS}).
    """

    def __init__(
        self, testCase, tls: RedisTLS | None = None, replicaOf: int | None = None
    ) -> None:
        self.testCase = testCase
        #: The port of the master this one replicates, if any.
        self.replicaOf = replicaOf
        self.program = requireProgram(testCase, "redis-server")
        self.directory = os.path.abspath(testCase.mktemp())
        os.makedirs(self.directory)
        self.port = freePort()
        self.tls = tls
        self.url = f"redis://127.0.0.1:{self.port}/0"
        if tls is not None:
            self.url = f"rediss://localhost:{self.port}/0"
        self.process: subprocess.Popen | None = None
        testCase.addCleanup(self.stop)
        self.start()

    def start(self) -> None:
        """
        Start it and wait until it takes connections.
        """
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls.certificate,
                "--tls-key-file",
                self.tls.key,
                "--tls-auth-clients",
                "yes" if self.tls.clientCA else "no",
            ]
            if self.tls.clientCA:
                listen += ["--tls-ca-cert-file", self.tls.clientCA]
        if self.replicaOf is not None:
            listen += ["--replicaof", "127.0.0.1", str(self.replicaOf)]
        self.process = subprocess.Popen(
            [
                self.program,
                *listen,
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
        with self._connect() as s:
            s.sendall(b"".join(parts))
            reply = b""
            while not reply.endswith(b"\r\n") or not _complete(reply):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if self.tls is None:
            return s
        context = ssl.create_default_context(cafile=self.tls.serverCA)
        if self.tls.clientCA:
            context.load_cert_chain(self.tls.clientCertificate, self.tls.clientKey)
        return context.wrap_socket(s, server_hostname="localhost")

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


class RedisSentinel(RedisServer):
    """
    One Redis Sentinel (C{redis-server CONF --sentinel}) monitoring the
    master on C{masterPort} as C{service}, with a quorum of 1 and short
    timeouts, so that a test's failover takes seconds.
    """

    def __init__(self, testCase, masterPort: int, service: str = "mymaster"):
        self.masterPort = masterPort
        self.service = service
        super().__init__(testCase)
        self.url = f"redis+sentinel://127.0.0.1:{self.port}/{service}/0"

    def start(self) -> None:
        config = os.path.join(self.directory, "sentinel.conf")
        if not os.path.exists(config):
            with open(config, "w") as f:
                f.write(
                    f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                    f"sentinel monitor {self.service} 127.0.0.1 "
                    f"{self.masterPort} 1\n"
                    f"sentinel down-after-milliseconds {self.service} 500\n"
                    f"sentinel failover-timeout {self.service} 2000\n"
                )
        log = open(os.path.join(self.directory, "sentinel.log"), "ab")
        self.process = subprocess.Popen(
            [self.program, config, "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        waitUntilBlocking(
            lambda: listening(self.port), what=f"redis-sentinel on port {self.port}"
        )

    def currentMaster(self) -> int | None:
        """
        The port of the master it names now (blocking).
        """
        reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        lines = reply.split(b"\r\n")
        return int(lines[4]) if reply.startswith(b"*2") else None


def tlsRedisServer(testCase) -> RedisServer:
    """
    A TLS-only Redis with a test CA made here: its certificate for
    C{localhost} from a root and an intermediate (L{tests.test_tls.
    makeChain}), and client certificates required from a client CA
    (L{tests.test_clientcert.ClientPKI}), with one issued for the MSA.

    @return: the server; its C{tls} names the files.
    """
    from tests.test_clientcert import ClientPKI
    from tests.test_tls import makeChain

    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    server, _, _ = makeChain(directory)
    clients = ClientPKI(os.path.join(directory, "clients"))
    _, clientCertificate, clientKey = clients.issue("msa", "1")
    return RedisServer(
        testCase,
        RedisTLS(
            certificate=server["full"],
            key=server["key"],
            clientCA=clients.caFile,
            serverCA=server["root"],
            clientCertificate=clientCertificate,
            clientKey=clientKey,
        ),
    )


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
