# -*- test-case-name: tests.test_testing -*-
"""
Tests for L{msa.testing}, written as an embedder would use it: a submission
through the harness lands in the in-memory spool byte for byte, the spool
can be told to fail a commit (the client hears 451 and nothing is queued),
and the accounts refuse a wrong password with 535 through the real realm.
"""

import email.utils

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.checkers import SubmissionRealm
from msa.delivery import Submission, submissionFactory
from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import IAccountStore, ISpool, ISpoolWriter, ISubmission
from msa.testing import (
    Harness,
    MemoryAccountStore,
    MemoryChecker,
    MemorySpool,
    dotStuff,
    memoryRealm,
    testAccount,
)

MESSAGE = b"From: <ik@mijnbedrijf.nl>\r\nSubject: aangifte\r\n\r\n.dot\r\nline\r\n"

QUEUED = [
    b"250 2.1.0 Ok",
    b"250 2.1.5 Ok",
    b"354 End data with <CR><LF>.<CR><LF>",
    b"250 2.0.0 Ok: queued as Q0001",
]


def receivedHeader(envelope: Envelope) -> bytes:
    """
    The Received header the real avatar writes for a message of the
    harness (TLS is simulated, so no cipher is named).
    """
    date = email.utils.formatdate(envelope.receivedAt, localtime=True)
    return (
        b"Received: from client.example.nl ([192.0.2.1])\r\n"
        b"\tby msa.example.nl (digipoort-msa) with ESMTPSA\r\n"
        b"\tid " + envelope.queueId.encode() + b" for <belastingdienst@overheid.nl>; "
        b"" + date.encode() + b"\r\n"
    )


