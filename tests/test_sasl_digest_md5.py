# -*- test-case-name: tests.test_sasl_digest_md5 -*-
"""
Tests for L{msa.sasl.digest_md5}: the RFC 2831 examples, real clients
(pure-sasl, and responses written the way curl and swaks/GNU SASL write
them), every refusal, and random input.
"""

import hashlib
import random

from puresasl.client import SASLClient
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.errors import SMTPReply
from msa.interfaces import IDigestMD5Credentials, IMechanismCredentials
from msa.sasl import Authenticate, Challenge, MechanismContext
from msa.sasl.digest_md5 import (
    DigestMD5Credentials,
    DigestMD5Mechanism,
    computeHA1,
    parseDirectives,
    responseValue,
    rspauthValue,
)

REALM = "mail.example.org"
NONCE = "OA6MG9tEQGm2hh"
RFC_HA1 = computeHA1("chris", "elwood.innosoft.com", "secret")


def makeContext() -> MechanismContext:
    return MechanismContext(realm=REALM, serverNames=[REALM, "smtp.example.org"])


def makeMechanism(nonce: str = NONCE) -> DigestMD5Mechanism:
    return DigestMD5Mechanism(makeContext(), nonceFactory=lambda: nonce)


def q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def makeResponse(
    nonce: str = NONCE,
    *,
    username: str = "alice",
    password: str = "secret",
    realm: str | None = REALM,
    cnonce: str = "OA6MHXh6VqTrRk",
    nc: str = "00000001",
    qop: str = "auth",
    digestUri: str = "smtp/" + REALM,
    authzid: str | None = None,
    charset: str | None = "utf-8",
    drop: tuple[str, ...] = (),
    extra: tuple[tuple[str, str], ...] = (),
    separator: str = ",",
    sort: bool = False,
) -> bytes:
    """
    A digest-response computed the way a client computes it.
    """
    ha1 = computeHA1(username, realm or "", password)
    response = responseValue(ha1, nonce, nc, cnonce, qop, digestUri, authzid)
    items = [
        ("username", q(username)),
        ("realm", None if realm is None else q(realm)),
        ("nonce", q(nonce)),
        ("cnonce", q(cnonce)),
        ("nc", nc),
        ("qop", qop),
        ("digest-uri", q(digestUri)),
        ("response", response.decode("ascii")),
        ("charset", charset),
        ("authzid", None if authzid is None else q(authzid)),
    ]
    items = [(k, v) for k, v in items if v is not None and k not in drop]
    items.extend(extra)
    if sort:
        items.sort()
    text = separator.join(f"{k}={v}" for k, v in items)
    return text.encode("utf-8" if charset else "iso-8859-1")


class ComputationTests(unittest.TestCase):
    """
    The RFC 2831 section 4 examples, through the pure functions.
    """

    def test_imapExample(self) -> None:
        args = (RFC_HA1, "OA6MG9tEQGm2hh", "00000001", "OA6MHXh6VqTrRk", "auth")
        uri = "imap/elwood.innosoft.com"
        self.assertEqual(responseValue(*args, uri), b"d388dad90d4bbd760a152321f2143af7")
        self.assertEqual(rspauthValue(*args, uri), b"ea40f60335c427b5527b84dbabcdfffd")

    def test_acapExample(self) -> None:
        args = (RFC_HA1, b"OA9BSXrbuRhWay", b"00000001", b"OA9BSuZWMSpW8m", b"auth")
        uri = b"acap/elwood.innosoft.com"
        self.assertEqual(responseValue(*args, uri), b"6084c6db3fede7352c551284490fd0fc")
        self.assertEqual(rspauthValue(*args, uri), b"2f0b3d7c3c2e486600ef710726aa2eae")

    def test_imapExampleParsed(self) -> None:
        """
        The example's digest-response text parses, and the credentials made
        from it verify with the RFC's secret.
        """
        parsed = parseDirectives(
            b'charset=utf-8,username="chris",realm="elwood.innosoft.com",'
            b'nonce="OA6MG9tEQGm2hh",nc=00000001,cnonce="OA6MHXh6VqTrRk",'
            b'digest-uri="imap/elwood.innosoft.com",'
            b"response=d388dad90d4bbd760a152321f2143af7,qop=auth"
        )
        credentials = DigestMD5Credentials(
            username=parsed["username"].decode(),
            realm=parsed["realm"].decode(),
            nonce=parsed["nonce"],
            nc=parsed["nc"],
            cnonce=parsed["cnonce"],
            qop=parsed["qop"],
            digestUri=parsed["digest-uri"],
            authzid=None,
            response=parsed["response"],
        )
        self.assertFalse(credentials.checkHA1(computeHA1("chris", "x", "secret")))
        self.assertTrue(credentials.checkHA1(RFC_HA1))
        self.assertEqual(credentials.rspauth, b"ea40f60335c427b5527b84dbabcdfffd")

    def test_ha1IsRawBytes(self) -> None:
        self.assertEqual(
            RFC_HA1, hashlib.md5(b"chris:elwood.innosoft.com:secret").digest()
        )
        self.assertRaises(
            ValueError, responseValue, RFC_HA1.hex().encode(), "n", "1", "c", "a", "u"
        )

    def test_ha1Latin1(self) -> None:
        """
        Each field that fits ISO 8859-1 is hashed as ISO 8859-1, each other
        one as UTF-8 (RFC 2831 section 2.1.2.1: the fields separately, not
        the joined string).
        """
        self.assertEqual(
            computeHA1("j\u00fcrgen", "r", "p\u00e4ss"),
            hashlib.md5("j\u00fcrgen:r:p\u00e4ss".encode("iso-8859-1")).digest(),
        )
        self.assertEqual(
            computeHA1("j\u00fcrgen", "r", "\u20ac"),
            hashlib.md5(b"j\xfcrgen:r:" + "\u20ac".encode()).digest(),
        )

    def test_parseSyntax(self) -> None:
        self.assertEqual(
            parseDirectives(b' , A = "x\\"y\\\\" ,,b=tok/en ,c=""'),
            {"a": b'x"y\\', "b": b"tok/en", "c": b""},
        )


