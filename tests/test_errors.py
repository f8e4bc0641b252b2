# -*- test-case-name: tests.test_errors -*-
"""
Tests for L{msa.errors}: an L{SMTPReply} is the exact reply a client gets
instead of the normal one, and says whether the failure is permanent.
"""

from twisted.trial import unittest

from msa.errors import SMTPReply


class SMTPReplyTests(unittest.TestCase):
    def test_line(self):
        """
        On the wire the reply is code, enhanced status and text, separated
        by one space, without CRLF; C{str} gives the same text.
        """
        reply = SMTPReply(550, "5.7.1", "Sender address rejected")
        self.assertEqual(reply.line(), b"550 5.7.1 Sender address rejected")
        self.assertEqual(str(reply), "550 5.7.1 Sender address rejected")
        self.assertEqual(
            (reply.code, reply.status, reply.text),
            (550, "5.7.1", "Sender address rejected"),
        )

    def test_lineASCII(self):
        """
        A reply goes out in ASCII: other characters become C{?}.
        """
        reply = SMTPReply(550, "5.1.1", "no mailbox jörg")
        self.assertEqual(reply.line(), b"550 5.1.1 no mailbox j?rg")

    def test_permanentEdge(self):
        """
        5xx replies are permanent, 4xx are not (499 and 500 at the edge).
        """
        self.assertFalse(SMTPReply(451, "4.3.0", "try again").permanent)
        self.assertFalse(SMTPReply(499, "4.0.0", "x").permanent)
        self.assertTrue(SMTPReply(500, "5.0.0", "x").permanent)
        self.assertTrue(SMTPReply(554, "5.7.1", "x").permanent)

    def test_exception(self):
        """
        It is raised and caught as an exception carrying its three parts.
        """
        error = self.assertRaises(SMTPReply, self._raise)
        self.assertEqual(error.args, (535, "5.7.8", "no"))

    def _raise(self):
        raise SMTPReply(535, "5.7.8", "no")
