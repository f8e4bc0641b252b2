# -*- test-case-name: tests.test_accounts -*-
"""
Tests for L{msa.accounts.model}: the accounts, their secrets and the file
they live in.  The live store is tested in L{tests.test_filestore}, the cred
checker and realm in L{tests.test_checkers}.
"""

import base64
import hashlib
import json
import os
import re
import stat

import attrs
from twisted.trial import unittest

from msa.accounts.model import (
    DEFAULT_MECHANISMS,
    Account,
    AccountsFileError,
    makeAccount,
    parseAccounts,
    readAccounts,
    verifyPassword,
    writeAccounts,
)
from msa.accounts.passwords import hashPassword
from msa.sasl.digest_md5 import computeHA1
from msa.sasl.scram import deriveKeys

REALM = "mail.example.org"


def expectedHA1(username: str, realm: str, password: str) -> bytes:
    return hashlib.md5(f"{username}:{realm}:{password}".encode("latin-1")).digest()


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


class MechanismSecretsTests(unittest.TestCase):
    """
    The secrets L{makeAccount} stores are those the real mechanisms compute.
    """

    def setUp(self):
        self.alice = makeAccount("alice", "pw-alice", [REALM])

    def test_realDigestMD5(self):
        """
        The stored H(A1) is L{msa.sasl.digest_md5.computeHA1}'s.
        """
        self.assertEqual(
            (computeHA1("alice", REALM, "pw-alice").hex(),),
            self.alice.digestHA1[REALM],
        )

    def test_realScram(self):
        """
        The stored SCRAM keys are L{msa.sasl.scram.deriveKeys}'s.
        """
        keys = self.alice.scram["SCRAM-SHA-256"]
        stored, server = deriveKeys(
            "pw-alice", base64.b64decode(keys["salt"]), keys["iterations"]
        )
        self.assertEqual(base64.b64encode(stored).decode(), keys["storedKey"])
        self.assertEqual(base64.b64encode(server).decode(), keys["serverKey"])


class DefaultsTests(unittest.TestCase):
    def test_defaultMechanisms(self):
        self.assertEqual(
            DEFAULT_MECHANISMS,
            frozenset({"PLAIN", "LOGIN", "DIGEST-MD5", "SCRAM-SHA-256"}),
        )
        self.assertIsInstance(Account("x").mechanisms, frozenset)


class AuthorizationFieldTests(unittest.TestCase):
    def test_badFieldNamesAccountAndKey(self):
        from msa.accounts.model import AccountsFileError, parseAccounts

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
