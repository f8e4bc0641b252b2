# -*- test-case-name: tests.test_selftest -*-
"""
C{digipoort-msa-admin selftest} (L{msa.admin.selftest}) against real
listeners: the MSA started from a TOML file passes every probe on both of
its listeners; a deliberately weakened MSA fails the probes its weakness
concerns and only those; and a plain C{twisted.mail} ESMTP server, with the
defaults the MSA exists to fix, fails exactly the probes it should.

The self-test is blocking (a command-line tool), so it runs in a thread or
as a subprocess while the servers run in the test's reactor.
"""

import datetime
import io
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, endpoints, reactor, ssl, threads
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.trial import unittest
from zope.interface import implementer

from msa.admin.command import main
from msa.admin.selftest import (
    FAIL,
    PASS,
    SKIP,
    SMUGGLING_FORMS,
    ProbeResult,
    formatTable,
    weakness,
)
from tests.e2e import RunningMSA, freePort, runProgram

SENDER = "ik@mijnbedrijf.nl"
RCPT = "belastingdienst@overheid.nl"
SMUGGLING = [f"smuggling {label}" for label, _ in SMUGGLING_FORMS]
ALL_PROBES = [
    "greeting",
    "pre-tls-530",
    "starttls-injection",
    "no-auth-before-tls",
    "tls1.0-refused",
    "tls1.1-refused",
    "cipher-suites",
    "groups",
    "certificate",
    "clean-message",
    *SMUGGLING,
]
PRE_TLS = ["pre-tls-530", "starttls-injection", "no-auth-before-tls"]


def parseTable(output: str) -> dict[str, tuple[str, str]]:
    """
    The report's rows: probe -> (result, detail).
    """
    lines = output.splitlines()
    header = lines[0]
    resultAt = header.index("RESULT")
    detailAt = header.index("DETAIL")
    rows = {}
    for line in lines[1:]:
        if line.startswith("selftest of "):
            break
        rows[line[:resultAt].rstrip()] = (
            line[resultAt:detailAt].strip(),
            line[detailAt:],
        )
    return rows


