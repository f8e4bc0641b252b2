"""
Tests for L{msa.sasl.scram}: the RFC 7677 test vector, a round trip with the
scramp client, every refusal, SASLprep, and random input.
"""

import base64
import random

import scramp
import scramp.core
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.errors import SMTPReply
from msa.interfaces import IMechanismCredentials, IScramCredentials
from msa.sasl import Authenticate, Challenge, MechanismContext
from msa.sasl.scram import ScramSHA256Mechanism, deriveKeys, saslprep

SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
NONCE = CLIENT_NONCE + SERVER_NONCE
CLIENT_FIRST = b"n,,n=user,r=" + CLIENT_NONCE.encode()
SERVER_FIRST = b"r=" + NONCE.encode() + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=" + NONCE.encode() + b",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


class Accounts:
    """
    An account store knowing SCRAM secrets for a few users.
    """

    def __init__(self) -> None:
        self.queries: list[tuple[str, str]] = []
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.params: dict[str, tuple[bytes, int]] = {}

    def add(self, username: str, password: str, salt: bytes = SALT) -> None:
        self.params[username] = (salt, 4096)
        self.keys[username] = deriveKeys(password, salt, 4096)

    def scramParameters(self, username: str, mechanism: str):
        self.queries.append((username, mechanism))
        return self.params.get(username)

    def check(self, credentials) -> bool:
        if credentials.username not in self.keys:
            return False
        return credentials.checkKeys(*self.keys[credentials.username])


