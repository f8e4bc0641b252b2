# -*- test-case-name: tests.test_accounts_e2e -*-
"""
The admin command and the running server together (issue: SASL and
accounts): an account added with C{digipoort-msa-admin} can submit at
once, a disabled one cannot, a mechanism taken away fails like a wrong
password, and a broken accounts file keeps the last good one.  Also: the
server refuses to start on an accounts file others can read.
"""

import io
import os
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.admin import command as admin
from msa.service import services, tap
from tests.e2e import RunningMSA
from tests.test_e2e import submit
from tests.waiting import waitUntil


def runAdmin(configFile: str, *args: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    import sys

    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    try:
        code = admin.main(["--config", configFile, *args])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def accountsReloaded(msa):
    """
    Wait until the running service's account store has read the accounts
    file as it is now (by its polling, or a SIGHUP): its stamp of the file
    is the file's.

    @return: a L{Deferred} that fails loudly if that does not happen.
    """
    [watcher] = [s for s in msa.service if isinstance(s, services.AccountWatcher)]
    store = watcher.store
    return waitUntil(
        lambda: store._currentStamp() == store._stamp,
        what=f"the service to read {store.path} again",
    )


class AdminRoundTripTests(unittest.TestCase):
    def setUp(self):
        self.msa = RunningMSA(self, accounts={"watch_interval": 0.1})

    def admin(self, *args, stdin=""):
        code, out, err = runAdmin(self.msa.configFile, *args, stdin=stdin)
        self.assertEqual(code, 0, err)
        return out

    def trySubmit(self, user, password, mechanism="PLAIN"):
        return threads.deferToThread(
            submit,
            port=self.msa.implicitPort,
            implicit=True,
            context=self.msa.clientContext(),
            user=user,
            password=password,
            mechanism=mechanism,
        )

    def waitForReload(self):
        return accountsReloaded(self.msa)

    @defer.inlineCallbacks
    def test_addSubmitDisableRefused(self):
        self.admin(
            "accounts",
            "add",
            "acme",
            "--sender",
            "@mijnbedrijf.nl",
            stdin="Acme s3cret!\n",
        )
        yield self.waitForReload()
        code, text = yield self.trySubmit("acme", "Acme s3cret!")
        self.assertEqual(code, 250, text)
        self.admin("accounts", "disable", "acme")
        yield self.waitForReload()
        error = yield self.assertFailure(
            self.trySubmit("acme", "Acme s3cret!"), smtplib.SMTPAuthenticationError
        )
        self.assertEqual(error.smtp_code, 535)
        self.assertEqual(error.smtp_error, b"5.7.8 Authentication credentials invalid")
        self.admin("accounts", "enable", "acme")
        self.admin("accounts", "passwd", "acme", stdin="new passw0rd\n")
        yield self.waitForReload()
        code, _ = yield self.trySubmit("acme", "new passw0rd")
        self.assertEqual(code, 250)
        error = yield self.assertFailure(
            self.trySubmit("acme", "Acme s3cret!"), smtplib.SMTPAuthenticationError
        )
        self.assertEqual(error.smtp_code, 535)

    @defer.inlineCallbacks
    def test_mechanismWithdrawn(self):
        """
        An account whose LOGIN is phased out fails LOGIN exactly as a wrong
        password would, and still passes PLAIN.
        """
        self.admin("accounts", "set", "alice", "--mechanisms", "PLAIN,SCRAM-SHA-256")
        yield self.waitForReload()
        error = yield self.assertFailure(
            self.trySubmit("alice", "wonderland", "LOGIN"),
            smtplib.SMTPAuthenticationError,
        )
        self.assertEqual(
            (error.smtp_code, error.smtp_error),
            (535, b"5.7.8 Authentication credentials invalid"),
        )
        code, _ = yield self.trySubmit("alice", "wonderland", "PLAIN")
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_brokenFileKeepsLastGood(self):
        with open(self.msa.accountsFile, "a") as f:
            f.write("{ not json")
        yield self.waitForReload()
        code, _ = yield self.trySubmit("alice", "wonderland")
        self.assertEqual(code, 250)
        self.flushLoggedErrors()


class StartRefusedTests(unittest.TestCase):
    def test_accountsReadableByOthers(self):
        msa = RunningMSA(self)
        os.chmod(msa.accountsFile, 0o644)
        options = tap.Options()
        options.parseOptions(["--config", msa.configFile])
        error = self.assertRaises(SystemExit, tap.makeService, options)
        self.assertIn(msa.accountsFile, str(error))
        self.assertIn("chmod 600", str(error))


class AuthorizationFieldsThroughAdminTests(unittest.TestCase):
    """
    The authorization fields round-trip through the admin command and take
    effect in the running server.
    """

    def setUp(self):
        self.msa = RunningMSA(self, accounts={"watch_interval": 0.1})

    def admin(self, *args, expect=0, stdin=""):
        code, out, err = runAdmin(self.msa.configFile, *args, stdin=stdin)
        self.assertEqual(code, expect, err)
        return out + err

    def test_roundTrip(self):
        self.admin(
            "accounts",
            "set",
            "alice",
            "--sender",
            "ik@mijnbedrijf.nl",
            "--sender",
            "@acme.nl",
            "--recipient",
            "@overheid.nl",
            "--max-message-size",
            "1000000",
            "--max-recipients",
            "5",
            "--messages-per-minute",
            "10",
            "--messages-per-day",
            "500",
            "--max-sessions",
            "2",
            "--require-header-from",
            "yes",
        )
        shown = self.admin("accounts", "show", "alice")
        for line in [
            'senders: ["ik@mijnbedrijf.nl", "@acme.nl"]',
            'recipients: ["@overheid.nl"]',
            "maxMessageSize: 1000000",
            "maxRecipients: 5",
            "messagesPerMinute: 10",
            "messagesPerDay: 500",
            "maxSessions: 2",
            "requireHeaderFrom: true",
        ]:
            self.assertIn(line, shown)
        self.admin("accounts", "set", "alice", "--clear", "maxSessions")
        self.assertNotIn("maxSessions", self.admin("accounts", "show", "alice"))
        out = self.admin("accounts", "set", "alice", "--sender", "nodomain", expect=2)
        self.assertIn("senders", out)
        out = self.admin("accounts", "set", "alice", "--max-recipients", "0", expect=2)
        self.assertIn("maxRecipients", out)

    @defer.inlineCallbacks
    def test_senderTakesEffect(self):
        self.admin("accounts", "set", "alice", "--sender", "@acme.nl")
        yield accountsReloaded(self.msa)
        error = yield self.assertFailure(
            threads.deferToThread(
                submit,
                port=self.msa.implicitPort,
                implicit=True,
                context=self.msa.clientContext(),
            ),
            AssertionError,
        )
        self.assertIn("553", str(error))


class HangupReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sighupReloads(self):
        """
        With polling practically off, SIGHUP alone makes the server read the
        accounts file again.
        """
        import signal

        import attrs

        from msa.accounts.model import makeAccount, readAccounts, writeAccounts

        msa = RunningMSA(self, accounts={"watch_interval": 3600})
        accounts = readAccounts(msa.accountsFile)
        accounts["carol"] = attrs.evolve(
            makeAccount("carol", "carol pass", ["localhost"]),
            extra={"senders": ["@mijnbedrijf.nl"]},
        )
        writeAccounts(msa.accountsFile, accounts)

        def login():
            return threads.deferToThread(
                submit,
                port=msa.implicitPort,
                implicit=True,
                context=msa.clientContext(),
                user="carol",
                password="carol pass",
            )

        yield self.assertFailure(login(), smtplib.SMTPAuthenticationError)
        os.kill(os.getpid(), signal.SIGHUP)
        yield accountsReloaded(msa)
        code, _ = yield login()
        self.assertEqual(code, 250)
