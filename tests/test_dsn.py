# -*- test-case-name: tests.test_dsn -*-
"""
Tests for L{msa.queue.dsn}: the RFC 3464 report, parsed back with Python's
C{email} package, and its queueing in the spool.
"""

import email
import email.utils
import io

from twisted.internet import task
from twisted.trial import unittest

from msa.envelope import Envelope
from msa.queue import dsn
from msa.queue.spool import PENDING, Spool

HEADERS = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: aangifte 2025\r\n"
    b"X-Folded: first\r\n"
    b"\tsecond\r\n"
)
MESSAGE = HEADERS + b"\r\nTHE BODY\r\nmore body\r\n"
ARRIVAL = 1_700_000_000.0


def build(recipients=None, headers=HEADERS, **kwargs):
    recipients = recipients or [
        dsn.recipientStatus(
            "bob@example.org", dsn.FAILED, "550 5.1.1 no such user", "core.example"
        )
    ]
    kwargs.setdefault("hostname", "msa.example.nl")
    kwargs.setdefault("sender", "alice@example.com")
    kwargs.setdefault("queueId", "ABC123")
    kwargs.setdefault("arrival", ARRIVAL)
    kwargs.setdefault("lastAttempt", ARRIVAL + 60)
    return dsn.buildDSN(recipients=recipients, headers=headers, **kwargs)


class StatusTests(unittest.TestCase):
    def test_enhancedCode(self):
        self.assertEqual(dsn.statusFromReply("550 5.1.1 no", dsn.FAILED), "5.1.1")
        self.assertEqual(dsn.statusFromReply("552-5.3.4 big", dsn.FAILED), "5.3.4")
        self.assertEqual(dsn.statusFromReply("451 4.3.0 later", dsn.FAILED), "4.3.0")

    def test_derived(self):
        self.assertEqual(dsn.statusFromReply("550 no such user", dsn.FAILED), "5.0.0")
        self.assertEqual(dsn.statusFromReply("421 closing", dsn.DELAYED), "4.0.0")
        # An enhanced code of the wrong class is not believed.
        self.assertEqual(dsn.statusFromReply("550 4.1.1 odd", dsn.FAILED), "5.0.0")
        self.assertEqual(
            dsn.statusFromReply("greeting: 421 4.3.2 busy", dsn.DELAYED), "4.3.2"
        )

    def test_noReply(self):
        self.assertEqual(
            dsn.statusFromReply("cannot connect to core:25: refused", dsn.FAILED),
            "4.4.7",
        )
        self.assertEqual(dsn.statusFromReply("connection lost", dsn.DELAYED), "4.4.1")


