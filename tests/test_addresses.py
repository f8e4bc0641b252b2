# -*- test-case-name: tests.test_addresses -*-
"""
L{msa.submission.addresses}: MAIL and RCPT arguments, complete addresses only (R8).
"""

from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.submission.addresses import parseMailArgument, parseMailbox, parseRcptArgument


class MailboxTests(unittest.TestCase):
    def assertRefused(self, address, code=553, status="5.1.3"):
        error = self.assertRaises(SMTPReply, parseMailbox, address)
        self.assertEqual((error.code, error.status), (code, status), address)

    def test_complete(self):
        for address in [
            "ik@mijnbedrijf.nl",
            "first.last+tag@sub.example.co.uk",
            '"with space"@example.nl',
            '"quoted\\"quote"@example.nl',
            "x@[192.0.2.1]",
            "x@[IPv6:2001:db8::1]",
            "a-b_c@xn--bcher-kva.example",
        ]:
            self.assertEqual(parseMailbox(address), address)

    def test_incomplete(self):
        for address in [
            "ik",
            "ik@",
            "@example.nl",
            "ik@localhost",
            "ik@example",
            "ik@example.",
            "ik@.example.nl",
            "ik@example..nl",
            "ik@-example.nl",
            "ik@example-.nl",
            "ik@example.123",
            ".ik@example.nl",
            "ik.@example.nl",
            "i..k@example.nl",
            "i k@example.nl",
            "ik@@example.nl",
            "ik@exa mple.nl",
        ]:
            self.assertRefused(address)

    def test_sourceRoute(self):
        self.assertRefused("@relay.example:ik@example.nl")

    def test_nonASCII(self):
        self.assertRefused("jos\u00e9@example.nl", 553, "5.6.7")

    def test_lengthLimits(self):
        self.assertEqual(
            parseMailbox("l" * 64 + "@example.nl"), "l" * 64 + "@example.nl"
        )
        self.assertRefused("l" * 65 + "@example.nl")
        domain = ".".join(["d" * 60] * 4) + ".nl"
        self.assertRefused("ik@" + domain + "x" * 10)


class ArgumentTests(unittest.TestCase):
    def test_mail(self):
        self.assertEqual(
            parseMailArgument(b"FROM:<a@example.nl>"), ("a@example.nl", {})
        )
        self.assertEqual(
            parseMailArgument(b"from: <a@example.nl>"), ("a@example.nl", {})
        )
        self.assertEqual(parseMailArgument(b"FROM:a@example.nl"), ("a@example.nl", {}))
        self.assertEqual(parseMailArgument(b"FROM:<>"), ("", {}))
        self.assertEqual(
            parseMailArgument(b"FROM:<a@example.nl> body=8bitmime SIZE=10 AUTH=<>"),
            ("a@example.nl", {"BODY": "8BITMIME", "SIZE": "10", "AUTH": "<>"}),
        )

    def test_quotedBracket(self):
        self.assertEqual(
            parseMailArgument(b'FROM:<"a>b"@example.nl> SIZE=1'),
            ('"a>b"@example.nl', {"SIZE": "1"}),
        )

    def test_errors(self):
        cases = [
            (b"TO:<a@example.nl>", 501, "5.5.4"),
            (b"FROM<a@example.nl>", 501, "5.5.4"),
            (b"FROM:<a@example.nl", 501, "5.1.7"),
            (b"FROM:<a@example.nl>SIZE=1", 501, "5.5.4"),
            (b"FROM:<a@example.nl> SIZE=abc", 501, "5.5.4"),
            (b"FROM:<a@example.nl> SIZE=", 501, "5.5.4"),
            (b"FROM:<a@example.nl> SIZE=1 SIZE=2", 501, "5.5.4"),
            (b"FROM:<a@example.nl> RET=HDRS", 555, "5.5.4"),
            (b"FROM:<a@example.nl> BODY=BINARYMIME", 501, "5.5.4"),
        ]
        for argument, code, status in cases:
            error = self.assertRaises(
                SMTPReply, parseMailArgument, argument, frozenset()
            )
            self.assertEqual((error.code, error.status), (code, status), argument)

    def test_rcpt(self):
        self.assertEqual(parseRcptArgument(b"TO:<b@example.nl>"), ("b@example.nl", {}))
        for argument, code in [
            (b"TO:<>", 553),
            (b"TO:<postmaster>", 553),
            (b"TO:<b@example.nl> NOTIFY=NEVER", 555),
            (b"FROM:<b@example.nl>", 501),
        ]:
            error = self.assertRaises(
                SMTPReply, parseRcptArgument, argument, frozenset()
            )
            self.assertEqual(error.code, code, argument)