def makeCertificate(
    directory: str,
    name: str = "localhost",
    days: int = 365,
    expired: bool = False,
    issuer: tuple | None = None,
    ca: bool = False,
) -> tuple[str, str, tuple]:
    """
    An ECDSA certificate for C{name}, self-signed or issued by C{issuer}.

    @return: the certificate's and the key's path, and (certificate, key)
        for issuing further.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(
            days=days
        )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuerCert, issuerKey = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuerCert.subject if issuerCert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    cert = builder.sign(issuerKey, hashes.SHA256())
    os.makedirs(directory, exist_ok=True)
    certPath = os.path.join(directory, f"{name}-{days}-{expired}-{ca}-cert.pem")
    keyPath = certPath.replace("-cert.pem", "-key.pem")
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certPath, keyPath, (cert, key)


class SelftestMixin:
    """
    Run the self-test in a thread (the servers are in this reactor) and
    check its report.
    """

    def passwordFile(self) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("wonderland\n")
        return path

    def selftest(self, port: int, *options: str, account: bool = True):
        """
        @return: a L{Deferred} of (exit code, rows, output).
        """
        argv = ["selftest", "127.0.0.1", str(port), *options]
        if account:
            argv += [
                "--user",
                "alice",
                "--password-file",
                self.passwordFile(),
                "--sender",
                SENDER,
                "--rcpt",
                RCPT,
            ]
        out, err = io.StringIO(), io.StringIO()

        def run():
            return main(argv, stdout=out, stderr=err)

        def done(code):
            self.assertEqual(err.getvalue(), "")
            return code, parseTable(out.getvalue()), out.getvalue()

        return threads.deferToThread(run).addCallback(done)

    def assertOutcome(self, rows, failing: list[str], skipped: list[str] = ()):
        """
        Exactly the probes in C{failing} failed, those in C{skipped} were
        skipped, and every other one passed.
        """
        self.assertEqual(list(rows), ALL_PROBES)
        expected = {
            name: FAIL if name in failing else SKIP if name in skipped else PASS
            for name in ALL_PROBES
        }
        actual = {name: status for name, (status, _) in rows.items()}
        self.assertEqual(actual, expected, "\n".join(f"{k}: {v}" for k, v in rows.items()))


class MSAPassesTests(SelftestMixin, unittest.TestCase):
    """
    The MSA, started from a TOML file with a certificate of its own, passes
    every probe on both listeners.
    """

    def setUp(self):
        self.msa = RunningMSA(self)

    def options(self):
        return ["--servername", "localhost", "--ca-file", self.msa.certFile]

    @defer.inlineCallbacks
    def test_starttlsListener(self):
        """
        Every probe passes on the STARTTLS listener, and the clean message
        reaches the outbox marked as a self-test.
        """
        code, rows, output = yield self.selftest(self.msa.starttlsPort, *self.options())
        self.assertOutcome(rows, failing=[])
        self.assertEqual(code, 0)
        self.assertEqual(rows["pre-tls-530"][0], PASS)
        for name in SMUGGLING:
            self.assertRegex(rows[name][1], r"^refused: 550 5\.5\.2 Message refused: bare CR or LF")
        self.assertIn("TLS 1.3: TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_GCM_SHA256", rows["cipher-suites"][1])
        self.assertTrue(rows["groups"][1].startswith("accepted: X25519, P-256, P-384"))
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(len(files), 1, "only the clean message is accepted")
        text = self.msa.readOutbox(files[0])
        self.assertIn(b"\r\nX-Digipoort-Selftest: ", text)
        self.assertIn(b" clean\r\n", text)
        self.assertRegex(text, rb"\r\nSubject: digipoort-msa selftest \S+: clean message; please discard\r\n")

    @defer.inlineCallbacks
    def test_implicitListener(self):
        """
        Every probe passes on the implicit-TLS listener; the plaintext ones
        are reported as not applicable.
        """
        code, rows, _ = yield self.selftest(
            self.msa.implicitPort, "--implicit", *self.options()
        )
        self.assertOutcome(rows, failing=[], skipped=PRE_TLS)
        for name in PRE_TLS:
            self.assertEqual(rows[name][1], "N/A: implicit TLS, no plaintext phase")
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def test_withoutAccountNothingIsSent(self):
        """
        Without an account, the message probes are skipped with the reason,
        nothing reaches the outbox, and the exit code is 0.
        """
        code, rows, _ = yield self.selftest(
            self.msa.starttlsPort, *self.options(), account=False
        )
        self.assertOutcome(rows, failing=[], skipped=["clean-message", *SMUGGLING])
        self.assertEqual(
            rows["clean-message"][1],
            "no account (--user, --password-file, --sender, --rcpt)",
        )
        self.assertEqual(code, 0)
        self.assertEqual(self.msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_subprocess(self):
        """
        C{digipoort-msa-admin selftest} as a real program: the table on
        stdout, the summary line, exit code 0.
        """
        program = os.path.join(os.path.dirname(sys.executable), "digipoort-msa-admin")
        out, err, code = yield runProgram(
            program,
            [
                "selftest",
                "127.0.0.1",
                str(self.msa.implicitPort),
                "--implicit",
                *self.options(),
                "--user",
                "alice",
                "--password-file",
                self.passwordFile(),
                "--sender",
                SENDER,
                "--rcpt",
                RCPT,
            ],
        )
        self.assertEqual(err, b"")
        self.assertEqual(code, 0)
        output = out.decode()
        self.assertOutcome(parseTable(output), failing=[], skipped=PRE_TLS)
        self.assertTrue(output.startswith("PROBE "))
        self.assertEqual(
            output.splitlines()[-1],
            f"selftest of 127.0.0.1:{self.msa.implicitPort} (implicit TLS): "
            f"{len(ALL_PROBES) - 3} PASS, 0 FAIL, 3 SKIP",
        )
