# -*- test-case-name: tests.test_external_offer -*-
"""
SASL EXTERNAL is advertised only where it can work (issue 9 item 6): on a
connection with a verified client certificate.  A client that takes the
first mechanism it knows (the JDK, L{tests.test_jdk_interop}) must not be
led to EXTERNAL without one.  The whole MSA (L{tests.e2e.RunningMSA}) with
C{client_certificates = "request"}, over STARTTLS and implicit TLS.
"""

import os
import smtplib

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.clientcert import certificateIdentities
from tests.e2e import SENDERS, RunningMSA, fixtureAccount
from tests.test_clientcert import ClientPKI

WITHOUT = "SCRAM-SHA-256 DIGEST-MD5 PLAIN LOGIN"
WITH = "EXTERNAL " + WITHOUT
NOT_HERE = (504, b"5.5.4 EXTERNAL needs a verified client certificate")


def externalMSA(testCase):
    """
    The MSA asking for client certificates from a test CA, and a
    certificate from that CA that the EXTERNAL-only account C{acme} lists.

    @return: the L{RunningMSA}, the L{ClientPKI}, and the certificate, its
        PEM file and its key's PEM file.
    """
    pki = ClientPKI(os.path.abspath(testCase.mktemp()))
    cert, certFile, keyFile = pki.issue("acme", "NTRNL-12345678")
    [fingerprint, _] = certificateIdentities(cert)
    acme = attrs.evolve(
        fixtureAccount("acme", "acme pass", mechanisms=("EXTERNAL",)),
        extra={"senders": SENDERS, "certificates": [fingerprint]},
    )
    msa = RunningMSA(
        testCase,
        tls={"client_certificates": "request", "client_ca": pki.caFile},
        extraAccounts={"acme": acme},
    )
    return msa, pki, (cert, certFile, keyFile)


class ExternalOfferTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.msa, _, (_, self.certFile, self.keyFile) = externalMSA(self)

    def connect(self, implicit: bool, certificate: bool) -> smtplib.SMTP:
        context = self.msa.clientContext()
        if certificate:
            context.load_cert_chain(self.certFile, self.keyFile)
        if implicit:
            smtp = smtplib.SMTP_SSL(
                "localhost", self.msa.implicitPort, context=context, timeout=10
            )
        else:
            smtp = smtplib.SMTP("localhost", self.msa.starttlsPort, timeout=10)
            smtp.ehlo()
            assert smtp.starttls(context=context)[0] == 220
        smtp.ehlo()
        return smtp

    def session(self, implicit: bool, certificate: bool, commands=()):
        """
        @return: the advertised AUTH list and the replies to C{commands}.
        """
        smtp = self.connect(implicit, certificate)
        try:
            replies = [smtp.docmd(*command) for command in commands]
            [auth] = [
                line[5:].decode("ascii")
                for line in smtp.ehlo_resp.splitlines()
                if line.startswith(b"AUTH ")
            ]
            return auth, replies
        finally:
            smtp.close()

    @defer.inlineCallbacks
    def checkOffer(self, implicit):
        auth, _ = yield threads.deferToThread(self.session, implicit, False)
        self.assertEqual(auth, WITHOUT)
        auth, replies = yield threads.deferToThread(
            self.session, implicit, True, [("AUTH", "EXTERNAL =")]
        )
        self.assertEqual(auth, WITH)
        self.assertEqual(replies, [(235, b"2.7.0 Authentication successful")])

    def test_offerStartTLS(self):
        return self.checkOffer(implicit=False)

    def test_offerImplicitTLS(self):
        return self.checkOffer(implicit=True)

    @defer.inlineCallbacks
    def test_refusedWithoutCertificate(self):
        """
        AUTH EXTERNAL without a certificate gets 504, with or without an
        initial response, and it is not a failed login: the fourth attempt
        gets the same answer (three failed logins end the session), and a
        password login then works.
        """
        auth, replies = yield threads.deferToThread(
            self.session,
            False,
            False,
            [("AUTH", "EXTERNAL")] * 2
            + [("AUTH", "EXTERNAL =")] * 2
            + [("AUTH", "PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=")],
        )
        self.assertEqual(
            replies, [NOT_HERE] * 4 + [(235, b"2.7.0 Authentication successful")]
        )
