# -*- test-case-name: tests.test_parameters -*-
"""
L{msa.submission.parameters}: the ESMTP parameter grammar of MAIL and RCPT
in ASCII only (issue 18, defect 4: C{SIZE=\\u00b2} passed C{isdigit()} and
dropped the connection with a traceback), and its replies through the
protocol: every such input gets 501 or 555 5.5.4 and the session goes on.
"""

from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.submission.parameters import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    offeredParameters,
    parseParameters,
    sizeOctets,
)
from tests.helpers import Harness

#: No extension offered.
NONE: frozenset[str] = frozenset()

#: Characters for which C{str.isdigit()} is true but that are not DIGIT.
UNICODE_DIGITS = [
    "\u00b2",  # superscript two
    "\u00b9",  # superscript one
    "\uff11",  # fullwidth one
    "\u0661",  # Arabic-Indic one
    "\u0967",  # Devanagari one
    "\u2460",  # circled one
    "\U0001d7cf",  # mathematical bold one
]


class GrammarTests(unittest.TestCase):
    def assertRefused(self, text, code, known=MAIL_PARAMETERS):
        error = self.assertRaises(SMTPReply, parseParameters, text, known)
        self.assertEqual((error.code, error.status), (code, "5.5.4"), repr(text))
        self.assertTrue(str(error).isascii(), repr(str(error)))
        return error

    def test_known(self):
        self.assertEqual(
            parseParameters(" size=10  body=8bitmime\tAUTH=<> ", MAIL_PARAMETERS),
            {"SIZE": "10", "BODY": "8BITMIME", "AUTH": "<>"},
        )
        self.assertEqual(parseParameters("", RCPT_PARAMETERS), {})
        self.assertEqual(
            parseParameters("AUTH=a+2Bb@example.nl", MAIL_PARAMETERS),
            {"AUTH": "a+2Bb@example.nl"},
        )

    def test_sizeUnicodeDigits(self):
        """
        SIZE's value is ASCII digits only: every other digit is 501 5.5.4.
        """
        for digit in UNICODE_DIGITS:
            self.assertTrue(digit.isdigit())
            for value in (digit, "1" + digit, digit + "0"):
                self.assertRefused("SIZE=" + value, 501)

    def test_sizeLength(self):
        """
        1*20DIGIT: twenty digits are a size, twenty-one are not.
        """
        self.assertEqual(
            sizeOctets(parseParameters("SIZE=" + "9" * 20, MAIL_PARAMETERS)),
            10**20 - 1,
        )
        self.assertRefused("SIZE=" + "9" * 21, 501)
        for value in ("SIZE", "SIZE=", "SIZE=-1", "SIZE=+1", "SIZE=1.0", "SIZE=0x10"):
            self.assertRefused(value, 501)
        self.assertIsNone(sizeOctets({}))

    def test_nonASCIIKeyword(self):
        """
        A keyword that folds to a known one only outside ASCII (the long s
        upper-cases to S, the Kelvin sign lower-cases to k) is malformed.
        """
        for text in ("\u017fIZE=10", "SIZ\u0395=10", "B\u2126DY=7BIT", "\uff33IZE=1"):
            self.assertRefused(text, 501)

    def test_valueGrammar(self):
        """
        esmtp-value is 1*(%d33-60 / %d62-126): no "=", controls, NUL, DEL,
        non-ASCII; separators other than SP and HTAB are not separators.
        """
        for text in (
            "BODY=7BIT=",
            "AUTH=a\x00b",
            "AUTH=a\x7fb",
            "AUTH=\u00e9",
            "BODY=7BIT\x0bSIZE=1",
            "BODY=7BIT\x85SIZE=1",
            "BODY=7BIT\u3000SIZE=1",
            "=7BIT",
            "-BODY=7BIT",
            "BO_DY=7BIT",
        ):
            self.assertRefused(text, 501)

    def test_unknownAndDuplicate(self):
        """
        A keyword of an extension switched off is unknown, 555 5.5.4.
        """
        self.assertRefused("RET=HDRS", 555, offeredParameters(MAIL_PARAMETERS, NONE))
        self.assertRefused("X-" + "A" * 400, 555)
        self.assertRefused(
            "NOTIFY=NEVER", 555, offeredParameters(RCPT_PARAMETERS, NONE)
        )
        self.assertRefused("SIZE=1 size=2", 501)
        self.assertRefused("BODY=7BIT " * 3, 501)

    def test_badValues(self):
        self.assertRefused(
            "BODY=BINARYMIME", 501, offeredParameters(MAIL_PARAMETERS, NONE)
        )
        self.assertRefused("BODY=BINARY", 501)
        self.assertRefused("BODY", 501)
        self.assertRefused("AUTH", 501)
        self.assertRefused("AUTH=a+zz", 501)
        self.assertRefused("AUTH=a+b", 501)

    def test_longWordShortReply(self):
        """
        The reply quotes a malformed parameter in printable ASCII, cut
        short.
        """
        error = self.assertRefused("SIZE=1\x01" + "x" * 500, 501)
        self.assertLess(len(str(error)), 120)
        self.assertIn("SIZE=1?", str(error))

    def test_shownCutAfter64(self):
        """
        A malformed parameter of 64 characters is quoted whole; one of 65
        is quoted as its first 61 and "...".
        """
        word = "SIZE=1\x01" + "x" * 57
        self.assertEqual(
            self.assertRefused(word, 501).text,
            "Bad parameter syntax: SIZE=1?" + "x" * 57,
        )
        self.assertEqual(
            self.assertRefused(word + "y", 501).text,
            "Bad parameter syntax: SIZE=1?" + "x" * 54 + "...",
        )


class ProtocolTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness(self, maxMessageSize=1000)
        self.h.login()

    def test_superscriptSize(self):
        """
        C{SIZE=\\u00b2} (as UTF-8) is 501 5.5.4, the session goes on, and a
        message still goes through afterwards.
        """
        h = self.h
        for digit in UNICODE_DIGITS:
            reply = h.command(b"MAIL FROM:<a@example.nl> SIZE=" + digit.encode())
            self.assertEqual(reply, [b"501 5.5.4 Bad parameter syntax: SIZE=?"])
        self.assertEqual(h.command(b"NOOP"), [b"250 2.0.0 Ok"])
        replies = h.submit(b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(replies[-1], b"250 2.0.0 Ok: queued as Q0001")

    def test_sizeChecked(self):
        h = self.h
        self.assertEqual(
            h.command(b"MAIL FROM:<a@example.nl> SIZE=1001"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(
            h.command(b"MAIL FROM:<a@example.nl> SIZE=" + b"9" * 20),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(
            h.command(b"MAIL FROM:<a@example.nl> SIZE=1000"), [b"250 2.1.0 Ok"]
        )

    def test_rcptParameters(self):
        h = self.h
        h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(
            h.command(b"RCPT TO:<b@example.nl> NOTIFY=\xc2\xb2"),
            [b"501 5.5.4 Bad parameter syntax: NOTIFY=?"],
        )
        self.assertEqual(
            h.command(b"RCPT TO:<b@example.nl> NOTIFY=NEVER,SUCCESS"),
            [b"501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE and DELAY"],
        )
        self.assertEqual(h.command(b"RCPT TO:<b@example.nl>"), [b"250 2.1.5 Ok"])
