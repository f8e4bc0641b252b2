# -*- test-case-name: tests.test_sasl_plain -*-
"""
Tests for L{msa.sasl.plain}: SASL PLAIN (RFC 4616) as a state machine, with
every refusal and the 255-octet limit of each field at and past its edge.
"""

from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.sasl.base import Challenge, MechanismContext
from msa.sasl.plain import MAX_FIELD, PlainMechanism
from tests.test_sasl import PasswordCredentialsMixin

SYNTAX = "PLAIN needs authzid NUL authcid NUL passwd"


class PlainMechanismTests(PasswordCredentialsMixin, unittest.TestCase):
    mechanismName = "PLAIN"

    def assertRefused(self, data, code, text):
        error = self.assertRaises(SMTPReply, PlainMechanism().start, data)
        self.assertEqual((error.code, error.text), (code, text))

    def test_initialResponse(self):
        """
        An initial response completes the exchange at once.
        """
        mechanism = PlainMechanism(MechanismContext())
        self.assertCredentials(
            mechanism.start(b"\0alice\0wonderland"), "alice", "wonderland"
        )
        self.assertIsNone(mechanism.serverFinal())

    def test_emptyChallenge(self):
        """
        Without an initial response the server sends an empty challenge and
        takes the message as the response.
        """
        mechanism = PlainMechanism()
        self.assertEqual(mechanism.start(None), Challenge(b""))
        self.assertCredentials(
            mechanism.respond(b"\0alice\0wonderland"), "alice", "wonderland"
        )

    def test_authzidSameAsAuthcid(self):
        """
        An authorization identity equal to the user name is accepted.
        """
        self.assertCredentials(
            PlainMechanism().start(b"alice\0alice\0wonderland"), "alice", "wonderland"
        )

    def test_authzidOther(self):
        """
        Acting for another identity fails as a wrong password does: 535.
        """
        self.assertRefused(
            b"bob\0alice\0wonderland", 535, "Authentication credentials invalid"
        )

    def test_fieldCount(self):
        """
        Fewer or more than three NUL-separated fields are malformed: 501.
        """
        for data in [b"", b"alice", b"alice\0wonderland", b"\0a\0b\0c"]:
            self.assertRefused(data, 501, SYNTAX)

    def test_emptyUsername(self):
        """
        The user name (authcid) may not be empty.
        """
        self.assertRefused(b"\0\0wonderland", 501, SYNTAX)

    def test_emptyPassword(self):
        """
        An empty password is passed on: the checker refuses it.
        """
        self.assertCredentials(PlainMechanism().start(b"\0alice\0"), "alice", "")

    def test_fieldLimit(self):
        """
        Each field may be 255 octets long, not 256.
        """
        self.assertEqual(MAX_FIELD, 255)
        name, password = b"u" * 255, b"p" * 255
        self.assertCredentials(
            PlainMechanism().start(name + b"\0" + name + b"\0" + password),
            name.decode(),
            password.decode(),
        )
        self.assertRefused(b"\0" + b"u" * 256 + b"\0pw", 501, SYNTAX)
        self.assertRefused(b"\0alice\0" + b"p" * 256, 501, SYNTAX)
        self.assertRefused(b"a" * 256 + b"\0alice\0pw", 501, SYNTAX)

    def test_utf8(self):
        """
        The fields are UTF-8; anything else is malformed.
        """
        self.assertCredentials(
            PlainMechanism().start("\0jörg\0wönderland".encode()),
            "jörg",
            "wönderland",
        )
        for data in [b"\0j\xf6rg\0pw", b"\0alice\0w\xf6nderland", b"\xff\0alice\0pw"]:
            self.assertRefused(data, 501, "PLAIN fields must be UTF-8")
