# -*- test-case-name: tests.test_pop3_sasl_e2e -*-
"""
POP3 AUTH (RFC 5034) with the mechanisms that need the TLS connection,
against the daemon from TOML: SCRAM-SHA-256-PLUS with tls-exporter channel
binding (a pyOpenSSL client: Python's C{ssl} cannot export keying
material) and EXTERNAL with a verified client certificate, over STLS and
implicit TLS.
"""

import base64
import os
import poplib

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.clientcert import certificateIdentities
from tests.e2e import RunningMSA, fixtureAccount
from tests.test_clientcert import ClientPKI
from tests.test_pop3_e2e import MESSAGE, deliver
from tests.test_sasl_scram import exporterClient
from tests.test_scram_plus import SMTPSession, b64

try:
    import scramp
except ImportError:  # pragma: no cover
    scramp = None

MECHANISMS = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"]
LOGGED_IN = b"+OK Logged in, mailbox locked"


class POP3OverOpenSSL(SMTPSession):
    """
    L{SMTPSession}'s socket and pyOpenSSL TLS, speaking POP3: one line a
    response.
    """

    def readLine(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.conn.recv(4096)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, line: bytes) -> bytes:  # type: ignore[override]
        self.conn.sendall(line + b"\r\n")
        return self.readLine()


def scramPlusLogin(msa: RunningMSA, implicit: bool, cbdata: bytes | None = None):
    """
    Blocking: SCRAM-SHA-256-PLUS over TLS 1.3; the last response and what
    STAT says after it.
    """
    port = msa.pop3sPort if implicit else msa.pop3Port
    session = POP3OverOpenSSL(port)
    try:
        if implicit:
            session.startTLS(msa.certFile)
            assert session.readLine().startswith(b"+OK")
        else:
            assert session.readLine().startswith(b"+OK")
            assert session.command(b"STLS").startswith(b"+OK")
            session.startTLS(msa.certFile)
        exporter = session.exporter() if cbdata is None else cbdata
        client = exporterClient("alice", "wonderland", exporter)
        first = b64(client.get_client_first().encode())
        reply = session.command(b"AUTH SCRAM-SHA-256-PLUS " + first)
        assert reply.startswith(b"+ "), reply
        client.set_server_first(base64.b64decode(reply[2:]).decode())
        reply = session.command(b64(client.get_client_final().encode()))
        if not reply.startswith(b"+ "):
            return reply, None
        client.set_server_final(base64.b64decode(reply[2:]).decode())
        reply = session.command(b"")
        return reply, session.command(b"STAT")
    finally:
        session.close()


class ScramPlusTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        if scramp is None:
            raise unittest.SkipTest("scramp not installed")
        self.msa = RunningMSA(self, pop3={"mechanisms": MECHANISMS})

    @defer.inlineCallbacks
    def checkPlus(self, implicit: bool):
        yield deliver(self.msa, "alice", MESSAGE)
        reply, stat = yield threads.deferToThread(scramPlusLogin, self.msa, implicit)
        self.assertEqual((reply, stat), (LOGGED_IN, b"+OK 1 %d" % len(MESSAGE)))

    def test_stls(self):
        return self.checkPlus(implicit=False)

    def test_implicit(self):
        return self.checkPlus(implicit=True)

    @defer.inlineCallbacks
    def test_wrongBinding(self):
        reply, _ = yield threads.deferToThread(
            scramPlusLogin, self.msa, True, bytes(32)
        )
        self.assertEqual(reply, b"-ERR [AUTH] Authentication failed")


class ExternalTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        pki = ClientPKI(os.path.abspath(self.mktemp()))
        cert, self.certFile, self.keyFile = pki.issue("acme", "NTRNL-12345678")
        [fingerprint, _] = certificateIdentities(cert)
        acme = attrs.evolve(
            fixtureAccount("acme", "acme pass", mechanisms=("EXTERNAL",)),
            extra={"certificates": [fingerprint]},
        )
        self.msa = RunningMSA(
            self,
            tls={"client_certificates": "request", "client_ca": pki.caFile},
            extraAccounts={"acme": acme},
            pop3={},
        )

    def session(self, implicit: bool, certificate: bool):
        """
        Blocking: CAPA's SASL line and the answer to AUTH EXTERNAL.
        """
        context = self.msa.clientContext()
        if certificate:
            context.load_cert_chain(self.certFile, self.keyFile)
        if implicit:
            client = poplib.POP3_SSL(
                "localhost", self.msa.pop3sPort, context=context, timeout=10
            )
        else:
            client = poplib.POP3("localhost", self.msa.pop3Port, timeout=10)
            client.stls(context)
        try:
            [sasl] = [
                line for line in client._longcmd("CAPA")[1] if line.startswith(b"SASL")
            ]
            try:
                answer = client._shortcmd("AUTH EXTERNAL =")
            except poplib.error_proto as e:
                answer = e.args[0]
            return sasl, answer
        finally:
            client.close()

    @defer.inlineCallbacks
    def checkExternal(self, implicit: bool):
        yield deliver(self.msa, "acme", MESSAGE)
        sasl, answer = yield threads.deferToThread(self.session, implicit, True)
        self.assertEqual(sasl, b"SASL EXTERNAL SCRAM-SHA-256 DIGEST-MD5 PLAIN LOGIN")
        self.assertEqual(answer, LOGGED_IN)
        sasl, answer = yield threads.deferToThread(self.session, implicit, False)
        self.assertEqual(sasl, b"SASL SCRAM-SHA-256 DIGEST-MD5 PLAIN LOGIN")
        self.assertEqual(answer, b"-ERR Unrecognized authentication type")

    def test_stls(self):
        return self.checkExternal(implicit=False)

    def test_implicit(self):
        return self.checkExternal(implicit=True)
