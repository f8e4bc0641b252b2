# -*- test-case-name: tests.test_digest_nonascii -*-
"""
DIGEST-MD5 with non-ASCII user names and passwords (issue 9 item 5).

RFC 2831 2.1.2.1 hashes each of user name, realm and password in ISO 8859-1
when it fits and in UTF-8 otherwise.  Real clients differ, so the account
store keeps every H(A1) they compute (L{msa.sasl.digest_md5.ha1Variants}):

  - RFC: the JDK (L{tests.test_jdk_interop}) and Cyrus libsasl2;
  - only the password converted: GNU SASL (msmtp, gsasl);
  - nothing converted, all UTF-8: Perl's Authen::SASL (swaks), pure-sasl,
    curl.

Each family submits over real sockets with verified TLS to the whole MSA
(L{tests.e2e.RunningMSA}), for a user whose name and password fit ISO
8859-1 and for one whose password (a euro sign) does not.  The digest
response in each transcript is recomputed here, independently of the
implementation, to show which of the three a client used.

Also here: the variants as stored (an ASCII account keeps exactly one, in
the same format as before), an account file in the old format, and the
admin command writing them.
"""

import base64
import hashlib
import io
import json
import os
import smtplib
import sys

import attrs
from puresasl.client import SASLClient
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.checkers import AccountChecker
from msa.accounts.model import (
    AccountsFileError,
    makeAccount,
    parseAccounts,
    readAccounts,
    writeAccounts,
)
from msa.admin import command as admin
from msa.sasl import MechanismContext
from msa.sasl.digest_md5 import (
    DigestMD5Mechanism,
    ha1Variants,
    parseDirectives,
    responseValue,
)
from tests import test_interop, test_interop_more
from tests.e2e import (
    MESSAGE,
    SENDERS,
    RunningMSA,
    fixtureAccount,
    requireProgram,
    runProgram,
)
from tests.test_checkers import DictStore
from tests.test_interop_more import checkOutboxFile, runWithStdin, writeFile

FROM = "ik@mijnbedrijf.nl"
TO = "belastingdienst@overheid.nl"
REALM = "localhost"

#: (user, password): both fit ISO 8859-1; then a password that does not
#: (the euro sign), which must stay UTF-8 per the RFC.
NON_ASCII = [
    ("bedrijf-\u00eb", "wachtwoord-\u00e9"),
    ("bedrijf-\u00f8", "wachtwoord-\u00e9\u20ac"),
]


def _latin1IfPossible(text: str) -> bytes:
    try:
        return text.encode("iso-8859-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def rfcHA1(user: str, realm: str, password: str) -> bytes:
    """
    RFC 2831 2.1.2.1: each field on its own (the JDK, Cyrus).
    """
    fields = [_latin1IfPossible(f) for f in (user, realm, password)]
    return hashlib.md5(b":".join(fields)).digest()


def passwordOnlyHA1(user: str, realm: str, password: str) -> bytes:
    """
    Only the password converted (GNU SASL).
    """
    joined = f"{user}:{realm}:".encode() + _latin1IfPossible(password)
    return hashlib.md5(joined).digest()


def utf8HA1(user: str, realm: str, password: str) -> bytes:
    """
    Nothing converted (Perl Authen::SASL, pure-sasl, curl).
    """
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).digest()


def nonAsciiAccounts() -> dict:
    """
    The L{NON_ASCII} accounts, for L{RunningMSA}'s C{extraAccounts}.
    """
    return {
        user: attrs.evolve(
            fixtureAccount(user, password, (REALM,)), extra={"senders": SENDERS}
        )
        for user, password in NON_ASCII
    }


def matchingHA1(challenge, response, user: str, password: str) -> bytes | None:
    """
    Which stored H(A1) of C{user} the digest C{response} (to C{challenge})
    was computed from, recomputed from the directives.

    @param challenge: the server's digest-challenge (L{str} or L{bytes}).
    @param response: the client's digest-response (L{str} or L{bytes}).
    @return: the 16-byte H(A1), or L{None} when none matches.
    """

    def raw(text):
        return text.encode("utf-8") if isinstance(text, str) else text

    nonce = parseDirectives(raw(challenge))["nonce"]
    d = parseDirectives(raw(response))
    for ha1 in ha1Variants(user, REALM, password):
        expected = responseValue(
            ha1,
            nonce,
            d["nc"],
            d["cnonce"],
            d.get("qop", b"auth"),
            d["digest-uri"],
            d.get("authzid"),
        )
        if expected == d["response"].lower():
            return ha1
    return None


