# -*- test-case-name: tests.test_transaction -*-
"""
L{msa.submission.transaction.MailTransaction}: MAIL, RCPT and DATA with
their exact replies through the protocol harness, the refusals the object
returns before each command, the body's block path against the
line-by-line path, and the transaction's state (sender, recipients, the
DATA phase).
"""

from twisted.internet import defer
from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.submission.phase import SessionPhase
from tests.helpers import Harness


class TransactionTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness(self)
        self.h.login()

    def test_specExample(self):
        """
        The replies of the spec example (R7), and the spool holds one
        Received header followed by the message byte for byte.
        """
        h = self.h
        self.assertEqual(h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>"), [b"250 2.1.0 Ok"])
        self.assertEqual(
            h.command(b"RCPT TO:<belastingdienst@overheid.nl>"), [b"250 2.1.5 Ok"]
        )
        self.assertEqual(h.command(b"DATA"), [b"354 End data with <CR><LF>.<CR><LF>"])
        body = b"Subject: aangifte\r\n\r\n..dot\r\nline\r\n"
        self.assertEqual(h.send(body + b".\r\n"), [b"250 2.0.0 Ok: queued as Q0001"])
        [(envelope, data)] = h.spool.committed
        self.assertEqual(envelope.sender, "ik@mijnbedrijf.nl")
        self.assertEqual(envelope.recipients, ["belastingdienst@overheid.nl"])
        self.assertEqual(envelope.account, "alice")
        header, _, rest = data.partition(b"\r\n\t")
        self.assertTrue(header.startswith(b"Received: from client.example.nl ("))
        self.assertEqual(data.count(b"Received:"), 1)
        self.assertTrue(
            data.endswith(b"Subject: aangifte\r\n\r\n.dot\r\nline\r\n"), data
        )
        self.assertIn(b"id Q0001 for <belastingdienst@overheid.nl>;", data)
        self.assertEqual(h.command(b"QUIT"), [b"221 2.0.0 Bye"])

    def test_writtenOnceForManyRecipients(self):
        """
        Twisted makes one IMessage per recipient; the spool gets the message
        once, with every recipient in its envelope.
        """
        self.h.transaction(
            recipients=[b"b@example.nl", b"c@example.nl", b"d@example.nl"]
        )
        self.h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(len(self.h.spool.writers), 1)
        [(envelope, data)] = self.h.spool.committed
        self.assertEqual(
            envelope.recipients, ["b@example.nl", "c@example.nl", "d@example.nl"]
        )

    def test_pipelining(self):
        reply = self.h.send(
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
            b"RCPT TO:<nodomain>\r\nRCPT TO:<c@example.nl>\r\nDATA\r\n"
            b"Subject: p\r\n\r\nx\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(reply[0], b"250 2.1.0 Ok")
        self.assertEqual(reply[1], b"250 2.1.5 Ok")
        self.assertTrue(reply[2].startswith(b"553 5.1.3 "))
        self.assertEqual(
            reply[3:],
            [
                b"250 2.1.5 Ok",
                b"354 End data with <CR><LF>.<CR><LF>",
                b"250 2.0.0 Ok: queued as Q0001",
                b"250 2.0.0 Ok",
            ],
        )

    def test_sequenceErrors(self):
        self.assertEqual(
            self.h.command(b"RCPT TO:<b@example.nl>"),
            [b"503 5.5.1 Error: need MAIL command"],
        )
        self.assertEqual(
            self.h.command(b"DATA"), [b"503 5.5.1 Error: need MAIL command"]
        )
        self.h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl>"),
            [b"503 5.5.1 Error: nested MAIL command"],
        )
        self.assertEqual(
            self.h.command(b"DATA"), [b"554 5.5.1 Error: no valid recipients"]
        )
        self.assertEqual(self.h.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.h.command(b"MAIL FROM:<a@example.nl>"), [b"250 2.1.0 Ok"])

    def test_incompleteAddresses(self):
        """
        R8: an incomplete address is refused, never completed (Twisted adds
        its own host name).
        """
        for command in [
            b"MAIL FROM:<ik>",
            b"MAIL FROM:<ik@localhost>",
            b"MAIL FROM:<ik@>",
            b"MAIL FROM:<@mijnbedrijf.nl>",
            b"MAIL FROM:<ik@@mijnbedrijf.nl>",
            b"MAIL FROM:<ik@mijnbedrijf..nl>",
            b"MAIL FROM:<ik@-x.nl>",
        ]:
            reply = self.h.command(command)
            self.assertEqual(len(reply), 1)
            self.assertTrue(reply[0].startswith(b"553 5.1.3 "), (command, reply))
        [reply] = self.h.command(b"MAIL FROM:<ik>")
        self.assertIn(b"fully qualified", reply)
        self.h.command(b"MAIL FROM:<a@example.nl>")
        [reply] = self.h.command(b"RCPT TO:<belastingdienst>")
        self.assertTrue(reply.startswith(b"553 5.1.3 <belastingdienst>: address must"))

    def test_addressNotRewritten(self):
        self.h.transaction(
            sender=b'"ik zelf"@Mijn-Bedrijf.NL', recipients=[b"X@[192.0.2.1]"]
        )
        self.h.send(b"Subject: x\r\n\r\n.\r\n")
        [(envelope, data)] = self.h.spool.committed
        self.assertEqual(envelope.sender, '"ik zelf"@Mijn-Bedrijf.NL')
        self.assertEqual(envelope.recipients, ["X@[192.0.2.1]"])

    def test_nonASCIIAddress(self):
        self.assertEqual(
            self.h.command("MAIL FROM:<jos\u00e9@example.nl>".encode()),
            [
                b"553 5.6.7 Non-ASCII addresses require the SMTPUTF8 "
                b"parameter (RFC 6531)"
            ],
        )

    def test_parameters(self):
        """
        With the extensions switched off, their parameters are unknown.
        """
        self.h = Harness(self, extensions=frozenset())
        self.h.login()
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> BODY=8BITMIME"), [b"250 2.1.0 Ok"]
        )
        self.h.command(b"RSET")
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> BODY=7BIT SIZE=100"),
            [b"250 2.1.0 Ok"],
        )
        self.h.command(b"RSET")
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> SMTPUTF8"),
            [b"555 5.5.4 Unsupported parameter: SMTPUTF8"],
        )
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> BODY=BINARYMIME"),
            [b"501 5.5.4 BODY must be 7BIT or 8BITMIME"],
        )
        self.h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(
            self.h.command(b"RCPT TO:<b@example.nl> NOTIFY=NEVER"),
            [b"555 5.5.4 Unsupported parameter: NOTIFY"],
        )

    def test_sizeParameter(self):
        """
        Twisted has no SIZE extension.
        """
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> SIZE=52428801"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> SIZE=52428800"), [b"250 2.1.0 Ok"]
        )

    def test_maxRecipients(self):
        h = Harness(self, maxRecipients=2)
        h.login()
        h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(h.command(b"RCPT TO:<b1@example.nl>"), [b"250 2.1.5 Ok"])
        self.assertEqual(h.command(b"RCPT TO:<b2@example.nl>"), [b"250 2.1.5 Ok"])
        self.assertEqual(
            h.command(b"RCPT TO:<b3@example.nl>"),
            [b"452 4.5.3 Error: too many recipients"],
        )

    def test_temporarySpoolFailure(self):
        """
        A failing spool is a temporary failure, 451 (Twisted answers 550 for
        any failure of eomReceived).
        """
        self.h.spool.newMessage = _failingCommit(self.h.spool.newMessage)
        self.h.transaction()
        self.assertEqual(
            self.h.send(b"Subject: x\r\n\r\n.\r\n"),
            [b"451 4.3.0 Error: temporary local problem, try again later"],
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


def _failingCommit(newMessage):
    def wrapped(envelope):
        writer = newMessage(envelope)
        writer.commit = lambda: defer.fail(OSError(28, "No space left on device"))
        return writer

    return wrapped


class DataBlockEquivalenceTests(unittest.TestCase):
    """
    The body fast path (whole runs of lines at once) must decide exactly as
    the line-by-line path: same replies, same bytes spooled, for random
    messages with dots, bare CR and LF, over-long lines, 8-bit text and
    size limits, cut into random packets.
    """

    def randomMessage(self, rng) -> bytes:
        lines = []
        # Half the messages are clean text (the fast path's case), half may
        # hold anything the filter refuses.
        clean = rng.random() < 0.5
        for _ in range(rng.randrange(0, 120)):
            kind = rng.random() * (0.7 if clean else 1.0)
            if kind < 0.5:
                line = bytes(
                    rng.choice(b"abc xyz:=-") for _ in range(rng.randrange(80))
                )
            elif kind < 0.7:
                line = b"." * rng.randrange(1, 4) + b"text"
            elif kind < 0.75:
                # With a transparency dot, which does not count.
                line = rng.choice([b"", b"."]) + b"x" * rng.choice(
                    [997, 998, 999, 1200]
                )
            elif kind < 0.78:
                line = b"bare" + rng.choice([b"\n", b"\r", b"\n.\n"]) + b"end"
            elif kind < 0.85:
                line = "\u00e9\u00e9n 8-bit".encode()
            else:
                line = b""
            lines.append(line)
        return b"".join(line + b"\r\n" for line in lines) + b".\r\nNOOP\r\n"

    def feed(self, data, cuts, maxSize, fast):
        h = Harness(self, maxMessageSize=maxSize)
        if not fast:
            h.server.transaction.dataBlock = lambda: False
        else:
            original = h.server.transaction.dataBlock

            def counting():
                taken = original()
                self.blocksTaken += taken
                return taken

            h.server.transaction.dataBlock = counting
        h.login()
        h.transaction()
        replies = []
        last = 0
        for cut in cuts + [len(data)]:
            replies += h.send(data[last:cut])
            last = cut
        return replies, [body for _, body in h.spool.committed]

    def test_sameDecisions(self):
        import random

        rng = random.Random(20261128)
        self.blocksTaken = 0
        for _ in range(300):
            data = self.randomMessage(rng)
            cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(6)))
            maxSize = rng.choice([52428800, 2000, 5000])
            fast = self.feed(data, cuts, maxSize, fast=True)
            slow = self.feed(data, cuts, maxSize, fast=False)
            self.assertEqual(fast, slow, data[:200])
        # Both paths really ran: many messages took blocks.
        self.assertGreater(self.blocksTaken, 100)

    def test_fastPathUsed(self):
        """
        The control: a large ordinary body really goes through the block
        path (so the test above compares two different paths).
        """
        h = Harness(self)
        h.login()
        h.transaction()
        calls = []
        original = h.server.transaction.dataBlock

        def counting():
            taken = original()
            calls.append(taken)
            return taken

        h.server.transaction.dataBlock = counting
        self.assertEqual(
            h.send(b"Subject: x\r\n\r\n" + b"..dot line\r\n" * 200 + b".\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        self.assertIn(True, calls)
        [(_, body)] = h.spool.committed
        self.assertTrue(body.endswith(b"\r\n\r\n" + b".dot line\r\n" * 200))


class MailTransactionUnitTests(unittest.TestCase):
    """
    The mail transaction object the server owns: the refusals it returns
    (not sends) before MAIL, RCPT and DATA, its state, and the phase.
    """

    def setUp(self):
        self.h = Harness(self)
        self.h.startTLS()
        self.tx = self.h.server.transaction

    def assertRefusal(self, refusal, expected):
        self.assertIsInstance(refusal, SMTPReply)
        self.assertEqual(str(refusal), expected)

    def test_refusalsBeforeLogin(self):
        self.h.transport.clear()
        for refusal in (
            self.tx.mailRefusal(),
            self.tx.rcptRefusal(),
            self.tx.dataRefusal(b""),
        ):
            self.assertRefusal(refusal, "530 5.7.0 Authentication required")
        self.assertEqual(self.h.transport.value(), b"")

    def test_refusalsInSequence(self):
        self.h.login()
        self.assertIsNone(self.tx.mailRefusal())
        self.assertRefusal(self.tx.rcptRefusal(), "503 5.5.1 Error: need MAIL command")
        self.assertRefusal(
            self.tx.dataRefusal(b""), "503 5.5.1 Error: need MAIL command"
        )
        self.assertRefusal(self.tx.dataRefusal(b"x"), "501 5.5.4 Syntax: DATA")
        self.assertEqual(self.h.command(b"MAIL FROM:<a@example.nl>"), [b"250 2.1.0 Ok"])
        self.assertTrue(self.tx.inProgress)
        self.assertEqual(self.tx.sender, "a@example.nl")
        self.assertRefusal(
            self.tx.mailRefusal(), "503 5.5.1 Error: nested MAIL command"
        )
        self.assertIsNone(self.tx.rcptRefusal())
        self.assertRefusal(
            self.tx.dataRefusal(b""), "554 5.5.1 Error: no valid recipients"
        )
        self.assertEqual(self.h.command(b"RCPT TO:<b@example.nl>"), [b"250 2.1.5 Ok"])
        self.assertEqual(self.tx.recipients, ["b@example.nl"])
        self.assertIsNone(self.tx.dataRefusal(b""))

    def test_dataPhase(self):
        """
        The 354 puts the session in the DATA phase with an open message;
        the final dot returns it to commands with the transaction reset.
        """
        self.h.login()
        self.assertEqual(
            self.h.transaction(),
            [b"354 End data with <CR><LF>.<CR><LF>"],
        )
        self.assertIs(self.h.server.phase, SessionPhase.DATA)
        self.assertIsNotNone(self.tx.message)
        self.assertEqual(self.tx.queueId, "Q0001")
        self.assertEqual(
            self.h.send(b"Subject: x\r\n\r\n.\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        self.assertIs(self.h.server.phase, SessionPhase.COMMAND)
        self.assertIsNone(self.tx.message)
        self.assertIsNone(self.tx.filter)
        self.assertFalse(self.tx.inProgress)
        self.assertEqual(self.tx.recipients, [])

    def test_resetEndsTransactionAtAvatar(self):
        """
        RSET, HELO and EHLO end the transaction, and tell the avatar, which
        releases what it held for it.
        """
        self.h.login()
        ended = []
        self.h.server.avatar.endTransaction = lambda: ended.append(True)
        self.h.command(b"MAIL FROM:<a@example.nl>")
        # (The avatar may end a previous transaction itself at MAIL.)
        del ended[:]
        self.assertEqual(self.h.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.assertFalse(self.tx.inProgress)
        self.h.command(b"EHLO client.example.nl")
        self.h.command(b"HELO client.example.nl")
        self.assertEqual(ended, [True, True, True])

    def test_accountSizeLimit(self):
        """
        The account's lower limit is the transaction's; the server's when
        the account has none.
        """
        self.h.login()
        self.assertEqual(self.tx.maxMessageSize(), self.h.policy.maxMessageSize)
        self.h.server.avatar.maxMessageSize = 1000
        self.assertEqual(self.tx.maxMessageSize(), 1000)
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> SIZE=1001"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
