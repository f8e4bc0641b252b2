# -*- test-case-name: tests.test_interop -*-
"""
Interoperability: real, independent SMTP/SASL client implementations talk to
the whole MSA (L{tests.e2e.RunningMSA}) over real loopback sockets with real,
verified TLS, and a TLS scanner checks the listeners' TLS parameters.

Clients: curl (its own SASL code), swaks (Perl's Authen::SASL::Perl, chosen
by L{runSwaks}), pure-sasl (Python DIGEST-MD5) and scramp (Python SCRAM) driven
over smtplib, smtplib's own PLAIN and LOGIN, sslyze (TLS configuration
against Mozilla's "intermediate" profile) and a TLS 1.1-only Python client.

Every blocking Python client runs in a thread (L{threads.deferToThread}); the
programs run through L{runProgram}; the MSA stays on the reactor.
"""

import base64
import datetime
import ipaddress
import json
import os
import re
import smtplib
import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, threads
from twisted.trial import unittest
from twisted.trial.unittest import SkipTest

from tests import e2e
from tests.e2e import MESSAGE, USERS, RunningMSA, requireProgram, runProgram

FROM = "ik@mijnbedrijf.nl"
TO = "belastingdienst@overheid.nl"
PASSWORD = USERS["alice"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSLYZE = os.path.join(ROOT, ".venv-scan", "bin", "sslyze")

#: curl's exit code for "login denied", swaks's for a failed AUTH.
CURL_LOGIN_DENIED = 67
SWAKS_AUTH_FAILED = 28

QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)")


def checkAccepted(testCase, data: bytes, message: bytes = MESSAGE) -> None:
    """
    C{data} (an outbox file) is exactly one C{Received:} header of three
    folded lines followed by the client's message bytes.
    """
    testCase.assertTrue(data.startswith(b"Received: from "), data[:80])
    testCase.assertTrue(data.endswith(message), data[-200:])
    header = data[: len(data) - len(message)]
    testCase.assertTrue(header.endswith(b"\r\n"), header)
    lines = header[:-2].split(b"\r\n")
    testCase.assertEqual(len(lines), 3, header)
    for line in lines[1:]:
        testCase.assertIn(line[:1], (b" ", b"\t"), header)
    testCase.assertIn(b" with ESMTPSA ", header)


@defer.inlineCallbacks
def checkOutbox(testCase, msa: RunningMSA, queueId: bytes | str, message=MESSAGE):
    """
    Exactly one message, named after the queue id the client was given,
    and it is the client's message.
    """
    if isinstance(queueId, bytes):
        queueId = queueId.decode("ascii")
    files = yield msa.waitForOutbox(1)
    testCase.assertEqual(files, [f"{queueId}.eml"])
    checkAccepted(testCase, msa.readOutbox(files[0]), message)


def queueIdIn(testCase, output: bytes) -> bytes:
    found = QUEUED.findall(output)
    testCase.assertEqual(len(found), 1, output.decode("utf-8", "replace"))
    return found[0]


def digestResponse(b64: bytes) -> dict[str, str]:
    """
    The directives of a DIGEST-MD5 client response (base64 as on the wire).
    """
    text = base64.b64decode(b64).decode("utf-8")
    return {
        k: (q if q else u)
        for k, q, u in re.findall(r'([a-z-]+)=(?:"([^"]*)"|([^,]*))', text)
    }


def localhostIsLoopback() -> bool:
    try:
        infos = socket.getaddrinfo("localhost", None, socket.AF_INET)
    except OSError:
        return False
    return bool(infos) and all(info[4][0] == "127.0.0.1" for info in infos)


def writeMessage(testCase) -> str:
    path = os.path.abspath(testCase.mktemp()) + ".eml"
    with open(path, "wb") as f:
        f.write(MESSAGE)
    return path