class BuildTests(unittest.TestCase):
    def test_structure(self):
        data = build()
        message = email.message_from_bytes(data)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertEqual(
            message["From"], "Mail Delivery System <MAILER-DAEMON@msa.example.nl>"
        )
        self.assertEqual(message["To"], "<alice@example.com>")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertIsNotNone(message["Date"])
        self.assertTrue(message["Message-ID"].endswith("@msa.example.nl>"))
        text, report, headers = message.get_payload()
        self.assertEqual(
            [p.get_content_type() for p in message.get_payload()],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        self.assertIn("msa.example.nl", text.get_payload())
        self.assertIn("ABC123", text.get_payload())
        self.assertIn("<bob@example.org>: 550 5.1.1 no such user", text.get_payload())
        perMessage, perRcpt = report.get_payload()
        self.assertEqual(perMessage["Reporting-MTA"], "dns; msa.example.nl")
        self.assertEqual(
            email.utils.parsedate_to_datetime(perMessage["Arrival-Date"]).timestamp(),
            ARRIVAL,
        )
        self.assertEqual(perRcpt["Final-Recipient"], "rfc822; bob@example.org")
        self.assertEqual(perRcpt["Action"], "failed")
        self.assertEqual(perRcpt["Status"], "5.1.1")
        self.assertEqual(perRcpt["Remote-MTA"], "dns; core.example")
        self.assertEqual(perRcpt["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertEqual(
            email.utils.parsedate_to_datetime(perRcpt["Last-Attempt-Date"]).timestamp(),
            ARRIVAL + 60,
        )
        self.assertIsNone(perRcpt["Will-Retry-Until"])
        self.assertEqual(headers.get_payload().encode(), HEADERS)

    def test_crlfAndLineLength(self):
        long = "550 5.1.1 " + "x" * 3000
        data = build(
            [dsn.recipientStatus("bob@example.org", dsn.FAILED, long)],
            headers=b"Subject: " + b"y" * 2000 + b"\r\n",
        )
        self.assertNotIn(b"\r\n", data.replace(b"\r\n", b""))
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertTrue(data.endswith(b"--\r\n"))
        for line in data.split(b"\r\n"):
            self.assertLessEqual(len(line), 998)

    def test_delayed(self):
        data = build(
            [
                dsn.recipientStatus("a@example.org", dsn.DELAYED, "451 4.3.0 later"),
                dsn.recipientStatus("b@example.org", dsn.DELAYED, "connection lost"),
            ],
            willRetryUntil=ARRIVAL + 5 * 86400,
            envid="ENV-1",
        )
        message = email.message_from_bytes(data)
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        perMessage, a, b = message.get_payload()[1].get_payload()
        self.assertEqual(perMessage["Original-Envelope-Id"], "ENV-1")
        self.assertEqual([a["Action"], b["Action"]], ["delayed", "delayed"])
        self.assertEqual([a["Status"], b["Status"]], ["4.3.0", "4.4.1"])
        self.assertEqual(a["Diagnostic-Code"], "smtp; 451 4.3.0 later")
        self.assertIsNone(b["Diagnostic-Code"])
        self.assertEqual(b["X-Last-Error"], "connection lost")
        self.assertEqual(
            email.utils.parsedate_to_datetime(a["Will-Retry-Until"]).timestamp(),
            ARRIVAL + 5 * 86400,
        )
        self.assertIn("WARNING ONLY", message.get_payload()[0].get_payload())

    def test_noRecipients(self):
        self.assertRaises(
            ValueError,
            dsn.buildDSN,
            **{
                "hostname": "h",
                "sender": "s",
                "queueId": "q",
                "arrival": 0,
                "lastAttempt": 0,
                "recipients": [],
                "headers": b"",
            },
        )

    def test_eightBitHeaders(self):
        headers = "Subject: Belastingaangifte één\r\n".encode()
        message = email.message_from_bytes(build(headers=headers))
        part = message.get_payload()[2]
        self.assertEqual(part["Content-Transfer-Encoding"], "8bit")


class ReadHeadersTests(unittest.TestCase):
    def test_headerOnly(self):
        self.assertEqual(dsn.readHeaders(io.BytesIO(MESSAGE)), HEADERS)

    def test_bareLF(self):
        self.assertEqual(
            dsn.readHeaders(io.BytesIO(b"A: 1\nB: 2\n\nbody\n")), b"A: 1\r\nB: 2\r\n"
        )

    def test_noBody(self):
        self.assertEqual(
            dsn.readHeaders(io.BytesIO(b"A: 1\r\nB: 2")), b"A: 1\r\nB: 2\r\n"
        )
        self.assertEqual(dsn.readHeaders(io.BytesIO(b"\r\nbody")), b"")
        self.assertEqual(dsn.readHeaders(io.BytesIO(b"")), b"")

    def test_bounded(self):
        """
        Never more than the limit is read; a header without an end within
        it is cut at the last whole line.
        """
        data = b"".join(b"X-%05d: %s\r\n" % (i, b"v" * 50) for i in range(10000))
        f = io.BytesIO(data + b"\r\nbody")
        headers = dsn.readHeaders(f, limit=4096)
        self.assertLessEqual(f.tell(), 4096)
        self.assertLessEqual(len(headers), 4096)
        self.assertTrue(headers.endswith(b"v\r\n"))
        self.assertTrue(data.startswith(headers))

    def test_longLineCut(self):
        headers = dsn.readHeaders(io.BytesIO(b"X: " + b"a" * 5000 + b"\r\n\r\n"))
        self.assertEqual(len(headers), 998 + 2)


class QueueTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(ARRIVAL)
        self.spool = Spool(self.mktemp(), reactor=self.clock)

    def queue(self, sender="alice@example.com"):
        writer = self.spool.newMessage(
            Envelope(sender=sender, recipients=["bob@example.org"])
        )
        writer.write(MESSAGE)
        return self.spool.load(self.successResultOf(writer.commit()))

    def test_queued(self):
        entry = self.queue()
        status = dsn.recipientStatus("bob@example.org", dsn.FAILED, "550 5.1.1 no")
        dsnId = self.successResultOf(
            dsn.queueDSN(self.spool, entry, [status], "msa.example.nl", ARRIVAL + 5)
        )
        bounce = self.spool.load(dsnId)
        self.assertEqual(bounce.envelope.sender, "")
        self.assertEqual(bounce.envelope.recipients, ["alice@example.com"])
        self.assertEqual(bounce.envelope.account, "")
        self.assertEqual(bounce.recipients, {"alice@example.com": PENDING})
        self.assertTrue(bounce.isBounce)
        with self.spool.openMessage(dsnId) as f:
            data = f.read()
        self.assertIn(b"Subject: aangifte 2025", data)
        self.assertNotIn(b"THE BODY", data)
        message = email.message_from_bytes(data)
        self.assertIn(dsnId, message["Message-ID"])

    def test_notForNullSenderOrBounce(self):
        status = dsn.recipientStatus("bob@example.org", dsn.FAILED, "550 5.1.1 no")
        nullSender = self.queue(sender="")
        self.assertIsNone(
            self.successResultOf(
                dsn.queueDSN(self.spool, nullSender, [status], "h", ARRIVAL)
            )
        )
        bounce = self.queue()
        bounce.isBounce = True
        self.assertIsNone(
            self.successResultOf(
                dsn.queueDSN(self.spool, bounce, [status], "h", ARRIVAL)
            )
        )
        self.assertEqual(len(self.spool.pending()), 2)

    def test_utf8Sender(self):
        entry = self.queue(sender="jöran@example.nl")
        status = dsn.recipientStatus("bob@example.org", dsn.FAILED, "550 5.1.1 no")
        dsnId = self.successResultOf(
            dsn.queueDSN(self.spool, entry, [status], "msa.example.nl", ARRIVAL)
        )
        self.assertIn("SMTPUTF8", self.spool.load(dsnId).envelope.mailParams)

    def test_messageGone(self):
        """
        Without the original message file, the DSN is still made, with an
        empty header part.
        """
        entry = self.queue()
        entry.messagePath += ".gone"
        status = dsn.recipientStatus("bob@example.org", dsn.FAILED, "550 5.1.1 no")
        dsnId = self.successResultOf(
            dsn.queueDSN(self.spool, entry, [status], "msa.example.nl", ARRIVAL)
        )
        self.assertIsNotNone(dsnId)
