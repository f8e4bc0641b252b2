"""
Tests for L{msa.lmtp}: the LMTP server (RFC 2033) that delivers return
messages into the mailboxes (R16), over a string transport with the real
Maildir store (its file work runs synchronously without a thread pool).
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.lmtp import AddressAllowlist, LMTPFactory, LMTPPolicy
from msa.mailbox import MaildirStore, Quota

MAILBOXES = {
    "retour@acme.nl": "acme",
    "ontvangst@acme.nl": "acme",
    "retour@bakker.nl": "bakker",
}


def accountFor(address: str) -> str | None:
    return MAILBOXES.get(address.lower())


MESSAGE = b"From: core@digipoort.example\r\nSubject: ack\r\n\r\nregel\r\n"


class Session:
    """
    One LMTP session on a string transport.
    """

    def __init__(self, factory: LMTPFactory) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        self.server = factory.buildProtocol(self.transport.getPeer())
        self.server.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> list[bytes]:
        lines = self.transport.value().split(b"\r\n")[:-1]
        self.transport.clear()
        return lines

    def send(self, data: bytes) -> list[bytes]:
        self.server.dataReceived(data)
        return self.take()


class LMTPTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.clock = Clock()
        self.quotas: dict[str, Quota] = {}
        self.store = MaildirStore(
            self.directory,
            reactor=self.clock,
            quotaFor=lambda account: self.quotas.get(account, Quota()),
        )
        self.factory = LMTPFactory(
            self.store,
            accountFor,
            LMTPPolicy(hostname="msa.test", maxMessageSize=1000, maxLineLength=100),
            reactor=self.clock,
        )

    def session(self) -> Session:
        session = Session(self.factory)
        self.assertEqual(session.greeting, [b"220 msa.test LMTP ready"])
        return session

    def stored(self, account: str) -> list[bytes]:
        out = []
        for entry in self.store.listMessages(account):
            with open(entry.path, "rb") as f:
                out.append(f.read())
        return out

    def transaction(self, *recipients: str, data: bytes = MESSAGE) -> list[bytes]:
        """
        LHLO, MAIL, the RCPTs and DATA pipelined in one write: every reply.
        """
        session = self.session()
        commands = b"LHLO core.test\r\nMAIL FROM:<core@digipoort.example>\r\n"
        for recipient in recipients:
            commands += b"RCPT TO:<" + recipient.encode() + b">\r\n"
        replies = session.send(commands + b"DATA\r\n" + data + b".\r\n")
        return replies[5:]  # after the LHLO reply's lines


class ProtocolTests(LMTPTestCase):
    def test_lhlo(self):
        self.assertEqual(
            self.session().send(b"LHLO core.test\r\n"),
            [
                b"250-msa.test",
                b"250-PIPELINING",
                b"250-ENHANCEDSTATUSCODES",
                b"250-8BITMIME",
                b"250 SIZE 1000",
            ],
        )

    def test_verbs(self):
        """
        Verbs are matched case-insensitively against the commands LMTP
        knows, and against nothing else (no attribute of the protocol is
        reachable by naming it).
        """
        session = self.session()
        self.assertEqual(session.send(b"noop\r\n"), [b"250 2.0.0 Ok"])
        self.assertEqual(session.send(b"Lhlo core.test\r\n")[-1], b"250 SIZE 1000")
        for verb in (
            b"lmtp_NOOP",
            b"NOOP_",
            b"_RESETTIMEOUT",
            b"HANGUP",
            b"N\xc3\xb6OP",
        ):
            self.assertEqual(
                session.send(verb + b"\r\n"),
                [b"500 5.5.2 Error: command not recognized"],
            )
        self.assertEqual(session.send(b"QUIT\r\n"), [b"221 2.0.0 Bye"])

    def test_lhloRequired(self):
        """
        HELO and EHLO are SMTP's, refused (RFC 2033 4.1); MAIL needs LHLO.
        """
        session = self.session()
        for command in (b"EHLO core.test", b"HELO core.test"):
            self.assertEqual(
                session.send(command + b"\r\n"),
                [b"500 5.5.1 This is LMTP (RFC 2033): use LHLO"],
            )
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b.nl>\r\n"),
            [b"503 5.5.1 Error: send LHLO first"],
        )
        self.assertEqual(
            session.send(b"LHLO\r\n"), [b"501 5.5.4 Syntax: LHLO hostname"]
        )

    def test_perRecipientReplies(self):
        """
        After the final dot, one reply per accepted recipient in RCPT order;
        an address of no account was refused at RCPT with 550 5.1.1 and gets
        none.  Two addresses of one account share one stored copy.
        """
        replies = self.transaction(
            "retour@acme.nl", "nobody@acme.nl", "retour@bakker.nl", "ONTVANGST@acme.nl"
        )
        self.assertEqual(
            replies[:5],
            [
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"550 5.1.1 <nobody@acme.nl>: no mailbox here for this address",
                b"250 2.1.5 Ok",
                b"250 2.1.5 Ok",
            ],
        )
        self.assertEqual(replies[5], b"354 End data with <CR><LF>.<CR><LF>")
        final = replies[6:]
        self.assertEqual(len(final), 3)
        [acme] = self.store.listMessages("acme")
        [bakker] = self.store.listMessages("bakker")
        self.assertEqual(
            final,
            [
                f"250 2.0.0 Ok: delivered as {acme.uid}".encode(),
                f"250 2.0.0 Ok: delivered as {bakker.uid}".encode(),
                f"250 2.0.0 Ok: delivered as {acme.uid}".encode(),
            ],
        )
        self.assertEqual(self.stored("acme"), [MESSAGE])
        self.assertEqual(self.stored("bakker"), [MESSAGE])
        self.assertEqual(acme.sha256, hashlib.sha256(MESSAGE).hexdigest())

    def test_dotUnstuffed(self):
        """
        The mailbox keeps the message as it was before the client's
        dot-stuffing.
        """
        text = b"Subject: x\r\n\r\n..begint met punt\r\n.\r\n"
        replies = self.transaction("retour@acme.nl", data=text[:-3])
        self.assertTrue(replies[-1].startswith(b"250 2.0.0 "), replies)
        self.assertEqual(
            self.stored("acme"), [b"Subject: x\r\n\r\n.begint met punt\r\n"]
        )

    def test_quotaPerRecipient(self):
        """
        A mailbox over its quota gets 452 4.2.2 for its recipient only; the
        others are delivered.
        """
        self.quotas["acme"] = Quota(maxMessages=1)
        self.transaction("retour@acme.nl")
        replies = self.transaction("retour@bakker.nl", "retour@acme.nl")
        self.assertEqual(replies[-2][:10], b"250 2.0.0 ")
        self.assertEqual(replies[-1], b"452 4.2.2 Mailbox full: too many messages")
        self.assertEqual(len(self.stored("acme")), 1)
        self.assertEqual(len(self.stored("bakker")), 1)

    def test_sizeLimit(self):
        session = self.session()
        session.send(b"LHLO core.test\r\n")
        self.assertEqual(
            session.send(b"MAIL FROM:<> SIZE=1001\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        big = b"Subject: x\r\n\r\n" + (b"y" * 98 + b"\r\n") * 10
        replies = self.transaction("retour@acme.nl", "retour@bakker.nl", data=big)
        self.assertEqual(
            replies[-2:],
            [b"552 5.3.4 Message size exceeds fixed maximum message size (1000)"] * 2,
        )
        self.assertEqual(self.stored("acme") + self.stored("bakker"), [])

    def test_lineTooLong(self):
        replies = self.transaction(
            "retour@acme.nl", data=b"Subject: x\r\n\r\n" + b"y" * 101 + b"\r\n"
        )
        self.assertEqual(
            replies[-1][:59],
            b"550 5.6.0 Message refused: a line is longer than 102 octets",
        )
        self.assertEqual(self.stored("acme"), [])
        replies = self.transaction(
            "retour@acme.nl", data=b"Subject: x\r\n\r\n" + b"y" * 100 + b"\r\n"
        )
        self.assertEqual(replies[-1][:10], b"250 2.0.0 ")

    def test_bareLineFeed(self):
        replies = self.transaction("retour@acme.nl", data=b"Subject: x\r\n\r\na\nb\r\n")
        self.assertEqual(replies[-1][:9], b"550 5.5.2")
        self.assertEqual(self.stored("acme"), [])

    def test_nullSenderAndSequence(self):
        """
        The core's notifications come from <>; DATA needs a recipient; a
        second transaction follows RSET in the same session.
        """
        session = self.session()
        session.send(b"LHLO core.test\r\n")
        self.assertEqual(
            session.send(b"RCPT TO:<retour@acme.nl>\r\n"),
            [b"503 5.5.1 Error: need MAIL command"],
        )
        self.assertEqual(session.send(b"MAIL FROM:<>\r\n"), [b"250 2.1.0 Ok"])
        self.assertEqual(
            session.send(b"DATA\r\n"), [b"503 5.5.1 Error: no valid recipients"]
        )
        self.assertEqual(session.send(b"RSET\r\n"), [b"250 2.0.0 Ok"])
        self.assertEqual(session.send(b"QUIT\r\n"), [b"221 2.0.0 Bye"])
        self.assertTrue(session.transport.disconnecting)

    def test_cutOffDuringData(self):
        """
        A connection lost before the final dot stores nothing.
        """
        session = self.session()
        session.send(
            b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<retour@acme.nl>\r\nDATA\r\n"
            b"Subject: half\r\n"
        )
        session.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.stored("acme"), [])

    def test_idleTimeout(self):
        session = self.session()
        self.clock.advance(LMTPPolicy().idleTimeout)
        self.assertEqual(
            session.take(), [b"421 4.4.2 msa.test Error: timeout exceeded"]
        )
        self.assertTrue(session.transport.disconnecting)


class AllowlistTests(unittest.TestCase):
    def test_networks(self):
        allow = AddressAllowlist(["192.0.2.0/24", "2001:db8::1"])
        self.assertTrue(allow.allows("192.0.2.7"))
        self.assertTrue(allow.allows("::ffff:192.0.2.7"))
        self.assertTrue(allow.allows("2001:db8::1"))
        self.assertFalse(allow.allows("192.0.3.1"))
        self.assertFalse(allow.allows("2001:db8::2"))
        self.assertFalse(allow.allows("not an address"))

    def test_factoryRefusesOthers(self):
        """
        A TCP client from outside the allowlist gets no session at all; a
        unix-socket client is judged by the socket's permissions.
        """
        factory = LMTPFactory(
            MaildirStore(self.mktemp(), reactor=Clock()),
            accountFor,
            allowlist=AddressAllowlist(["127.0.0.1"]),
            reactor=Clock(),
        )
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5)))
        self.assertIsNone(factory.buildProtocol(IPv6Address("TCP", "::2", 5)))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5)))
        self.assertIsNotNone(factory.buildProtocol(UNIXAddress(None)))


class _SlowStore:
    """
    An L{IMailboxStore} whose deliveries wait until the test fires them.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[str, bytes, defer.Deferred]] = []
        #: The audit fields of each delivery.
        self.auditFields: list[dict] = []

    def deliver(self, account, source, size, sha256, auditFields=None):
        d: defer.Deferred = defer.Deferred()
        self.auditFields.append(auditFields)
        self.pending.append((account, source.read(), d))
        return d


