# -*- test-case-name: tests.test_slowclients -*-
"""
Slow and many clients against the assembled daemon over real sockets
(issue 9, items 9 and 10): the MSA from a TOML file (L{RunningMSA}), with
small deadlines configured.

  - Slowloris: a connection trickling one byte every 0.5 s (a partial EHLO,
    a partial ClientHello on the implicit-TLS port or after STARTTLS, a
    message in DATA, NOOPs without ever logging in) is closed by its
    deadline, and its slot is free again afterwards.
  - Bursts: twice C{max_connections} connections at once, arriving while
    the MSA is not accepting: each one gets its 220 or its C{421 4.7.0},
    nobody gets nothing; the listen backlog the kernel reports follows the
    configuration.

The unit tests of the same deadlines on a fake clock are in
C{tests/test_deadlines.py}.
"""

import select
import smtplib
import socket
import ssl
import subprocess
import time

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, threads
from twisted.logger import capturedLogs
from twisted.trial import unittest

from msa.service.backlog import checkBacklog, withBacklog
from tests.e2e import RunningMSA, freePort, requireProgram
from tests.test_proxy import ProxiedSMTP, proxyV1

GREETING = b"220 localhost ESMTP\r\n"
TOO_MANY = b"421 4.7.0 localhost Error: too many connections\r\n"


def timeoutReply(what: str) -> bytes:
    return f"421 4.4.2 localhost Error: timeout exceeded ({what})\r\n".encode()


def readLine(sock: socket.socket) -> bytes:
    """
    One reply line, blocking (the socket has a timeout).
    """
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def readToEnd(sock) -> tuple[bytes, str]:
    """
    Everything until the server closes.

    @return: the bytes and how it ended: C{"eof"}, C{"reset"} or
        C{"open"} (nothing more within 10 s: the server did not close).
    """
    sock.settimeout(10)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLEOFError):
            return data, "reset"
        except TimeoutError:
            return data, "open"
        if not chunk:
            return data, "eof"
        data += chunk