def matchingVariant(challenge, response, user: str, password: str) -> int | None:
    """
    The index in L{ha1Variants} of L{matchingHA1}.
    """
    ha1 = matchingHA1(challenge, response, user, password)
    variants = ha1Variants(user, REALM, password)
    return variants.index(ha1) if ha1 in variants else None


def b64lines(lines, prefixes):
    """
    The base64 payloads after C{AUTH DIGEST-MD5} in a transcript: the
    challenge and the response, each line stripped of its direction prefix.
    """
    for index, line in enumerate(lines):
        if line.endswith(b"AUTH DIGEST-MD5"):
            challenge, response = lines[index + 1].strip(), lines[index + 2].strip()
            for prefix in prefixes:
                challenge = challenge.removeprefix(prefix).strip()
                response = response.removeprefix(prefix).strip()
            return (
                base64.b64decode(challenge.removeprefix(b"334 ")),
                base64.b64decode(response),
            )
    raise AssertionError(f"no AUTH DIGEST-MD5 in {lines!r}")


class VariantTests(unittest.TestCase):
    """
    L{ha1Variants}: what it stores for which names.
    """

    def test_ascii(self):
        """
        An ASCII account has exactly one H(A1), the RFC's.
        """
        self.assertEqual(
            ha1Variants("alice", REALM, "secret"), [rfcHA1("alice", REALM, "secret")]
        )

    def test_allFitLatin1(self):
        user, password = NON_ASCII[0]
        self.assertEqual(
            ha1Variants(user, REALM, password),
            [
                rfcHA1(user, REALM, password),
                passwordOnlyHA1(user, REALM, password),
                utf8HA1(user, REALM, password),
            ],
        )

    def test_passwordBeyondLatin1(self):
        """
        With a euro sign in the password GNU SASL's H(A1) is the all-UTF-8
        one: two values.
        """
        user, password = NON_ASCII[1]
        self.assertEqual(
            ha1Variants(user, REALM, password),
            [rfcHA1(user, REALM, password), utf8HA1(user, REALM, password)],
        )
        self.assertEqual(
            passwordOnlyHA1(user, REALM, password), utf8HA1(user, REALM, password)
        )

    def test_asciiUserLatin1Password(self):
        self.assertEqual(
            ha1Variants("alice", REALM, "p\u00e4ss"),
            [rfcHA1("alice", REALM, "p\u00e4ss"), utf8HA1("alice", REALM, "p\u00e4ss")],
        )

    def test_userBeyondLatin1(self):
        """
        A user name that does not fit ISO 8859-1 stays UTF-8 in every
        variant; only the password differs.
        """
        user, password = "\u0141ukasz", "p\u00e4ss"
        self.assertEqual(
            ha1Variants(user, REALM, password),
            [rfcHA1(user, REALM, password), utf8HA1(user, REALM, password)],
        )
        self.assertEqual(
            rfcHA1(user, REALM, password), passwordOnlyHA1(user, REALM, password)
        )


NONCE = "OA6MG9tEQGm2hh"


def respond(user: str, ha1: bytes, charset: bool, encoding: str = "utf-8") -> bytes:
    """
    A digest-response from a client that computed C{ha1}, with the user
    name in C{encoding}.
    """
    cnonce, uri = "OA6MHXh6VqTrRk", "smtp/" + REALM
    response = responseValue(ha1, NONCE, "00000001", cnonce, "auth", uri)
    text = (
        f'username="{user}",realm="{REALM}",nonce="{NONCE}",cnonce="{cnonce}",'
        f'nc=00000001,qop=auth,digest-uri="{uri}",response={response.decode()}'
    )
    if charset:
        text += ",charset=utf-8"
    return text.encode(encoding)


