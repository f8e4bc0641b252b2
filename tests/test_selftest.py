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
import re
import ssl as stdlibssl
import sys

import attrs
import OpenSSL.SSL
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, ssl, threads, utils
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.trial import unittest
from zope.interface import implementer

from msa.accounts.model import makeAccount
from msa.admin import tlsprobes
from msa.admin.command import main
from msa.admin.probeclient import (
    DEFAULT_TLS13_CIPHERS,
    FAIL,
    PASS,
    SKIP,
    WARN,
    ProbeResult,
    Target,
)
from msa.admin.selftest import SMUGGLING_FORMS, formatTable
from msa.admin.tlsprobes import weakness
from msa.service.tap import DEMO_ACCOUNT, DEMO_SENDERS
from msa.tls import DEFAULT_CIPHERS
from tests.e2e import RunningMSA, freePort, runProgram
from tests.plaintwisted import BareLFESMTP, listenPlainTwisted
from tests.test_readme import README, literalBlocks

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
#: The forms a server that takes a bare LF for a line end ends the data on
#: (L{BareLFESMTP}), and those it keeps inside the message.
BARE_LF_ENDS = ["smuggling LF.LF", "smuggling LF.CRLF", "smuggling CRLF.LF"]
BARE_LF_INSIDE = [name for name in SMUGGLING if name not in BARE_LF_ENDS]


def accepted(label: str, reply: str = "250 Delivery in progress") -> str:
    """
    The WARN detail of a smuggling form accepted inside one message.
    """
    return (
        f"accepted as one message with {label} inside ({reply}); no smuggled "
        "command ran here, but a next hop that ends data on it would run "
        "them unless this server normalises bare CR/LF before relaying "
        "(not visible from outside)"
    )


def smuggledRan(label: str) -> str:
    """
    The FAIL detail of a smuggling form that ended the data on
    L{BareLFESMTP}: the smuggled MAIL, RCPT, DATA and message answered.
    """
    return (
        f"{label} ended the message and the smuggled commands were answered: "
        "250 Delivery in progress; 250 Sender address accepted; "
        "250 Recipient address accepted; "
        "354 Continue; 250 Delivery in progress; 221 See you later"
    )


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
        start, end = (
            now - datetime.timedelta(hours=1),
            now + datetime.timedelta(days=days),
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

    def accountOptions(self) -> list[str]:
        return [
            "--user",
            "alice",
            "--password-file",
            self.passwordFile(),
            "--sender",
            SENDER,
            "--rcpt",
            RCPT,
        ]

    def selftest(self, port: int, *options: str, account: bool = True):
        """
        @return: a L{Deferred} of (exit code, rows, output).
        """
        argv = ["selftest", "127.0.0.1", str(port), "--timeout", "10", *options]
        if account:
            argv += self.accountOptions()
        out, err = io.StringIO(), io.StringIO()

        def run():
            return main(argv, stdout=out, stderr=err)

        def done(code):
            self.assertEqual(err.getvalue(), "")
            return code, parseTable(out.getvalue()), out.getvalue()

        return threads.deferToThread(run).addCallback(done)

    def assertOutcome(
        self,
        rows,
        failing: list[str],
        skipped: list[str] = (),
        warning: list[str] = (),
    ):
        """
        Exactly the probes in C{failing} failed, those in C{skipped} were
        skipped, those in C{warning} warned, and every other one passed.
        """
        self.assertEqual(list(rows), ALL_PROBES)
        expected = {
            name: FAIL
            if name in failing
            else SKIP
            if name in skipped
            else WARN
            if name in warning
            else PASS
            for name in ALL_PROBES
        }
        actual = {name: status for name, (status, _) in rows.items()}
        self.assertEqual(
            actual, expected, "\n".join(f"{k}: {v}" for k, v in rows.items())
        )


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
            self.assertEqual(
                rows[name][1],
                "refused: 550 5.5.2 Message refused: bare CR or LF in message "
                "text; lines must end with CRLF",
            )
        self.assertTrue(
            rows["cipher-suites"][1].startswith(
                "TLS 1.2: ECDHE-ECDSA-AES128-GCM-SHA256, "
                "ECDHE-ECDSA-AES256-GCM-SHA384, ECDHE-ECDSA-CHACHA20-POLY1305; "
                "TLS 1.3: TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, "
                "TLS_AES_128_GCM_SHA256 ("
            ),
            rows["cipher-suites"][1],
        )
        self.assertTrue(rows["groups"][1].startswith("accepted: X25519, P-256, P-384"))
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(len(files), 1, "only the clean message is accepted")
        text = self.msa.readOutbox(files[0])
        match = re.search(
            rb"\r\nSubject: digipoort-msa selftest (\d{8}T\d{6}Z-[0-9a-f]{6}): "
            rb"clean message; please discard\r\n",
            text,
        )
        self.assertIsNotNone(match, text)
        self.assertIn(
            b"\r\nX-Digipoort-Selftest: " + match.group(1) + b" clean\r\n", text
        )

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
                *self.accountOptions(),
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
            f"{len(ALL_PROBES) - 3} PASS, 0 WARN, 0 FAIL, 3 SKIP",
        )