class ScramTests(unittest.TestCase):
    def setUp(self) -> None:
        self.accounts = Accounts()
        self.accounts.add("user", "pencil")

    def makeMechanism(self, serverNonce: str | None = None) -> ScramSHA256Mechanism:
        context = MechanismContext(scramParameters=self.accounts.scramParameters)
        if serverNonce is None:
            return ScramSHA256Mechanism(context)
        return ScramSHA256Mechanism(context, nonceFactory=lambda: serverNonce)

    def assertReply(self, code: int, status: str, f, *args) -> SMTPReply:
        error = self.assertRaises(SMTPReply, f, *args)
        self.assertEqual((error.code, error.status), (code, status))
        return error

    def started(self, clientFirst: bytes = CLIENT_FIRST) -> ScramSHA256Mechanism:
        mechanism = self.makeMechanism(SERVER_NONCE)
        mechanism.start(clientFirst)
        return mechanism

    def test_rfc7677Vector(self) -> None:
        mechanism = self.makeMechanism(SERVER_NONCE)
        self.assertEqual(mechanism.start(CLIENT_FIRST), Challenge(SERVER_FIRST))
        self.assertEqual(self.accounts.queries, [("user", "SCRAM-SHA-256")])
        result = mechanism.respond(CLIENT_FINAL)
        self.assertIsInstance(result, Authenticate)
        credentials = result.credentials
        self.assertTrue(verifyObject(IScramCredentials, credentials))
        self.assertTrue(verifyObject(IMechanismCredentials, credentials))
        self.assertEqual(credentials.username, "user")
        self.assertEqual(credentials.mechanism, "SCRAM-SHA-256")
        self.assertTrue(self.accounts.check(credentials))
        self.assertEqual(mechanism.serverFinal(), SERVER_FINAL)

    def test_noInitialResponse(self) -> None:
        mechanism = self.makeMechanism(SERVER_NONCE)
        self.assertEqual(mechanism.start(None), Challenge(b""))
        self.assertEqual(mechanism.respond(CLIENT_FIRST), Challenge(SERVER_FIRST))
        self.assertTrue(
            self.accounts.check(mechanism.respond(CLIENT_FINAL).credentials)
        )

    def test_freshServerNonce(self) -> None:
        first = self.makeMechanism().start(CLIENT_FIRST).data
        second = self.makeMechanism().start(CLIENT_FIRST).data
        self.assertNotEqual(first, second)
        self.assertTrue(first.startswith(b"r=" + CLIENT_NONCE.encode()))

    def roundTrip(self, username: str, password: str, gs2: str | None = None):
        client = scramp.ScramClient(["SCRAM-SHA-256"], username, password)
        mechanism = self.makeMechanism()
        clientFirst = client.get_client_first()
        if gs2 is not None:
            clientFirst = gs2 + clientFirst[3:]
            client.gs2_header = scramp.core.Gs2Header(gs2[0], None)
        serverFirst = mechanism.start(clientFirst.encode()).data
        client.set_server_first(serverFirst.decode())
        result = mechanism.respond(client.get_client_final().encode())
        return client, mechanism, result.credentials

    def test_scrampRoundTrip(self) -> None:
        self.accounts.add("alice", "correct horse", salt=b"0123456789abcdef")
        client, mechanism, credentials = self.roundTrip("alice", "correct horse")
        self.assertTrue(self.accounts.check(credentials))
        client.set_server_final(mechanism.serverFinal().decode())

    def test_scrampEscapedNames(self) -> None:
        """
        User names with "," and "=", and non-ASCII passwords (SASLprep maps
        U+00A0 to a space and drops U+00AD on both sides).
        """
        self.accounts.add("a,b=c", "p\u00e4ss word")
        client, mechanism, credentials = self.roundTrip(
            "a,b=c", "p\u00e4ss\u00a0wo\u00adrd"
        )
        self.assertEqual(credentials.username, "a,b=c")
        self.assertIn(("a,b=c", "SCRAM-SHA-256"), self.accounts.queries)
        self.assertTrue(self.accounts.check(credentials))
        client.set_server_final(mechanism.serverFinal().decode())

    def test_clientCanBindButServerCannot(self) -> None:
        """
        "y,," is accepted while no -PLUS mechanism is offered, and c= must
        then carry it.
        """
        client, mechanism, credentials = self.roundTrip("user", "pencil", gs2="y,,")
        self.assertTrue(self.accounts.check(credentials))

    def test_authzidEqualToUser(self) -> None:
        mechanism = self.makeMechanism(SERVER_NONCE)
        serverFirst = mechanism.start(b"n,a=user,n=user,r=" + CLIENT_NONCE.encode())
        self.assertEqual(serverFirst, Challenge(SERVER_FIRST))
        result = mechanism.respond(CLIENT_FINAL.replace(b"biws", b"bixhPXVzZXIs"))
        self.assertIsInstance(result, Authenticate)

    def test_wrongPassword(self) -> None:
        _, mechanism, credentials = self.roundTrip("user", "pen")
        self.assertFalse(self.accounts.check(credentials))
        self.assertReply(535, "5.7.8", mechanism.serverFinal)

    def test_serverFinalBeforeCheck(self) -> None:
        mechanism = self.started()
        self.assertReply(535, "5.7.8", mechanism.serverFinal)
        mechanism.respond(CLIENT_FINAL)
        self.assertReply(535, "5.7.8", mechanism.serverFinal)

    def test_unknownUser(self) -> None:
        """
        An unknown user gets a plausible, stable server-first message and
        fails at the proof.
        """
        client, mechanism, credentials = self.roundTrip("nobody", "pencil")
        serverFirst = client.server_first
        fields = dict(f.split("=", 1) for f in serverFirst.split(","))
        self.assertEqual(fields["i"], "4096")
        self.assertEqual(len(base64.b64decode(fields["s"])), 16)
        clientNonce = str(client.c_nonce)
        self.assertTrue(fields["r"].startswith(clientNonce))
        self.assertGreater(len(fields["r"]), len(clientNonce))

        again, _, _ = self.roundTrip("nobody", "pencil")
        salt = again.server_first.split(",")[1]
        self.assertEqual(salt, "s=" + fields["s"])
        other, _, _ = self.roundTrip("nobody2", "pencil")
        self.assertNotEqual(other.server_first.split(",")[1], salt)

        self.assertFalse(self.accounts.check(credentials))
        # Even keys made from that very salt do not let it through.
        keys = deriveKeys("pencil", base64.b64decode(fields["s"]), 4096)
        self.assertFalse(credentials.checkKeys(*keys))
        self.assertReply(535, "5.7.8", mechanism.serverFinal)

    def test_tamperedNonce(self) -> None:
        mechanism = self.started()
        final = CLIENT_FINAL.replace(b"k0,p=", b"k1,p=")
        self.assertReply(535, "5.7.8", mechanism.respond, final)

    def test_wrongChannelBinding(self) -> None:
        mechanism = self.started()
        final = CLIENT_FINAL.replace(b"c=biws", b"c=eSws")
        self.assertReply(535, "5.7.8", mechanism.respond, final)

    def test_channelBindingRequested(self) -> None:
        mechanism = self.makeMechanism(SERVER_NONCE)
        first = b"p=tls-exporter,,n=user,r=" + CLIENT_NONCE.encode()
        self.assertReply(535, "5.7.8", mechanism.start, first)

    def test_authzidDifferent(self) -> None:
        mechanism = self.makeMechanism(SERVER_NONCE)
        first = b"n,a=admin,n=user,r=" + CLIENT_NONCE.encode()
        self.assertReply(535, "5.7.8", mechanism.start, first)

    def test_malformedClientFirst(self) -> None:
        nonce = CLIENT_NONCE.encode()
        for data in [
            b"",
            b"n,,",
            b"garbage",
            b"x,,n=user,r=" + nonce,
            b"n,b=user,n=user,r=" + nonce,
            b"n,,n=,r=" + nonce,
            b"n,,n=us=2Xer,r=" + nonce,
            b"n,,n=us=er,r=" + nonce,
            b"n,,m=ext,n=user,r=" + nonce,
            b"n,,r=" + nonce + b",n=user",
            b"n,,n=user,r=",
            b"n,,n=user,r=a b",
            b"n,,n=user,r=" + nonce + b",1=x",
            b"n,,n=\xff,r=" + nonce,
            b"n,,n=us\x07er,r=" + nonce,
            b"n,,n=user,r=" + nonce + b",x=" + b"a" * 5000,
        ]:
            mechanism = self.makeMechanism(SERVER_NONCE)
            self.assertReply(501, "5.5.2", mechanism.start, data)

    def test_malformedClientFinal(self) -> None:
        nonce = NONCE.encode()
        proof = CLIENT_FINAL.split(b",p=")[1]
        for data in [
            b"",
            b"c=biws,r=" + nonce,
            b"r=" + nonce + b",c=biws,p=" + proof,
            b"c=biws,p=" + proof,
            b"c=bi!s,r=" + nonce + b",p=" + proof,
            b"c=biws,r=" + nonce + b",p=" + proof[:-4],
            b"c=biws,r=" + nonce + b",p=###",
            b"c=biws,r=" + nonce + b",p=" + proof + b",x=y",
            b"c=biws,r=" + nonce + b",,p=" + proof,
            b"c=biws,r=" + nonce + b",p=\xff",
        ]:
            mechanism = self.started()
            self.assertReply(501, "5.5.2", mechanism.respond, data)

    def test_outOfSequence(self) -> None:
        mechanism = self.started()
        mechanism.respond(CLIENT_FINAL)
        self.assertReply(501, "5.5.2", mechanism.respond, CLIENT_FINAL)
        self.assertReply(501, "5.5.2", mechanism.start, CLIENT_FIRST)

    def test_saslprep(self) -> None:
        """
        The examples of RFC 4013 section 3.
        """
        self.assertEqual(saslprep("I\u00adX"), "IX")
        self.assertEqual(saslprep("user"), "user")
        self.assertEqual(saslprep("USER"), "USER")
        self.assertEqual(saslprep("\u00aa"), "a")
        self.assertEqual(saslprep("\u2168"), "IX")
        self.assertRaises(ValueError, saslprep, "\u0007")
        self.assertRaises(ValueError, saslprep, "\u0627\u0031")
        self.assertEqual(saslprep("\u0627\u0031\u0628"), "\u0627\u0031\u0628")
        self.assertEqual(saslprep("\u0221"), "\u0221")
        self.assertRaises(ValueError, saslprep, "\u0221", allowUnassigned=False)
        self.assertRaises(ValueError, deriveKeys, "a\u0000b", SALT, 4096)

    def test_fuzz(self) -> None:
        """
        Random and mutated messages: a challenge, an L{Authenticate} or an
        L{SMTPReply}, never another exception.
        """
        rng = random.Random(5802)
        alphabet = b"=,nyparcs0Z+/ \x00\xff\xc3"
        for i in range(3000):
            final = i % 2 == 0
            base = CLIENT_FINAL if final else CLIENT_FIRST
            if i % 3 == 0:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
            else:
                data = bytearray(base)
                for _ in range(rng.randrange(1, 5)):
                    position = rng.randrange(len(data) + 1)
                    action = rng.randrange(3)
                    if action == 0:
                        data.insert(position, rng.choice(alphabet))
                    elif action == 1 and position < len(data):
                        del data[position]
                    elif position < len(data):
                        data[position] = rng.choice(alphabet)
                data = bytes(data)
            mechanism = self.makeMechanism(SERVER_NONCE)
            try:
                if final:
                    mechanism.start(CLIENT_FIRST)
                    result = mechanism.respond(data)
                else:
                    result = mechanism.start(data)
            except SMTPReply as e:
                self.assertIn((e.code, e.status), [(501, "5.5.2"), (535, "5.7.8")])
            else:
                self.assertIsInstance(result, (Challenge, Authenticate))
