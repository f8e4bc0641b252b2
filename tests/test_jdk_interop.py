# -*- test-case-name: tests.test_jdk_interop -*-
"""
The JDK as a mail client: C{tests/JavaSmtpSasl.java} speaks SMTP over
verified implicit TLS by hand and does AUTH with the JDK's own
C{javax.security.sasl} client, as JavaMail / Jakarta Mail do, against the
whole MSA (L{tests.e2e.RunningMSA}).

  - DIGEST-MD5 with a non-ASCII user name and password: the JDK follows
    RFC 2831 2.1.2.1 (each field converted to ISO 8859-1 on its own when it
    fits), which the MSA once got wrong.
  - EXTERNAL with a client certificate from the configured client CA.
  - The default choice: handed the advertised list in order
    (C{Sasl.createSaslClient(mechanismsFromEHLO, ...)}), the JDK takes the
    first it knows and does not fall back.  Without a client certificate
    EXTERNAL is not in the list, so it picks DIGEST-MD5 and submits.

Debian package: C{default-jdk-headless} (C{java} and C{javac}).  The client
is compiled once per test run with C{javac} into a temporary directory.
"""

import base64
import hashlib
import json
import os

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import defer
from twisted.trial import unittest

from tests.e2e import (
    MESSAGE,
    SENDERS,
    RunningMSA,
    fixtureAccount,
    requireProgram,
    runProgram,
)
from tests.test_digest_nonascii import NON_ASCII, matchingVariant, nonAsciiAccounts
from tests.test_external_offer import externalMSA

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "JavaSmtpSasl.java")

#: The directory holding the compiled client, once compiled in this run.
_compiled: list[str] = []


@defer.inlineCallbacks
def compileClient(testCase):
    """
    Compile C{JavaSmtpSasl.java} (once per run) with C{javac}.

    @return: a L{defer.Deferred} firing with the C{java} program and the
        class directory.
    """
    java = requireProgram(testCase, "java")
    javac = requireProgram(testCase, "javac")
    if not (
        _compiled and os.path.exists(os.path.join(_compiled[0], "JavaSmtpSasl.class"))
    ):
        classes = os.path.abspath(testCase.mktemp())
        os.makedirs(classes)
        out, err, code = yield runProgram(javac, ["-d", classes, SOURCE])
        testCase.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
        _compiled[:] = [classes]
    return java, _compiled[0]


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class JDKTestsMixin:
    """
    Runs the Java client against C{self.msa}.
    """

    timeout = 60

    @defer.inlineCallbacks
    def runJava(self, mechanisms, user, password, clientCertificate=()):
        """
        @param mechanisms: the list handed to C{Sasl.createSaslClient}, or
            C{"EHLO"} for the advertised one.
        @param clientCertificate: C{(pkcs12File, password)} or nothing.
        @return: the exit code and the transcript's lines (L{str}).
        """
        java, classes = yield compileClient(self)
        messageFile = os.path.abspath(self.mktemp())
        with open(messageFile, "wb") as f:
            f.write(MESSAGE)
        out, err, code = yield runProgram(
            java,
            [
                "-XX:TieredStopAtLevel=1",
                "-cp",
                classes,
                "JavaSmtpSasl",
                str(self.msa.implicitPort),
                self.msa.certFile,
                mechanisms,
                b64(user),
                b64(password),
                messageFile,
                *clientCertificate,
            ],
        )
        lines = (out + err).decode("utf-8", "replace").splitlines()
        return code, lines

    @defer.inlineCallbacks
    def checkSubmitted(self, code, lines):
        self.assertEqual(code, 0, "\n".join(lines))
        self.assertIn("S: 235 2.7.0 Authentication successful", lines)
        [queued] = [line for line in lines if "Ok: queued as" in line]
        queueId = queued.rsplit(" ", 1)[1]
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(files, [f"{queueId}.eml"])
        self.assertTrue(self.msa.readOutbox(files[0]).endswith(MESSAGE))


