"""
Tests for L{msa.accounts.mailboxes}: which account's mailbox receives a
return message, and its quota.
"""

from twisted.trial import unittest

from msa.accounts.mailboxes import MailboxDirectory, MailboxSettings, mailboxClaims
from msa.mailbox import Quota
from msa.testing import testAccount


class SettingsTests(unittest.TestCase):
    def test_valid(self):
        settings = MailboxSettings.fromExtra(
            {"mailboxes": ["retour@acme.nl", "@acme.example"], "mailboxMaxBytes": 10}
        )
        self.assertTrue(settings.addresses.matches("RETOUR@acme.nl"))
        self.assertTrue(settings.addresses.matches("x@acme.example"))
        self.assertEqual((settings.maxBytes, settings.maxMessages), (10, None))

    def test_invalid(self):
        for extra, message in [
            ({"mailboxes": "retour@acme.nl"}, "key 'mailboxes' must be a list"),
            ({"mailboxes": ["acme.nl"]}, "key 'mailboxes': 'acme.nl' is neither"),
            ({"mailboxMaxBytes": 0}, "key 'mailboxMaxBytes' must be a positive"),
            ({"mailboxMaxMessages": True}, "key 'mailboxMaxMessages' must be a posi"),
        ]:
            with self.assertRaises(ValueError) as caught:
                MailboxSettings.fromExtra(extra)
            self.assertTrue(str(caught.exception).startswith(message), caught.exception)


class DirectoryTests(unittest.TestCase):
    def setUp(self):
        self.accounts = [
            testAccount("acme", {"mailboxes": ["@acme.nl"], "mailboxMaxMessages": 5}),
            testAccount("boss", {"mailboxes": ["baas@acme.nl"]}),
            testAccount("plain", {}),
        ]
        self.directory = MailboxDirectory(
            lambda: self.accounts, Quota(maxBytes=1000, maxMessages=100)
        )

    def test_accountFor(self):
        """
        An exact address wins over a domain; case does not matter; an
        address of no account has none.
        """
        self.assertEqual(self.directory.accountFor("retour@ACME.nl"), "acme")
        self.assertEqual(self.directory.accountFor("Baas@acme.nl"), "boss")
        self.assertIsNone(self.directory.accountFor("retour@bakker.nl"))

    def test_quota(self):
        self.assertEqual(
            self.directory.quotaFor("acme"), Quota(maxBytes=1000, maxMessages=5)
        )
        self.assertEqual(
            self.directory.quotaFor("plain"), Quota(maxBytes=1000, maxMessages=100)
        )

    def test_followsReload(self):
        self.assertIsNone(self.directory.accountFor("x@new.nl"))
        self.accounts = self.accounts + [testAccount("new", {"mailboxes": ["@new.nl"]})]
        self.assertEqual(self.directory.accountFor("x@new.nl"), "new")

    def test_claims(self):
        self.assertEqual(
            mailboxClaims(self.accounts, exceptAccount="boss"), {"@acme.nl": "acme"}
        )