class CheckVariantsTests(unittest.TestCase):
    """
    The mechanism and L{AccountChecker} together: every stored variant logs
    in, nothing else does.
    """

    def setUp(self):
        accounts = nonAsciiAccounts()
        user, password = NON_ASCII[0]
        old = hashlib.md5(f"old:{REALM}:{password}".encode("latin-1")).hexdigest()
        accounts["old"] = attrs.evolve(
            fixtureAccount("old", password, ()), digestHA1={REALM: old}
        )
        self.checker = AccountChecker(DictStore(*accounts.values()), threaded=False)

    def login(self, response: bytes):
        mechanism = DigestMD5Mechanism(
            MechanismContext(realm=REALM, serverNames=[REALM]),
            nonceFactory=lambda: NONCE,
        )
        mechanism.start(None)
        credentials = mechanism.respond(response).credentials
        return credentials, self.checker.requestAvatarId(credentials)

    def test_everyVariant(self):
        for user, password in NON_ASCII:
            for ha1 in ha1Variants(user, REALM, password):
                for charset in (True, False):
                    credentials, d = self.login(respond(user, ha1, charset))
                    self.assertEqual(credentials.username, user)
                    self.assertEqual(self.successResultOf(d), user)

    def test_wrongPassword(self):
        user, password = NON_ASCII[0]
        for ha1 in ha1Variants(user, REALM, password + "x"):
            _, d = self.login(respond(user, ha1, True))
            self.failureResultOf(d, UnauthorizedLogin)

    def test_otherUsersVariant(self):
        """
        The variants are per account: one account's H(A1) does not let a
        response for another user name in.
        """
        user, password = NON_ASCII[0]
        other, _ = NON_ASCII[1]
        _, d = self.login(respond(other, ha1Variants(user, REALM, password)[0], True))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_latin1WithoutCharset(self):
        """
        A user name in ISO 8859-1 without charset (what the RFC says a
        client without charset sends) is read as ISO 8859-1.
        """
        user, password = NON_ASCII[0]
        ha1 = ha1Variants(user, REALM, password)[0]
        response = respond(user, ha1, False, "iso-8859-1")
        self.assertIn(b'username="bedrijf-\xeb"', response)
        credentials, d = self.login(response)
        self.assertEqual(self.successResultOf(d), user)

    def test_oldAccountEntry(self):
        """
        An old single H(A1) (names all ISO 8859-1: the RFC's) still works;
        it is the only one the account has.
        """
        _, password = NON_ASCII[0]
        ha1 = ha1Variants("old", REALM, password)[0]
        _, d = self.login(respond("old", ha1, True))
        self.assertEqual(self.successResultOf(d), "old")
        utf8 = ha1Variants("old", REALM, password)[-1]
        _, d = self.login(respond("old", utf8, True))
        self.failureResultOf(d, UnauthorizedLogin)


class StoredVariantsTests(unittest.TestCase):
    """
    The variants in the accounts file.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")
        os.makedirs(os.path.dirname(self.path))

    def document(self):
        with open(self.path, "rb") as f:
            return json.load(f)

    def test_asciiKeepsOneString(self):
        """
        An ASCII account is written exactly as before: one hex string per
        realm.
        """
        writeAccounts(self.path, {"alice": makeAccount("alice", "pw", ["a", "b"])})
        stored = self.document()["accounts"]["alice"]["digestHA1"]
        self.assertEqual(
            stored,
            {
                "a": rfcHA1("alice", "a", "pw").hex(),
                "b": rfcHA1("alice", "b", "pw").hex(),
            },
        )

    def test_nonAsciiList(self):
        user, password = NON_ASCII[0]
        writeAccounts(self.path, {user: makeAccount(user, password, [REALM])})
        stored = self.document()["accounts"][user]["digestHA1"]
        self.assertEqual(
            stored,
            {
                REALM: [
                    rfcHA1(user, REALM, password).hex(),
                    passwordOnlyHA1(user, REALM, password).hex(),
                    utf8HA1(user, REALM, password).hex(),
                ]
            },
        )
        self.assertEqual(
            readAccounts(self.path)[user].digestHA1[REALM],
            tuple(h.hex() for h in ha1Variants(user, REALM, password)),
        )

    def test_oldFormat(self):
        """
        A file written before the variants (one H(A1) per realm, upper-case
        hex allowed) still reads.
        """
        account = makeAccount("bedrijf-\u00eb", "pw", [])
        old = hashlib.md5("bedrijf-\u00eb:localhost:pw".encode("latin-1")).hexdigest()
        document = {
            "version": 1,
            "accounts": {
                "bedrijf-\u00eb": {
                    "enabled": True,
                    "mechanisms": ["DIGEST-MD5", "PLAIN"],
                    "passwordHash": account.passwordHash,
                    "digestHA1": {"localhost": old.upper()},
                }
            },
        }
        accounts = parseAccounts(json.dumps(document).encode("utf-8"))
        self.assertEqual(accounts["bedrijf-\u00eb"].digestHA1, {"localhost": (old,)})

    def test_malformed(self):
        """
        A list must hold one to three different 32-hex-digit values.
        """
        account = makeAccount("a", "pw", [])
        good = "0" * 32
        for value in ([], [good, good], [good, "1" * 32, "2" * 32, "3" * 32], ["x"], 5):
            document = {
                "version": 1,
                "accounts": {
                    "a": {
                        "enabled": True,
                        "mechanisms": ["DIGEST-MD5"],
                        "passwordHash": account.passwordHash,
                        "digestHA1": {"r": value},
                    }
                },
            }
            with self.assertRaises(AccountsFileError) as caught:
                parseAccounts(json.dumps(document).encode(), "f.json")
            self.assertIn(
                "account 'a': key 'digestHA1' must map realms", str(caught.exception)
            )


class AdminVariantsTests(unittest.TestCase):
    """
    C{digipoort-msa-admin accounts add/passwd} store every variant.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")

    def runAdmin(self, *argv, stdin):
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", io.StringIO())
        self.patch(sys, "stderr", io.StringIO())
        return admin.main(["--accounts", self.path, "--realm", REALM, *argv])

    def test_addAndPasswd(self):
        user, password = NON_ASCII[0]
        self.assertEqual(
            self.runAdmin("accounts", "add", user, stdin=password + "\n"), 0
        )
        with open(self.path, "rb") as f:
            stored = json.load(f)["accounts"][user]["digestHA1"]
        self.assertEqual(
            stored, {REALM: [h.hex() for h in ha1Variants(user, REALM, password)]}
        )
        self.assertEqual(len(stored[REALM]), 3)

        newUser, newPassword = NON_ASCII[1]
        self.assertEqual(
            self.runAdmin("accounts", "passwd", user, stdin=newPassword + "\n"), 0
        )
        self.assertEqual(
            readAccounts(self.path)[user].digestHA1,
            {REALM: tuple(h.hex() for h in ha1Variants(user, REALM, newPassword))},
        )


