"""
Tests for L{msa.admin}, the C{digipoort-msa-admin} program.
"""

import io
import os
import stat
import sys

import attrs
from twisted.trial import unittest

from msa import admin
from msa.accounts import readAccounts, verifyPassword, writeAccounts


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class AdminTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")

    def runAdmin(self, *argv, stdin="", base=None):
        """
        Run the program with C{stdin} as standard input.

        @return: the exit code, stdout and stderr.
        """
        if base is None:
            base = ["--accounts", self.path, "--realm", "mail.example.org"]
        stdout, stderr = io.StringIO(), io.StringIO()
        if isinstance(stdin, str):
            stdin = io.StringIO(stdin)
        self.patch(sys, "stdin", stdin)
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        code = admin.main([*base, *argv])
        return code, stdout.getvalue(), stderr.getvalue()

    def test_roundTrip(self):
        """
        add, list, show, passwd, disable, enable and remove work together.
        """
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin="first pw\n")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        alice = readAccounts(self.path)["alice"]
        self.assertTrue(verifyPassword(alice, "first pw"))
        self.assertEqual(sorted(alice.digestHA1), ["mail.example.org"])
        bob = ["accounts", "add", "bob", "--mechanisms", "plain,login", "--disabled"]
        code, out, err = self.runAdmin(*bob, stdin="bob pw\n")
        self.assertEqual(code, 0, err)

        code, out, err = self.runAdmin("accounts", "list")
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            [
                "alice\tenabled\tDIGEST-MD5,LOGIN,PLAIN,SCRAM-SHA-256",
                "bob\tdisabled\tLOGIN,PLAIN",
            ],
        )

        code, out, err = self.runAdmin("accounts", "show", "alice")
        self.assertEqual(code, 0)
        self.assertIn("enabled: yes", out)
        self.assertIn("password hash: set", out)
        self.assertIn("DIGEST-MD5 secret: set for realm(s) mail.example.org", out)
        self.assertIn("SCRAM-SHA-256 keys: set (4096 iterations)", out)
        self.assertNotIn("scrypt$", out)
        for secret in alice.digestHA1.values():
            self.assertNotIn(secret, out)
        code, out, err = self.runAdmin("accounts", "show", "bob")
        self.assertIn("DIGEST-MD5 secret: not set", out)
        self.assertIn("SCRAM-SHA-256 keys: not set", out)

        code, out, err = self.runAdmin(
            "accounts", "passwd", "alice", stdin="second pw\n"
        )
        self.assertEqual(code, 0, err)
        renewed = readAccounts(self.path)["alice"]
        self.assertTrue(verifyPassword(renewed, "second pw"))
        self.assertFalse(verifyPassword(renewed, "first pw"))
        self.assertNotEqual(renewed.digestHA1, alice.digestHA1)

        self.assertEqual(self.runAdmin("accounts", "disable", "alice")[0], 0)
        self.assertFalse(readAccounts(self.path)["alice"].enabled)
        self.assertEqual(self.runAdmin("accounts", "enable", "alice")[0], 0)
        self.assertTrue(readAccounts(self.path)["alice"].enabled)
        self.assertEqual(self.runAdmin("accounts", "remove", "bob")[0], 0)
        self.assertEqual(list(readAccounts(self.path)), ["alice"])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertNotIn(b"first pw", data)
        self.assertNotIn(b"second pw", data)

    def test_passwordNotAnArgument(self):
        """
        A password on the command line is a usage error and nothing is
        written.
        """
        for argv in [
            ("accounts", "add", "alice", "secret"),
            ("accounts", "add", "alice", "--password", "secret"),
            ("accounts", "add", "alice", "--password=secret"),
            ("accounts", "passwd", "alice", "secret"),
        ]:
            code, out, err = self.runAdmin(*argv, stdin="pw\n")
            self.assertEqual(code, 2, argv)
            self.assertIn("unrecognized arguments", err)
        self.assertFalse(os.path.exists(self.path))

    def test_emptyPassword(self):
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin="\n")
        self.assertEqual(code, 1)
        self.assertIn("empty password", err)
        self.assertFalse(os.path.exists(self.path))

    def test_terminal(self):
        """
        On a terminal the password is asked twice with getpass, and must
        match.
        """
        answers = ["tty pw", "tty pw", "one", "other"]
        self.patch(admin.getpass, "getpass", lambda prompt: answers.pop(0))
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin=FakeTerminal())
        self.assertEqual(code, 0, err)
        self.assertTrue(verifyPassword(readAccounts(self.path)["alice"], "tty pw"))
        code, out, err = self.runAdmin(
            "accounts", "passwd", "alice", stdin=FakeTerminal()
        )
        self.assertEqual(code, 1)
        self.assertIn("differ", err)
        self.assertTrue(verifyPassword(readAccounts(self.path)["alice"], "tty pw"))

    def test_unknownUser(self):
        self.runAdmin("accounts", "add", "alice", stdin="pw\n")
        for command in ("passwd", "disable", "enable", "remove", "show", "set"):
            extra = ["--mechanisms", "PLAIN"] if command == "set" else []
            code, out, err = self.runAdmin(
                "accounts", command, "bob", *extra, stdin="p\n"
            )
            self.assertEqual(code, 1, command)
            self.assertIn("no account 'bob'", err)

    def test_addExisting(self):
        self.runAdmin("accounts", "add", "alice", stdin="pw\n")
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin="pw2\n")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)
        self.assertTrue(verifyPassword(readAccounts(self.path)["alice"], "pw"))

    def test_unknownMechanism(self):
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", "--mechanisms", "CRAM-MD5", stdin="pw\n"
        )
        self.assertEqual(code, 2)
        self.assertIn("CRAM-MD5", err)

    def test_setKeepsExtra(self):
        """
        C{set --mechanisms} keeps C{extra}, drops secrets of dropped
        mechanisms and warns about mechanisms still without secrets.
        """
        self.runAdmin("accounts", "add", "alice", "--mechanisms", "PLAIN", stdin="pw\n")
        alice = readAccounts(self.path)["alice"]
        extra = {"senders": ["a@example.org"]}
        writeAccounts(self.path, {"alice": attrs.evolve(alice, extra=extra)})
        code, out, err = self.runAdmin(
            "accounts", "set", "alice", "--mechanisms", "PLAIN,SCRAM-SHA-256"
        )
        self.assertEqual(code, 0)
        self.assertIn("SCRAM-SHA-256 has no secret", err)
        self.assertIn("accounts passwd alice", err)
        changed = readAccounts(self.path)["alice"]
        self.assertEqual(changed.extra, {"senders": ["a@example.org"]})
        self.assertEqual(changed.mechanisms, {"PLAIN", "SCRAM-SHA-256"})
        code, out, err = self.runAdmin("accounts", "show", "alice")
        self.assertIn('senders: ["a@example.org"]', out)

    def test_looseModeWarned(self):
        self.runAdmin("accounts", "add", "alice", stdin="pw\n")
        os.chmod(self.path, 0o644)
        code, out, err = self.runAdmin("accounts", "list")
        self.assertEqual(code, 0)
        self.assertIn("chmod 600", err)
        self.runAdmin("accounts", "disable", "alice")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_malformedFile(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("{")
        code, out, err = self.runAdmin("accounts", "list")
        self.assertEqual(code, 1)
        self.assertIn(self.path, err)

    def test_config(self):
        """
        With C{--config} the accounts file and realm come from the server
        configuration.
        """
        base = os.path.dirname(self.path)
        os.makedirs(base)
        config = os.path.join(base, "msa.toml")
        with open(config, "w") as f:
            f.write('[server]\nsasl_realm = "conf.example"\n')
            f.write('[accounts]\nfile = "users.json"\n')
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", stdin="pw\n", base=["--config", config]
        )
        self.assertEqual(code, 0, err)
        alice = readAccounts(os.path.join(base, "users.json"))["alice"]
        self.assertEqual(list(alice.digestHA1), ["conf.example"])

    def test_badConfig(self):
        code, out, err = self.runAdmin(
            "accounts", "list", base=["--config", self.path + ".missing"]
        )
        self.assertEqual(code, 2)
        self.assertIn("--accounts", err)

    def test_defaults(self):
        """
        Without C{--accounts} or C{--config} the built-in configuration is
        used: C{msa-state/accounts.json} in the current directory, realm
        C{localhost}.
        """
        base = os.path.dirname(self.path)
        os.makedirs(base)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(base)
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", stdin="pw\n", base=[]
        )
        self.assertEqual(code, 0, err)
        path = os.path.join(base, "msa-state", "accounts.json")
        self.assertEqual(list(readAccounts(path)["alice"].digestHA1), ["localhost"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_realmFallback(self):
        """
        Without C{--realm} and without a configuration module, the realm is
        the host's fully qualified name.
        """
        self.patch(admin, "_loadConfig", lambda path: None)
        self.patch(admin.socket, "getfqdn", lambda: "host.example")
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", stdin="pw\n", base=["--accounts", self.path]
        )
        self.assertEqual(code, 0, err)
        alice = readAccounts(self.path)["alice"]
        self.assertEqual(list(alice.digestHA1), ["host.example"])
        self.assertEqual(self.runAdmin("accounts", "list", base=[])[0], 2)
