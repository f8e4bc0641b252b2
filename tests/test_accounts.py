"""
Tests for L{msa.accounts}: the accounts file, its store, checker and realm.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import stat

import attrs
import scramp
from puresasl.client import SASLClient
from scramp import ScramMechanism
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest
from zope.interface import Interface, implementer

from msa.accounts import (
    DEFAULT_MECHANISMS,
    Account,
    AccountsFileError,
    hashPassword,
    makeAccount,
    parseAccounts,
    readAccounts,
    verifyPassword,
    writeAccounts,
)
from msa.accountstore import AccountFile
from msa.checkers import AccountChecker, SubmissionRealm
from msa.interfaces import (
    IDigestMD5Credentials,
    IMechanismCredentials,
    IScramCredentials,
    ISubmission,
)
from msa.sasl import MechanismContext, UsernamePassword
from msa.sasl.digest_md5 import DigestMD5Mechanism
from msa.sasl.scram import ScramSHA256Mechanism

REALM = "mail.example.org"


def expectedHA1(username: str, realm: str, password: str) -> bytes:
    return hashlib.md5(f"{username}:{realm}:{password}".encode("latin-1")).digest()


@implementer(IDigestMD5Credentials, IMechanismCredentials)
class FakeDigestCredentials:
    """
    What a DIGEST-MD5 exchange by a client knowing C{password} yields.
    """

    def __init__(self, username, realm, password, mechanism="DIGEST-MD5"):
        self.username = username
        self.realm = realm
        self.mechanism = mechanism
        self._secret = expectedHA1(username, realm, password)

    def checkHA1(self, ha1):
        return hmac.compare_digest(ha1, self._secret)


@implementer(IScramCredentials, IMechanismCredentials)
class FakeScramCredentials:
    """
    What a SCRAM-SHA-256 exchange by a client knowing C{password} yields;
    the keys are derived independently with scramp.
    """

    def __init__(self, store, username, password, mechanism="SCRAM-SHA-256"):
        self.username = username
        self.mechanism = mechanism
        parameters = store.scramParameters(username, mechanism)
        salt, iterations = parameters if parameters else (b"salt" * 4, 4096)
        info = ScramMechanism("SCRAM-SHA-256").make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
        self._keys = info[1], info[2]

    def checkKeys(self, storedKey, serverKey):
        return hmac.compare_digest(storedKey, self._keys[0]) and hmac.compare_digest(
            serverKey, self._keys[1]
        )


class FileTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(self.mktemp(), "accounts.json")
        os.makedirs(os.path.dirname(self.path))
        self.alice = makeAccount("alice", "s3cret pw", [REALM])

    def test_roundTrip(self):
        """
        Accounts read back equal to what was written, C{extra} included.
        """
        alice = attrs.evolve(
            self.alice, extra={"senders": ["a@example.org"], "messagesPerDay": 5}
        )
        bob = makeAccount("bob", "pw", [], mechanisms=["plain"])
        bob = attrs.evolve(bob, enabled=False)
        writeAccounts(self.path, {"alice": alice, "bob": bob})
        self.assertEqual(readAccounts(self.path), {"alice": alice, "bob": bob})
        self.assertEqual(bob.mechanisms, frozenset({"PLAIN"}))
        self.assertEqual(bob.digestHA1, {})
        self.assertEqual(bob.scram, {})

    def test_format(self):
        """
        The file is indented JSON with sorted keys, version 1.
        """
        writeAccounts(self.path, {"alice": self.alice})
        with open(self.path) as f:
            text = f.read()
        document = json.loads(text)
        self.assertEqual(document["version"], 1)
        self.assertEqual(text, json.dumps(document, indent=2, sort_keys=True) + "\n")
        entry = document["accounts"]["alice"]
        self.assertEqual(
            sorted(entry),
            ["digestHA1", "enabled", "mechanisms", "passwordHash", "scram"],
        )
        scramKeys = sorted(entry["scram"]["SCRAM-SHA-256"])
        self.assertEqual(scramKeys, ["iterations", "salt", "serverKey", "storedKey"])

    def test_mode(self):
        """
        The file has mode 0600 after a write, even over a 0644 file, and no
        temporary file is left behind.
        """
        with open(self.path, "w") as f:
            f.write("{}")
        os.chmod(self.path, 0o644)
        writeAccounts(self.path, {"alice": self.alice})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["accounts.json"])

    def test_noPlaintext(self):
        """
        The password appears nowhere in the file.
        """
        writeAccounts(self.path, {"alice": self.alice})
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertNotIn(b"s3cret", data)
        self.assertNotIn(base64.b64encode(b"s3cret pw"), data)

    def test_scryptFormat(self):
        """
        Password hashes are C{scrypt$16384$8$1$<16 byte salt>$<hash>}, salted
        afresh each time, and L{verifyPassword} checks them.
        """
        h = self.alice.passwordHash
        match = re.fullmatch(
            r"scrypt\$16384\$8\$1\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)", h
        )
        self.assertIsNotNone(match)
        salt, digest = (base64.b64decode(g) for g in match.groups())
        self.assertEqual(len(salt), 16)
        expected = hashlib.scrypt(b"s3cret pw", salt=salt, n=2**14, r=8, p=1, dklen=32)
        self.assertEqual(digest, expected)
        self.assertNotEqual(hashPassword("s3cret pw"), h)
        self.assertTrue(verifyPassword(self.alice, "s3cret pw"))
        self.assertFalse(verifyPassword(self.alice, "s3cret pW"))

    def test_makeAccountChecks(self):
        """
        Empty passwords, unusable names and unknown mechanisms are refused.
        """
        self.assertRaises(ValueError, makeAccount, "x", "", [])
        self.assertRaises(ValueError, makeAccount, " x", "pw", [])
        self.assertRaises(ValueError, makeAccount, "x\n", "pw", [])
        self.assertRaises(ValueError, makeAccount, "x", "pw", [], ["CRAM-MD5"])
        self.assertRaises(ValueError, self.alice.withPassword, "", [])

    def test_withPasswordAndMechanisms(self):
        """
        L{Account.withPassword} renews every secret and keeps the rest;
        L{Account.withMechanisms} drops the secrets of dropped mechanisms.
        """
        alice = attrs.evolve(self.alice, extra={"maxRecipients": 1}, enabled=False)
        renewed = alice.withPassword("new", ["a", "b"])
        self.assertEqual(
            (renewed.enabled, renewed.extra), (False, {"maxRecipients": 1})
        )
        self.assertEqual(sorted(renewed.digestHA1), ["a", "b"])
        self.assertEqual(
            renewed.digestHA1["a"], (expectedHA1("alice", "a", "new").hex(),)
        )
        self.assertTrue(verifyPassword(renewed, "new"))
        fewer = renewed.withMechanisms(["plain"])
        self.assertEqual(fewer.mechanisms, frozenset({"PLAIN"}))
        self.assertEqual((fewer.digestHA1, fewer.scram), ({}, {}))
        self.assertEqual(fewer.passwordHash, renewed.passwordHash)

    def test_malformedJSON(self):
        """
        A file that is not JSON is refused with its name in the message.
        """
        with open(self.path, "w") as f:
            f.write('{"version": 1, "accounts": {')
        e = self.assertRaises(AccountsFileError, readAccounts, self.path)
        self.assertIn(self.path, str(e))
        self.assertIn("not valid JSON", str(e))

    def test_missingKey(self):
        """
        A missing key is reported with the file, the account and the key.
        """
        writeAccounts(self.path, {"alice": self.alice})
        with open(self.path) as f:
            document = json.load(f)
        del document["accounts"]["alice"]["passwordHash"]
        with open(self.path, "w") as f:
            json.dump(document, f)
        e = self.assertRaises(AccountsFileError, readAccounts, self.path)
        self.assertIn(self.path, str(e))
        self.assertIn("'alice'", str(e))
        self.assertIn("'passwordHash'", str(e))

    def test_badValues(self):
        """
        Wrong types, bad versions and bad secrets are reported.
        """
        writeAccounts(self.path, {"a": attrs.evolve(self.alice, name="a")})
        with open(self.path) as f:
            good = json.load(f)
        parseAccounts(json.dumps(good).encode())
        cases = [
            ({"version": 2}, "version"),
            ({"accounts": []}, "'accounts'"),
            ({"enabled": "yes"}, "'enabled'"),
            ({"mechanisms": ["plain"]}, "'mechanisms'"),
            ({"passwordHash": "s3cret pw"}, "'passwordHash'"),
            ({"digestHA1": {REALM: "xyz"}}, "'digestHA1'"),
            ({"scram": {"SCRAM-SHA-256": {"salt": "AA=="}}}, "'scram'"),
        ]
        for change, expected in cases:
            document = json.loads(json.dumps(good))
            if "version" in change or "accounts" in change:
                target = document
            else:
                target = document["accounts"]["a"]
            target.update(change)
            e = self.assertRaises(
                AccountsFileError, parseAccounts, json.dumps(document).encode(), "F"
            )
            self.assertIn(expected, str(e))
            self.assertTrue(str(e).startswith("F: "), str(e))


class AccountFileTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")
        os.makedirs(os.path.dirname(self.path))
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        writeAccounts(self.path, {"alice": self.alice})

    def test_load(self):
        store = AccountFile(self.path)
        self.assertEqual(store.getAccount("alice"), self.alice)
        self.assertIsNone(store.getAccount("bob"))

    def test_refuseLooseMode(self):
        """
        A file readable by others is refused, saying why and how to fix it.
        """
        os.chmod(self.path, 0o644)
        e = self.assertRaises(AccountsFileError, AccountFile, self.path)
        self.assertIn(self.path, str(e))
        self.assertIn("0644", str(e))
        self.assertIn("chmod 600", str(e))

    def test_missingFile(self):
        e = self.assertRaises(AccountsFileError, AccountFile, self.path + ".no")
        self.assertIn(self.path + ".no", str(e))

    def test_reloadKeepsLastGood(self):
        """
        A malformed file or a loose mode on reload is logged and the accounts
        read last stay in use.
        """
        store = AccountFile(self.path)
        with open(self.path, "w") as f:
            f.write("not json")
        with capturedLogs() as events:
            self.assertFalse(store.reload())
        self.assertEqual(store.getAccount("alice"), self.alice)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "error")
        self.assertIn(self.path, events[0]["error"])
        writeAccounts(self.path, {})
        os.chmod(self.path, 0o640)
        self.assertFalse(store.reload())
        self.assertEqual(store.getAccount("alice"), self.alice)
        os.chmod(self.path, 0o600)
        self.assertTrue(store.reload())
        self.assertIsNone(store.getAccount("alice"))

    def test_watching(self):
        """
        L{AccountFile.startWatching} polls the file on the given reactor and
        reloads it when it changes, and only then.
        """
        clock = Clock()
        store = AccountFile(self.path, reactor=clock)
        reloads = []
        original = store.reload
        store.reload = lambda: reloads.append(1) or original()
        d = store.startWatching(2.0)
        clock.advance(2)
        self.assertEqual(reloads, [])
        bob = makeAccount("bob", "pw-bob", [], ["PLAIN"])
        writeAccounts(self.path, {"bob": bob})
        clock.advance(1)
        self.assertIsNone(store.getAccount("bob"))
        clock.advance(1)
        self.assertEqual(store.getAccount("bob"), bob)
        self.assertEqual(reloads, [1])
        # A touch (new mtime, same contents) is noticed too.
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        clock.advance(2)
        self.assertEqual(reloads, [1, 1])
        # A broken file is reported once, not on every poll.
        with open(self.path, "w") as f:
            f.write("{")
        with capturedLogs() as events:
            clock.advance(2)
            clock.advance(2)
        self.assertEqual(len(events), 1)
        self.assertEqual(store.getAccount("bob"), bob)
        store.stopWatching()
        self.assertEqual(clock.getDelayedCalls(), [])
        return d

    def test_scramParameters(self):
        store = AccountFile(self.path)
        salt, iterations = store.scramParameters("alice", "SCRAM-SHA-256")
        keys = self.alice.scram["SCRAM-SHA-256"]
        self.assertEqual(salt, base64.b64decode(keys["salt"]))
        self.assertEqual(iterations, keys["iterations"])
        self.assertEqual(len(salt), 16)
        self.assertIsNone(store.scramParameters("bob", "SCRAM-SHA-256"))
        self.assertIsNone(store.scramParameters("alice", "SCRAM-SHA-1"))


class DictStore:
    def __init__(self, *accounts):
        self.accounts = {a.name: a for a in accounts}

    def getAccount(self, name):
        return self.accounts.get(name)

    def scramParameters(self, username, mechanism):
        account = self.accounts.get(username)
        keys = account and account.scram.get(mechanism)
        return keys and (base64.b64decode(keys["salt"]), keys["iterations"])


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        self.plainOnly = makeAccount("plain", "pw-plain", [REALM], ["PLAIN"])
        self.disabled = attrs.evolve(
            makeAccount("off", "pw-off", [REALM]), enabled=False
        )
        self.store = DictStore(self.alice, self.plainOnly, self.disabled)
        self.checker = AccountChecker(self.store, threaded=False)

    def assertAccepted(self, credentials, name):
        self.assertEqual(
            self.successResultOf(self.checker.requestAvatarId(credentials)), name
        )

    def assertRefused(self, credentials):
        failure = self.failureResultOf(
            self.checker.requestAvatarId(credentials), UnauthorizedLogin
        )
        self.assertEqual(str(failure.value), "Authentication failed")

    def test_passwordMechanisms(self):
        for mechanism in ("PLAIN", "LOGIN"):
            self.assertAccepted(
                UsernamePassword("alice", "pw-alice", mechanism), "alice"
            )
            self.assertRefused(UsernamePassword("alice", "pw-alicE", mechanism))
        self.assertAccepted(UsernamePassword("plain", "pw-plain", "PLAIN"), "plain")

    def test_refusals(self):
        """
        Unknown users, disabled accounts and mechanisms the account may not
        use are refused just like a wrong password.
        """
        self.assertRefused(UsernamePassword("nobody", "pw-alice", "PLAIN"))
        self.assertRefused(UsernamePassword("off", "pw-off", "PLAIN"))
        self.assertRefused(UsernamePassword("plain", "pw-plain", "LOGIN"))
        self.assertRefused(FakeDigestCredentials("plain", REALM, "pw-plain"))
        self.assertRefused(FakeScramCredentials(self.store, "plain", "pw-plain"))
        self.assertRefused(FakeDigestCredentials("off", REALM, "pw-off"))
        self.assertRefused(FakeScramCredentials(self.store, "off", "pw-off"))

    def test_unknownUserCostsScrypt(self):
        """
        An unknown user's password is still run through scrypt.
        """
        import msa.passwordcheck

        calls = []
        original = msa.passwordcheck._scrypt
        self.patch(
            msa.passwordcheck, "_scrypt", lambda *a: calls.append(a) or original(*a)
        )
        self.assertRefused(UsernamePassword("nobody", "pw", "PLAIN"))
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0][2:5], (2**14, 8, 1))

    def test_digestMD5(self):
        self.assertAccepted(FakeDigestCredentials("alice", REALM, "pw-alice"), "alice")
        self.assertRefused(FakeDigestCredentials("alice", REALM, "wrong"))
        self.assertRefused(FakeDigestCredentials("alice", "other.realm", "pw-alice"))
        self.assertRefused(FakeDigestCredentials("nobody", REALM, "pw-alice"))

    def test_scram(self):
        self.assertAccepted(
            FakeScramCredentials(self.store, "alice", "pw-alice"), "alice"
        )
        self.assertRefused(FakeScramCredentials(self.store, "alice", "wrong"))
        self.assertRefused(FakeScramCredentials(self.store, "nobody", "pw-alice"))
        withoutKeys = attrs.evolve(self.alice, scram={})
        self.store.accounts["alice"] = withoutKeys
        self.assertRefused(FakeScramCredentials(self.store, "alice", "pw-alice"))

    def test_noMechanism(self):
        """
        Credentials that do not say which mechanism made them are refused.
        """
        credentials = UsernamePassword("alice", "pw-alice", "PLAIN")
        del credentials.mechanism
        self.assertRefused(credentials)

    def test_threaded(self):
        """
        By default scrypt runs in a thread; the results are the same.
        """
        checker = AccountChecker(self.store)
        d = checker.requestAvatarId(UsernamePassword("alice", "pw-alice", "PLAIN"))
        d.addCallback(self.assertEqual, "alice")
        d.addCallback(
            lambda _: checker.requestAvatarId(UsernamePassword("alice", "x", "PLAIN"))
        )
        return self.assertFailure(d, UnauthorizedLogin)

    def test_realDigestMD5(self):
        """
        The stored H(A1) is L{msa.sasl.digest_md5.computeHA1}'s.
        """
        from msa.sasl.digest_md5 import computeHA1

        self.assertEqual(
            (computeHA1("alice", REALM, "pw-alice").hex(),),
            self.alice.digestHA1[REALM],
        )

    def test_realScram(self):
        """
        The stored SCRAM keys are L{msa.sasl.scram.deriveKeys}'s.
        """
        from msa.sasl.scram import deriveKeys

        keys = self.alice.scram["SCRAM-SHA-256"]
        stored, server = deriveKeys(
            "pw-alice", base64.b64decode(keys["salt"]), keys["iterations"]
        )
        self.assertEqual(base64.b64encode(stored).decode(), keys["storedKey"])
        self.assertEqual(base64.b64encode(server).decode(), keys["serverKey"])


class RealMechanismTests(unittest.TestCase):
    """
    Whole exchanges with the real mechanisms and independent clients, checked
    by L{AccountChecker} against an L{AccountFile}.
    """

    def setUp(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")
        os.makedirs(os.path.dirname(path))
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        writeAccounts(path, {"alice": self.alice})
        self.store = AccountFile(path)
        self.checker = AccountChecker(self.store, threaded=False)
        self.context = MechanismContext(
            realm=REALM,
            serverNames=[REALM],
            scramParameters=self.store.scramParameters,
        )

    def scram(self, username, password):
        client = scramp.ScramClient(["SCRAM-SHA-256"], username, password)
        mechanism = ScramSHA256Mechanism(self.context)
        first = mechanism.start(client.get_client_first().encode()).data
        client.set_server_first(first.decode())
        result = mechanism.respond(client.get_client_final().encode())
        return self.checker.requestAvatarId(result.credentials)

    def digest(self, username, password):
        client = SASLClient(
            REALM, "smtp", mechanism="DIGEST-MD5", username=username, password=password
        )
        mechanism = DigestMD5Mechanism(self.context)
        response = client.process(mechanism.start(None).data)
        credentials = mechanism.respond(response).credentials
        return self.checker.requestAvatarId(credentials)

    def test_scram(self):
        self.assertEqual(self.successResultOf(self.scram("alice", "pw-alice")), "alice")
        self.failureResultOf(self.scram("alice", "pw-bob"), UnauthorizedLogin)
        self.failureResultOf(self.scram("bob", "pw-alice"), UnauthorizedLogin)

    def test_digestMD5(self):
        self.assertEqual(
            self.successResultOf(self.digest("alice", "pw-alice")), "alice"
        )
        self.failureResultOf(self.digest("alice", "pw-bob"), UnauthorizedLogin)
        self.failureResultOf(self.digest("bob", "pw-alice"), UnauthorizedLogin)

    def test_portal(self):
        """
        Through a L{Portal}: PLAIN logs in and yields the factory's avatar.
        """
        realm = SubmissionRealm(self.store, lambda account: ("avatar", account.name))
        portal = Portal(realm, [self.checker])
        credentials = UsernamePassword("alice", "pw-alice", "PLAIN")
        d = portal.login(credentials, None, ISubmission)
        interface, avatar, logout = self.successResultOf(d)
        self.assertEqual((interface, avatar), (ISubmission, ("avatar", "alice")))
        bad = UsernamePassword("alice", "nope", "PLAIN")
        self.failureResultOf(portal.login(bad, None, ISubmission), UnauthorizedLogin)


class IOther(Interface):
    pass


class RealmTests(unittest.TestCase):
    def setUp(self):
        self.alice = makeAccount("alice", "pw", [], ["PLAIN"])
        self.made = []
        self.realm = SubmissionRealm(DictStore(self.alice), self.factory)

    def factory(self, account):
        avatar = attrs.make_class("Avatar", ["account", "loggedOut"])(account, False)
        self.made.append(avatar)
        return avatar

    def test_avatar(self):
        interface, avatar, logout = self.realm.requestAvatar("alice", None, ISubmission)
        self.assertIs(interface, ISubmission)
        self.assertEqual(self.made, [avatar])
        self.assertIs(avatar.account, self.alice)
        logout()

    def test_logout(self):
        """
        The avatar's own C{logout}, if it has one, is called on logout.
        """
        calls = []

        def factory(account):
            return attrs.make_class("A", ["logout"])(lambda: calls.append(account.name))

        self.realm = SubmissionRealm(DictStore(self.alice), factory)
        self.realm.requestAvatar(b"alice", None, IOther, ISubmission)[2]()
        self.assertEqual(calls, ["alice"])

    def test_otherInterface(self):
        self.assertRaises(
            NotImplementedError, self.realm.requestAvatar, "alice", None, IOther
        )

    def test_goneAccount(self):
        self.assertRaises(
            UnauthorizedLogin, self.realm.requestAvatar, "bob", None, ISubmission
        )


class DefaultsTests(unittest.TestCase):
    def test_defaultMechanisms(self):
        self.assertEqual(
            DEFAULT_MECHANISMS,
            frozenset({"PLAIN", "LOGIN", "DIGEST-MD5", "SCRAM-SHA-256"}),
        )
        self.assertIsInstance(Account("x").mechanisms, frozenset)


class AuthorizationFieldTests(unittest.TestCase):
    def test_badFieldNamesAccountAndKey(self):
        from msa.accounts import AccountsFileError, parseAccounts

        document = {
            "version": 1,
            "accounts": {
                "acme": {
                    "enabled": True,
                    "mechanisms": ["PLAIN"],
                    "passwordHash": makeAccount("acme", "pw", []).passwordHash,
                    "maxRecipients": "many",
                }
            },
        }
        error = self.assertRaises(
            AccountsFileError, parseAccounts, json.dumps(document).encode(), "acc.json"
        )
        self.assertIn("acc.json", str(error))
        self.assertIn("acme", str(error))
        self.assertIn("maxRecipients", str(error))
