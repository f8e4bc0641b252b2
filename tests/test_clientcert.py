# -*- test-case-name: tests.test_clientcert -*-
"""
Client certificates (R13) end to end: a company whose account is bound to
its certificate submits with curl using --cert/--key plus its password;
the same password from a connection without the certificate (or with
another company's) is refused; SASL EXTERNAL logs in by the certificate
alone; a revoked certificate does not get through the handshake.
"""

import datetime
import os
import smtplib
import ssl

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.clientcert import certificateIdentities
from tests.e2e import MESSAGE, RunningMSA, fixtureAccount, requireProgram, runProgram

NOW = datetime.datetime.now(datetime.UTC)


def _name(cn, serial=None):
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attributes)


def _write(path, *items):
    with open(path, "wb") as f:
        for item in items:
            if isinstance(item, ec.EllipticCurvePrivateKey):
                f.write(
                    item.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
            else:
                f.write(item.public_bytes(serialization.Encoding.PEM))
    return path


class ClientPKI:
    """
    A client CA and certificates for two companies, one of them revoked.
    """

    def __init__(self, directory, caName="Test Client CA"):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.caKey = ec.generate_private_key(ec.SECP256R1())
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(_name(caName))
            .issuer_name(_name(caName))
            .public_key(self.caKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(self.caKey, hashes.SHA256())
        )
        self.caFile = _write(os.path.join(directory, "client-ca.pem"), self.ca)

    def issue(self, name, serialNumber):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name, serialNumber))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
            .sign(self.caKey, hashes.SHA256())
        )
        certFile = _write(os.path.join(self.directory, name + ".pem"), cert)
        keyFile = _write(os.path.join(self.directory, name + "-key.pem"), key)
        return cert, certFile, keyFile

    def crl(self, *revoked):
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.subject)
            .last_update(NOW - datetime.timedelta(minutes=1))
            .next_update(NOW + datetime.timedelta(days=1))
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(NOW - datetime.timedelta(minutes=1))
                .build()
            )
        return _write(
            os.path.join(self.directory, "client.crl"),
            builder.sign(self.caKey, hashes.SHA256()),
        )


class ClientCertificateTests(unittest.TestCase):
    def setUp(self):
        pki = ClientPKI(os.path.abspath(self.mktemp()))
        self.acmeCert, self.acmeFile, self.acmeKey = pki.issue("acme", "NTRNL-12345678")
        _, self.otherFile, self.otherKey = pki.issue("other", "NTRNL-87654321")
        self.revokedCert, self.revokedFile, self.revokedKey = pki.issue(
            "revoked", "NTRNL-11111111"
        )
        [fingerprint, _] = certificateIdentities(self.acmeCert)
        acme = attrs.evolve(
            fixtureAccount(
                "acme", "acme pass", mechanisms=("PLAIN", "LOGIN", "EXTERNAL")
            ),
            extra={
                "senders": ["@mijnbedrijf.nl"],
                "requireClientCertificate": True,
                "certificates": [fingerprint, "serialNumber:NTRNL-11111111"],
            },
        )
        self.msa = RunningMSA(
            self,
            tls={
                "client_certificates": "request",
                "client_ca": pki.caFile,
                "client_crl": pki.crl(self.revokedCert),
            },
            extraAccounts={"acme": acme},
        )
        self.messageFile = os.path.join(self.msa.directory, "m.txt")
        with open(self.messageFile, "wb") as f:
            f.write(MESSAGE)

    def curl(self, *extra, user="acme:acme pass"):
        curl = requireProgram(self, "curl")
        args = [
            "-sS",
            "--url",
            f"smtps://localhost:{self.msa.implicitPort}",
            "--cacert",
            self.msa.certFile,
            "--mail-from",
            "ik@mijnbedrijf.nl",
            "--mail-rcpt",
            "belastingdienst@overheid.nl",
            "-T",
            self.messageFile,
            *extra,
        ]
        if user is not None:
            args += ["-u", user]
        return runProgram(curl, args)

    @defer.inlineCallbacks
    def test_certificateAndPassword(self):
        out, err, code = yield self.curl(
            "--cert",
            self.acmeFile,
            "--key",
            self.acmeKey,
            "--login-options",
            "AUTH=PLAIN",
        )
        self.assertEqual(code, 0, err)
        files = yield self.msa.waitForOutbox(1)
        self.assertTrue(self.msa.readOutbox(files[0]).endswith(MESSAGE))

    @defer.inlineCallbacks
    def test_passwordWithoutCertificateRefused(self):
        out, err, code = yield self.curl("--login-options", "AUTH=PLAIN")
        self.assertEqual(code, 67, err)
        self.assertEqual(self.msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_passwordWithAnotherCertificateRefused(self):
        out, err, code = yield self.curl(
            "--cert",
            self.otherFile,
            "--key",
            self.otherKey,
            "--login-options",
            "AUTH=LOGIN",
        )
        self.assertEqual(code, 67, err)
        self.assertEqual(self.msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_unboundAccountUnaffected(self):
        out, err, code = yield self.curl(
            "--login-options", "AUTH=PLAIN", user="alice:wonderland"
        )
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_externalWithCurl(self):
        out, err, code = yield self.curl(
            "--cert",
            self.acmeFile,
            "--key",
            self.acmeKey,
            "--login-options",
            "AUTH=EXTERNAL",
            "-v",
            user="acme:",
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"> AUTH EXTERNAL", err)
        yield self.msa.waitForOutbox(1)

    def smtplibExternal(self, certFile, keyFile, authzid=b"="):
        context = ssl.create_default_context(cafile=self.msa.certFile)
        if certFile:
            context.load_cert_chain(certFile, keyFile)
        client = smtplib.SMTP_SSL("localhost", self.msa.implicitPort, context=context)
        try:
            client.ehlo("mijnbedrijf.nl")
            return client.docmd("AUTH", "EXTERNAL " + authzid.decode())
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_externalRefusals(self):
        ok = yield threads.deferToThread(
            self.smtplibExternal, self.acmeFile, self.acmeKey
        )
        self.assertEqual(ok, (235, b"2.7.0 Authentication successful"))
        asAcme = yield threads.deferToThread(
            self.smtplibExternal, self.acmeFile, self.acmeKey, b"YWNtZQ=="
        )
        self.assertEqual(asAcme[0], 235)
        asAlice = yield threads.deferToThread(
            self.smtplibExternal, self.acmeFile, self.acmeKey, b"YWxpY2U="
        )
        self.assertEqual(asAlice, (535, b"5.7.8 Authentication credentials invalid"))
        noCert = yield threads.deferToThread(self.smtplibExternal, None, None)
        self.assertEqual(
            noCert, (504, b"5.5.4 EXTERNAL needs a verified client certificate")
        )
        unlisted = yield threads.deferToThread(
            self.smtplibExternal, self.otherFile, self.otherKey
        )
        self.assertEqual(unlisted[0], 535)

    @defer.inlineCallbacks
    def test_revokedCertificate(self):
        yield self.assertFailure(
            threads.deferToThread(
                self.smtplibExternal, self.revokedFile, self.revokedKey
            ),
            ssl.SSLError,
            smtplib.SMTPServerDisconnected,
            ConnectionResetError,
        )