class ExchangeMixin:
    """
    Helpers to run an exchange and check refusals.
    """

    def authenticate(self, response: bytes, nonce: str = NONCE) -> Authenticate:
        mechanism = makeMechanism(nonce)
        mechanism.start(None)
        result = mechanism.respond(response)
        self.assertIsInstance(result, Authenticate)
        self.mechanism = mechanism
        return result

    def assertReply(self, code: int, status: str, f, *args) -> SMTPReply:
        error = self.assertRaises(SMTPReply, f, *args)
        self.assertEqual((error.code, error.status), (code, status))
        return error

    def assertMalformed(self, response: bytes) -> None:
        mechanism = makeMechanism()
        mechanism.start(None)
        self.assertReply(501, "5.5.2", mechanism.respond, response)

    def assertRefused(self, response: bytes, nonce: str = NONCE) -> None:
        mechanism = makeMechanism(nonce)
        mechanism.start(None)
        self.assertReply(535, "5.7.8", mechanism.respond, response)


class MechanismTests(ExchangeMixin, unittest.TestCase):
    def test_challenge(self) -> None:
        challenge = makeMechanism().start(None)
        self.assertEqual(
            challenge,
            Challenge(
                b'realm="mail.example.org",nonce="OA6MG9tEQGm2hh",qop="auth",'
                b"charset=utf-8,algorithm=md5-sess"
            ),
        )
        self.assertEqual(makeMechanism().start(b""), challenge)

    def test_freshNonces(self) -> None:
        first = DigestMD5Mechanism(makeContext()).start(None).data
        second = DigestMD5Mechanism(makeContext()).start(None).data
        self.assertNotEqual(first, second)
        nonce = parseDirectives(first)["nonce"]
        self.assertGreaterEqual(len(nonce), 24)

    def test_success(self) -> None:
        credentials = self.authenticate(makeResponse()).credentials
        self.assertTrue(verifyObject(IDigestMD5Credentials, credentials))
        self.assertTrue(verifyObject(IMechanismCredentials, credentials))
        self.assertEqual(credentials.username, "alice")
        self.assertEqual(credentials.realm, REALM)
        self.assertEqual(credentials.mechanism, "DIGEST-MD5")
        self.assertTrue(credentials.checkHA1(computeHA1("alice", REALM, "secret")))
        expected = rspauthValue(
            computeHA1("alice", REALM, "secret"),
            NONCE,
            "00000001",
            "OA6MHXh6VqTrRk",
            "auth",
            "smtp/" + REALM,
        )
        self.assertEqual(self.mechanism.serverFinal(), b"rspauth=" + expected)

    def test_pureSaslRoundTrip(self) -> None:
        client = SASLClient(
            "smtp.example.org",
            "smtp",
            mechanism="DIGEST-MD5",
            username="alice",
            password="secret",
        )
        mechanism = DigestMD5Mechanism(makeContext())
        response = client.process(mechanism.start(None).data)
        credentials = mechanism.respond(response).credentials
        self.assertEqual(credentials.username, "alice")
        self.assertTrue(credentials.checkHA1(computeHA1("alice", REALM, "secret")))
        self.assertIsNone(client.process(mechanism.serverFinal()))
        self.assertTrue(client.complete)

    def test_curlStyle(self) -> None:
        """
        curl: digest-uri smtp/<realm>, quoted nc, no charset, no authzid.
        """
        response = makeResponse(charset=None).replace(b"nc=00000001", b'nc="00000001"')
        credentials = self.authenticate(response).credentials
        self.assertTrue(credentials.checkHA1(computeHA1("alice", REALM, "secret")))

    def test_swaksGnuSaslStyle(self) -> None:
        """
        swaks (Authen::SASL) and GNU SASL: charset=utf-8, alphabetical
        order, ", " separators, another server name in the digest-uri.
        """
        response = makeResponse(
            separator=", ", sort=True, digestUri="smtp/SMTP.example.org"
        )
        self.assertTrue(response.startswith(b'charset=utf-8, cnonce="'))
        credentials = self.authenticate(response).credentials
        self.assertTrue(credentials.checkHA1(computeHA1("alice", REALM, "secret")))

    def test_utf8UserName(self) -> None:
        response = makeResponse(username="j\u00fcrgen", password="\u20ac")
        credentials = self.authenticate(response).credentials
        self.assertEqual(credentials.username, "j\u00fcrgen")
        self.assertTrue(
            credentials.checkHA1(computeHA1("j\u00fcrgen", REALM, "\u20ac"))
        )

    def test_latin1UserName(self) -> None:
        """
        Without charset the user name is ISO 8859-1.
        """
        response = makeResponse(username="j\u00fcrgen", charset=None)
        self.assertIn(b"j\xfcrgen", response)
        credentials = self.authenticate(response).credentials
        self.assertEqual(credentials.username, "j\u00fcrgen")
        self.assertTrue(
            credentials.checkHA1(computeHA1("j\u00fcrgen", REALM, "secret"))
        )

    def test_authzidEqualToUser(self) -> None:
        credentials = self.authenticate(makeResponse(authzid="alice")).credentials
        self.assertTrue(credentials.checkHA1(computeHA1("alice", REALM, "secret")))

    def test_emptyAuthzidIsNone(self) -> None:
        """
        C{authzid=""} (GNU SASL's C{-z ''}) means no authzid (issue 18,
        defect 13): the response and rspauth are computed without one, as
        GNU SASL computes them, and the login is the user's own.
        """
        response = makeResponse(extra=(("authzid", '""'),))
        self.assertIn(b',authzid=""', response)
        credentials = self.authenticate(response).credentials
        self.assertEqual(credentials.username, "alice")
        ha1 = computeHA1("alice", REALM, "secret")
        self.assertTrue(credentials.checkHA1(ha1))
        expected = rspauthValue(
            ha1, NONCE, "00000001", "OA6MHXh6VqTrRk", "auth", "smtp/" + REALM
        )
        self.assertEqual(self.mechanism.serverFinal(), b"rspauth=" + expected)

    def test_servNameEqualToHost(self) -> None:
        uri = "smtp/%s/%s" % (REALM, REALM)
        credentials = self.authenticate(makeResponse(digestUri=uri)).credentials
        self.assertTrue(credentials.checkHA1(computeHA1("alice", REALM, "secret")))

    def test_unknownDirectiveIgnored(self) -> None:
        self.authenticate(makeResponse(extra=(("maxbuf", "65536"),)))

    def test_wrongPassword(self) -> None:
        """
        The checker's verdict: checkHA1 fails and no rspauth is given.
        """
        credentials = self.authenticate(makeResponse(password="wrong")).credentials
        self.assertFalse(credentials.checkHA1(computeHA1("alice", REALM, "secret")))
        self.assertReply(535, "5.7.8", self.mechanism.serverFinal)

    def test_serverFinalBeforeCheck(self) -> None:
        self.assertReply(535, "5.7.8", makeMechanism().serverFinal)
        self.authenticate(makeResponse())
        self.assertReply(535, "5.7.8", self.mechanism.serverFinal)

    def test_unknownRealm(self) -> None:
        self.assertRefused(makeResponse(realm="other.example.org"))

    def test_absentRealm(self) -> None:
        self.assertRefused(makeResponse(realm=None))

    def test_absentRealmWithEmptyRealm(self) -> None:
        mechanism = DigestMD5Mechanism(
            MechanismContext(realm="", serverNames=[REALM]),
            nonceFactory=lambda: NONCE,
        )
        mechanism.start(None)
        credentials = mechanism.respond(makeResponse(realm=None)).credentials
        self.assertEqual(credentials.realm, "")
        self.assertTrue(credentials.checkHA1(computeHA1("alice", "", "secret")))

    def test_replayedNonce(self) -> None:
        """
        A response to another exchange's nonce is refused.
        """
        other = DigestMD5Mechanism(makeContext())
        otherNonce = parseDirectives(other.start(None).data)["nonce"].decode()
        self.assertRefused(makeResponse(otherNonce))

    def test_secondResponse(self) -> None:
        self.authenticate(makeResponse())
        self.assertReply(501, "5.5.2", self.mechanism.respond, makeResponse())

    def test_respondBeforeStart(self) -> None:
        self.assertReply(501, "5.5.2", makeMechanism().respond, makeResponse())

    def test_nonceCount(self) -> None:
        self.assertRefused(makeResponse(nc="00000002"))

    def test_nonceCountSyntax(self) -> None:
        self.assertMalformed(makeResponse(nc="1"))

    def test_qopAuthInt(self) -> None:
        self.assertRefused(makeResponse(qop="auth-int"))

    def test_qopAuthConf(self) -> None:
        self.assertRefused(makeResponse(qop="auth-conf"))

    def test_qopDefaultsToAuth(self) -> None:
        """
        Without qop the response must have been computed with qop=auth.
        """
        credentials = self.authenticate(makeResponse(drop=("qop",))).credentials
        self.assertTrue(credentials.checkHA1(computeHA1("alice", REALM, "secret")))

    def test_wrongHost(self) -> None:
        self.assertRefused(makeResponse(digestUri="smtp/evil.example.net"))

    def test_wrongService(self) -> None:
        self.assertRefused(makeResponse(digestUri="imap/" + REALM))

    def test_wrongServName(self) -> None:
        uri = "smtp/%s/smtp.example.org" % (REALM,)
        self.assertRefused(makeResponse(digestUri=uri))

    def test_badUri(self) -> None:
        self.assertRefused(makeResponse(digestUri="smtp"))
        self.assertRefused(makeResponse(digestUri="smtp/"))

    def test_authzidDifferent(self) -> None:
        self.assertRefused(makeResponse(authzid="bob"))

    def test_otherCharset(self) -> None:
        self.assertRefused(makeResponse().replace(b"utf-8", b"iso-8859-1"))

    def test_duplicatedDirective(self) -> None:
        self.assertMalformed(makeResponse(extra=(("nonce", q(NONCE)),)))
        self.assertMalformed(makeResponse(extra=(("Realm", q(REALM)),)))

    def test_missingDirectives(self) -> None:
        for name in ("username", "nonce", "cnonce", "nc", "digest-uri", "response"):
            self.assertMalformed(makeResponse(drop=(name,)))

    def test_badResponseValue(self) -> None:
        response = makeResponse()
        good = parseDirectives(response)["response"]
        self.assertMalformed(response.replace(good, good[:-1]))
        self.assertMalformed(response.replace(good, b"x" * 32))

    def test_tooLong(self) -> None:
        response = makeResponse(extra=(("x", q("a" * 4096)),))
        self.assertMalformed(response)

    def test_unterminatedQuote(self) -> None:
        self.assertMalformed(makeResponse() + b',authzid="alice')
        self.assertMalformed(makeResponse() + b',authzid="alice\\')

    def test_nonUtf8(self) -> None:
        self.assertMalformed(
            makeResponse(username="j\u00fcrgen").replace("\u00fc".encode(), b"\xfc")
        )

    def test_garbage(self) -> None:
        for data in [
            b"",
            b",,,",
            b"username",
            b"username=",
            b'username="a"x',
            b"username=a b",
            b'="a"',
            b'user\xffname="a"',
            b'username="a\x00"',
            b"\x00\xff",
        ]:
            self.assertMalformed(data)

    def test_emptyUsername(self) -> None:
        self.assertMalformed(
            makeResponse().replace(b'username="alice"', b'username=""')
        )

    def test_initialResponse(self) -> None:
        self.assertReply(501, "5.5.2", makeMechanism().start, makeResponse())

    def test_startTwice(self) -> None:
        mechanism = makeMechanism()
        mechanism.start(None)
        self.assertReply(501, "5.5.2", mechanism.start, None)

    def test_fuzz(self) -> None:
        """
        Random bytes and random mutations of a valid response: the result is
        an L{Authenticate} or an L{SMTPReply}, never another exception.
        """
        rng = random.Random(2831)
        valid = makeResponse(authzid="alice", extra=(("maxbuf", "1024"),))
        alphabet = b'=,"\\ \t\x00\xff\xc3azAZ09/-'
        for i in range(3000):
            if i % 3 == 0:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
            else:
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 6)):
                    position = rng.randrange(len(data) + 1)
                    action = rng.randrange(3)
                    if action == 0:
                        data.insert(position, rng.choice(alphabet))
                    elif action == 1 and position < len(data):
                        del data[position]
                    elif position < len(data):
                        data[position] = rng.choice(alphabet)
                data = bytes(data)
            mechanism = makeMechanism()
            mechanism.start(None)
            try:
                result = mechanism.respond(data)
            except SMTPReply as e:
                self.assertIn((e.code, e.status), [(501, "5.5.2"), (535, "5.7.8")])
            else:
                self.assertIsInstance(result, Authenticate)