class CurlTests(unittest.TestCase):
    """
    curl 7.88+: its own SASL implementation, C{--cacert} verification.
    """

    timeout = 30

    def setUp(self):
        self.curl = requireProgram(self, "curl")
        self.msa = RunningMSA(self)
        self.messageFile = writeMessage(self)

    def curlArgs(
        self, implicit: bool, mechanism: str, password=PASSWORD, extra=(), user="alice"
    ):
        if implicit:
            url = [f"smtps://127.0.0.1:{self.msa.implicitPort}"]
        else:
            url = [f"smtp://127.0.0.1:{self.msa.starttlsPort}", "--ssl-reqd"]
        return [
            "-v",
            "-sS",
            "--url",
            *url,
            "--cacert",
            self.msa.certFile,
            "--login-options",
            f"AUTH={mechanism}",
            *extra,
            "-u",
            f"{user}:{password}",
            "--mail-from",
            FROM,
            "--mail-rcpt",
            TO,
            "-T",
            self.messageFile,
        ]

    @defer.inlineCallbacks
    def submit(self, implicit: bool, mechanism: str, extra=(), args=None):
        if args is None:
            args = self.curlArgs(implicit, mechanism, extra=extra)
        out, err, code = yield runProgram(self.curl, args)
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        # The protocol lines only, without curl's "{ [5 bytes data]" notes.
        lines = [line for line in err.splitlines() if line[:2] in (b"< ", b"> ")]
        auth = [line for line in lines if line.startswith(b"> AUTH ")]
        self.assertEqual(len(auth), 1, auth)
        self.assertEqual(auth[0].split()[2], mechanism.encode("ascii"))
        # An initial response on the AUTH line only when asked for.
        self.assertEqual(len(auth[0].split()), 4 if "--sasl-ir" in args else 3)
        self.assertIn(b"< 235 2.7.0 Authentication successful", lines)
        yield checkOutbox(self, self.msa, queueIdIn(self, err))
        return lines

    @defer.inlineCallbacks
    def checkDigest(self, implicit: bool):
        lines = yield self.submit(implicit, "DIGEST-MD5")
        index = lines.index(b"> AUTH DIGEST-MD5")
        self.assertTrue(lines[index + 1].startswith(b"< 334 "))
        response = digestResponse(lines[index + 2][2:])
        # curl names the realm, not the host, in the digest-uri.
        self.assertEqual(response["digest-uri"], "smtp/localhost")
        self.assertEqual(response["username"], "alice")
        # The server proved it knew the password: rspauth, then 235.
        rspauth = base64.b64decode(lines[index + 3][6:])
        self.assertTrue(rspauth.startswith(b"rspauth="), lines[index + 3])

    def test_digestMD5StartTLS(self):
        return self.checkDigest(implicit=False)

    def test_digestMD5ImplicitTLS(self):
        return self.checkDigest(implicit=True)

    def test_plainStartTLS(self):
        return self.submit(False, "PLAIN")

    def test_plainImplicitTLS(self):
        return self.submit(True, "PLAIN")

    @defer.inlineCallbacks
    def checkPlainInitialResponse(self, implicit: bool):
        lines = yield self.submit(implicit, "PLAIN", extra=["--sasl-ir"])
        (auth,) = [line for line in lines if line.startswith(b"> AUTH ")]
        self.assertEqual(
            base64.b64decode(auth.split()[3]), b"\0alice\0" + PASSWORD.encode()
        )

    def test_plainInitialResponseStartTLS(self):
        return self.checkPlainInitialResponse(implicit=False)

    def test_plainInitialResponseImplicitTLS(self):
        return self.checkPlainInitialResponse(implicit=True)

    def test_loginStartTLS(self):
        return self.submit(False, "LOGIN")

    def test_loginImplicitTLS(self):
        return self.submit(True, "LOGIN")

    def test_hostnameVerifiedStartTLS(self):
        """
        The certificate is verified against the name C{localhost} too.
        """
        port = self.msa.starttlsPort
        args = self.curlArgs(False, "DIGEST-MD5")
        args[args.index("--url") + 1] = f"smtp://localhost:{port}"
        args[:0] = ["--resolve", f"localhost:{port}:127.0.0.1"]
        return self.submit(False, "DIGEST-MD5", args=args)

    @defer.inlineCallbacks
    def checkWrongPassword(self, implicit: bool, mechanism: str):
        args = self.curlArgs(implicit, mechanism, password="wrong")
        out, err, code = yield runProgram(self.curl, args)
        self.assertEqual(code, CURL_LOGIN_DENIED, err.decode("utf-8", "replace"))
        self.assertIn(b"< 535 5.7.8 Authentication credentials invalid", err)
        self.assertNotIn(b"> MAIL FROM", err)
        self.assertEqual(self.msa.outboxFiles(), [])

    def test_wrongPasswordDigestMD5(self):
        return self.checkWrongPassword(False, "DIGEST-MD5")

    def test_wrongPasswordPlain(self):
        return self.checkWrongPassword(True, "PLAIN")

    def test_wrongPasswordLogin(self):
        return self.checkWrongPassword(False, "LOGIN")


