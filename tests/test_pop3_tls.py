# -*- test-case-name: tests.test_pop3_tls -*-
"""
The POP3 listeners serve the SMTP listeners' TLS (one context factory,
L{msa.service.pop3service}): the certificate chain with its OCSP response
stapled, the minimum version, and C{client_certificates = "require"}; over
implicit TLS (a pyOpenSSL handshake) and over STLS (C{openssl s_client
-starttls pop3}).
"""

import datetime
import os
import poplib
import ssl

from OpenSSL import SSL
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import RunningMSA, requireProgram
from tests.test_clientcert import ClientPKI
from tests.test_tls import makeChain
from tests.test_tls_daemon import ocspResponse, pyOpenSSLHandshake, sClient, stapled


class POP3TLSPolicyTests(unittest.TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        paths, issuerKey, issuer = makeChain(directory)
        self.certFile, self.keyFile = paths["full"], paths["key"]
        self.rootFile = paths["root"]
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self.response = ocspResponse(self.certFile, issuer, issuerKey, now)
        self.ocspFile = os.path.join(directory, "ocsp.der")
        with open(self.ocspFile, "wb") as f:
            f.write(self.response)

    def start(self, **tls) -> RunningMSA:
        return RunningMSA(
            self,
            tls={"certificate": self.certFile, "key": self.keyFile, **tls},
            pop3={},
        )

    @defer.inlineCallbacks
    def test_ocspStapled(self):
        msa = self.start(ocsp_response=self.ocspFile)
        data = yield threads.deferToThread(stapled, msa.pop3sPort, False)
        self.assertEqual(data, self.response)
        requireProgram(self, "openssl")
        code, output = yield threads.deferToThread(
            sClient,
            [
                "-connect",
                f"127.0.0.1:{msa.pop3Port}",
                "-starttls",
                "pop3",
                "-status",
                "-servername",
                "localhost",
            ],
            b"QUIT\r\n",
        )
        self.assertEqual(code, 0, output)
        self.assertIn("OCSP Response Status: successful", output)
        self.assertIn("Cert Status: good", output)

    @defer.inlineCallbacks
    def test_minimumVersion(self):
        msa = self.start(minimum_version="TLSv1_3")

        def tls12():
            pyOpenSSLHandshake(
                msa.pop3sPort,
                False,
                lambda context: context.set_max_proto_version(SSL.TLS1_2_VERSION),
            )

        with self.assertRaises(SSL.Error):
            yield threads.deferToThread(tls12)
        conn = yield threads.deferToThread(pyOpenSSLHandshake, msa.pop3sPort, False)
        self.assertEqual(conn.get_protocol_version_name(), "TLSv1.3")

    @defer.inlineCallbacks
    def test_clientCertificateRequired(self):
        """
        With C{require}, a client without a certificate never gets the
        greeting; one with a certificate from C{client_ca} does.
        """
        pki = ClientPKI(os.path.abspath(self.mktemp()))
        _, certFile, keyFile = pki.issue("acme", "NTRNL-12345678")
        msa = self.start(client_certificates="require", client_ca=pki.caFile)

        def greeting(certificate: bool) -> bytes:
            context = ssl.create_default_context(cafile=self.rootFile)
            if certificate:
                context.load_cert_chain(certFile, keyFile)
            client = poplib.POP3_SSL(
                "localhost", msa.pop3sPort, context=context, timeout=10
            )
            try:
                return client.getwelcome()
            finally:
                client.close()

        failure = yield self.assertFailure(
            threads.deferToThread(greeting, False), ssl.SSLError, ConnectionError
        )
        self.assertNotIsInstance(failure, ssl.SSLCertVerificationError)
        welcome = yield threads.deferToThread(greeting, True)
        self.assertEqual(welcome, b"+OK localhost POP3 ready")