class ClientFamilyMixin:
    """
    An MSA with the L{NON_ASCII} accounts and the check that a client
    submitted with the H(A1) its family computes.
    """

    timeout = 60
    #: The H(A1) this client family computes (L{rfcHA1}, ...).
    family = None

    def setUp(self):
        self.msa = RunningMSA(self, extraAccounts=nonAsciiAccounts())
        self.messageFile = writeFile(self, MESSAGE, ".eml")

    def checkFamily(self, challenge, response, user, password):
        self.assertEqual(
            matchingHA1(challenge, response, user, password),
            type(self).family(user, REALM, password),
        )

    @defer.inlineCallbacks
    def checkOutbox(self, message=MESSAGE):
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(len(files), 1)
        self.assertTrue(self.msa.readOutbox(files[0]).endswith(message))

    def test_latin1Names(self):
        return self.submit(*NON_ASCII[0])

    def test_euroInPassword(self):
        return self.submit(*NON_ASCII[1])


class CurlTests(ClientFamilyMixin, unittest.TestCase):
    family = staticmethod(utf8HA1)

    @defer.inlineCallbacks
    def submit(self, user, password):
        curl = requireProgram(self, "curl")
        # CurlTests.curlArgs needs only self.msa and self.messageFile.
        args = test_interop.CurlTests.curlArgs(
            self, True, "DIGEST-MD5", password, user=user
        )
        out, err, code = yield runProgram(curl, args)
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        lines = [line for line in err.splitlines() if line[:2] in (b"< ", b"> ")]
        challenge, response = b64lines(lines, (b"< ", b"> "))
        self.assertNotIn(b"charset", response)
        self.assertIn(f'username="{user}"'.encode(), response)
        self.checkFamily(challenge, response, user, password)
        yield self.checkOutbox()


class SwaksTests(ClientFamilyMixin, unittest.TestCase):
    family = staticmethod(utf8HA1)

    @defer.inlineCallbacks
    def submit(self, user, password):
        # SwaksTests.swaksArgs needs only self.msa and self.messageFile.
        args = test_interop.SwaksTests.swaksArgs(
            self, True, "DIGEST-MD5", "localhost", password, user
        )
        out, err, code = yield test_interop.runSwaks(self, args)
        transcript = out + err
        self.assertEqual(code, 0, transcript.decode("utf-8", "replace"))
        challenge, response = b64lines(
            [line.strip() for line in transcript.splitlines()], (b"<~ ", b"~> ")
        )
        self.assertIn(b"charset=utf-8", response)
        self.checkFamily(challenge, response, user, password)
        # swaks sends a CRLF of its own after the data it was given.
        yield self.checkOutbox(MESSAGE + b"\r\n")