class RefusedSessionTests(SelftestMixin, unittest.TestCase):
    """
    When the account cannot get as far as DATA, the clean-message probe
    fails with the server's reply (never the password) and the smuggling
    probes are not tried.
    """

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password: C{535} shown as the reply to C{AUTH PLAIN}, the
        password nowhere in the output.
        """
        msa = RunningMSA(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        wrong = os.path.join(directory, "password")
        with open(wrong, "w") as f:
            f.write("not-the-password\n")
        argv = ["--servername", "localhost", "--ca-file", msa.certFile]
        argv += ["--user", "alice", "--password-file", wrong]
        argv += ["--sender", SENDER, "--rcpt", RCPT]
        code, rows, output = yield self.selftest(msa.starttlsPort, *argv, account=False)
        self.assertOutcome(rows, failing=["clean-message"], skipped=SMUGGLING)
        self.assertEqual(
            rows["clean-message"][1],
            "AUTH PLAIN answered 535 5.7.8 Authentication credentials invalid",
        )
        self.assertEqual(
            rows["smuggling LF.LF"][1],
            "not tried: the session for clean-message failed",
        )
        self.assertNotIn("not-the-password", output)
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_senderNotAllowed(self):
        """
        A sender the account may not use: the refusal of MAIL is shown.
        """
        msa = RunningMSA(self)
        argv = ["--servername", "localhost", "--ca-file", msa.certFile]
        argv += ["--user", "alice", "--password-file", self.passwordFile()]
        argv += ["--sender", "someone@elders.example", "--rcpt", RCPT]
        code, rows, _ = yield self.selftest(
            msa.implicitPort, "--implicit", *argv, account=False
        )
        self.assertOutcome(
            rows, failing=["clean-message"], skipped=[*PRE_TLS, *SMUGGLING]
        )
        self.assertEqual(
            rows["clean-message"][1],
            "MAIL FROM:<someone@elders.example> answered 553 5.7.1 Sender "
            "address <someone@elders.example> is not owned by the "
            "authenticated account",
        )
        self.assertEqual(code, 1)


class WeakenedMSATests(SelftestMixin, unittest.TestCase):
    """
    The MSA with one part of its TLS configuration weakened fails the
    probes about that part, and no other.
    """

    @defer.inlineCallbacks
    def test_weakCiphersAndGroups(self):
        """
        A CBC-SHA1 suite and a CBC-SHA384 suite added to C{[tls] ciphers},
        P-521 and ffdhe2048 to C{[tls] groups}: the suites and groups probes
        fail and name exactly what was added; everything else passes.
        """
        msa = RunningMSA(
            self,
            tls={
                "ciphers": DEFAULT_CIPHERS
                + ":ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384",
                "groups": "X25519:P-256:P-384:P-521:ffdhe2048",
            },
        )
        code, rows, _ = yield self.selftest(
            msa.starttlsPort, "--servername", "localhost", "--ca-file", msa.certFile
        )
        self.assertOutcome(rows, failing=["cipher-suites", "groups"])
        self.assertEqual(code, 1)
        self.assertTrue(
            rows["cipher-suites"][1].startswith(
                "accepts ECDHE-ECDSA-AES128-SHA (weak: CBC with SHA1), "
                "ECDHE-ECDSA-AES256-SHA384 (not expected); TLS 1.2: "
            ),
            rows["cipher-suites"][1],
        )
        self.assertTrue(
            rows["groups"][1].startswith(
                "accepts P-521, ffdhe2048, not in X25519:P-256:P-384; "
                "accepted: X25519, P-256, P-384, P-521, ffdhe2048"
            ),
            rows["groups"][1],
        )

    @defer.inlineCallbacks
    def test_operatorPolicy(self):
        """
        With the policy the operator passes (C{--expect-ciphers},
        C{--expect-groups}) covering what was added, only the weak suite
        still fails: an expected list cannot make CBC-SHA1 acceptable.
        """
        msa = RunningMSA(
            self,
            tls={
                "ciphers": DEFAULT_CIPHERS
                + ":ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384",
                "groups": "X25519:P-256:P-384:P-521",
            },
        )
        code, rows, _ = yield self.selftest(
            msa.implicitPort,
            "--implicit",
            "--servername",
            "localhost",
            "--ca-file",
            msa.certFile,
            "--expect-ciphers",
            "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-ECDSA-AES256-SHA384"
            ":ECDHE-ECDSA-AES128-SHA:" + DEFAULT_TLS13_CIPHERS,
            "--expect-groups",
            "X25519:P-256:P-384:P-521",
        )
        self.assertOutcome(rows, failing=["cipher-suites"], skipped=PRE_TLS)
        self.assertTrue(
            rows["cipher-suites"][1].startswith(
                "accepts ECDHE-ECDSA-AES128-SHA (weak: CBC with SHA1); "
            ),
            rows["cipher-suites"][1],
        )
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_wrongName(self):
        """
        A certificate for another name fails the certificate probe, and the
        message probes send no password to it.
        """
        directory = os.path.abspath(self.mktemp())
        cert, key, _ = makeCertificate(directory, "other.example")
        msa = RunningMSA(self, tls={"certificate": cert, "key": key})
        code, rows, _ = yield self.selftest(
            msa.starttlsPort, "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(
            rows, failing=["certificate"], skipped=["clean-message", *SMUGGLING]
        )
        self.assertIn("not valid for localhost", rows["certificate"][1])
        self.assertEqual(
            rows["clean-message"][1],
            "no password sent: the certificate is not valid for localhost",
        )
        self.assertEqual(code, 1)
        self.assertEqual(msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_tooFewDaysLeft(self):
        """
        A certificate with 5 days left fails with C{--min-days} 14 (the
        default) and passes with C{--min-days 3}; the chain verified, so
        the message probes run either way.
        """
        directory = os.path.abspath(self.mktemp())
        cert, key, _ = makeCertificate(directory, days=5)
        msa = RunningMSA(self, tls={"certificate": cert, "key": key})
        options = ["--servername", "localhost", "--ca-file", cert]
        code, rows, _ = yield self.selftest(msa.starttlsPort, *options)
        self.assertOutcome(rows, failing=["certificate"])
        self.assertRegex(
            rows["certificate"][1],
            r"expires \d{4}-\d\d-\d\d \(4 days left, less than 14\)",
        )
        self.assertEqual(code, 1)
        code, rows, _ = yield self.selftest(
            msa.starttlsPort, *options, "--min-days", "3", account=False
        )
        self.assertOutcome(rows, failing=[], skipped=["clean-message", *SMUGGLING])
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def test_chain(self):
        """
        A certificate issued by an intermediate: with the intermediate in
        C{[tls] chain} every probe passes; without it the certificate probe
        fails, whether the client has the intermediate (it is named as not
        sent) or not (the chain does not verify).
        """
        directory = os.path.abspath(self.mktemp())
        rootPath, _, root = makeCertificate(directory, "Selftest Root", ca=True)
        interPath, _, inter = makeCertificate(
            directory, "Selftest Intermediate", ca=True, issuer=root
        )
        cert, key, _ = makeCertificate(directory, issuer=inter)
        both = os.path.join(directory, "root-and-intermediate.pem")
        with open(both, "wb") as f:
            for path in (rootPath, interPath):
                with open(path, "rb") as g:
                    f.write(g.read())
        options = ["--servername", "localhost"]
        full = RunningMSA(
            self, tls={"certificate": cert, "key": key, "chain": interPath}
        )
        code, rows, _ = yield self.selftest(
            full.starttlsPort, *options, "--ca-file", rootPath, account=False
        )
        self.assertOutcome(rows, failing=[], skipped=["clean-message", *SMUGGLING])
        self.assertIn("chain of 3 verified by", rows["certificate"][1])
        leafOnly = RunningMSA(self, tls={"certificate": cert, "key": key})
        code, rows, _ = yield self.selftest(
            leafOnly.starttlsPort, *options, "--ca-file", rootPath, account=False
        )
        self.assertOutcome(
            rows, failing=["certificate"], skipped=["clean-message", *SMUGGLING]
        )
        self.assertIn("unable to get local issuer certificate", rows["certificate"][1])
        code, rows, _ = yield self.selftest(
            leafOnly.starttlsPort, *options, "--ca-file", both, account=False
        )
        self.assertOutcome(
            rows, failing=["certificate"], skipped=["clean-message", *SMUGGLING]
        )
        self.assertIn(
            "intermediate(s) not sent by the server: CN=Selftest Intermediate",
            rows["certificate"][1],
        )
        self.assertEqual(code, 1)


class PlainTwistedTests(SelftestMixin, unittest.TestCase):
    """
    A plain C{twisted.mail} ESMTP server, the defaults the MSA exists to
    fix (L{tests.plaintwisted}), fails
    exactly the probes about those defaults.
    """

    def listen(self, contextFactory, implicit: bool = False, protocol=None) -> int:
        return listenPlainTwisted(self, contextFactory, implicit, protocol)

    def defaultOptions(self, expired: bool = False, **kwargs):
        """
        Twisted's default L{ssl.CertificateOptions} (but for C{kwargs}) with
        a certificate for localhost.
        """
        directory = os.path.abspath(self.mktemp())
        cert, key, _ = makeCertificate(directory, expired=expired)
        with open(cert, "rb") as f, open(key, "rb") as g:
            private = ssl.PrivateCertificate.loadPEM(f.read() + g.read())
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            **kwargs,
        )
        return cert, options

    @defer.inlineCallbacks
    def test_defaults(self):
        """
        Commands before STARTTLS are not answered 530, the NOOP pipelined
        behind STARTTLS is executed inside TLS, AUTH is offered in the
        clear, CBC-SHA1 suites and groups beyond the policy are accepted,
        and every bare CR/LF end-of-data form is accepted with 250.  Its
        certificate and TLS versions pass: Twisted refuses TLS 1.0 and 1.1
        by default.
        """
        cert, options = self.defaultOptions()
        port = self.listen(options)
        code, rows, _ = yield self.selftest(
            port, "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(
            rows,
            failing=[
                "pre-tls-530",
                "starttls-injection",
                "no-auth-before-tls",
                "cipher-suites",
                "groups",
            ],
            warning=SMUGGLING,
        )
        self.assertEqual(code, 1)
        self.assertEqual(
            rows["pre-tls-530"][1],
            "not 530: HELO -> 250 localhost Hello 127.0.0.1, nice to meet you; "
            "MAIL -> 550 Cannot receive from specified address <>: "
            "Unauthenticated senders not allowed; "
            "RCPT -> 503 Must have sender before recipient; "
            "DATA -> 503 Must have valid receiver and originator; "
            "RSET -> 250 I remember nothing.; AUTH -> 334; "
            "VRFY -> 500 Command not implemented; "
            "EXPN -> 500 Command not implemented; "
            "HELP -> 500 Command not implemented",
        )
        self.assertEqual(
            rows["starttls-injection"][1],
            "after the handshake QUIT got 500 Command not implemented; 221 See "
            "you later: the NOOP injected in plaintext was processed inside TLS "
            "(CVE-2011-0411 class)",
        )
        self.assertEqual(
            rows["no-auth-before-tls"][1],
            "EHLO before TLS offers 'AUTH LOGIN PLAIN': passwords could go in "
            "the clear",
        )
        self.assertIn("(weak: CBC with SHA1)", rows["cipher-suites"][1])
        self.assertIn("ffdhe2048", rows["groups"][1])
        for label, _ in SMUGGLING_FORMS:
            self.assertEqual(rows[f"smuggling {label}"][1], accepted(label))

    @defer.inlineCallbacks
    def test_bareLFEndsData(self):
        """
        A server that takes a bare LF for a line end runs the smuggled
        transaction after LF.LF, LF.CRLF and CRLF.LF; it accepts the other
        forms inside the message.  Each is a failure, said as such.
        """
        cert, options = self.defaultOptions()
        port = self.listen(options, implicit=True, protocol=BareLFESMTP)
        code, rows, _ = yield self.selftest(
            port, "--implicit", "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(
            rows,
            failing=["cipher-suites", "groups", *BARE_LF_ENDS],
            skipped=PRE_TLS,
            warning=BARE_LF_INSIDE,
        )
        for name in BARE_LF_ENDS:
            self.assertEqual(rows[name][1], smuggledRan(name.split()[1]))
        for name in BARE_LF_INSIDE:
            self.assertEqual(rows[name][1], accepted(name.split()[1]))
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_implicitExpired(self):
        """
        On an implicit-TLS listener with an expired certificate (which the
        MSA refuses to start with), the certificate probe fails with
        OpenSSL's reason and the message probes send no password.
        """
        cert, options = self.defaultOptions(expired=True)
        port = self.listen(options, implicit=True)
        code, rows, _ = yield self.selftest(
            port, "--implicit", "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(
            rows,
            failing=["cipher-suites", "groups", "certificate"],
            skipped=[*PRE_TLS, "clean-message", *SMUGGLING],
        )
        self.assertIn(
            "certificate has expired (depth 0: CN=localhost)", rows["certificate"][1]
        )
        self.assertTrue(
            rows["clean-message"][1].startswith(
                "no password sent: the certificate does not verify "
                "(certificate has expired"
            )
        )
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_legacyVersions(self):
        """
        A context that still allows TLS 1.0 and 1.1 (security level 0, as
        old setups have it) fails both version probes.
        """
        cert, options = self.defaultOptions(
            insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0
        )
        legacy = _LegacyContextFactory(options)
        port = self.listen(legacy, implicit=True)
        code, rows, _ = yield self.selftest(
            port, "--implicit", "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(
            rows,
            failing=[
                "tls1.0-refused",
                "tls1.1-refused",
                "cipher-suites",
                "groups",
            ],
            skipped=PRE_TLS,
            warning=SMUGGLING,
        )
        self.assertRegex(rows["tls1.0-refused"][1], r"^accepted: TLSv1 ECDHE-ECDSA-")
        self.assertRegex(rows["tls1.1-refused"][1], r"^accepted: TLSv1.1 ECDHE-ECDSA-")
        self.assertEqual(code, 1)


@implementer(IOpenSSLContextFactory)
class _LegacyContextFactory:
    """
    Twisted's options lowered to TLS 1.0 at security level 0, as an old
    setup has them.
    """

    def __init__(self, options):
        self.options = options
        self.context = None

    def getContext(self):
        if self.context is None:
            context = self.options.getContext()
            context.set_cipher_list(b"ALL:@SECLEVEL=0")
            self.context = context
        return self.context


class ReportTests(unittest.TestCase):
    """
    The table, the rules behind the verdicts, and the exit codes that need
    no listener.
    """

    def test_table(self):
        """
        A header, then one row per probe: name and result left-aligned in
        columns as wide as their longest entry, two spaces apart, the
        detail last.
        """
        lines = formatTable(
            [
                ProbeResult("greeting", PASS, "220 localhost ESMTP"),
                ProbeResult("smuggling CR.LF", FAIL, "accepted"),
                ProbeResult("groups", SKIP, "why"),
            ]
        )
        self.assertEqual(
            lines,
            [
                "PROBE            RESULT  DETAIL",
                "greeting         PASS    220 localhost ESMTP",
                "smuggling CR.LF  FAIL    accepted",
                "groups           SKIP    why",
            ],
        )

    def test_smugglingForms(self):
        """
        The smuggling forms are a dot between any two of CR, LF and CRLF,
        all but CRLF.CRLF.
        """
        self.assertEqual(
            dict(SMUGGLING_FORMS),
            {
                "LF.LF": b"\n.\n",
                "LF.CR": b"\n.\r",
                "LF.CRLF": b"\n.\r\n",
                "CR.LF": b"\r.\n",
                "CR.CR": b"\r.\r",
                "CR.CRLF": b"\r.\r\n",
                "CRLF.LF": b"\r\n.\n",
                "CRLF.CR": b"\r\n.\r",
            },
        )

    def test_weakness(self):
        """
        Weak: no forward secrecy, anonymous, NULL, CBC with SHA-1.  Not
        weak by the rule (but failing when not expected): CBC with SHA-384,
        AEAD suites with (EC)DHE.
        """
        context = stdlibssl.SSLContext(stdlibssl.PROTOCOL_TLS_CLIENT)
        context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
        ciphers = {c["name"]: c for c in context.get_ciphers()}
        expected = {
            "ECDHE-ECDSA-AES128-GCM-SHA256": None,
            "ECDHE-RSA-CHACHA20-POLY1305": None,
            "DHE-RSA-AES256-GCM-SHA384": None,
            "ECDHE-ECDSA-AES256-SHA384": None,
            "ECDHE-ECDSA-AES128-SHA": "CBC with SHA1",
            "DHE-RSA-AES256-SHA": "CBC with SHA1",
            "AES128-GCM-SHA256": "no forward secrecy",
            "AES256-SHA": "no forward secrecy",
            "ADH-AES128-GCM-SHA256": "anonymous",
            "AECDH-AES128-SHA": "anonymous",
            "ECDHE-ECDSA-NULL-SHA": "no encryption",
            "NULL-SHA256": "no encryption",
        }
        self.assertEqual({name: weakness(ciphers[name]) for name in expected}, expected)

    def test_defaultsAreNotWeak(self):
        """
        None of the MSA's own default suites is weak by the rule.
        """
        context = stdlibssl.SSLContext(stdlibssl.PROTOCOL_TLS_CLIENT)
        context.set_ciphers(DEFAULT_CIPHERS)
        ciphers = [c for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
        self.assertEqual(len(ciphers), 6)
        self.assertEqual([weakness(c) for c in ciphers], [None] * 6)

    def test_localVersionCheck(self):
        """
        The local OpenSSL negotiates TLS 1.2 with itself in memory (and,
        at security level 0, TLS 1.0 here, so the version probes really
        test the server).
        """
        self.assertIsNone(tlsprobes.localCanNegotiate(OpenSSL.SSL.TLS1_2_VERSION))
        self.assertIsNone(tlsprobes.localCanNegotiate(OpenSSL.SSL.TLS1_VERSION))

    def test_couldNotTest(self):
        """
        When the local OpenSSL cannot negotiate an old version, the probe
        says so as a SKIP and connects nowhere.
        """
        self.patch(tlsprobes, "localCanNegotiate", lambda v: "no protocols available")
        results = tlsprobes.probeOldVersions(Target("127.0.0.1", freePort()))
        self.assertEqual(
            results,
            [
                ProbeResult(
                    f"tls{label}-refused",
                    SKIP,
                    f"could not test: the local OpenSSL cannot negotiate TLS "
                    f"{label} even with itself (no protocols available)",
                )
                for label in ("1.0", "1.1")
            ],
        )

    def test_accountOptionsGoTogether(self):
        """
        Some but not all of the account options: exit code 2 and why.
        """
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["selftest", "127.0.0.1", "25", "--user", "alice"], stdout=out, stderr=err
        )
        self.assertEqual(code, 2)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(
            err.getvalue(),
            "digipoort-msa-admin: selftest: --user, --password-file, --sender "
            "and --rcpt go together\n",
        )

    def test_expectedCiphersMatchNothing(self):
        """
        An expected policy that names no suite: exit code 2 and why.
        """
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["selftest", "127.0.0.1", "25", "--expect-ciphers", "NO-SUCH-SUITE"],
            stdout=out,
            stderr=err,
        )
        self.assertEqual(code, 2)
        self.assertEqual(
            err.getvalue(),
            "digipoort-msa-admin: --expect-ciphers: no suite matches 'NO-SUCH-SUITE'\n",
        )

    def test_nothingListening(self):
        """
        No listener: the greeting probe fails with the reason, the table
        ends there, and the exit code is 1.
        """
        port = freePort()
        out, err = io.StringIO(), io.StringIO()
        code = main(["selftest", "127.0.0.1", str(port)], stdout=out, stderr=err)
        self.assertEqual(code, 1)
        self.assertEqual(
            out.getvalue().splitlines(),
            [
                "PROBE     RESULT  DETAIL",
                f"greeting  FAIL    cannot connect to 127.0.0.1:{port}: "
                "[Errno 111] Connection refused",
                f"selftest of 127.0.0.1:{port} (STARTTLS): "
                "0 PASS, 0 WARN, 1 FAIL, 0 SKIP",
            ],
        )


class ReadmeExampleTests(unittest.TestCase):
    """
    The README's self-test example, run as a shell script against the MSA
    with the built-in defaults' demo account, its ports pointed at the test
    listeners.
    """

    @defer.inlineCallbacks
    def test_example(self):
        with open(README, encoding="utf-8") as f:
            blocks = [
                b
                for b in literalBlocks(f.read())
                if "digipoort-msa-admin selftest" in b
            ]
        self.assertEqual(len(blocks), 1)
        demo = attrs.evolve(
            makeAccount(*DEMO_ACCOUNT, ["localhost"]),
            extra={"senders": list(DEMO_SENDERS)},
        )
        msa = RunningMSA(self, extraAccounts={"demo": demo})
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        os.symlink(msa.state, os.path.join(cwd, "msa-state"))
        script = blocks[0]
        for old, new in [
            ("localhost 2587 ", f"localhost {msa.starttlsPort} "),
            ("localhost 2465 ", f"localhost {msa.implicitPort} "),
        ]:
            self.assertIn(old, script)
            script = script.replace(old, new)
        env = dict(
            os.environ,
            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        )
        out, err, code = yield utils.getProcessOutputAndValue(
            "/bin/bash", ["-ec", script], env=env, path=cwd
        )
        self.assertEqual((code, err), (0, b""), out.decode())
        summaries = [
            line
            for line in out.decode().splitlines()
            if line.startswith("selftest of ")
        ]
        self.assertEqual(
            summaries,
            [
                f"selftest of localhost:{msa.starttlsPort} (STARTTLS): "
                f"{len(ALL_PROBES) - 9} PASS, 0 WARN, 0 FAIL, 9 SKIP",
                f"selftest of localhost:{msa.implicitPort} (implicit TLS): "
                f"{len(ALL_PROBES) - 3} PASS, 0 WARN, 0 FAIL, 3 SKIP",
            ],
        )
        self.assertEqual(len(msa.outboxFiles()), 1)
