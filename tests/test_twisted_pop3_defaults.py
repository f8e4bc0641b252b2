# -*- test-case-name: tests.test_twisted_pop3_defaults -*-
"""
Each L{twisted.mail.pop3.POP3} default that DESIGN.md lists as wrong for
the return channel, shown twice (as L{tests.test_twisted_defaults} does for
SMTP): the defect on plain Twisted, and our server in the same scenario.
"""

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.mail import pop3
from twisted.trial import unittest
from zope.interface import implementer

from tests.pop3harness import POP3Harness


class SlowSyncMailbox(pop3.Mailbox):
    """
    One message; C{sync} (the deletions) takes a while, as an fsync does.
    """

    def __init__(self):
        self.deleted = []
        self.syncing = defer.Deferred()

    def listMessages(self, i=None):
        return [10] if i is None else 10

    def getUidl(self, i):
        return b"uid1"

    def deleteMessage(self, i):
        self.deleted.append(i)

    def sync(self):
        return self.syncing


@implementer(IRealm)
class OneMailboxRealm:
    def __init__(self):
        self.mailbox = SlowSyncMailbox()

    def requestAvatar(self, avatarId, mind, *interfaces):
        return pop3.IMailbox, self.mailbox, lambda: None


def twistedServer():
    realm = OneMailboxRealm()
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")
    server = pop3.POP3()
    server.portal = Portal(realm, [checker])
    transport = StringTransport()
    server.makeConnection(transport)
    transport.clear()
    return server, transport, realm


class TwistedPOP3DefaultsTests(unittest.TestCase):
    def test_loginBeforeTLS(self):
        """
        Twisted takes USER and PASS in the clear, with no STLS to offer;
        ours answers C{-ERR} before TLS and offers STLS.
        """
        server, transport, _ = twistedServer()
        server.dataReceived(b"CAPA\r\nUSER alice\r\nPASS wonderland\r\n")
        out = transport.value()
        self.assertNotIn(b"STLS", out)
        self.assertIn(b"+OK USER accepted, send PASS", out)
        self.assertIn(b"+OK Authentication succeeded", out)
        server.connectionLost(None)

        h = POP3Harness()
        out = h.send(b"CAPA\r\nUSER alice\r\nPASS wonderland\r\n")
        self.assertIn(b"\r\nSTLS\r\n", out)
        self.assertTrue(out.endswith(b"-ERR Must issue STLS first\r\n" * 2), out)

    def test_quitBeforeDeletionsDurable(self):
        """
        Twisted answers QUIT C{+OK} while the deletions (C{sync}) are
        still on their way; ours only once they are durable.
        """
        server, transport, realm = twistedServer()
        server.dataReceived(b"USER alice\r\nPASS wonderland\r\nDELE 1\r\n")
        transport.clear()
        server.dataReceived(b"QUIT\r\n")
        self.assertEqual(transport.value(), b"+OK \r\n")
        self.assertFalse(realm.mailbox.syncing.called)
        server.connectionLost(None)

        h = POP3Harness()
        h.mailboxes.add("alice", b"Subject: x\r\n\r\ny\r\n")
        h.login()
        h.command(b"DELE 1")
        commit = defer.Deferred()
        mailbox = h.server.maildrop.mailbox
        mailbox.commitDeletions = lambda uids: commit
        self.assertEqual(h.command(b"QUIT"), b"")
        commit.callback(None)
        self.assertEqual(h.take(), b"+OK Bye, 1 message(s) deleted\r\n")

    def test_noInUse(self):
        """
        Twisted lets two sessions hold one mailbox at once; ours answers
        the second C{[IN-USE]}.
        """
        first, _, realm = twistedServer()
        second, transport, _ = twistedServer()
        second.portal = first.portal
        first.dataReceived(b"USER alice\r\nPASS wonderland\r\n")
        second.dataReceived(b"USER alice\r\nPASS wonderland\r\n")
        self.assertIn(b"+OK Authentication succeeded", transport.value())
        first.connectionLost(None)
        second.connectionLost(None)

        h = POP3Harness()
        h.login()
        h.connect()
        self.assertEqual(
            h.login(), b"-ERR [IN-USE] Mailbox in use by another session\r\n"
        )
