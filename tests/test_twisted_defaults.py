# -*- test-case-name: tests.test_twisted_defaults -*-
"""
Each Twisted default that DESIGN.md lists as wrong for an MSA, shown twice:
the defect on plain C{twisted.mail.smtp.ESMTP} / C{SMTPClient} (so that we
know the scenario really exercises it, and notice if Twisted changes), and
the behaviour of our replacement in the same scenario.
"""

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from twisted.trial import unittest
from zope.interface import implementer

from msa.relay.protocol import dotStuff
from msa.submission.framing import DataFilter
from tests.helpers import Harness, TLSStringTransport


@implementer(smtp.IMessage)
class Recorder:
    def __init__(self, log, fail=False):
        self.log = log
        self.fail = fail

    def lineReceived(self, line):
        self.log.append(line)

    def eomReceived(self):
        if self.fail:
            return defer.fail(OSError("disk full"))
        return defer.succeed(None)

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class PlainDelivery:
    def __init__(self, fail=False):
        self.messages = []
        self.fail = fail

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        def make():
            log = []
            self.messages.append(log)
            return Recorder(log, self.fail)

        return make


def plainTwisted(testCase, delivery=None, challengers=None):
    server = smtp.ESMTP(
        chal=challengers or {b"PLAIN": smtp.cred.credentials.UsernamePassword},
        contextFactory=object(),
    )
    server.delivery = delivery
    transport = TLSStringTransport()
    server.makeConnection(transport)
    testCase.addCleanup(server.setTimeout, None)
    return server, transport


def talk(server, transport, data):
    transport.clear()
    server.dataReceived(data)
    return transport.value()