def runSwaks(testCase, args: list[str]):
    """
    Run swaks with Perl's own SASL code, whatever else the host has: with
    Debian's libauthen-sasl-cyrus-perl installed (common on mail hosts)
    Authen::SASL prefers its Cyrus plugin, which dies on swaks's C{maxssf}
    property before any DIGEST-MD5 exchange.  Authen::SASL's import list
    names the plugin to use, so swaks runs under C{perl -MAuthen::SASL=Perl}.

    @return: a L{Deferred} of (stdout, stderr, exit code).
    """
    swaks = requireProgram(testCase, "swaks")
    perl = requireProgram(testCase, "perl")
    return runProgram(perl, ["-MAuthen::SASL=Perl", swaks, *args])


class SwaksTests(unittest.TestCase):
    """
    swaks: Perl Authen::SASL (L{runSwaks}), certificate verified with
    C{--tls-verify}.
    """

    timeout = 30

    def setUp(self):
        requireProgram(self, "swaks")
        self.msa = RunningMSA(self)
        self.messageFile = writeMessage(self)

    def swaksArgs(
        self, implicit, mechanism, server="127.0.0.1", password=PASSWORD, user="alice"
    ):
        if implicit:
            mode = ["--port", str(self.msa.implicitPort), "--tls-on-connect"]
        else:
            mode = ["--port", str(self.msa.starttlsPort), "--tls"]
        return [
            "--server",
            server,
            *mode,
            "--tls-verify",
            "--tls-ca-path",
            self.msa.certFile,
            "--auth",
            mechanism,
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--from",
            FROM,
            "--to",
            TO,
            "--data",
            "@" + self.messageFile,
        ]

    @defer.inlineCallbacks
    def submit(self, implicit: bool, mechanism: str, server="127.0.0.1"):
        out, err, code = yield runSwaks(
            self, self.swaksArgs(implicit, mechanism, server)
        )
        transcript = out + err
        self.assertEqual(code, 0, transcript.decode("utf-8", "replace"))
        self.assertIn(b"~> AUTH " + mechanism.encode("ascii"), transcript)
        self.assertIn(b"<~  235 2.7.0 Authentication successful", transcript)
        queueId = queueIdIn(self, transcript).decode("ascii")
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(files, [f"{queueId}.eml"])
        data = self.msa.readOutbox(files[0])
        # swaks sends a CRLF of its own after the data it was given.
        checkAccepted(self, data, MESSAGE + b"\r\n")
        return transcript.splitlines()

    @defer.inlineCallbacks
    def checkDigest(self, implicit: bool, server: str):
        lines = yield self.submit(implicit, "DIGEST-MD5", server)
        index = lines.index(b" ~> AUTH DIGEST-MD5")
        self.assertTrue(lines[index + 1].startswith(b"<~  334 "))
        response = digestResponse(lines[index + 2].strip()[3:])
        self.assertEqual(response["digest-uri"], f"smtp/{server}")
        self.assertEqual(response["charset"], "utf-8")
        # swaks checks rspauth before it sends the empty line.
        self.assertTrue(lines[index + 3].startswith(b"<~  334 "))
        self.assertEqual(lines[index + 4], b" ~> ")

    def test_digestMD5StartTLS(self):
        return self.checkDigest(False, "127.0.0.1")

    def test_digestMD5ImplicitTLS(self):
        return self.checkDigest(True, "127.0.0.1")

    def test_digestMD5StartTLSLocalhost(self):
        return self.checkDigest(False, "localhost")

    def test_digestMD5ImplicitTLSLocalhost(self):
        return self.checkDigest(True, "localhost")

    def test_plainStartTLS(self):
        return self.submit(False, "PLAIN")

    def test_plainImplicitTLS(self):
        return self.submit(True, "PLAIN")

    def test_loginStartTLS(self):
        return self.submit(False, "LOGIN")

    def test_loginImplicitTLS(self):
        return self.submit(True, "LOGIN")

    @defer.inlineCallbacks
    def checkWrongPassword(self, implicit: bool, mechanism: str):
        args = self.swaksArgs(implicit, mechanism, password="wrong")
        out, err, code = yield runSwaks(self, args)
        transcript = out + err
        self.assertEqual(code, SWAKS_AUTH_FAILED, transcript.decode("utf-8", "replace"))
        self.assertIn(b"<~* 535 5.7.8 Authentication credentials invalid", transcript)
        self.assertNotIn(b"MAIL FROM", transcript)
        self.assertEqual(self.msa.outboxFiles(), [])

    def test_wrongPasswordDigestMD5StartTLS(self):
        return self.checkWrongPassword(False, "DIGEST-MD5")

    def test_wrongPasswordDigestMD5ImplicitTLS(self):
        return self.checkWrongPassword(True, "DIGEST-MD5")

    def test_wrongPasswordPlain(self):
        return self.checkWrongPassword(True, "PLAIN")


