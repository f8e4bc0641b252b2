# -*- test-case-name: tests.test_submission_auth -*-
"""
L{msa.submission.auth.AuthExchange}: the AUTH command and its SASL
exchange, through the protocol harness (exact replies, the failure limit,
the phase of the session) and directly on the object (the refusals it
returns before an exchange starts).
"""

import base64

from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.submission.phase import SessionPhase
from tests.helpers import Harness


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class AuthTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness(self)
        self.h.startTLS()

    def assertStillConnected(self):
        self.assertFalse(self.h.transport.disconnecting)

    def test_mailBeforeAuth(self):
        """
        RFC 6409 4.3: 530 (Twisted answers 550 after an anonymous login).
        """
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl>"),
            [b"530 5.7.0 Authentication required"],
        )

    def test_rcptAndDataBeforeAuth(self):
        for command in [b"RCPT TO:<b@example.nl>", b"DATA"]:
            self.assertEqual(
                self.h.command(command), [b"530 5.7.0 Authentication required"]
            )

    def test_plainInitialResponse(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0alice\0wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertEqual(self.h.server.session.account, "alice")

    def test_plainWithoutInitialResponse(self):
        self.assertEqual(self.h.command(b"AUTH PLAIN"), [b"334 "])
        self.assertEqual(
            self.h.command(b64(b"\0alice\0wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_plainAuthzidSameUser(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"alice\0alice\0wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_plainAuthzidOtherUser(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"bob\0alice\0wonderland")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertIsNone(self.h.server.avatar)

    def test_wrongPassword(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0alice\0guess")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertStillConnected()
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl>"),
            [b"530 5.7.0 Authentication required"],
        )

    def test_unknownUser(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0mallory\0wonderland")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )

    def test_invalidBase64(self):
        """
        Twisted answers 501 without an enhanced code; a malformed PLAIN
        raises out of dataReceived there and drops the client.
        """
        self.assertEqual(
            self.h.command(b"AUTH PLAIN !!!notbase64"),
            [b"501 5.5.2 Error: invalid base64 data"],
        )
        self.assertStillConnected()
        self.assertEqual(self.h.command(b"AUTH PLAIN"), [b"334 "])
        self.assertEqual(
            self.h.command(b"%%%"), [b"501 5.5.2 Error: invalid base64 data"]
        )
        self.assertStillConnected()

    def test_malformedPlain(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"alice wonderland")),
            [b"501 5.5.2 PLAIN needs authzid NUL authcid NUL passwd"],
        )
        self.assertStillConnected()

    def test_abort(self):
        self.assertEqual(self.h.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(self.h.command(b"*"), [b"501 5.7.0 Authentication aborted"])
        self.assertEqual(self.h.command(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_unknownMechanism(self):
        self.assertEqual(
            self.h.command(b"AUTH CRAM-MD5"),
            [b"504 5.5.4 Unrecognized authentication type"],
        )

    def test_bareAuth(self):
        """
        A bare AUTH raises IndexError out of Twisted's ext_AUTH.
        """
        self.assertEqual(
            self.h.command(b"AUTH"),
            [b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"],
        )
        self.assertStillConnected()

    def test_alreadyAuthenticated(self):
        self.h.login()
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0alice\0wonderland")),
            [b"503 5.5.1 Error: already authenticated"],
        )

    def test_login(self):
        self.assertEqual(self.h.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(self.h.command(b64(b"alice")), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(
            self.h.command(b64(b"wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_loginInitialResponse(self):
        self.assertEqual(
            self.h.command(b"AUTH LOGIN " + b64(b"alice")), [b"334 UGFzc3dvcmQ6"]
        )
        self.assertEqual(
            self.h.command(b64(b"wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_loginWrongPassword(self):
        self.h.command(b"AUTH LOGIN")
        self.h.command(b64(b"alice"))
        self.assertEqual(
            self.h.command(b64(b"nope")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )

    def test_failureLimit(self):
        """
        At the limit of failed logins the session ends with 421; below it,
        it goes on.
        """
        bad = b"AUTH PLAIN " + b64(b"\0alice\0bad")
        self.h.command(bad)
        self.h.command(bad)
        self.assertStillConnected()
        self.assertEqual(
            self.h.command(bad),
            [
                b"535 5.7.8 Authentication credentials invalid",
                b"421 4.7.0 msa.example.nl Error: too many failed logins",
            ],
        )
        self.assertTrue(self.h.transport.disconnecting)

    def test_longAuthLine(self):
        """
        RFC 4954: AUTH lines may be longer than 512 octets; PLAIN caps each
        field at 255 octets.
        """
        user = b"u" * 255
        token = b64(user + b"\0" + user + b"\0" + b"x" * 255)
        self.assertGreater(len(b"AUTH PLAIN " + token), 1000)
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + token),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        token = b64(b"\0alice\0" + b"x" * 256)
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + token),
            [b"501 5.5.2 PLAIN needs authzid NUL authcid NUL passwd"],
        )

    def test_responseTooLong(self):
        """
        A SASL response over 12288 octets ends the exchange with 500 5.5.6
        (RFC 4954 4): the client's next line is a command again, not a
        response (it was, so a NOOP after the 500 got a SASL error).
        """
        self.assertEqual(self.h.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(
            self.h.command(b"A" * 13000),
            [b"500 5.5.6 Authentication Exchange line is too long"],
        )
        self.assertIs(self.h.server.phase, SessionPhase.COMMAND)
        self.assertEqual(self.h.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.h.login(), [b"235 2.7.0 Authentication successful"])


class AuthExchangeUnitTests(unittest.TestCase):
    """
    The AUTH exchange object the server owns: what it refuses before an
    exchange starts (returned, not sent), and the phase it moves the
    session through.
    """

    def setUp(self):
        self.h = Harness(self)
        self.h.startTLS()
        self.auth = self.h.server.auth

    def assertRefusal(self, rest, expected):
        refusal = self.auth.refusal(rest)
        self.assertIsInstance(refusal, SMTPReply)
        self.assertEqual(str(refusal), expected)

    def test_refusalsBeforeExchange(self):
        """
        Each precondition has its exact refusal; nothing is sent by asking.
        """
        self.h.transport.clear()
        self.assertRefusal(b"", "501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        self.assertRefusal(
            b"PLAIN a b", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
        )
        self.assertRefusal(b"CRAM-MD5", "504 5.5.4 Unrecognized authentication type")
        self.assertIsNone(self.auth.refusal(b"PLAIN"))
        self.assertIsNone(self.auth.refusal(b"login dGVzdA=="))
        self.assertEqual(self.h.transport.value(), b"")

    def test_refusalWithoutEHLO(self):
        h = Harness(self)
        h.command(b"STARTTLS")
        h.server.handshakeCompleted()
        self.assertEqual(
            str(h.server.auth.refusal(b"PLAIN")), "503 5.5.1 Error: send EHLO first"
        )

    def test_refusalAfterLogin(self):
        self.h.login()
        self.assertRefusal(b"PLAIN", "503 5.5.1 Error: already authenticated")

    def test_externalWithoutCertificate(self):
        """
        EXTERNAL configured but no verified certificate: 504 with its own
        text, and it is not offered.
        """
        h = Harness(self, mechanisms=("PLAIN", "EXTERNAL"))
        h.startTLS()
        self.assertEqual(h.server.auth.offeredMechanisms(), ["PLAIN"])
        self.assertEqual(
            str(h.server.auth.refusal(b"EXTERNAL")),
            "504 5.5.4 EXTERNAL needs a verified client certificate",
        )

    def test_phaseDuringExchange(self):
        """
        A 334 challenge puts the session in the AUTH exchange phase; the
        last response ends it, whatever the outcome.
        """
        self.assertIs(self.h.server.phase, SessionPhase.COMMAND)
        self.assertEqual(self.h.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertIs(self.h.server.phase, SessionPhase.AUTH_EXCHANGE)
        self.h.command(b64(b"alice"))
        self.assertIs(self.h.server.phase, SessionPhase.AUTH_EXCHANGE)
        self.assertEqual(
            self.h.command(b64(b"wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertIs(self.h.server.phase, SessionPhase.COMMAND)
        self.assertEqual(self.h.server.session.mechanism, "LOGIN")
        self.assertEqual(self.h.server.session.account, "alice")
        self.assertIsNotNone(self.h.server.avatar)

    def test_phaseAfterAbort(self):
        self.h.command(b"AUTH PLAIN")
        self.assertIs(self.h.server.phase, SessionPhase.AUTH_EXCHANGE)
        self.assertEqual(self.h.command(b"*"), [b"501 5.7.0 Authentication aborted"])
        self.assertIs(self.h.server.phase, SessionPhase.COMMAND)
        self.assertEqual(self.h.server.session.mechanism, "")
        self.assertIsNone(self.h.server.avatar)

    def test_failuresCounted(self):
        """
        Each 535 counts towards C{maxAuthFailures}; other refusals do not.
        """
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0alice\0wrong")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(self.auth.failures, 1)
        self.assertEqual(
            self.h.command(b"AUTH PLAIN !!!"),
            [b"501 5.5.2 Error: invalid base64 data"],
        )
        self.assertEqual(self.auth.failures, 1)
