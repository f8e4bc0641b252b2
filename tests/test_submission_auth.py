# -*- test-case-name: tests.test_submission_auth -*-
"""
L{msa.submission.auth.AuthExchange}: the AUTH command and its SASL
exchange, through the protocol harness (exact replies, the failure limit,
the phase of the session), directly on the object (the refusals it
returns before an exchange starts), and in the assembled daemon (whose
user a mechanism's own refusal is logged under).
"""

import base64

from twisted.internet import threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.policy.authorization import AuthThrottle
from msa.submission.phase import SessionPhase
from tests.e2e import RunningMSA
from tests.helpers import Harness
from tests.sessionclient import RawSession
from tests.waiting import waitUntil


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


def digestResponse(challenge: bytes, realm: bytes, uri: bytes) -> bytes:
    """
    A well-formed DIGEST-MD5 response of C{alice} to C{challenge} (the
    decoded 334 data), for C{realm} and C{uri}; its digest is never checked
    because the mechanism refuses the realm or the URI first.
    """
    nonce = challenge.split(b'nonce="', 1)[1].split(b'"', 1)[0]
    return (
        b'username="alice",realm="' + realm + b'",nonce="' + nonce + b'",'
        b'cnonce="c2xpcHBlcnk",nc=00000001,qop=auth,'
        b'digest-uri="' + uri + b'",response=' + b"0" * 32
    )


#: The refusals DIGEST-MD5 makes itself, before the checker sees anything.
MECHANISM_REFUSALS = [
    (b"elsewhere.example", b"smtp/localhost"),  # a realm the server does not offer
    (b"localhost", b"imap/localhost"),  # not an SMTP digest-uri
]


class RecordingThrottle(AuthThrottle):
    """
    The memory throttle, remembering the keys of every failed login.
    """

    def __init__(self):
        super().__init__()
        self.keys = []

    def failedLogin(self, clientAddress, account):
        self.keys.append((clientAddress, account))
        return super().failedLogin(clientAddress, account)


class DigestRefusalUserTests(unittest.TestCase):
    """
    A DIGEST-MD5 response the mechanism refuses itself (a wrong realm, a
    digest-uri of another service) is still the failed login of the user
    it names: its log line and its throttle key carry that name, as a
    wrong password's do.
    """

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def failures(self):
        return [
            (e["user"], e["mechanism"], e["code"])
            for e in self.events
            if e.get("event") == "auth" and e.get("outcome") == "failure"
        ]

    def test_harness(self):
        """
        Through the protocol: 535 5.7.8, and the throttle counts it against
        (client, C{alice}).
        """
        h = Harness(self, mechanisms=("DIGEST-MD5", "PLAIN"))
        h.factory.authThrottle = throttle = RecordingThrottle()
        h.startTLS()
        for realm, uri in MECHANISM_REFUSALS:
            [challenge] = h.command(b"AUTH DIGEST-MD5")
            self.assertEqual(challenge[:4], b"334 ")
            response = digestResponse(base64.b64decode(challenge[4:]), realm, uri)
            self.assertEqual(
                h.command(b64(response)),
                [b"535 5.7.8 Authentication credentials invalid"],
            )
        self.assertEqual(throttle.keys, [("192.0.2.1", "alice")] * 2)
        self.assertEqual(self.failures(), [("alice", "DIGEST-MD5", 535)] * 2)

    def test_daemon(self):
        """
        The assembled MSA, over implicit TLS: the failure lines name
        C{alice}.
        """
        msa = RunningMSA(self)

        def talk():
            client = RawSession(msa.implicitPort, msa.clientContext(), implicit=True)
            replies = []
            try:
                client.secure(implicit=True)
                for realm, uri in MECHANISM_REFUSALS:
                    challenge = client.command(b"AUTH DIGEST-MD5")
                    response = digestResponse(
                        base64.b64decode(challenge[4:]), realm, uri
                    )
                    replies.append(client.command(b64(response)))
            finally:
                client.close()
            return replies

        d = threads.deferToThread(talk)

        def check(replies):
            self.assertEqual(
                replies, [b"535 5.7.8 Authentication credentials invalid"] * 2
            )
            return waitUntil(lambda: len(self.failures()) == 2)

        d.addCallback(check)
        d.addCallback(
            lambda _: self.assertEqual(
                self.failures(), [("alice", "DIGEST-MD5", 535)] * 2
            )
        )
        return d