def trickle(sock, data: bytes, interval: float = 0.5) -> tuple[bytes, str]:
    """
    Send C{data} one byte every C{interval} seconds until the server
    answers or closes.

    @return: what the server sent and how the connection ended, as
        L{readToEnd}; C{"open"} if all of C{data} went out and the server
        still had not closed.
    """
    for i in range(len(data)):
        try:
            sock.sendall(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return b"", "reset"
        pending = getattr(sock, "pending", lambda: 0)()
        if pending or select.select([sock], [], [], interval)[0]:
            return readToEnd(sock)
    return b"", "open"


def clientHello() -> bytes:
    """
    The first flight of a real TLS client (Python's ssl), as bytes.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def greeting(port: int) -> bytes:
    """
    Whether a new connection is let in now: its first line.
    """
    with connect(port) as sock:
        return readLine(sock)


class SlowlorisTests(unittest.TestCase):
    """
    One slot (C{max_connections = 1}), taken by a trickling client: the
    deadline closes the connection, and the slot is free again.
    """

    def start(self, **server) -> RunningMSA:
        server.setdefault("max_connections", 1)
        server.setdefault("max_connections_per_client", 1)
        return RunningMSA(self, server=server)

    @defer.inlineCallbacks
    def test_partialEHLO(self):
        msa = self.start(command_line_timeout=2)

        def talk():
            with connect(msa.starttlsPort) as sock:
                first = readLine(sock)
                # The slot is taken while the line has not even started.
                held = greeting(msa.starttlsPort)
                return first, held, trickle(sock, b"EHLO " + b"x" * 200)

        first, held, (data, end) = yield threads.deferToThread(talk)
        self.assertEqual(first, GREETING)
        self.assertEqual(held, TOO_MANY)
        self.assertEqual((data, end), (timeoutReply("command line"), "eof"))
        self.assertEqual(
            (yield threads.deferToThread(greeting, msa.starttlsPort)), GREETING
        )

    @defer.inlineCallbacks
    def test_partialClientHelloImplicit(self):
        """
        The handshake deadline: the connection is dropped without a word (a
        reply is impossible in the middle of a handshake).
        """
        msa = self.start(tls_handshake_timeout=2)
        hello = clientHello()

        def talk():
            with connect(msa.implicitPort) as sock:
                return trickle(sock, hello[:-1])

        with capturedLogs() as events:
            data, end = yield threads.deferToThread(talk)
        self.assertEqual(data, b"")
        self.assertIn(end, ("reset", "eof"))
        self.assertIn("tls_handshake", [e.get("deadline") for e in events])
        self.assertEqual(
            (yield threads.deferToThread(greeting, msa.starttlsPort)), GREETING
        )

    @defer.inlineCallbacks
    def test_partialClientHelloAfterSTARTTLS(self):
        msa = self.start(tls_handshake_timeout=2)
        hello = clientHello()

        def talk():
            with connect(msa.starttlsPort) as sock:
                replies = [readLine(sock)]
                sock.sendall(b"STARTTLS\r\n")
                replies.append(readLine(sock))
                return replies, trickle(sock, hello[:-1])

        replies, (data, end) = yield threads.deferToThread(talk)
        self.assertEqual(replies, [GREETING, b"220 2.0.0 Ready to start TLS\r\n"])
        self.assertEqual(data, b"")
        self.assertIn(end, ("reset", "eof"))
        self.assertEqual(
            (yield threads.deferToThread(greeting, msa.starttlsPort)), GREETING
        )

    @defer.inlineCallbacks
    def test_noLogin(self):
        """
        Complete commands, each well within every per-command limit, do not
        stretch the login phase.
        """
        msa = self.start(login_timeout=2)

        def talk():
            with connect(msa.starttlsPort) as sock:
                readLine(sock)
                for _ in range(100):
                    sock.sendall(b"NOOP\r\n")
                    reply = readLine(sock)
                    if reply != b"250 2.0.0 Ok\r\n":
                        rest, end = readToEnd(sock)
                        return reply + rest, end
                    time.sleep(0.5)
                return b"", "open"

        self.assertEqual(
            (yield threads.deferToThread(talk)), (timeoutReply("login"), "eof")
        )

    @defer.inlineCallbacks
    def test_trickledMessage(self):
        """
        DATA below the minimum rate: 421 4.4.2 over TLS, the message
        aborted (nothing in the outbox), the slot free again.
        """
        msa = self.start(data_timeout=1, data_min_rate=1024)

        def talk():
            client = smtplib.SMTP("localhost", msa.starttlsPort, timeout=10)
            client.starttls(context=msa.clientContext())
            client.login("alice", "wonderland")
            client.mail("ik@mijnbedrijf.nl")
            client.rcpt("belastingdienst@overheid.nl")
            client.putcmd("data")
            code, _ = client.getreply()
            assert code == 354, code
            result = trickle(client.sock, b"Subject: slow\r\n\r\n" + b"x" * 200)
            client.close()
            return result

        data, end = yield threads.deferToThread(talk)
        self.assertEqual(data, timeoutReply("DATA"))
        self.assertIn(end, ("eof", "reset"))
        self.assertEqual(msa.outboxFiles(), [])
        self.assertEqual(
            (yield threads.deferToThread(greeting, msa.starttlsPort)), GREETING
        )

    @defer.inlineCallbacks
    def test_proxiedSTARTTLSCompletes(self):
        """
        Behind a PROXY header the TLS layer of STARTTLS wraps the PROXY
        wrapper, which passes the end of the handshake on: a finished
        handshake followed by silence is not taken for an unfinished one.
        """
        port = freePort()
        msa = self.start(
            tls_handshake_timeout=1,
            starttls_listeners=[f"haproxy:tcp:{port}:interface=127.0.0.1"],
        )

        def talk():
            ProxiedSMTP.header = proxyV1("192.0.2.7", 40000)
            client = ProxiedSMTP("localhost", port, timeout=10)
            client.ehlo("mijnbedrijf.nl")
            client.starttls(context=msa.clientContext())
            time.sleep(2)
            try:
                return client.noop()
            finally:
                client.close()

        self.assertEqual((yield threads.deferToThread(talk)), (250, b"2.0.0 Ok"))


class BurstTests(unittest.TestCase):
    """
    The listen backlog follows the connection limit (issue 9, item 10).
    """

    @defer.inlineCallbacks
    def test_burstOfTwiceTheLimit(self):
        """
        200 connections with C{max_connections = 100}, all opened while the
        MSA is not accepting (this runs in the reactor's thread, as when the
        MSA is busy), before anything is read: the kernel queues every one
        of them, and then each gets the 220 greeting or C{421 4.7.0}.
        """
        msa = RunningMSA(
            self, server={"max_connections": 100, "max_connections_per_client": 200}
        )
        sockets = []
        self.addCleanup(lambda: [s.close() for s in sockets])
        poller = select.poll()
        for _ in range(200):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", msa.starttlsPort))
            sockets.append(sock)
            poller.register(sock, select.POLLOUT)
        # A connection the kernel could not queue would be retried only
        # after a second, and again be dropped: the MSA is not accepting.
        connected = set()
        deadline = time.monotonic() + 10
        while len(connected) < len(sockets) and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                connected.add(fd)
                poller.unregister(fd)
        self.assertEqual(len(connected), 200)
        for sock in sockets:
            self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), 0)

        def readAll():
            replies = []
            for sock in sockets:
                sock.setblocking(True)
                sock.settimeout(20)
                first = readLine(sock)
                if first == TOO_MANY:
                    rest, end = readToEnd(sock)
                    replies.append((first, rest, end))
                else:
                    replies.append((first, b"", ""))
            return replies

        replies = yield threads.deferToThread(readAll)
        self.assertEqual(replies.count((GREETING, b"", "")), 100)
        self.assertEqual(replies.count((TOO_MANY, b"", "eof")), 100)

    def test_kernelBacklog(self):
        """
        The backlog of each listening socket as the kernel reports it
        (C{ss}'s Send-Q): twice C{max_connections} by default, under
        C{haproxy:} too; C{listen_backlog} when given; an explicit
        C{backlog=} in the endpoint string wins.
        """
        ss = requireProgram(self, "ss")
        ports = [freePort() for _ in range(3)]
        msa = RunningMSA(
            self,
            server={
                "max_connections": 100,
                "starttls_listeners": [
                    f"tcp:{ports[0]}:interface=127.0.0.1",
                    f"haproxy:tcp:{ports[1]}:interface=127.0.0.1",
                    f"tcp:{ports[2]}:interface=127.0.0.1:backlog=77",
                ],
            },
        )
        other = RunningMSA(self, server={"listen_backlog": 300})

        def backlog(port: int) -> int:
            out = subprocess.run(
                [ss, "-ltnH", f"sport = :{port}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            return int(out[2])

        self.assertEqual(
            [backlog(p) for p in ports + [msa.implicitPort]], [200, 200, 77, 200]
        )
        self.assertEqual(
            [backlog(other.starttlsPort), backlog(other.implicitPort)], [300, 300]
        )


class BacklogConfigurationTests(unittest.TestCase):
    """
    How the backlog gets into the listeners' endpoint strings.
    """

    def test_withBacklog(self):
        for description, expected in [
            ("tcp:587", "tcp:587:backlog=2000"),
            (
                "tcp:465:interface=192.0.2.10",
                "tcp:465:interface=192.0.2.10:backlog=2000",
            ),
            ("tcp6:587:interface=\\:\\:1", "tcp6:587:interface=\\:\\:1:backlog=2000"),
            ("unix:/run/msa.sock", "unix:/run/msa.sock:backlog=2000"),
            ("tcp:587:backlog=4096", "tcp:587:backlog=4096"),
            ("tcp:port=587:backlog=10:interface=::1", None),
            ("systemd:domain=INET6:index=0", None),
        ]:
            self.assertEqual(
                withBacklog(description, 2000), expected or description, description
            )

    def test_builtEndpoints(self):
        """
        The endpoints the service builds carry the backlog (the STARTTLS and
        the implicit-TLS listener alike).
        """
        msa = RunningMSA(self, server={"max_connections": 30})
        backlogs = sorted(
            s.endpoint._backlog
            for s in msa.service
            if isinstance(s, StreamServerEndpointService)
        )
        self.assertEqual(backlogs, [60, 60])

    def test_minimum(self):
        """
        Never below Twisted's own default of 50.
        """
        msa = RunningMSA(self, server={"max_connections": 3})
        backlogs = [
            s.endpoint._backlog
            for s in msa.service
            if isinstance(s, StreamServerEndpointService)
        ]
        self.assertEqual(backlogs, [50, 50])

    def test_aboveSomaxconn(self):
        """
        The kernel silently caps the backlog at net.core.somaxconn; the MSA
        says so at start.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("4096\n")
        with capturedLogs() as events:
            checkBacklog(4096, path)
        self.assertEqual(events, [])
        with capturedLogs() as events:
            checkBacklog(4097, path)
        self.assertEqual(len(events), 1)
        self.assertIn("net.core.somaxconn", events[0]["log_format"])
        self.assertEqual((events[0]["backlog"], events[0]["limit"]), (4097, 4096))
