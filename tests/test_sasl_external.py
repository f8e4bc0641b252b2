# -*- test-case-name: tests.test_sasl_external -*-
"""
Tests for L{msa.sasl.external}: SASL EXTERNAL as a state machine and the
credentials it yields (the certificate's identities and the requested
authorization identity), with every refusal and the 255-octet limit at and
past its edge.  Which account a certificate maps to is
L{msa.accounts.clientcert}'s, tested in L{tests.test_clientcert}.
"""

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.errors import SMTPReply
from msa.interfaces import ICertificateCredentials, IMechanismCredentials
from msa.sasl.base import Authenticate, Challenge, MechanismContext
from msa.sasl.external import MAX_AUTHZID, CertificateCredentials, ExternalMechanism

IDENTITIES = ("sha256:00ff", "serialNumber:12345678")


def mechanism(identities=IDENTITIES):
    return ExternalMechanism(MechanismContext(peerIdentities=identities))


class ExternalMechanismTests(unittest.TestCase):
    def assertCredentials(self, step, authzid, identities=IDENTITIES):
        self.assertIsInstance(step, Authenticate)
        credentials = step.credentials
        self.assertIsInstance(credentials, CertificateCredentials)
        self.assertEqual(
            (credentials.identities, credentials.authzid, credentials.mechanism),
            (identities, authzid, "EXTERNAL"),
        )

    def assertRefused(self, data, text):
        error = self.assertRaises(SMTPReply, mechanism().start, data)
        self.assertEqual((error.code, error.status, error.text), (501, "5.5.2", text))

    def test_emptyChallenge(self):
        """
        Without an initial response the server sends an empty challenge;
        an empty response asks for whichever account lists the certificate.
        """
        m = mechanism()
        self.assertEqual(m.start(None), Challenge(b""))
        self.assertCredentials(m.respond(b""), "")
        self.assertIsNone(m.serverFinal())

    def test_authzid(self):
        """
        A non-empty message names the account to act as.
        """
        self.assertCredentials(mechanism().start(b"acme"), "acme")

    def test_identitiesFromContext(self):
        """
        The identities are the session's verified certificate's, as a
        tuple, taken when the mechanism is made; none without a certificate.
        """
        identities = ["sha256:00ff"]
        m = mechanism(identities)
        identities.append("serialNumber:1")
        self.assertCredentials(m.start(b""), "", ("sha256:00ff",))
        self.assertCredentials(mechanism(()).start(b""), "", ())

    def test_authzidLimit(self):
        """
        The authorization identity may be 255 octets long, not 256.
        """
        self.assertEqual(MAX_AUTHZID, 255)
        self.assertCredentials(mechanism().start(b"a" * 255), "a" * 255)
        self.assertRefused(b"a" * 256, "EXTERNAL authorization identity too long")

    def test_utf8(self):
        """
        The authorization identity is UTF-8; anything else is malformed.
        """
        self.assertCredentials(mechanism().start("jörg".encode()), "jörg")
        self.assertRefused(b"j\xf6rg", "EXTERNAL authorization identity must be UTF-8")


class CertificateCredentialsTests(unittest.TestCase):
    def test_interfaces(self):
        """
        The credentials provide L{ICertificateCredentials} for the
        certificate checker and L{IMechanismCredentials}; their user name
        is the requested authorization identity.
        """
        credentials = CertificateCredentials(IDENTITIES, "acme")
        self.assertTrue(verifyObject(ICertificateCredentials, credentials))
        self.assertTrue(verifyObject(IMechanismCredentials, credentials))
        self.assertEqual(credentials.username, "acme")