class TwistedDefaultsTests(unittest.TestCase):
    def test_authBeforeTLS(self):
        server, transport = plainTwisted(self)
        self.assertIn(b"AUTH PLAIN", talk(server, transport, b"EHLO c.example.nl\r\n"))
        ours = Harness(self)
        self.assertNotIn(b"250 AUTH PLAIN LOGIN", ours.command(b"EHLO c.example.nl"))

    def test_mailBeforeAuth(self):
        server, transport = plainTwisted(self)
        talk(server, transport, b"EHLO c.example.nl\r\n")
        self.assertTrue(
            talk(server, transport, b"MAIL FROM:<a@example.nl>\r\n").startswith(b"550")
        )
        ours = Harness(self, implicitTLS=True)
        ours.command(b"EHLO c.example.nl")
        self.assertEqual(
            ours.command(b"MAIL FROM:<a@example.nl>"),
            [b"530 5.7.0 Authentication required"],
        )

    def test_bareAuthRaises(self):
        server, transport = plainTwisted(self)
        talk(server, transport, b"EHLO c.example.nl\r\n")
        self.assertRaises(IndexError, server.dataReceived, b"AUTH\r\n")
        ours = Harness(self, implicitTLS=True)
        ours.command(b"EHLO c.example.nl")
        self.assertEqual(ours.command(b"AUTH")[0][:3], b"501")

    def test_startTLSPipelinedPlaintextExecuted(self):
        server, transport = plainTwisted(self)
        talk(server, transport, b"EHLO c.example.nl\r\n")
        replies = talk(server, transport, b"STARTTLS\r\nRSET\r\n")
        self.assertIn(b"250", replies.split(b"\r\n")[1])
        ours = Harness(self)
        self.assertEqual(
            ours.send(b"STARTTLS\r\nNOOP\r\n"), [b"220 2.0.0 Ready to start TLS"]
        )

    def test_startTLSAdvertisedAfterTLS(self):
        server, transport = plainTwisted(self)
        talk(server, transport, b"EHLO c.example.nl\r\n")
        talk(server, transport, b"STARTTLS\r\n")
        # Twisted keeps the HELO state across STARTTLS (RFC 3207 4.2 says to
        # forget it): MAIL is accepted without a new EHLO.
        self.assertIsNotNone(server._helo[0])
        ours = Harness(self)
        ours.command(b"EHLO c.example.nl")
        ours.command(b"STARTTLS")
        self.assertEqual(ours.server.session.helo, "")

    def test_noSize(self):
        server, transport = plainTwisted(self)
        self.assertNotIn(b"SIZE", talk(server, transport, b"EHLO c.example.nl\r\n"))
        self.assertIn(b"250-SIZE 52428800", Harness(self).command(b"EHLO c.example.nl"))

    def test_longDataLineRunsRestAsCommands(self):
        delivery = PlainDelivery()
        server, transport = plainTwisted(self, delivery)
        talk(server, transport, b"EHLO c.example.nl\r\n")
        talk(
            server, transport, b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
        )
        talk(server, transport, b"DATA\r\n")
        self.assertIn(
            b"500 Line too long", talk(server, transport, b"x" * 20000 + b"\r\n")
        )
        # Back in command mode: the rest of the body now runs as commands.
        self.assertTrue(talk(server, transport, b"RSET\r\n").startswith(b"250"))
        ours = Harness(self)
        ours.login()
        ours.transaction()
        self.assertEqual(ours.send(b"x" * 20000 + b"\r\nNOOP\r\n"), [])

    def test_eomFailureIsPermanent(self):
        server, transport = plainTwisted(self, PlainDelivery(fail=True))
        talk(server, transport, b"EHLO c.example.nl\r\n")
        talk(
            server, transport, b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
        )
        talk(server, transport, b"DATA\r\n")
        self.assertTrue(talk(server, transport, b"x\r\n.\r\n").startswith(b"550"))
        self.flushLoggedErrors(OSError)
        # Ours answers 451 for the same failure: see
        # test_transaction.TransactionTests.test_temporarySpoolFailure.

    def test_oneMessagePerRecipient(self):
        delivery = PlainDelivery()
        server, transport = plainTwisted(self, delivery)
        talk(server, transport, b"EHLO c.example.nl\r\n")
        talk(
            server,
            transport,
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
            b"RCPT TO:<c@example.nl>\r\nDATA\r\nx\r\n.\r\n",
        )
        self.assertEqual(len(delivery.messages), 2)
        ours = Harness(self)
        ours.login()
        ours.transaction(recipients=[b"b@example.nl", b"c@example.nl"])
        ours.send(b"x\r\n.\r\n")
        self.assertEqual(len(ours.spool.writers), 1)

    def test_clientDotStuffingPerChunk(self):
        """
        Twisted stuffs each 16 KiB chunk on its own: a line starting with "."
        at the start of a chunk goes out unstuffed.
        """
        client = smtp.SMTPClient(b"c.example.nl")
        client.makeConnection(StringTransport())
        first, second = b"a" * 10 + b"\n", b".hidden\n"
        self.assertEqual(
            client.transformChunk(first) + client.transformChunk(second),
            b"a" * 10 + b"\r\n.hidden\r\n",
        )
        wire = b"a" * 10 + b"\r\n.hidden\r\n"
        self.assertTrue(dotStuff(wire).startswith(b"a" * 10 + b"\r\n..hidden\r\n"))
        client.setTimeout(None)

    def test_ourFilterAgainstPlainCommandDefaults(self):
        """
        Plain Twisted accepts a bare LF inside DATA; ours refuses it.
        """
        delivery = PlainDelivery()
        server, transport = plainTwisted(self, delivery)
        talk(server, transport, b"EHLO c.example.nl\r\n")
        talk(
            server, transport, b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
        )
        talk(server, transport, b"DATA\r\n")
        self.assertTrue(talk(server, transport, b"a\nb\r\n.\r\n").startswith(b"250"))
        self.assertIn(b"a\nb", delivery.messages[0])
        f = DataFilter(maxSize=100)
        self.assertIsNone(f.lineReceived(b"a\nb"))
        self.assertEqual(f.error.code, 550)
