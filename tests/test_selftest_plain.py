# -*- test-case-name: tests.test_selftest_plain -*-
"""
C{digipoort-msa-admin selftest} against a plain C{twisted.mail} ESMTP
server (L{tests.plaintwisted}), with the defaults the MSA exists to fix: it
fails exactly the probes about those defaults.
"""

import os

from twisted.internet import defer, ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.trial import unittest
from zope.interface import implementer

from msa.admin.selftest import SMUGGLING_FORMS
from tests.plaintwisted import BareLFESMTP, listenPlainTwisted
from tests.selftesting import (
    BARE_LF_ENDS,
    BARE_LF_INSIDE,
    MESSAGES,
    NO_CHUNKING,
    PRE_TLS,
    SMUGGLING,
    SelftestMixin,
    accepted,
    makeCertificate,
    smuggledRan,
)


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
            skipped=NO_CHUNKING,
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
            skipped=[*PRE_TLS, *NO_CHUNKING],
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
            skipped=[*PRE_TLS, *MESSAGES],
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
            skipped=[*PRE_TLS, *NO_CHUNKING],
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