class PythonClientMixin:
    """
    Blocking smtplib sessions, run in a thread, with the certificate
    verified: against C{localhost} when that name is the loopback address,
    else against the IP address (the certificate names both).
    """

    timeout = 30

    def setUp(self):
        self.msa = RunningMSA(self)
        self.host = "localhost" if localhostIsLoopback() else "127.0.0.1"

    def context(self) -> ssl.SSLContext:
        context = self.msa.clientContext()
        self.assertTrue(context.check_hostname)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        return context

    def connect(self, implicit: bool) -> smtplib.SMTP:
        """
        An EHLO'd session over verified TLS (call in a thread).
        """
        if implicit:
            smtp = smtplib.SMTP_SSL(
                self.host, self.msa.implicitPort, context=self.context(), timeout=10
            )
        else:
            smtp = smtplib.SMTP(self.host, self.msa.starttlsPort, timeout=10)
            smtp.ehlo()
            code, _ = smtp.starttls(context=self.context())
            assert code == 220, code
        smtp.ehlo()
        assert "auth" in smtp.esmtp_features, smtp.esmtp_features
        return smtp

    def send(self, smtp: smtplib.SMTP) -> bytes:
        """
        Submit L{MESSAGE}; the queue id from the 250 reply.
        """
        code, reply = smtp.mail(FROM)
        assert code == 250, (code, reply)
        code, reply = smtp.rcpt(TO)
        assert code == 250, (code, reply)
        code, reply = smtp.data(MESSAGE)
        assert code == 250, (code, reply)
        smtp.quit()
        match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", reply)
        assert match, reply
        return match.group(1)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class PureSASLTests(PythonClientMixin, unittest.TestCase):
    """
    pure-sasl's DIGEST-MD5 (which checks rspauth), and smtplib's own PLAIN
    and LOGIN.
    """

    def setUp(self):
        try:
            from puresasl.client import SASLClient
        except ImportError:
            if os.environ.get("CI") == "true":
                self.fail("pure-sasl is not installed")
            raise SkipTest("pure-sasl not installed")
        self.SASLClient = SASLClient
        super().setUp()

    def digestSession(self, implicit: bool):
        smtp = self.connect(implicit)
        try:
            client = self.SASLClient(
                self.host,
                "smtp",
                mechanism="DIGEST-MD5",
                username="alice",
                password=PASSWORD,
            )
            exchange = []
            code, challenge = smtp.docmd("AUTH", "DIGEST-MD5")
            exchange.append((code, challenge))
            assert code == 334, exchange
            response = client.process(base64.b64decode(challenge))
            code, final = smtp.docmd(b64(response))
            exchange.append((code, final))
            assert code == 334, exchange
            # pure-sasl raises SASLProtocolException on a wrong rspauth.
            assert client.process(base64.b64decode(final)) is None
            assert client.complete, exchange
            code, reply = smtp.docmd("")
            exchange.append((code, reply))
            assert (code, reply) == (235, b"2.7.0 Authentication successful"), exchange
            return response, self.send(smtp)
        finally:
            smtp.close()

    @defer.inlineCallbacks
    def checkDigest(self, implicit: bool):
        response, queueId = yield threads.deferToThread(self.digestSession, implicit)
        directives = digestResponse(base64.b64encode(response))
        self.assertEqual(directives["digest-uri"], f"smtp/{self.host}")
        yield checkOutbox(self, self.msa, queueId)

    def test_digestMD5StartTLS(self):
        return self.checkDigest(implicit=False)

    def test_digestMD5ImplicitTLS(self):
        return self.checkDigest(implicit=True)

    def loginSession(self, implicit: bool, mechanism: str):
        smtp = self.connect(implicit)
        try:
            # smtplib picks from the advertised list; leave it one choice.
            smtp.esmtp_features["auth"] = mechanism
            code, reply = smtp.login("alice", PASSWORD)
            assert (code, reply) == (235, b"2.7.0 Authentication successful")
            return self.send(smtp)
        finally:
            smtp.close()

    @defer.inlineCallbacks
    def checkLogin(self, implicit: bool, mechanism: str):
        queueId = yield threads.deferToThread(self.loginSession, implicit, mechanism)
        yield checkOutbox(self, self.msa, queueId)

    def test_smtplibPlainStartTLS(self):
        return self.checkLogin(False, "PLAIN")

    def test_smtplibPlainImplicitTLS(self):
        return self.checkLogin(True, "PLAIN")

    def test_smtplibLoginStartTLS(self):
        return self.checkLogin(False, "LOGIN")

    def test_smtplibLoginImplicitTLS(self):
        return self.checkLogin(True, "LOGIN")

    def test_smtplibWrongPassword(self):
        def session():
            smtp = self.connect(False)
            try:
                smtp.esmtp_features["auth"] = "PLAIN"
                with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                    smtp.login("alice", "wrong")
                return caught.exception
            finally:
                smtp.close()

        def check(error):
            self.assertEqual(error.smtp_code, 535)
            self.assertEqual(
                error.smtp_error, b"5.7.8 Authentication credentials invalid"
            )
            self.assertEqual(self.msa.outboxFiles(), [])

        return threads.deferToThread(session).addCallback(check)