class HarnessTests(unittest.TestCase):
    """
    A whole session through L{Harness} with the default in-memory accounts
    and spool.
    """

    def submit(self, h: Harness) -> list[bytes]:
        return h.submit(
            MESSAGE,
            sender=b"ik@mijnbedrijf.nl",
            recipients=[b"belastingdienst@overheid.nl"],
        )

    def test_submissionLandsInSpool(self):
        """
        After STARTTLS and AUTH PLAIN, a submitted message is queued: the
        spool holds its envelope and exactly the Received header followed by
        the message, dot-unstuffed.
        """
        h = Harness(self)
        self.assertEqual(h.login(), [b"235 2.7.0 Authentication successful"])
        self.assertTrue(h.transport.tlsStarted)
        self.assertEqual(self.submit(h), QUEUED)
        [(envelope, data)] = h.spool.committed
        self.assertEqual(envelope.queueId, "Q0001")
        self.assertEqual(envelope.sender, "ik@mijnbedrijf.nl")
        self.assertEqual(envelope.recipients, ["belastingdienst@overheid.nl"])
        self.assertEqual(envelope.account, "alice")
        self.assertEqual(data, receivedHeader(envelope) + MESSAGE)
        self.assertEqual(h.spool.messages(), [data])
        self.assertEqual(h.spool.committed[0].queueId, "Q0001")
        self.assertTrue(h.spool.writers[0].committed)
        self.assertEqual(h.command(b"QUIT"), [b"221 2.0.0 Bye"])

    def test_authLogin(self):
        """
        L{Harness.login} also speaks AUTH LOGIN.
        """
        h = Harness(self)
        self.assertEqual(
            h.login(mechanism="LOGIN"), [b"235 2.7.0 Authentication successful"]
        )
        self.assertEqual(self.submit(h), QUEUED)

    def test_failedCommit(self):
        """
        L{MemorySpool.failNextCommit} fails the next commit as the real spool
        does when the disk refuses it: the client hears the spool's 451 after
        the final dot, nothing is queued, and the following message is
        queued again.
        """
        h = Harness(self)
        h.login()
        h.spool.failNextCommit()
        replies = self.submit(h)
        self.assertEqual(
            replies[-1], b"451 4.3.0 Cannot queue the message, try again later"
        )
        self.assertEqual(h.spool.committed, [])
        self.assertFalse(h.spool.writers[0].committed)
        replies = self.submit(h)
        self.assertEqual(replies[-1], b"250 2.0.0 Ok: queued as Q0002")
        self.assertEqual(len(h.spool.committed), 1)

    def test_failedCommitOtherException(self):
        """
        A commit failing with anything but an L{SMTPReply} gives the
        server's generic temporary failure, and the failure is logged.
        """
        h = Harness(self)
        h.login()
        h.spool.failNextCommit(OSError("No space left on device"))
        replies = self.submit(h)
        self.assertEqual(
            replies[-1], b"451 4.3.0 Error: temporary local problem, try again later"
        )
        self.assertEqual(h.spool.committed, [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_failedCommitChosenReply(self):
        """
        A commit failing with an L{SMTPReply} sends that reply unchanged.
        """
        h = Harness(self)
        h.login()
        h.spool.failNextCommit(SMTPReply(452, "4.3.1", "Insufficient system storage"))
        self.assertEqual(self.submit(h)[-1], b"452 4.3.1 Insufficient system storage")
        self.assertEqual(h.spool.committed, [])

    def test_wrongPassword(self):
        """
        A wrong password is refused with 535 (after the failed-login delay,
        which the harness lets pass on its clock), with PLAIN and LOGIN.
        """
        h = Harness(self)
        self.assertEqual(
            h.login(password=b"wrong"),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(
            h.login(password=b"wrong", mechanism="LOGIN"),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(
            h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>"),
            [b"530 5.7.0 Authentication required"],
        )

    def test_unknownUser(self):
        """
        An unknown user gets the same 535 as a wrong password.
        """
        h = Harness(self, users={"bob": "builder"})
        self.assertEqual(
            h.login(b"alice", b"wonderland"),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(
            h.login(b"bob", b"builder"), [b"235 2.7.0 Authentication successful"]
        )

    def test_senderOfTheAccount(self):
        """
        The avatar is the real one: an account may only send as its
        senders, given in C{realmArgs}.
        """
        h = Harness(
            self, realmArgs={"extras": {"alice": {"senders": ["@elders.example"]}}}
        )
        h.login()
        self.assertEqual(
            self.submit(h),
            [
                b"553 5.7.1 Sender address <ik@mijnbedrijf.nl> is not owned by the "
                b"authenticated account",
                b"503 5.5.1 Error: need MAIL command",
                b"503 5.5.1 Error: need MAIL command",
            ],
        )
        self.assertEqual(h.spool.writers, [])

    def test_ownPortal(self):
        """
        An embedder's portal (here the real L{SubmissionRealm} over an
        in-memory store whose account is disabled) replaces the default
        one: the realm refuses the login with 535.
        """
        spool = MemorySpool()
        store = MemoryAccountStore([attrs.evolve(testAccount("bob"), enabled=False)])
        portal = Portal(
            SubmissionRealm(store, submissionFactory(spool, "msa.example.nl")),
            [MemoryChecker({"bob": "builder"})],
        )
        h = Harness(self, portal=portal, spool=spool)
        self.assertIs(h.spool, spool)
        self.assertEqual(
            h.login(b"bob", b"builder"),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        store.accounts["bob"] = testAccount("bob")
        self.assertEqual(
            h.login(b"bob", b"builder"), [b"235 2.7.0 Authentication successful"]
        )

    def test_withoutTestCase(self):
        """
        The harness works without a trial test case (for pytest); then
        L{Harness.close} drops the connection.
        """
        h = Harness()
        self.assertEqual(h.command(b"EHLO client.example.nl")[0], b"250-msa.example.nl")
        h.close()
        self.assertEqual(h.server.factory.registry.sessions, set())


class MemorySpoolTests(unittest.TestCase):
    """
    L{MemorySpool} keeps the contract of the real spool's writer.
    """

    def setUp(self):
        self.spool = MemorySpool()
        self.writer = self.spool.newMessage(Envelope("a@example.nl", ["b@example.nl"]))

    def test_interfaces(self):
        self.assertTrue(verifyObject(ISpool, self.spool))
        self.assertTrue(verifyObject(ISpoolWriter, self.writer))
        self.assertEqual(self.writer.queueId, "Q0001")

    def test_commit(self):
        """
        The written bytes are kept with the envelope; the commit fires with
        the queue id.
        """
        self.writer.write(b"a\r\n")
        self.writer.write(b"b\r\n")
        self.assertEqual(self.successResultOf(self.writer.commit()), "Q0001")
        [stored] = self.spool.committed
        self.assertEqual(stored, (self.writer.envelope, b"a\r\nb\r\n"))

    def test_closedAfterCommit(self):
        """
        Nothing may be written after a commit, a second commit fails, and
        an abort after it changes nothing.
        """
        self.writer.commit()
        self.assertRaises(RuntimeError, self.writer.write, b"x")
        self.failureResultOf(self.writer.commit(), RuntimeError)
        self.writer.abort()
        self.assertFalse(self.writer.aborted)
        self.assertEqual(len(self.spool.committed), 1)

    def test_abort(self):
        """
        An aborted message is never committed; aborting twice is harmless.
        """
        self.writer.write(b"a\r\n")
        self.writer.abort()
        self.writer.abort()
        self.assertTrue(self.writer.aborted)
        self.assertRaises(RuntimeError, self.writer.write, b"x")
        self.failureResultOf(self.writer.commit(), RuntimeError)
        self.assertEqual(self.spool.committed, [])

    def test_failNextCommitOnce(self):
        """
        The failure applies to the next commit only, which keeps nothing.
        """
        self.spool.failNextCommit()
        failure = self.failureResultOf(self.writer.commit(), SMTPReply)
        self.assertEqual(
            str(failure.value), "451 4.3.0 Cannot queue the message, try again later"
        )
        self.assertRaises(RuntimeError, self.writer.write, b"x")
        second = self.spool.newMessage(Envelope("a@example.nl", ["b@example.nl"]))
        self.assertEqual(self.successResultOf(second.commit()), "Q0002")
        self.assertEqual([s.queueId for s in self.spool.committed], ["Q0002"])


class AccountTests(unittest.TestCase):
    """
    The in-memory accounts and the realm made of them.
    """

    def test_interfaces(self):
        self.assertTrue(verifyObject(IAccountStore, MemoryAccountStore()))
        self.assertTrue(verifyObject(ICredentialsChecker, MemoryChecker({})))

    def test_realmGivesRealAvatar(self):
        """
        L{memoryRealm} yields the real L{Submission} avatar of the account,
        with the default senders unless others are given.
        """
        spool = MemorySpool()
        realm = memoryRealm(spool, users=["alice", "bob"], extras={"bob": {}})
        _, alice, _ = realm.requestAvatar("alice", None, ISubmission)
        self.assertIsInstance(alice, Submission)
        self.assertTrue(alice.rules.senders.matches("ik@mijnbedrijf.nl"))
        _, bob, _ = realm.requestAvatar("bob", None, ISubmission)
        self.assertFalse(bob.rules.senders.matches("ik@mijnbedrijf.nl"))


class DotStuffTests(unittest.TestCase):
    def test_dotStuff(self):
        """
        Lines starting with a dot are doubled, a missing final CRLF is
        added, and the final dot follows.
        """
        self.assertEqual(dotStuff(b".a\r\nb\r\n..c"), b"..a\r\nb\r\n...c\r\n.\r\n")
        self.assertEqual(dotStuff(b""), b".\r\n")
