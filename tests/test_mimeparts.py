# -*- test-case-name: tests.test_mimeparts -*-
"""
Tests for L{msa.policy.mimeparts}: the C{mime-parts} policy counts the
number, nesting depth and size of MIME parts while the body streams by, each
limit at and past its edge, and never fails on garbage.
"""

import random

from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.policy.content import ContentPolicyChain
from msa.policy.contentpolicies import HeaderPolicy
from msa.policy.mimeparts import MimePartsPolicy
from tests.test_content import ENVELOPE, check, lines, multipart, text


def mimeRefusal(body: bytes, headers: bytes = b"", **options) -> SMTPReply | None:
    """
    Check a message whose top-level entity (Content-Type and body) is
    C{body}.
    """
    chain = ContentPolicyChain([MimePartsPolicy(**options)])
    return check(chain, b"From: a@b\r\n" + headers + body)


class RefusalAssertions:
    def assertRefused(self, reply: SMTPReply | None, text: str) -> None:
        """
        C{reply} is the exact refusal a client gets: 552 5.3.4 and C{text}.
        """
        assert reply is not None, f"not refused; expected {text!r}"
        assert (reply.code, reply.status, reply.text) == (552, "5.3.4", text), reply


class MimePartsPolicyTests(RefusalAssertions, unittest.TestCase):
    def test_notMultipart(self):
        self.assertIsNone(mimeRefusal(b"\r\nbody\r\n", maxParts=0))
        self.assertIsNone(mimeRefusal(b"", maxParts=0))

    def test_countAtLimit(self):
        message = multipart(b"b1", [text()] * 3)
        self.assertIsNone(mimeRefusal(message, maxParts=3))
        e = mimeRefusal(message, maxParts=2)
        self.assertEqual(
            (e.code, e.status, e.text),
            (552, "5.3.4", "Message refused: more than 2 MIME body parts"),
        )

    def test_defaultLimit(self):
        self.assertIsNone(mimeRefusal(multipart(b"b", [b""] * 100)))
        self.assertRefused(
            mimeRefusal(multipart(b"b", [b""] * 101)),
            "Message refused: more than 100 MIME body parts",
        )

    def test_nested(self):
        """
        A nested multipart counts as a part, and so do its own parts.
        """
        inner = multipart(b"inner", [text(), text(b"<p>hi</p>")], b"alternative")
        message = multipart(b"outer", [inner, text(), text()])
        self.assertIsNone(mimeRefusal(message, maxParts=5))
        self.assertRefused(
            mimeRefusal(message, maxParts=4),
            "Message refused: more than 4 MIME body parts",
        )

    def test_partHeadersFolded(self):
        inner = (
            b"Content-Type: multipart/related;\r\n"
            b'\tboundary="in ner"\r\nContent-ID: <x>\r\n\r\n'
            b"--in ner\r\n\r\none\r\n--in ner\r\n\r\ntwo\r\n--in ner--\r\n"
        )
        message = multipart(b"outer", [inner])
        self.assertIsNone(mimeRefusal(message, maxParts=3))
        self.assertRefused(
            mimeRefusal(message, maxParts=2),
            "Message refused: more than 2 MIME body parts",
        )

    def test_boundaryMustMatchExactly(self):
        """
        Only C{--boundary} alone on its line (white space after it allowed)
        delimits a part; it cannot be a prefix of a longer line.
        """
        body = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n"
            b"--bb\r\n--b x\r\n -b\r\n--b \t\r\n\r\n--B\r\n--b--\r\n--b\r\n"
        )
        self.assertIsNone(mimeRefusal(body, maxParts=2))
        self.assertRefused(
            mimeRefusal(body, maxParts=1),
            "Message refused: more than 1 MIME body parts",
        )

    def test_outerBoundaryClosesInner(self):
        """
        A delimiter of an enclosing multipart ends the inner one, even when
        the inner one was never closed.
        """
        inner = b'Content-Type: multipart/mixed; boundary="in"\r\n\r\n--in\r\n\r\nx'
        message = multipart(b"out", [inner, text()])
        self.assertIsNone(mimeRefusal(message, maxParts=3))
        # After the inner one is gone its boundary no longer counts.
        message = multipart(b"out", [inner, text(b"--in\r\n--in")])
        self.assertIsNone(mimeRefusal(message, maxParts=3))

    def test_afterClose(self):
        body = multipart(b"b", [text()]) + b"--b\r\n--b\r\n"
        self.assertIsNone(mimeRefusal(body, maxParts=1))

    def test_noBoundary(self):
        self.assertIsNone(
            mimeRefusal(
                b"Content-Type: multipart/mixed\r\n\r\n--\r\n--\r\n", maxParts=0
            )
        )
        self.assertIsNone(
            mimeRefusal(
                b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n',
                maxParts=0,
            )
        )

    def test_messageRfc822(self):
        embedded = (
            b"Content-Type: message/rfc822\r\n\r\n"
            b"From: x@y\r\nSubject: fwd\r\n" + multipart(b"emb", [text(), text()])
        )
        message = multipart(b"out", [text(), embedded])
        self.assertIsNone(mimeRefusal(message, maxParts=4))
        self.assertRefused(
            mimeRefusal(message, maxParts=3),
            "Message refused: more than 3 MIME body parts",
        )

    def test_digest(self):
        """
        In a multipart/digest, a part without Content-Type is a message.
        """
        part = b"\r\nFrom: x@y\r\n" + multipart(b"d2", [text()])
        message = multipart(b"d1", [part, part], b"digest")
        self.assertIsNone(mimeRefusal(message, maxParts=4))
        self.assertRefused(
            mimeRefusal(message, maxParts=3),
            "Message refused: more than 3 MIME body parts",
        )

    def test_partSizeAtLimit(self):
        """
        The size of a part is its content: the lines joined with CRLF.
        """
        content = b"a" * 10 + b"\r\n" + b"b" * 8
        message = multipart(b"b", [text(), text(content), text()])
        self.assertIsNone(mimeRefusal(message, maxPartSize=20))
        e = mimeRefusal(message, maxPartSize=19)
        self.assertEqual(
            (e.code, e.status, e.text),
            (552, "5.3.4", "Message refused: a MIME part exceeds 19 octets"),
        )

    def test_partSizeExcludesHeadersAndStructure(self):
        part = b"Content-Type: text/plain; name=" + b"x" * 100 + b"\r\n\r\n12345"
        inner = multipart(b"in", [part])
        message = multipart(b"out", [inner])
        self.assertIsNone(mimeRefusal(message, maxPartSize=5))
        self.assertRefused(
            mimeRefusal(message, maxPartSize=4),
            "Message refused: a MIME part exceeds 4 octets",
        )

    def test_singlePartSize(self):
        self.assertIsNone(mimeRefusal(b"\r\n12345\r\n", maxPartSize=5))
        self.assertRefused(
            mimeRefusal(b"\r\n12345\r\n6\r\n", maxPartSize=5),
            "Message refused: a MIME part exceeds 5 octets",
        )

    def test_partWithoutHeaderSection(self):
        """
        A part whose first line is not a header field starts its content
        right there.
        """
        body = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nabcdef\r\n--b--"
        )
        self.assertIsNone(mimeRefusal(body, maxPartSize=6))
        self.assertRefused(
            mimeRefusal(body, maxPartSize=5),
            "Message refused: a MIME part exceeds 5 octets",
        )

    def test_depth(self):
        def nest(depth):
            if depth == 0:
                return text()
            return multipart(b"d%d" % depth, [nest(depth - 1)])

        self.assertIsNone(mimeRefusal(nest(20)))
        e = mimeRefusal(nest(21))
        self.assertEqual(
            (e.code, e.status, e.text),
            (
                552,
                "5.3.4",
                "Message refused: MIME multiparts nested deeper than 20 levels",
            ),
        )
        self.assertIsNone(mimeRefusal(nest(2), maxDepth=2))
        self.assertRefused(
            mimeRefusal(nest(3), maxDepth=2),
            "Message refused: MIME multiparts nested deeper than 2 levels",
        )

    def test_badOptions(self):
        self.assertRaises(ValueError, MimePartsPolicy, maxParts=-1)
        self.assertRaises(ValueError, MimePartsPolicy, maxPartSize=-1)
        self.assertRaises(ValueError, MimePartsPolicy, maxDepth=0)

    def test_garbage(self):
        """
        Whatever the bytes, the policy answers or refuses with a limit; it
        never fails otherwise.
        """
        rng = random.Random(5322)
        pieces = [
            b"--b",
            b"--b--",
            b"--c",
            b"Content-Type: multipart/mixed; boundary=c",
            b"Content-Type: multipart/digest; boundary=b",
            b"Content-Type: message/rfc822",
            b'Content-Type: multipart/x; boundary="\xff\x00"',
            b"Content-Type: multipart/x; boundary*=utf-8''%FF%",
            b'Content-Type: ;;;==="',
            b"Content-Type: multipart",
            b"--\xff\x00",
            b" folded",
            b"",
            b":",
            b"\x00\xff\xfe",
        ]
        for _ in range(300):
            message = [rng.choice(pieces) for _ in range(rng.randrange(40))]
            if rng.random() < 0.3:
                message = [bytes(rng.randrange(256) for _ in range(20))] + message
            raw = b"\r\n".join(message)
            mime = MimePartsPolicy(maxParts=10, maxPartSize=50, maxDepth=3)
            reply = check(ContentPolicyChain([mime]), raw)
            if reply is not None:
                self.assertEqual((reply.code, reply.status), (552, "5.3.4"))
            reply = check(ContentPolicyChain([mime, HeaderPolicy()]), raw)
            if reply is not None:
                self.assertIn(
                    (reply.code, reply.status), [(552, "5.3.4"), (550, "5.6.0")]
                )

    def test_streamingMemory(self):
        """
        Only open boundaries are kept: a long message leaves nothing behind.
        """
        checker = ContentPolicyChain([MimePartsPolicy()]).startMessage(ENVELOPE)
        for line in lines(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'):
            checker.lineReceived(line)
        for _ in range(50):
            checker.lineReceived(b"--b")
            checker.lineReceived(b"")
            for _ in range(100):
                checker.lineReceived(b"x" * 76)
        [(_, mime)] = checker._checkers
        self.assertEqual(len(mime.stack), 1)
        self.assertEqual(mime.parts, 50)
        self.assertEqual(mime.partSize, 100 * 78 - 2)
        self.assertIsNone(mime.contentType)


class MimePartsMoreTests(RefusalAssertions, unittest.TestCase):
    """
    The policy's behaviours without a test of their own before the tests
    followed the modules.
    """

    def test_messageGlobal(self):
        """
        A message/global part (RFC 6532) is looked into as message/rfc822
        is: the parts of the message it holds count.
        """
        embedded = b"Content-Type: message/global\r\n\r\nFrom: x@y\r\n" + multipart(
            b"emb", [text(), text()]
        )
        message = multipart(b"out", [embedded])
        self.assertIsNone(mimeRefusal(message, maxParts=3))
        self.assertRefused(
            mimeRefusal(message, maxParts=2),
            "Message refused: more than 2 MIME body parts",
        )

    def test_noPartLimit(self):
        """
        With C{maxParts=None} any number of parts passes.
        """
        self.assertIsNone(mimeRefusal(multipart(b"b", [b""] * 1000), maxParts=None))

    def test_zeroLimits(self):
        """
        C{maxParts=0} refuses the first body part; C{maxPartSize=0} allows
        only empty leaves.
        """
        e = mimeRefusal(multipart(b"b", [text()]), maxParts=0)
        self.assertEqual(e.text, "Message refused: more than 0 MIME body parts")
        self.assertIsNone(mimeRefusal(multipart(b"b", [text(b"")]), maxPartSize=0))
        e = mimeRefusal(multipart(b"b", [text(b"x")]), maxPartSize=0)
        self.assertEqual(e.text, "Message refused: a MIME part exceeds 0 octets")

    def test_firstContentTypeCounts(self):
        """
        Of a part's Content-Type fields (any case), the first one decides
        what the part is.
        """
        part = (
            b"content-TYPE: multipart/mixed; boundary=in\r\n"
            b"Content-Type: text/plain\r\n\r\n"
            b"--in\r\n\r\none\r\n--in\r\n\r\ntwo\r\n--in--\r\n"
        )
        message = multipart(b"out", [part])
        self.assertIsNone(mimeRefusal(message, maxParts=3))
        self.assertRefused(
            mimeRefusal(message, maxParts=2),
            "Message refused: more than 2 MIME body parts",
        )

    def test_contentTypeBounded(self):
        """
        Of a part's Content-Type field, however long and folded, at most
        8192 octets are kept while the part's headers are read.
        """
        checker = ContentPolicyChain([MimePartsPolicy()]).startMessage(ENVELOPE)
        for line in lines(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b'):
            checker.lineReceived(line)
        checker.lineReceived(b"Content-Type: text/plain;")
        for _ in range(1000):
            checker.lineReceived(b"\tname=" + b"x" * 100)
        [(_, mime)] = checker._checkers
        self.assertEqual(mime.capturedSize, 8192)
        self.assertEqual(sum(len(piece) for piece in mime.contentType), 8192)
        checker.lineReceived(b"")
        self.assertIsNone(mime.contentType)
        checker.lineReceived(b"content")
        self.assertEqual(mime.partSize, 7)

    def test_eachMessageCountedAlone(self):
        """
        The counts of one message do not carry over to the next.
        """
        policy = MimePartsPolicy(maxParts=2)
        chain = ContentPolicyChain([policy])
        message = b"From: a@b\r\n" + multipart(b"b", [text(), text()])
        for _ in range(3):
            self.assertIsNone(check(chain, message))
