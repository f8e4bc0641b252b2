# -*- test-case-name: tests.test_scram_plus -*-
"""
End-to-end SCRAM-SHA-256-PLUS (RFC 5802 channel binding, tls-exporter of
RFC 9266) against the whole MSA: a pyOpenSSL client (Python's C{ssl} cannot
export keying material) computes the exporter on its side of a real TLS 1.3
connection and drives scramp over hand-written SMTP, in a thread.
"""

import base64
import socket
import struct

from OpenSSL import SSL
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import RunningMSA
from tests.test_sasl_scram import exporterClient

try:
    import scramp
except ImportError:  # pragma: no cover
    scramp = None

MECHANISMS = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN", "LOGIN"]
OK = (235, b"2.7.0 Authentication successful")
FAILED = (535, b"5.7.8 Authentication credentials invalid")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class SMTPSession:
    """
    A blocking SMTP client over a plain socket or a pyOpenSSL connection.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        # A hard receive timeout: with pyOpenSSL a socket timeout would make
        # the socket non-blocking.
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0)
        )
        self.conn: socket.socket | SSL.Connection = self.sock
        self.buffer = b""

    def startTLS(self, certFile: str, maximumVersion: int | None = None) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(certFile)
        context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        if maximumVersion is not None:
            context.set_max_proto_version(maximumVersion)
        conn = SSL.Connection(context, self.sock)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        conn.do_handshake()
        from service_identity.pyopenssl import verify_hostname

        verify_hostname(conn, "localhost")
        self.conn = conn
        self.buffer = b""

    def exporter(self) -> bytes:
        assert isinstance(self.conn, SSL.Connection)
        return self.conn.export_keying_material(b"EXPORTER-Channel-Binding", 32)

    def version(self) -> str:
        assert isinstance(self.conn, SSL.Connection)
        return self.conn.get_protocol_version_name()

    def readReply(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.conn.recv(4096)
                if not data:
                    raise EOFError(f"connection closed after {lines!r}")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, line: bytes) -> tuple[int, bytes]:
        """
        Send C{line}; the code and the last line of the reply.
        """
        self.conn.sendall(line + b"\r\n")
        code, lines = self.readReply()
        return code, lines[-1]

    def ehlo(self) -> list[bytes]:
        self.conn.sendall(b"EHLO client.example\r\n")
        code, lines = self.readReply()
        assert code == 250, (code, lines)
        return lines

    def close(self) -> None:
        try:
            self.conn.sendall(b"QUIT\r\n")
        except (OSError, SSL.Error):
            pass
        self.sock.close()


def authMechanisms(ehlo: list[bytes]) -> list[str]:
    for line in ehlo:
        if line.startswith(b"AUTH "):
            return line.decode("ascii").split()[1:]
    return []


def scramExchange(session: SMTPSession, client, mechanism: str):
    """
    Drive C{client}; the final code and text.
    """
    first = b64(client.get_client_first().encode())
    code, reply = session.command(b"AUTH " + mechanism.encode() + b" " + first)
    if code != 334:
        return code, reply
    client.set_server_first(base64.b64decode(reply).decode())
    code, reply = session.command(b64(client.get_client_final().encode()))
    if code != 334:
        return code, reply
    # Raises unless the server signature is right.
    client.set_server_final(base64.b64decode(reply).decode())
    return session.command(b"")


class ScramPlusTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        if scramp is None:
            raise unittest.SkipTest("scramp not installed")
        self.msa = RunningMSA(self, server={"mechanisms": MECHANISMS})

    def connect(self, implicit: bool, maximumVersion: int | None = None):
        """
        A TLS session after EHLO (call in a thread): the session and the
        mechanisms advertised.
        """
        if implicit:
            session = SMTPSession(self.msa.implicitPort)
            session.startTLS(self.msa.certFile, maximumVersion)
            code, lines = session.readReply()
            assert code == 220, (code, lines)
        else:
            session = SMTPSession(self.msa.starttlsPort)
            code, lines = session.readReply()
            assert code == 220, (code, lines)
            session.ehlo()
            code, reply = session.command(b"STARTTLS")
            assert code == 220, (code, reply)
            session.startTLS(self.msa.certFile, maximumVersion)
        return session, authMechanisms(session.ehlo())

    def plusSession(self, implicit: bool, password: str, wrongData: bool = False):
        session, mechanisms = self.connect(implicit)
        try:
            version = session.version()
            cbdata = bytes(32) if wrongData else session.exporter()
            client = exporterClient("alice", password, cbdata)
            result = scramExchange(session, client, "SCRAM-SHA-256-PLUS")
            if result[0] == 235:
                # The session is usable.
                assert session.command(b"NOOP")[0] == 250
            return version, mechanisms, result
        finally:
            session.close()

    @defer.inlineCallbacks
    def checkPlus(self, implicit: bool):
        version, mechanisms, result = yield threads.deferToThread(
            self.plusSession, implicit, "wonderland"
        )
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual(mechanisms, MECHANISMS)
        self.assertEqual(result, OK)

    def test_plusImplicitTLS(self):
        return self.checkPlus(implicit=True)

    def test_plusStartTLS(self):
        return self.checkPlus(implicit=False)

    @defer.inlineCallbacks
    def test_wrongBindingData(self):
        """
        A client binding to other data (what it would see behind a man in
        the middle) fails even with the right password.
        """
        _, _, result = yield threads.deferToThread(
            self.plusSession, True, "wonderland", True
        )
        self.assertEqual(result, FAILED)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        _, _, result = yield threads.deferToThread(self.plusSession, True, "wrong")
        self.assertEqual(result, FAILED)

    def plainScramSession(self, canBind: bool):
        session, _ = self.connect(True)
        try:
            if canBind:
                client = exporterClient(
                    "alice", "wonderland", session.exporter(), ("SCRAM-SHA-256",)
                )
            else:
                client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "wonderland")
            return scramExchange(session, client, "SCRAM-SHA-256")
        finally:
            session.close()

    @defer.inlineCallbacks
    def test_downgrade(self):
        """
        SCRAM-SHA-256 with "y,," (the client can bind but believes the
        server cannot) fails where -PLUS is offered.
        """
        result = yield threads.deferToThread(self.plainScramSession, True)
        self.assertEqual(result, FAILED)

    @defer.inlineCallbacks
    def test_noBindingStillWorks(self):
        result = yield threads.deferToThread(self.plainScramSession, False)
        self.assertEqual(result, OK)

    def tls12Session(self, implicit: bool):
        session, mechanisms = self.connect(implicit, SSL.TLS1_2_VERSION)
        try:
            version = session.version()
            code, reply = session.command(b"AUTH SCRAM-SHA-256-PLUS")
            # "y,," is no downgrade here: -PLUS is not offered.
            client = exporterClient(
                "alice", "wonderland", bytes(32), ("SCRAM-SHA-256",)
            )
            return (
                version,
                mechanisms,
                (code, reply),
                scramExchange(session, client, "SCRAM-SHA-256"),
            )
        finally:
            session.close()

    @defer.inlineCallbacks
    def checkTLS12(self, implicit: bool):
        """
        TLS 1.2: no -PLUS (tls-exporter needs the extended master secret
        there), AUTH SCRAM-SHA-256-PLUS is an unknown mechanism, and "y,,"
        is accepted.
        """
        version, mechanisms, plus, scram = yield threads.deferToThread(
            self.tls12Session, implicit
        )
        self.assertEqual(version, "TLSv1.2")
        self.assertEqual(mechanisms, MECHANISMS[1:])
        self.assertEqual(plus, (504, b"5.5.4 Unrecognized authentication type"))
        self.assertEqual(scram, OK)

    def test_tls12ImplicitTLS(self):
        return self.checkTLS12(implicit=True)

    def test_tls12StartTLS(self):
        return self.checkTLS12(implicit=False)


class NotConfiguredTests(unittest.TestCase):
    """
    Without -PLUS in the configured mechanisms, TLS 1.3 changes nothing.
    """

    timeout = 60

    def setUp(self):
        if scramp is None:
            raise unittest.SkipTest("scramp not installed")
        self.msa = RunningMSA(self, server={"mechanisms": ["SCRAM-SHA-256", "PLAIN"]})

    def session(self):
        session = SMTPSession(self.msa.implicitPort)
        try:
            session.startTLS(self.msa.certFile)
            session.readReply()
            mechanisms = authMechanisms(session.ehlo())
            plus = session.command(b"AUTH SCRAM-SHA-256-PLUS")
            client = exporterClient(
                "alice", "wonderland", session.exporter(), ("SCRAM-SHA-256",)
            )
            return (
                session.version(),
                mechanisms,
                plus,
                scramExchange(session, client, "SCRAM-SHA-256"),
            )
        finally:
            session.close()

    @defer.inlineCallbacks
    def test_notOffered(self):
        version, mechanisms, plus, scram = yield threads.deferToThread(self.session)
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual(mechanisms, ["SCRAM-SHA-256", "PLAIN"])
        self.assertEqual(plus, (504, b"5.5.4 Unrecognized authentication type"))
        self.assertEqual(scram, OK)