class ScramTests(PythonClientMixin, unittest.TestCase):
    """
    scramp's SCRAM-SHA-256 client, initial response on the AUTH line,
    server signature verified.
    """

    def setUp(self):
        try:
            import scramp
        except ImportError:
            if os.environ.get("CI") == "true":
                self.fail("scramp is not installed")
            raise SkipTest("scramp not installed")
        self.scramp = scramp
        super().setUp()

    def scramSession(self, implicit: bool, password: str):
        smtp = self.connect(implicit)
        try:
            client = self.scramp.ScramClient(["SCRAM-SHA-256"], "alice", password)
            first = client.get_client_first().encode("utf-8")
            code, serverFirst = smtp.docmd("AUTH", "SCRAM-SHA-256 " + b64(first))
            assert code == 334, (code, serverFirst)
            client.set_server_first(base64.b64decode(serverFirst).decode("utf-8"))
            code, reply = smtp.docmd(b64(client.get_client_final().encode("utf-8")))
            if code != 334:
                return code, reply, None
            # Raises ScramException unless the server signature is right.
            client.set_server_final(base64.b64decode(reply).decode("utf-8"))
            code, reply = smtp.docmd("")
            if code != 235:
                return code, reply, None
            return code, reply, self.send(smtp)
        finally:
            smtp.close()

    @defer.inlineCallbacks
    def checkScram(self, implicit: bool):
        code, reply, queueId = yield threads.deferToThread(
            self.scramSession, implicit, PASSWORD
        )
        self.assertEqual((code, reply), (235, b"2.7.0 Authentication successful"))
        yield checkOutbox(self, self.msa, queueId)

    def test_scramStartTLS(self):
        return self.checkScram(implicit=False)

    def test_scramImplicitTLS(self):
        return self.checkScram(implicit=True)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        code, reply, queueId = yield threads.deferToThread(
            self.scramSession, False, "wrong"
        )
        self.assertEqual(
            (code, reply), (535, b"5.7.8 Authentication credentials invalid")
        )
        self.assertIsNone(queueId)
        self.assertEqual(self.msa.outboxFiles(), [])