class JDKDigestMD5Tests(JDKTestsMixin, unittest.TestCase):
    """
    The JDK's DIGEST-MD5 client with non-ASCII user names and passwords.
    """

    def setUp(self):
        self.msa = RunningMSA(self, extraAccounts=nonAsciiAccounts())

    @defer.inlineCallbacks
    def checkDigest(self, user, password):
        code, lines = yield self.runJava("DIGEST-MD5", user, password)
        yield self.checkSubmitted(code, lines)
        self.assertIn("MECHANISM DIGEST-MD5", lines)
        # The challenge and the response, as the JDK saw and wrote them.
        [challenge] = [line[3:] for line in lines if line.startswith("S> realm=")]
        [response, empty] = [line[3:] for line in lines if line.startswith("C> ")]
        self.assertEqual(empty, "")
        self.assertIn("charset=utf-8", response)
        # The JDK hashes per RFC 2831: the first variant.
        self.assertEqual(matchingVariant(challenge, response, user, password), 0)

    def test_latin1Password(self):
        """
        User name and password both fit ISO 8859-1: the JDK converts both.
        """
        return self.checkDigest(*NON_ASCII[0])

    def test_passwordBeyondLatin1(self):
        """
        The password has a euro sign (not in ISO 8859-1): it stays UTF-8
        while the user name is converted.
        """
        return self.checkDigest(*NON_ASCII[1])

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        user, password = NON_ASCII[0]
        code, lines = yield self.runJava("DIGEST-MD5", user, password + "x")
        self.assertEqual(code, 2, "\n".join(lines))
        self.assertIn("S: 535 5.7.8 Authentication credentials invalid", lines)
        self.assertEqual(self.msa.outboxFiles(), [])


class JDKOldAccountFileTests(JDKTestsMixin, unittest.TestCase):
    """
    An accounts file written before the variants: one H(A1) per realm, of
    the whole string in ISO 8859-1 when all of it fit.
    """

    def setUp(self):
        user, password = NON_ASCII[0]
        old = hashlib.md5(f"{user}:localhost:{password}".encode("iso-8859-1"))
        account = attrs.evolve(
            fixtureAccount(user, password, ()),
            digestHA1={"localhost": old.hexdigest()},
            extra={"senders": SENDERS},
        )
        self.msa = RunningMSA(self, extraAccounts={user: account})
        with open(self.msa.accountsFile, "rb") as f:
            stored = json.load(f)["accounts"][user]["digestHA1"]
        self.assertEqual(stored, {"localhost": old.hexdigest()})

    @defer.inlineCallbacks
    def test_jdk(self):
        """
        Names that fit ISO 8859-1 make that H(A1) the RFC's, so the JDK
        still gets in.
        """
        code, lines = yield self.runJava("DIGEST-MD5", *NON_ASCII[0])
        yield self.checkSubmitted(code, lines)


class JDKClientCertificateTests(JDKTestsMixin, unittest.TestCase):
    """
    The MSA asks for client certificates from a test CA
    (C{client_certificates = "request"}), so EXTERNAL is configured and,
    by default, first.
    """

    def setUp(self):
        self.msa, pki, (cert, _, keyFile) = externalMSA(self)
        with open(keyFile, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        self.p12 = os.path.join(pki.directory, "acme.p12")
        with open(self.p12, "wb") as f:
            f.write(
                pkcs12.serialize_key_and_certificates(
                    b"acme",
                    key,
                    cert,
                    [pki.ca],
                    serialization.BestAvailableEncryption(b"p12 pass"),
                )
            )

    @defer.inlineCallbacks
    def test_external(self):
        """
        With its certificate the JDK takes EXTERNAL, first in the list, and
        submits as the account that lists the certificate.
        """
        code, lines = yield self.runJava(
            "EHLO", "", "", clientCertificate=(self.p12, "p12 pass")
        )
        yield self.checkSubmitted(code, lines)
        self.assertIn("ADVERTISED EXTERNAL SCRAM-SHA-256 DIGEST-MD5 PLAIN LOGIN", lines)
        self.assertIn("MECHANISM EXTERNAL", lines)
        self.assertIn("C: AUTH EXTERNAL =", lines)

    @defer.inlineCallbacks
    def test_defaultChoiceWithoutCertificate(self):
        """
        Without a certificate EXTERNAL is not advertised; from the list in
        the server's order the JDK takes DIGEST-MD5 (it has no SCRAM) and
        submits.
        """
        code, lines = yield self.runJava("EHLO", "alice", "wonderland")
        yield self.checkSubmitted(code, lines)
        self.assertIn("ADVERTISED SCRAM-SHA-256 DIGEST-MD5 PLAIN LOGIN", lines)
        self.assertIn("MECHANISM DIGEST-MD5", lines)

    @defer.inlineCallbacks
    def test_externalWithoutCertificate(self):
        """
        Asked for EXTERNAL anyway, without a certificate: 504, not a failed
        login.
        """
        code, lines = yield self.runJava("EXTERNAL", "", "")
        self.assertEqual(code, 2, "\n".join(lines))
        self.assertIn(
            "S: 504 5.5.4 EXTERNAL needs a verified client certificate", lines
        )
        self.assertEqual(self.msa.outboxFiles(), [])