class PipeliningTests(unittest.TestCase):
    def test_repliesWaitForTheMailboxes(self):
        """
        Commands pipelined after the final dot are answered only after the
        message's per-recipient replies, which wait for the mailboxes: no
        250 goes out before the store has the message.
        """
        clock = Clock()
        store = _SlowStore()
        factory = LMTPFactory(store, accountFor, reactor=clock)
        session = Session(factory)
        replies = session.send(
            b"LHLO core.test\r\nMAIL FROM:<>\r\nRCPT TO:<retour@acme.nl>\r\n"
            b"RCPT TO:<retour@bakker.nl>\r\nDATA\r\n" + MESSAGE + b".\r\n"
            b"MAIL FROM:<>\r\nNOOP\r\n"
        )
        self.assertEqual(replies[-1], b"354 End data with <CR><LF>.<CR><LF>")
        self.assertEqual(
            [(account, data) for account, data, _ in store.pending],
            [("acme", MESSAGE), ("bakker", MESSAGE)],
        )
        # The delivery records name the core by its TCP address.
        self.assertEqual(
            [fields["client"] for fields in store.auditFields], ["127.0.0.1"] * 2
        )
        store.pending[1][2].callback("uid-bakker")
        self.assertEqual(session.take(), [])
        store.pending[0][2].errback(Failure(SMTPReply(452, "4.2.2", "Mailbox full")))
        self.assertEqual(
            session.take(),
            [
                b"452 4.2.2 Mailbox full",
                b"250 2.0.0 Ok: delivered as uid-bakker",
                b"250 2.1.0 Ok",
                b"250 2.0.0 Ok",
            ],
        )