def issueFromTestCA(directory: str, hostname: str) -> tuple[str, str]:
    """
    Like L{msa.tls.ensureSelfSignedCertificate}, and under the same file
    names so that the MSA picks it up, but a 90-day leaf (no CA flag) issued
    by a throw-away CA, written next to it as C{test-ca.pem}: what a
    scanner's path validation and Mozilla's lifespan limit accept.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MSA test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(hostname),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    certPath = os.path.join(directory, "selfsigned-cert.pem")
    keyPath = os.path.join(directory, "selfsigned-key.pem")
    with open(os.path.join(directory, "test-ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(certPath, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certPath, keyPath


class SSLyzeTests(unittest.TestCase):
    """
    sslyze (its own venv, run as a program) checks both listeners against
    Mozilla's "intermediate" configuration.

    Mozilla's profile also judges the certificate: a path to a trusted root
    and a lifespan of at most 366 days.  The MSA's built-in self-signed
    certificate (825 days, CA flag set on the leaf) fails both, whatever the
    TLS parameters, so the MSA here serves a 90-day leaf from a throw-away CA
    that sslyze is told to trust (C{--certinfo_ca_file}): then exit status
    0 means the TLS configuration itself is compliant.
    """

    timeout = 60

    def setUp(self):
        if not os.access(SSLYZE, os.X_OK):
            if os.environ.get("CI") == "true":
                self.fail(f"{SSLYZE} is missing (CI must install sslyze there)")
            raise SkipTest(f"{SSLYZE} not installed")
        self.patch(e2e, "ensureSelfSignedCertificate", issueFromTestCA)
        self.msa = RunningMSA(self)
        self.caFile = os.path.join(self.msa.state, "test-ca.pem")

    @defer.inlineCallbacks
    def scan(self, args: list[str]):
        jsonFile = os.path.abspath(self.mktemp()) + ".json"
        out, err, code = yield runProgram(
            SSLYZE,
            [
                *args,
                "--mozilla_config=intermediate",
                "--certinfo_ca_file",
                self.caFile,
                f"--json_out={jsonFile}",
            ],
        )
        report = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, report)
        self.assertRegex(report, r"127\.0\.0\.1:\d+: OK - Compliant")
        with open(jsonFile) as f:
            results = json.load(f)["server_scan_results"]
        self.assertEqual(len(results), 1)
        self.assertEqual(results[0]["scan_status"], "COMPLETED")
        scan = results[0]["scan_result"]

        def result(name):
            self.assertEqual(scan[name]["status"], "COMPLETED", name)
            return scan[name]["result"]

        for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
            outcome = result(f"{version}_cipher_suites")
            self.assertFalse(outcome["is_tls_version_supported"], version)
            self.assertEqual(outcome["accepted_cipher_suites"], [], version)
        tls12 = result("tls_1_2_cipher_suites")
        self.assertTrue(tls12["is_tls_version_supported"])
        names = [s["cipher_suite"]["name"] for s in tls12["accepted_cipher_suites"]]
        self.assertTrue(names)
        for name in names:
            self.assertRegex(name, r"^TLS_ECDHE_(ECDSA|RSA)_WITH_")
            self.assertRegex(
                name, r"_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20_POLY1305_SHA256)$"
            )
        self.assertTrue(result("tls_1_3_cipher_suites")["is_tls_version_supported"])
        self.assertFalse(result("tls_compression")["supports_compression"])
        renegotiation = result("session_renegotiation")
        self.assertTrue(renegotiation["supports_secure_renegotiation"])
        self.assertFalse(renegotiation["is_vulnerable_to_client_renegotiation_dos"])
        curves = {c["name"] for c in result("elliptic_curves")["supported_curves"]}
        self.assertTrue(curves)
        self.assertLessEqual(curves, {"X25519", "secp256r1", "secp384r1"})
        self.assertTrue(result("tls_fallback_scsv")["supports_fallback_scsv"])
        self.assertFalse(result("heartbleed")["is_vulnerable_to_heartbleed"])
        return report

    def test_startTLS(self):
        return self.scan(["--starttls", "smtp", f"127.0.0.1:{self.msa.starttlsPort}"])

    def test_implicitTLS(self):
        return self.scan([f"127.0.0.1:{self.msa.implicitPort}"])


class OldTLSTests(unittest.TestCase):
    """
    A client that can speak no more than TLS 1.1 gets no session.
    """

    timeout = 30

    def setUp(self):
        self.msa = RunningMSA(self)

    def tls11Context(self) -> ssl.SSLContext:
        """
        The most a TLS 1.1 client can offer: TLS 1.0 and 1.1 with every
        cipher (OpenSSL 3 needs security level 0 for them).
        """
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as e:
            raise SkipTest(f"this OpenSSL cannot offer TLS 1.1: {e}")
        context.load_verify_locations(self.msa.certFile)
        return context

    def offersTLS11(self) -> None:
        """
        Prove the client really can complete a TLS 1.1 handshake, against a
        local server that allows it; else skip.
        """
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            server.minimum_version = ssl.TLSVersion.TLSv1_1
            server.maximum_version = ssl.TLSVersion.TLSv1_1
            server.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as e:
            raise SkipTest(f"this OpenSSL cannot do TLS 1.1: {e}")
        server.load_cert_chain(
            self.msa.certFile, os.path.join(self.msa.state, "selfsigned-key.pem")
        )
        listener = socket.create_server(("127.0.0.1", 0))
        errors = []

        def serve():
            try:
                conn, _ = listener.accept()
                with server.wrap_socket(conn, server_side=True) as tlsConn:
                    tlsConn.recv(1)
            except (OSError, ssl.SSLError) as e:
                errors.append(e)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as sock:
                with self.tls11Context().wrap_socket(
                    sock, server_hostname="localhost"
                ) as tlsSock:
                    version = tlsSock.version()
                    tlsSock.sendall(b"x")
        except ssl.SSLError as e:
            raise SkipTest(f"this OpenSSL cannot complete a TLS 1.1 handshake: {e}")
        finally:
            thread.join(10)
            listener.close()
        if version != "TLSv1.1":
            raise SkipTest(f"a TLS 1.1 client negotiated {version}")

    def handshake(self, implicit: bool) -> str:
        self.offersTLS11()
        if implicit:
            sock = socket.create_connection(
                ("127.0.0.1", self.msa.implicitPort), timeout=10
            )
            try:
                with self.assertRaises(ssl.SSLError) as caught:
                    self.tls11Context().wrap_socket(sock, server_hostname="localhost")
            finally:
                sock.close()
        else:
            smtp = smtplib.SMTP("127.0.0.1", self.msa.starttlsPort, timeout=10)
            try:
                smtp.ehlo()
                smtp._host = "localhost"
                with self.assertRaises(ssl.SSLError) as caught:
                    smtp.starttls(context=self.tls11Context())
            finally:
                smtp.close()
        return str(caught.exception)

    @defer.inlineCallbacks
    def checkRefused(self, implicit: bool):
        reason = yield threads.deferToThread(self.handshake, implicit)
        self.assertRegex(reason, r"(?i)protocol version|unsupported protocol")

    def test_startTLS(self):
        return self.checkRefused(implicit=False)

    def test_implicitTLS(self):
        return self.checkRefused(implicit=True)
