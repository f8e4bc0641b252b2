"""
C{digipoort-msa-admin mailbox list|show|delete|purge} and C{accounts set
--mailbox}, against the files of a daemon started from TOML, with return
messages the daemon took over LMTP (smtplib.LMTP on its unix socket).
"""

import hashlib
import io
import json
import os
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.admin import command as admin
from msa.mailbox import MaildirStore
from tests.test_returnchannel import (
    RETURN,
    ReturnChannelMixin,
    lmtpDeliver,
    shortDirectory,
)
from tests.waiting import waitUntil


class MailboxAdminTests(ReturnChannelMixin, unittest.TestCase):
    def setUp(self):
        self.socket = os.path.join(shortDirectory(self), "lmtp.sock")
        self.startMSA(
            {"listeners": [f"unix:{self.socket}"]},
            accounts={"watch_interval": 0.2},
        )

    def runAdmin(self, *argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        code = admin.main(["--config", self.msa.configFile, *argv], stdout, stderr)
        return code, stdout.getvalue(), stderr.getvalue()

    def deliver(self, recipient: str, count: int = 1):
        """
        C{count} return messages for C{recipient}: the last reply of each.
        """

        def session():
            client = smtplib.LMTP(self.socket, timeout=10)
            client.ehlo("core.test")
            try:
                return [
                    lmtpDeliver(client, [recipient], RETURN)[-1] for _ in range(count)
                ]
            finally:
                client.quit()

        return threads.deferToThread(session)

    @defer.inlineCallbacks
    def test_listShowDeletePurge(self):
        replies = yield self.deliver("retour@acme.nl", 3)
        uids = [text.split()[-1].decode() for code, text in replies]
        code, out, err = self.runAdmin("mailbox", "list")
        self.assertEqual(code, 0, err)
        header, row = out.splitlines()
        self.assertEqual(row.split()[:3], ["acme", "3", str(3 * len(RETURN))])
        code, out, err = self.runAdmin("mailbox", "show", "acme")
        digest = hashlib.sha256(RETURN).hexdigest()
        self.assertEqual(
            [
                (line.split()[0], line.split()[1], line.split()[3])
                for line in out.splitlines()
            ],
            [(uid, str(len(RETURN)), digest) for uid in uids],
        )
        code, out, err = self.runAdmin("mailbox", "delete", "acme", uids[0])
        self.assertEqual(
            (code, out), (0, f"removed {uids[0]} from the mailbox of acme\n")
        )
        code, out, err = self.runAdmin("mailbox", "delete", "acme", uids[0])
        self.assertEqual(code, 1)
        self.assertIn(f"no message {uids[0]} in the mailbox of acme", err)
        code, out, err = self.runAdmin("mailbox", "purge", "acme", "--older-than", "1")
        self.assertEqual((code, out.splitlines()[-1]), (0, "0 message(s) removed"))
        code, out, err = self.runAdmin("mailbox", "purge", "acme")
        self.assertEqual((code, out.splitlines()[-1]), (0, "2 message(s) removed"))
        self.assertEqual(self.stored("acme"), {})
        records = self.auditRecords("mailbox-deleted")
        self.assertEqual(sorted(r["uid"] for r in records), sorted(uids))
        self.assertEqual({r["reason"] for r in records}, {"admin"})
        self.assertTrue(all(r["by"] for r in records))

    @defer.inlineCallbacks
    def test_lockedByPOP3Session(self):
        """
        While a POP3 session (here: the store's open) holds the mailbox, a
        removal fails and changes nothing.
        """
        yield self.deliver("retour@acme.nl")
        box = yield MaildirStore(self.mailboxes).open("acme")
        try:
            code, out, err = self.runAdmin("mailbox", "purge", "acme")
        finally:
            box.release()
        self.assertEqual(code, 1)
        self.assertIn("the mailbox of acme is in use by a POP3 session", err)
        self.assertEqual(len(self.stored("acme")), 1)

    @defer.inlineCallbacks
    def test_accountsSetMailbox(self):
        """
        accounts set --mailbox gives an account its mailbox addresses (the
        daemon delivers to them once it has reloaded the accounts); an
        address another account has is refused.
        """
        [(code, text)] = yield self.deliver("retour@nieuw.nl")
        self.assertEqual(code, 550)
        code, out, err = self.runAdmin(
            "accounts",
            "set",
            "alice",
            "--mailbox",
            "retour@nieuw.nl",
            "--mailbox-max-messages",
            "5",
        )
        self.assertEqual(code, 0, err)
        with open(self.msa.accountsFile) as f:
            alice = json.load(f)["accounts"]["alice"]
        self.assertEqual(
            (alice["mailboxes"], alice["mailboxMaxMessages"]), (["retour@nieuw.nl"], 5)
        )
        code, out, err = self.runAdmin(
            "accounts", "set", "bob", "--mailbox", "retour@acme.nl"
        )
        self.assertEqual(code, 1)
        self.assertIn("mailbox retour@acme.nl belongs to account acme already", err)

        @defer.inlineCallbacks
        def accepted():
            [(code, _)] = yield self.deliver("retour@nieuw.nl")
            return code == 250

        yield waitUntil(accepted, 10, "the daemon to deliver to alice's new mailbox")
        self.assertEqual(list(self.stored("alice").values()), [RETURN])