class MsmtpTests(ClientFamilyMixin, unittest.TestCase):
    family = staticmethod(passwordOnlyHA1)

    @defer.inlineCallbacks
    def submit(self, user, password):
        msmtp = requireProgram(self, "msmtp")
        configFile = writeFile(self, b"", ".msmtprc")
        passwordFile = writeFile(self, password.encode("utf-8"), ".pw")
        out, err, code = yield runWithStdin(
            msmtp,
            [
                f"--file={configFile}",
                "--host=localhost",
                f"--port={self.msa.implicitPort}",
                "--tls=on",
                "--tls-starttls=off",
                f"--tls-trust-file={self.msa.certFile}",
                "--auth=digest-md5",
                f"--user={user}",
                f"--passwordeval=cat {passwordFile}",
                "--set-date-header=off",
                f"--from={FROM}",
                "--debug",
                TO,
            ],
            self.messageFile,
        )
        transcript = out + err
        self.assertEqual(code, 0, transcript.decode("utf-8", "replace"))
        challenge, response = b64lines(transcript.splitlines(), (b"<-- ", b"--> "))
        self.assertIn(b"charset=utf-8", response)
        self.checkFamily(challenge, response, user, password)
        files = yield self.msa.waitForOutbox(1)
        checkOutboxFile(self, self.msa.readOutbox(files[0]), MESSAGE)


class GsaslTests(ClientFamilyMixin, unittest.TestCase):
    """
    The C{gsasl} command (GNU SASL): authentication only, over STARTTLS.
    """

    family = staticmethod(passwordOnlyHA1)

    @defer.inlineCallbacks
    def submit(self, user, password):
        gsasl = requireProgram(self, "gsasl")
        out, err, code = yield runWithStdin(
            gsasl,
            [
                "--smtp",
                f"--connect=localhost:{self.msa.starttlsPort}",
                "--starttls",
                f"--x509-ca-file={self.msa.certFile}",
                "--mechanism=DIGEST-MD5",
                f"--authentication-id={user}",
                f"--password={password}",
                "--quality-of-protection=qop-auth",
                f"--realm={REALM}",
            ],
        )
        transcript = out + err
        self.assertEqual(code, 0, transcript.decode("utf-8", "replace"))
        lines = transcript.splitlines()
        self.assertIn(b"235 2.7.0 Authentication successful", lines)
        challenge, response = b64lines(lines, ())
        self.checkFamily(challenge, response, user, password)


class CyrusTests(ClientFamilyMixin, unittest.TestCase):
    """
    Cyrus libsasl2 (C{sasl-sample-client}), relayed over smtplib.
    """

    family = staticmethod(rfcHA1)

    @defer.inlineCallbacks
    def submit(self, user, password):
        requireProgram(self, "sasl-sample-client")
        requireProgram(self, "stdbuf")
        # CyrusSASLTests.session needs only self.msa.
        exchange, code, queueId, prompts = yield threads.deferToThread(
            test_interop_more.CyrusSASLTests.session,
            self,
            "DIGEST-MD5",
            password,
            user=user,
        )
        self.assertEqual(code, 235, exchange)
        (_, challenge), (_, response) = exchange[:2]
        self.assertNotIn(b"charset", response)
        self.assertIn(f'username="{user}"'.encode(), response)
        self.checkFamily(challenge, response, user, password)
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(files, [f"{queueId}.eml"])


class PureSASLTests(ClientFamilyMixin, unittest.TestCase):
    """
    pure-sasl over smtplib with verified implicit TLS.
    """

    family = staticmethod(utf8HA1)

    def session(self, user, password):
        context = self.msa.clientContext()
        smtp = smtplib.SMTP_SSL(
            "localhost", self.msa.implicitPort, context=context, timeout=10
        )
        try:
            smtp.ehlo()
            client = SASLClient(
                "localhost",
                "smtp",
                mechanism="DIGEST-MD5",
                username=user,
                password=password,
            )
            code, challenge = smtp.docmd("AUTH", "DIGEST-MD5")
            assert code == 334, (code, challenge)
            challenge = base64.b64decode(challenge)
            response = client.process(challenge)
            code, final = smtp.docmd(base64.b64encode(response).decode())
            assert code == 334, (code, final)
            assert client.process(base64.b64decode(final)) is None
            code, reply = smtp.docmd("")
            assert code == 235, (code, reply)
            assert smtp.sendmail(FROM, [TO], MESSAGE) == {}
            smtp.quit()
            return challenge, response
        finally:
            smtp.close()

    @defer.inlineCallbacks
    def submit(self, user, password):
        challenge, response = yield threads.deferToThread(self.session, user, password)
        self.assertNotIn(b"charset", response)
        self.checkFamily(challenge, response, user, password)
        yield self.checkOutbox()
