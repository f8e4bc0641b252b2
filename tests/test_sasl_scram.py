# -*- test-case-name: tests.test_sasl_scram -*-
"""
Tests for L{msa.sasl.scram}: the RFC 7677 test vector, a round trip with the
scramp client, every refusal, SASLprep, and random input; SCRAM-SHA-256-PLUS
with tls-exporter channel binding and the downgrade protection.
"""

import base64
import random

import scramp
import scramp.core
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.errors import SMTPReply
from msa.interfaces import IMechanismCredentials, IScramCredentials
from msa.sasl import (
    Authenticate,
    Challenge,
    MechanismContext,
    mechanismFactories,
)
from msa.sasl.scram import (
    ScramSHA256Mechanism,
    ScramSHA256PlusMechanism,
    deriveKeys,
    saslprep,
)

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
#: Channel binding data as a TLS 1.3 exporter would give it.
CBDATA = bytes(range(32))


def exporterClient(
    username: str,
    password: str,
    cbdata: bytes,
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256-PLUS",),
) -> scramp.ScramClient:
    """
    A scramp client binding with C{tls-exporter} and C{cbdata}.  scramp
    (1.5) refuses the name C{tls-exporter}, because Python's C{ssl} cannot
    export keying material, but takes raw data for C{tls-unique} and treats
    every type alike from there on (c= is base64(gs2 header + data)): make
    it with C{tls-unique} and rename the type.
    """
    client = scramp.ScramClient(
        list(mechanisms), username, password, channel_binding=("tls-unique", cbdata)
    )
    if client.gs2_header.cb_name is not None:
        client.gs2_header.cb_name.cb_name = "tls-exporter"
    return client


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


