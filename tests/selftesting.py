# -*- test-case-name: tests.test_selftest,tests.test_selftest_smuggling -*-
"""
What the self-test's tests share (L{tests.test_selftest},
L{tests.test_selftest_plain}, L{tests.test_selftest_report},
L{tests.test_selftest_smuggling}): the probe names, the report parsed, a
certificate made to order, and L{SelftestMixin}, which runs the self-test
in a thread while the servers run in the test's reactor.
"""

import datetime
import io
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import threads

from msa.admin.command import main
from msa.admin.probeclient import (
    FAIL,
    PASS,
    SKIP,
    WARN,
)
from msa.admin.selftest import SMUGGLING_FORMS

SENDER = "ik@mijnbedrijf.nl"
RCPT = "belastingdienst@overheid.nl"
SMUGGLING = [f"smuggling {label}" for label, _ in SMUGGLING_FORMS]
#: The message probes: the clean message, the smuggling forms through DATA,
#: and through BDAT (skipped where CHUNKING is not offered).
MESSAGES = ["clean-message", *SMUGGLING, "smuggling BDAT"]
#: What a server without CHUNKING skips.
NO_CHUNKING = ["smuggling BDAT"]
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
    "extensions",
    "clean-message",
    *SMUGGLING,
    "smuggling BDAT",
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

    def selftest(
        self, port: int, *options: str, account: bool = True, host: str = "127.0.0.1"
    ):
        """
        @return: a L{Deferred} of (exit code, rows, output).
        """
        argv = ["selftest", host, str(port), "--timeout", "10", *options]
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
        probes: list[str] = ALL_PROBES,
    ):
        """
        Exactly the probes in C{failing} failed, those in C{skipped} were
        skipped, those in C{warning} warned, and every other one of
        C{probes} (the SMTP ones by default) passed.
        """
        self.assertEqual(list(rows), probes)
        expected = {
            name: FAIL
            if name in failing
            else SKIP
            if name in skipped
            else WARN
            if name in warning
            else PASS
            for name in probes
        }
        actual = {name: status for name, (status, _) in rows.items()}
        self.assertEqual(
            actual, expected, "\n".join(f"{k}: {v}" for k, v in rows.items())
        )
