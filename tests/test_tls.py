# -*- test-case-name: tests.test_tls -*-
"""
L{msa.tls}: the server's TLS policy checked with real handshakes from
Python's ssl module (a scanner's view is in test_interop), the chain sent
complete, and clear errors for unusable certificates.
"""

import datetime
import os
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, reactor, threads
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from msa import tls


def makeCertificate(name, key, issuerName, issuerKey, ca, sans=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuerName)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
        )
    return builder.sign(issuerKey, hashes.SHA256())


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def makeChain(directory):
    """
    Root CA -> intermediate -> leaf "localhost"; the leaf file holds leaf
    and intermediate, as operators get it from their CA.
    """
    rootKey, interKey, leafKey = (
        ec.generate_private_key(ec.SECP256R1()) for _ in "123"
    )
    root = makeCertificate("Test Root", rootKey, "Test Root", rootKey, True)
    inter = makeCertificate("Test Intermediate", interKey, "Test Root", rootKey, True)
    leaf = makeCertificate(
        "localhost", leafKey, "Test Intermediate", interKey, False, ["localhost"]
    )
    paths = {
        name: os.path.join(directory, name + ".pem")
        for name in ("root", "full", "leaf", "key")
    }
    with open(paths["root"], "wb") as f:
        f.write(pem(root))
    with open(paths["full"], "wb") as f:
        f.write(pem(leaf) + pem(inter))
    with open(paths["leaf"], "wb") as f:
        f.write(pem(leaf))
    with open(paths["key"], "wb") as f:
        f.write(
            leafKey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths, interKey, inter


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


def handshake(port, context, serverName="localhost"):
    """
    A blocking client handshake; returns (version, cipher) or raises.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=serverName) as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            return conn.version(), conn.cipher()[0]


class ServerPolicyTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.paths, _, _ = makeChain(self.directory)

    def listen(self, certFile, keyFile, chainFile=None):
        options = tls.serverContextFactory(certFile, keyFile, chainFile)
        factory = TLSMemoryBIOFactory(
            options, False, protocol.Factory.forProtocol(Echo)
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def client(self, **kwargs):
        context = ssl.create_default_context(cafile=self.paths["root"])
        for key, value in kwargs.items():
            if key == "ciphers":
                context.set_ciphers(value)
            else:
                setattr(context, key, value)
        return context

    def test_chainSentComplete(self):
        """
        A client that trusts only the root verifies the leaf: the server sent
        the intermediate from the certificate file.
        """
        port = self.listen(self.paths["full"], self.paths["key"])
        d = threads.deferToThread(handshake, port, self.client())
        d.addCallback(lambda result: self.assertEqual(result[0], "TLSv1.3"))
        return d

    def test_chainFromChainFile(self):
        directory = self.directory
        with open(os.path.join(directory, "full.pem"), "rb") as f:
            both = x509.load_pem_x509_certificates(f.read())
        chainFile = os.path.join(directory, "chain.pem")
        with open(chainFile, "wb") as f:
            f.write(pem(both[1]))
        port = self.listen(self.paths["leaf"], self.paths["key"], chainFile)
        return threads.deferToThread(handshake, port, self.client())

    def test_leafAloneFailsVerification(self):
        """
        The control for the two tests above: without the intermediate the
        client cannot verify, so they prove the chain is sent.
        """
        port = self.listen(self.paths["leaf"], self.paths["key"])
        return self.assertFailure(
            threads.deferToThread(handshake, port, self.client()), ssl.SSLError
        )

    def test_tls12AEADOnly(self):
        port = self.listen(self.paths["full"], self.paths["key"])
        good = self.client(
            maximum_version=ssl.TLSVersion.TLSv1_2,
            ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        cbc = self.client(
            maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA256"
        )
        d = threads.deferToThread(handshake, port, good)
        d.addCallback(self.assertEqual, ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"))
        d.addCallback(
            lambda _: self.assertFailure(
                threads.deferToThread(handshake, port, cbc), ssl.SSLError
            )
        )
        return d

    def test_mismatchedKey(self):
        otherKey = os.path.join(self.directory, "other-key.pem")
        with open(otherKey, "wb") as f:
            f.write(
                ec.generate_private_key(ec.SECP256R1()).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        error = self.assertRaises(
            tls.TLSConfigurationError,
            tls.serverContextFactory,
            self.paths["full"],
            otherKey,
        )
        self.assertIn("do not match", str(error))

    def test_missingFile(self):
        error = self.assertRaises(
            tls.TLSConfigurationError,
            tls.serverContextFactory,
            "/nonexistent/cert.pem",
            self.paths["key"],
        )
        self.assertIn("/nonexistent/cert.pem", str(error))


class SelfSignedTests(unittest.TestCase):
    def test_made(self):
        directory = os.path.abspath(self.mktemp())
        certFile, keyFile = tls.ensureSelfSignedCertificate(directory, "localhost")
        with open(certFile, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(cert.public_key().curve.name, "secp256r1")
        sans = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(os.stat(keyFile).st_mode & 0o777, 0o600)
        self.assertEqual(
            tls.ensureSelfSignedCertificate(directory, "localhost"), (certFile, keyFile)
        )
        with open(certFile, "rb") as f:
            self.assertEqual(x509.load_pem_x509_certificate(f.read()), cert)