class ScramPlusTests(unittest.TestCase):
    """
    SCRAM-SHA-256-PLUS with tls-exporter, and SCRAM-SHA-256's downgrade
    protection when -PLUS is offered.
    """

    def setUp(self) -> None:
        self.accounts = Accounts()
        self.accounts.add("user", "pencil")

    def context(self, bindings: dict[str, bytes] | None = None) -> MechanismContext:
        return MechanismContext(
            scramParameters=self.accounts.scramParameters,
            channelBindings={"tls-exporter": CBDATA} if bindings is None else bindings,
        )

    def assertReply(self, code: int, status: str, f, *args) -> SMTPReply:
        error = self.assertRaises(SMTPReply, f, *args)
        self.assertEqual((error.code, error.status), (code, status))
        return error

    def exchange(self, client, mechanism):
        """
        Run C{client} against C{mechanism} up to the credentials.
        """
        serverFirst = mechanism.start(client.get_client_first().encode()).data
        client.set_server_first(serverFirst.decode())
        return mechanism.respond(client.get_client_final().encode())

    def test_registered(self) -> None:
        self.assertIs(
            mechanismFactories()["SCRAM-SHA-256-PLUS"], ScramSHA256PlusMechanism
        )
        self.assertEqual(ScramSHA256PlusMechanism.name, "SCRAM-SHA-256-PLUS")

    def test_roundTrip(self) -> None:
        """
        scramp binds with the same data: the keys of SCRAM-SHA-256 are
        looked up and checked, and the client accepts the server signature.
        """
        client = exporterClient("user", "pencil", CBDATA)
        first = client.get_client_first()
        self.assertTrue(first.startswith("p=tls-exporter,,n=user,r="), first)
        mechanism = ScramSHA256PlusMechanism(self.context())
        serverFirst = mechanism.start(first.encode()).data
        client.set_server_first(serverFirst.decode())
        final = client.get_client_final()
        c = final.split(",")[0]
        self.assertEqual(
            c, "c=" + base64.b64encode(b"p=tls-exporter,," + CBDATA).decode()
        )
        result = mechanism.respond(final.encode())
        self.assertIsInstance(result, Authenticate)
        credentials = result.credentials
        self.assertTrue(verifyObject(IScramCredentials, credentials))
        self.assertEqual(credentials.username, "user")
        self.assertEqual(credentials.mechanism, "SCRAM-SHA-256")
        self.assertEqual(self.accounts.queries, [("user", "SCRAM-SHA-256")])
        self.assertTrue(self.accounts.check(credentials))
        client.set_server_final(mechanism.serverFinal().decode())

    def test_noInitialResponse(self) -> None:
        client = exporterClient("user", "pencil", CBDATA)
        mechanism = ScramSHA256PlusMechanism(self.context())
        self.assertEqual(mechanism.start(None), Challenge(b""))
        serverFirst = mechanism.respond(client.get_client_first().encode()).data
        client.set_server_first(serverFirst.decode())
        result = mechanism.respond(client.get_client_final().encode())
        self.assertTrue(self.accounts.check(result.credentials))

    def test_wrongPassword(self) -> None:
        client = exporterClient("user", "pen", CBDATA)
        mechanism = ScramSHA256PlusMechanism(self.context())
        result = self.exchange(client, mechanism)
        self.assertFalse(self.accounts.check(result.credentials))
        self.assertReply(535, "5.7.8", mechanism.serverFinal)

    def test_wrongBindingData(self) -> None:
        """
        A client on the other side of a man in the middle computes other
        data: refused at the client-final message.
        """
        client = exporterClient("user", "pencil", bytes(32))
        mechanism = ScramSHA256PlusMechanism(self.context())
        self.assertReply(535, "5.7.8", self.exchange, client, mechanism)

    def test_bindingDataLeftOut(self) -> None:
        """
        c= with the gs2 header alone (no data) is refused.
        """
        client = exporterClient("user", "pencil", CBDATA)
        mechanism = ScramSHA256PlusMechanism(self.context())
        serverFirst = mechanism.start(client.get_client_first().encode()).data
        client.set_server_first(serverFirst.decode())
        final = client.get_client_final()
        withoutData = base64.b64encode(b"p=tls-exporter,,").decode()
        final = "c=" + withoutData + final[final.index(",") :]
        self.assertReply(535, "5.7.8", mechanism.respond, final.encode())

    def test_tlsUnique(self) -> None:
        """
        Only tls-exporter is supported: scramp binding with tls-unique is
        refused at the client-first message, as is any other type.
        """
        client = scramp.ScramClient(
            ["SCRAM-SHA-256-PLUS"],
            "user",
            "pencil",
            channel_binding=("tls-unique", CBDATA),
        )
        first = client.get_client_first().encode()
        self.assertTrue(first.startswith(b"p=tls-unique,,"), first)
        context = self.context({"tls-exporter": CBDATA, "tls-unique": CBDATA})
        mechanism = ScramSHA256PlusMechanism(context)
        self.assertReply(535, "5.7.8", mechanism.start, first)
        for name in [b"tls-server-end-point", b"x"]:
            mechanism = ScramSHA256PlusMechanism(self.context())
            first = b"p=" + name + b",,n=user,r=" + CLIENT_NONCE.encode()
            self.assertReply(535, "5.7.8", mechanism.start, first)

    def test_badBindingName(self) -> None:
        for name in [b"", b"tls exporter", b"tls_exporter", b"\xc3\xa9"]:
            mechanism = ScramSHA256PlusMechanism(self.context())
            first = b"p=" + name + b",,n=user,r=" + CLIENT_NONCE.encode()
            self.assertReply(501, "5.5.2", mechanism.start, first)
            mechanism = ScramSHA256Mechanism(self.context())
            self.assertReply(501, "5.5.2", mechanism.start, first)

    def test_noBindingData(self) -> None:
        """
        Without data for the connection (not TLS 1.3), -PLUS fails closed.
        """
        client = exporterClient("user", "pencil", CBDATA)
        mechanism = ScramSHA256PlusMechanism(self.context({}))
        self.assertReply(
            535, "5.7.8", mechanism.start, client.get_client_first().encode()
        )

    def test_plusWithoutBinding(self) -> None:
        """
        A -PLUS exchange must bind: "n" and "y" are refused.
        """
        for flag in [b"n", b"y"]:
            mechanism = ScramSHA256PlusMechanism(self.context())
            first = flag + b",,n=user,r=" + CLIENT_NONCE.encode()
            self.assertReply(535, "5.7.8", mechanism.start, first)
        mechanism = ScramSHA256PlusMechanism(self.context())
        first = b"q,,n=user,r=" + CLIENT_NONCE.encode()
        self.assertReply(501, "5.5.2", mechanism.start, first)

    def test_downgrade(self) -> None:
        """
        A SCRAM-SHA-256 client that can bind says "y" (scramp does, given
        binding data but not the -PLUS mechanism): refused when the server
        offers -PLUS on the connection.
        """
        client = exporterClient("user", "pencil", CBDATA, ("SCRAM-SHA-256",))
        first = client.get_client_first().encode()
        self.assertTrue(first.startswith(b"y,,"), first)
        mechanism = ScramSHA256Mechanism(self.context())
        self.assertReply(535, "5.7.8", mechanism.start, first)

    def test_canBindNotOffered(self) -> None:
        """
        "y" without -PLUS offered (no channel bindings in the context) is
        fine.
        """
        client = exporterClient("user", "pencil", CBDATA, ("SCRAM-SHA-256",))
        mechanism = ScramSHA256Mechanism(self.context({}))
        result = self.exchange(client, mechanism)
        self.assertTrue(self.accounts.check(result.credentials))
        client.set_server_final(mechanism.serverFinal().decode())

    def test_noBindingWhileOffered(self) -> None:
        """
        "n" (a client that cannot bind) stays fine when -PLUS is offered.
        """
        client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "pencil")
        mechanism = ScramSHA256Mechanism(self.context())
        result = self.exchange(client, mechanism)
        self.assertTrue(self.accounts.check(result.credentials))
        client.set_server_final(mechanism.serverFinal().decode())

    def test_bindingRequestedWithoutPlus(self) -> None:
        """
        p= with plain SCRAM-SHA-256 is refused even when -PLUS is offered.
        """
        client = exporterClient("user", "pencil", CBDATA)
        mechanism = ScramSHA256Mechanism(self.context())
        self.assertReply(
            535, "5.7.8", mechanism.start, client.get_client_first().encode()
        )

    def test_fuzz(self) -> None:
        """
        Mutated -PLUS messages: a challenge, an L{Authenticate} or an
        L{SMTPReply}, never another exception.
        """
        rng = random.Random(9266)
        client = exporterClient("user", "pencil", CBDATA)
        first = client.get_client_first().encode()
        mechanism = ScramSHA256PlusMechanism(self.context())
        client.set_server_first(mechanism.start(first).data.decode())
        final = client.get_client_final().encode()
        alphabet = b"=,nyparcs0Z+/- \x00\xff\xc3"
        for i in range(2000):
            isFinal = i % 2 == 0
            data = bytearray(final if isFinal else first)
            for _ in range(rng.randrange(1, 5)):
                position = rng.randrange(len(data) + 1)
                action = rng.randrange(3)
                if action == 0:
                    data.insert(position, rng.choice(alphabet))
                elif action == 1 and position < len(data):
                    del data[position]
                elif position < len(data):
                    data[position] = rng.choice(alphabet)
            mechanism = ScramSHA256PlusMechanism(self.context())
            try:
                if isFinal:
                    mechanism.start(first)
                    result = mechanism.respond(bytes(data))
                else:
                    result = mechanism.start(bytes(data))
            except SMTPReply as e:
                self.assertIn((e.code, e.status), [(501, "5.5.2"), (535, "5.7.8")])
            else:
                self.assertIsInstance(result, (Challenge, Authenticate))


