# -*- test-case-name: tests.test_sasl_login -*-
"""
Tests for L{msa.sasl.login}: SASL LOGIN as a state machine, the user name
and the password each asked for, with every refusal and the 255-octet limit
at and past its edge.
"""

from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.sasl.base import Challenge, MechanismContext
from msa.sasl.login import MAX_FIELD, LoginMechanism
from tests.test_sasl import PasswordCredentialsMixin


class LoginMechanismTests(PasswordCredentialsMixin, unittest.TestCase):
    mechanismName = "LOGIN"

    def assertRefused(self, call, data, text):
        error = self.assertRaises(SMTPReply, call, data)
        self.assertEqual((error.code, error.status, error.text), (501, "5.5.2", text))

    def test_exchange(self):
        """
        Without an initial response the server asks for C{Username:}, then
        C{Password:}, and the exchange is complete.
        """
        mechanism = LoginMechanism(MechanismContext())
        self.assertEqual(mechanism.start(None), Challenge(b"Username:"))
        self.assertEqual(mechanism.respond(b"alice"), Challenge(b"Password:"))
        self.assertCredentials(mechanism.respond(b"wonderland"), "alice", "wonderland")
        self.assertIsNone(mechanism.serverFinal())

    def test_initialResponse(self):
        """
        An initial response is the user name: the password is asked next.
        """
        mechanism = LoginMechanism()
        self.assertEqual(mechanism.start(b"alice"), Challenge(b"Password:"))
        self.assertCredentials(mechanism.respond(b"wonderland"), "alice", "wonderland")

    def test_emptyUsername(self):
        """
        An empty user name is malformed.
        """
        mechanism = LoginMechanism()
        mechanism.start(None)
        self.assertRefused(mechanism.respond, b"", "LOGIN needs a user name")

    def test_emptyPassword(self):
        """
        An empty password is passed on: the checker refuses it.
        """
        mechanism = LoginMechanism()
        mechanism.start(b"alice")
        self.assertCredentials(mechanism.respond(b""), "alice", "")

    def test_fieldLimit(self):
        """
        The user name and the password may each be 255 octets long, not 256.
        """
        self.assertEqual(MAX_FIELD, 255)
        mechanism = LoginMechanism()
        mechanism.start(b"u" * 255)
        self.assertCredentials(mechanism.respond(b"p" * 255), "u" * 255, "p" * 255)
        self.assertRefused(LoginMechanism().start, b"u" * 256, "LOGIN field too long")
        mechanism = LoginMechanism()
        mechanism.start(b"alice")
        self.assertRefused(mechanism.respond, b"p" * 256, "LOGIN field too long")

    def test_utf8(self):
        """
        Both fields are UTF-8; anything else is malformed.
        """
        mechanism = LoginMechanism()
        mechanism.start("jörg".encode())
        self.assertCredentials(
            mechanism.respond("wönderland".encode()), "jörg", "wönderland"
        )
        self.assertRefused(
            LoginMechanism().start, b"j\xf6rg", "LOGIN fields must be UTF-8"
        )
        mechanism = LoginMechanism()
        mechanism.start(b"alice")
        self.assertRefused(mechanism.respond, b"\xff", "LOGIN fields must be UTF-8")