class FakeSaltTests(unittest.TestCase):
    """
    L{scram.setFakeSaltSecret}: an unknown user's salt from the key material,
    the same in every process given the same material.
    """

    def setUp(self):
        from msa.sasl import scram

        self.scram = scram
        self.addCleanup(setattr, scram, "_fakeSaltSecret", scram._fakeSaltSecret)

    def test_sameMaterialSameSalt(self):
        self.scram.setFakeSaltSecret(b"-----BEGIN PRIVATE KEY----- one")
        first = self.scram._fakeSalt("nobody")
        self.scram._fakeSaltSecret = b"what another process drew at random"
        self.assertNotEqual(self.scram._fakeSalt("nobody"), first)
        self.scram.setFakeSaltSecret(b"-----BEGIN PRIVATE KEY----- one")
        self.assertEqual(self.scram._fakeSalt("nobody"), first)
        self.assertEqual(len(first), 16)
        self.assertNotEqual(self.scram._fakeSalt("somebody"), first)

    def test_otherMaterialOtherSalt(self):
        self.scram.setFakeSaltSecret(b"one key")
        first = self.scram._fakeSalt("nobody")
        self.scram.setFakeSaltSecret(b"another key")
        self.assertNotEqual(self.scram._fakeSalt("nobody"), first)
