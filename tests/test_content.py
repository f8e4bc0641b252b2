"""
L{msa.policy.content}: the header collector, the built-in content policies, the
chain that runs them and the loading of policies from the configuration.
"""

import random

from twisted.trial import unittest
from zope.interface import implementer

from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import IContentPolicy
from msa.policy.content import ContentPolicyChain, HeaderCollector, Headers
from msa.policy.contentpolicies import HeaderPolicy, MimePartsPolicy, loadPolicies
from tests.example_policy import RequireHeader

ENVELOPE = Envelope(sender="ik@mijnbedrijf.nl", recipients=["b@overheid.nl"])

GOOD = (
    b"From: Ik <ik@mijnbedrijf.nl>\r\n"
    b"To: belastingdienst@overheid.nl\r\n"
    b"Date: Tue, 1 Jul 2025 10:00:00 +0200\r\n"
    b"Message-ID: <1@mijnbedrijf.nl>\r\n"
    b"Subject: aangifte\r\n"
    b"\r\n"
    b"body\r\n"
)


def lines(message: bytes) -> list[bytes]:
    parts = message.split(b"\r\n")
    if parts[-1] == b"":
        parts.pop()
    return parts


def check(chain: ContentPolicyChain, message: bytes) -> SMTPReply | None:
    """
    Stream C{message} through C{chain}; the refusal, or L{None}.
    """
    try:
        checker = chain.startMessage(ENVELOPE)
        for line in lines(message):
            checker.lineReceived(line)
        checker.eomReceived()
    except SMTPReply as e:
        return e
    return None


def collect(message: bytes, **kw) -> tuple[Headers, HeaderCollector]:
    collector = HeaderCollector(**kw)
    for line in lines(message):
        headers = collector.feed(line)
        if headers is not None:
            return headers, collector
    return collector.finish(), collector


class HeaderCollectorTests(unittest.TestCase):
    def test_fields(self):
        headers, collector = collect(GOOD)
        self.assertIsNone(headers.error)
        self.assertIsNone(collector.firstBodyLine)
        self.assertEqual(
            headers.fields,
            [
                ("From", "Ik <ik@mijnbedrijf.nl>"),
                ("To", "belastingdienst@overheid.nl"),
                ("Date", "Tue, 1 Jul 2025 10:00:00 +0200"),
                ("Message-ID", "<1@mijnbedrijf.nl>"),
                ("Subject", "aangifte"),
            ],
        )
        self.assertEqual(headers.size, len(GOOD.split(b"\r\n\r\n")[0]) + 2)

    def test_lookup(self):
        headers, _ = collect(b"Received: a\r\nX: 1\r\nreceived: b\r\n\r\n")
        self.assertEqual(headers.getAll("RECEIVED"), ["a", "b"])
        self.assertEqual(headers.get("received"), "a")
        self.assertIsNone(headers.get("Missing"))
        self.assertEqual(headers.count("Received"), 2)
        self.assertIn("x", headers)
        self.assertNotIn("y", headers)
        self.assertEqual(len(headers), 3)
        self.assertEqual(list(headers)[1], ("X", "1"))

    def test_folding(self):
        headers, _ = collect(
            b"Subject: one\r\n two\r\n\tthree  \r\nTo:\r\n  a@b\r\n\r\n"
        )
        self.assertEqual(headers.fields, [("Subject", "one two\tthree"), ("To", "a@b")])

    def test_obsoleteSpaceBeforeColon(self):
        headers, _ = collect(b"Subject : hi\r\n\r\n")
        self.assertEqual(headers.fields, [("Subject", "hi")])
        self.assertIsNone(headers.error)

    def test_emptyValueAndColonsInValue(self):
        headers, _ = collect(b"X-Empty:\r\nX-T: a: b:c\r\n\r\n")
        self.assertEqual(headers.fields, [("X-Empty", ""), ("X-T", "a: b:c")])

    def test_eightBitRoundTrip(self):
        headers, _ = collect(b"Subject: \xc3\xa9\xff\r\n\r\n")
        value = headers.get("Subject")
        self.assertEqual(value.encode("utf-8", "surrogateescape"), b"\xc3\xa9\xff")

    def test_headersOnly(self):
        """
        A message without an empty line is all header section.
        """
        headers, collector = collect(b"From: a@b\r\nSubject: x\r\n")
        self.assertEqual(headers.fields, [("From", "a@b"), ("Subject", "x")])
        self.assertIsNone(headers.error)
        self.assertIsNone(collector.firstBodyLine)

    def test_emptyMessage(self):
        headers = HeaderCollector().finish()
        self.assertEqual(headers.fields, [])
        self.assertIsNone(headers.error)

    def test_noHeaders(self):
        headers, _ = collect(b"\r\nbody\r\n")
        self.assertEqual(headers.fields, [])
        self.assertIsNone(headers.error)

    def test_lineWithoutColon(self):
        headers, collector = collect(b"From: a@b\r\nnot a header\r\nTo: c@d\r\n")
        self.assertEqual(headers.fields, [("From", "a@b")])
        self.assertEqual(
            headers.error, "line 2 is neither a header field nor a continuation line"
        )
        self.assertEqual(collector.firstBodyLine, b"not a header")

    def test_badFieldNames(self):
        for line in [
            b"Bad Name: x",
            b": no name",
            b"Caf\xc3\xa9: x",
            b"Ctl\x01: x",
            b"\x7f: x",
        ]:
            headers, collector = collect(b"From: a@b\r\n" + line + b"\r\n\r\n")
            self.assertIn("line 2 is neither", headers.error, line)
            self.assertEqual(collector.firstBodyLine, line)

    def test_firstLineContinuation(self):
        headers, collector = collect(b" From: a@b\r\nTo: c@d\r\n\r\n")
        self.assertEqual(headers.fields, [])
        self.assertEqual(headers.error, "the first line is a continuation line")
        self.assertEqual(collector.firstBodyLine, b" From: a@b")

    def test_feedAfterComplete(self):
        collector = HeaderCollector()
        collector.feed(b"")
        self.assertRaises(RuntimeError, collector.feed, b"x")

    def test_sizeAtLimit(self):
        """
        The limit counts every header line with its CRLF, continuation
        lines included, not the empty line.
        """
        message = b"Subject: " + b"x" * 80 + b"\r\n " + b"y" * 8 + b"\r\n"
        size = len(message)
        headers, _ = collect(message + b"\r\n", maxSize=size)
        self.assertEqual(headers.size, size)
        self.assertIsNone(headers.error)
        e = self.assertRaises(SMTPReply, collect, message, maxSize=size - 1)
        self.assertEqual(
            (e.code, e.status, e.text),
            (
                552,
                "5.3.4",
                f"Message refused: header section exceeds {size - 1} octets",
            ),
        )

    def test_sizeDefault(self):
        line = b"X: " + b"a" * 995
        ok = b"\r\n".join([line] * 65) + b"\r\n"
        self.assertLessEqual(len(ok), 65536)
        collect(ok)
        self.assertRaises(SMTPReply, collect, ok * 2)

    def test_fieldCountAtLimit(self):
        message = b"X: 1\r\n Y\r\n" * 5
        headers, _ = collect(message + b"\r\n", maxFields=5)
        self.assertEqual(len(headers), 5)
        e = self.assertRaises(SMTPReply, collect, message + b"Z: 1\r\n", maxFields=5)
        self.assertEqual(
            (e.code, e.status, e.text),
            (552, "5.3.4", "Message refused: more than 5 header fields"),
        )

    def test_fieldCountDefault(self):
        collect(b"X: 1\r\n" * 1000)
        self.assertRaises(SMTPReply, collect, b"X: 1\r\n" * 1001)


def headerRefusal(message: bytes, **options) -> SMTPReply | None:
    return check(ContentPolicyChain([HeaderPolicy(**options)]), message)


def without(message: bytes, name: bytes) -> bytes:
    return b"".join(
        line for line in message.splitlines(True) if not line.startswith(name + b":")
    )


def adding(message: bytes, line: bytes) -> bytes:
    return line + b"\r\n" + message


class HeaderPolicyTests(unittest.TestCase):
    def assertRefused(self, reply, text, code=550, status="5.6.0"):
        self.assertIsNotNone(reply)
        self.assertEqual((reply.code, reply.status, reply.text), (code, status, text))

    def test_good(self):
        self.assertIsNone(headerRefusal(GOOD))

    def test_headersOnly(self):
        self.assertIsNone(headerRefusal(GOOD.split(b"\r\n\r\n")[0] + b"\r\n"))

    def test_missing(self):
        for name in [b"From", b"Date", b"Message-ID"]:
            self.assertRefused(
                headerRefusal(without(GOOD, name)),
                f"Message refused: exactly one {name.decode()}: header field is "
                "required (RFC 5322 3.6)",
            )

    def test_duplicated(self):
        for line in [
            b"From: other@mijnbedrijf.nl",
            b"DATE: Tue, 1 Jul 2025 10:00:00 +0200",
            b"message-id: <2@mijnbedrijf.nl>",
        ]:
            name = {b"F": "From", b"D": "Date", b"m": "Message-ID"}[line[:1]]
            self.assertRefused(
                headerRefusal(adding(GOOD, line)),
                f"Message refused: exactly one {name}: header field is required "
                "(RFC 5322 3.6)",
            )

    def test_atMostOnce(self):
        for name in ["Sender", "Reply-To", "To", "Cc", "Bcc", "Subject", "References"]:
            message = adding(adding(GOOD, f"{name}: <x@y>".encode()), b"X-Other: 1")
            if name != "To" and name != "Subject":
                message = adding(message, f"{name}: <z@y>".encode())
            self.assertRefused(
                headerRefusal(message),
                f"Message refused: at most one {name}: header field is allowed "
                "(RFC 5322 3.6)",
            )

    def test_optional(self):
        message = without(without(without(GOOD, b"From"), b"Date"), b"Message-ID")
        self.assertIsNone(
            headerRefusal(
                message, requireFrom=False, requireDate=False, requireMessageId=False
            )
        )
        twice = adding(GOOD, b"Message-ID: <2@b>")
        self.assertRefused(
            headerRefusal(twice, requireMessageId=False),
            "Message refused: at most one Message-ID: header field is allowed "
            "(RFC 5322 3.6)",
        )

    def test_badDate(self):
        for date in [b"yesterday", b"", b"Tue, 41 Jul 2025 10:00:00 +0200", b"\xff"]:
            message = adding(without(GOOD, b"Date"), b"Date: " + date)
            self.assertRefused(
                headerRefusal(message),
                "Message refused: the Date: header field is not a valid date-time "
                "(RFC 5322 3.3)",
            )

    def test_badDateNotRequired(self):
        message = adding(without(GOOD, b"Date"), b"Date: soon")
        self.assertIsNotNone(headerRefusal(message, requireDate=False))

    def test_dateFormats(self):
        for date in [
            b"1 Jul 2025 10:00 +0200",
            b"Tue, 01 Jul 2025 08:00:00 GMT",
            b"Tue, 1 Jul 2025 10:00:00 +0200 (CEST)",
        ]:
            message = adding(without(GOOD, b"Date"), b"Date: " + date)
            self.assertIsNone(headerRefusal(message), date)

    def test_badMessageId(self):
        for value in [b"1@mijnbedrijf.nl", b"<nodomain>", b"<a b@c>", b"<@c>"]:
            message = adding(without(GOOD, b"Message-ID"), b"Message-ID: " + value)
            self.assertRefused(
                headerRefusal(message),
                "Message refused: the Message-ID: header field is not a valid "
                "msg-id (RFC 5322 3.6.4)",
            )

    def test_malformed(self):
        self.assertRefused(
            headerRefusal(b"From: a@b\r\nnonsense\r\n\r\nbody\r\n"),
            "Message refused: malformed header section: line 2 is neither a "
            "header field nor a continuation line (RFC 5322 2.2)",
        )
        self.assertRefused(
            headerRefusal(b" folded\r\n" + GOOD),
            "Message refused: malformed header section: the first line is a "
            "continuation line (RFC 5322 2.2)",
        )

    def test_singleFrom(self):
        two = adding(without(GOOD, b"From"), b"From: a@mijnbedrijf.nl, b@x.nl")
        text = "Message refused: the From: header field must hold exactly one mailbox"
        self.assertRefused(headerRefusal(two), text)
        self.assertRefused(
            headerRefusal(two, singleFrom=False),
            "Message refused: a Sender: header field is required when From: "
            "holds more than one mailbox (RFC 5322 3.6.2)",
        )
        withSender = adding(two, b"Sender: a@mijnbedrijf.nl")
        self.assertIsNone(headerRefusal(withSender, singleFrom=False))
        for value in [b"garbage", b"", b"a@b c@d", b"x@", b"<>"]:
            bad = adding(without(GOOD, b"From"), b"From: " + value)
            self.assertRefused(headerRefusal(bad), text)
            self.assertRefused(
                headerRefusal(bad, singleFrom=False),
                "Message refused: the From: header field is not a valid mailbox "
                "list (RFC 5322 3.6.2)",
            )

    def test_fromForms(self):
        for value in [
            b"ik@mijnbedrijf.nl",
            b'"Ik, de baas" <ik@mijnbedrijf.nl>',
            b"J\xc3\xb6hn <j@mijnbedrijf.nl>",
            b"=?utf-8?q?J=C3=B6hn?= <j@mijnbedrijf.nl>",
            b"ik@mijnbedrijf.nl (comment)",
        ]:
            message = adding(without(GOOD, b"From"), b"From: " + value)
            self.assertIsNone(headerRefusal(message), value)


def multipart(boundary: bytes, parts: list[bytes], ctype=b"mixed") -> bytes:
    out = b"Content-Type: multipart/" + ctype + b'; boundary="' + boundary + b'"\r\n'
    out += b"\r\npreamble\r\n"
    for part in parts:
        out += b"--" + boundary + b"\r\n" + part + b"\r\n"
    return out + b"--" + boundary + b"--\r\nepilogue\r\n"


def text(body: bytes = b"hello") -> bytes:
    return b"Content-Type: text/plain\r\n\r\n" + body


def mimeRefusal(body: bytes, headers: bytes = b"", **options) -> SMTPReply | None:
    """
    Check a message whose top-level entity (Content-Type and body) is
    C{body}.
    """
    chain = ContentPolicyChain([MimePartsPolicy(**options)])
    return check(chain, b"From: a@b\r\n" + headers + body)


class MimePartsPolicyTests(unittest.TestCase):
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
        self.assertIsNotNone(mimeRefusal(multipart(b"b", [b""] * 101)))

    def test_nested(self):
        """
        A nested multipart counts as a part, and so do its own parts.
        """
        inner = multipart(b"inner", [text(), text(b"<p>hi</p>")], b"alternative")
        message = multipart(b"outer", [inner, text(), text()])
        self.assertIsNone(mimeRefusal(message, maxParts=5))
        self.assertIsNotNone(mimeRefusal(message, maxParts=4))

    def test_partHeadersFolded(self):
        inner = (
            b"Content-Type: multipart/related;\r\n"
            b'\tboundary="in ner"\r\nContent-ID: <x>\r\n\r\n'
            b"--in ner\r\n\r\none\r\n--in ner\r\n\r\ntwo\r\n--in ner--\r\n"
        )
        message = multipart(b"outer", [inner])
        self.assertIsNone(mimeRefusal(message, maxParts=3))
        self.assertIsNotNone(mimeRefusal(message, maxParts=2))

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
        self.assertIsNotNone(mimeRefusal(body, maxParts=1))

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
        self.assertIsNotNone(mimeRefusal(message, maxParts=3))

    def test_digest(self):
        """
        In a multipart/digest, a part without Content-Type is a message.
        """
        part = b"\r\nFrom: x@y\r\n" + multipart(b"d2", [text()])
        message = multipart(b"d1", [part, part], b"digest")
        self.assertIsNone(mimeRefusal(message, maxParts=4))
        self.assertIsNotNone(mimeRefusal(message, maxParts=3))

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
        self.assertIsNotNone(mimeRefusal(message, maxPartSize=4))

    def test_singlePartSize(self):
        self.assertIsNone(mimeRefusal(b"\r\n12345\r\n", maxPartSize=5))
        self.assertIsNotNone(mimeRefusal(b"\r\n12345\r\n6\r\n", maxPartSize=5))

    def test_partWithoutHeaderSection(self):
        """
        A part whose first line is not a header field starts its content
        right there.
        """
        body = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nabcdef\r\n--b--"
        )
        self.assertIsNone(mimeRefusal(body, maxPartSize=6))
        self.assertIsNotNone(mimeRefusal(body, maxPartSize=5))

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
        self.assertIsNotNone(mimeRefusal(nest(3), maxDepth=2))

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


class Recorder:
    """
    A checker that records what it is given and may refuse at a chosen
    call.
    """

    def __init__(self, log: list, name: str, refuseAt=None, fail=False) -> None:
        self.log = log
        self.name = name
        self.refuseAt = refuseAt
        self.fail = fail

    def _maybe(self, event):
        self.log.append((self.name,) + event)
        if self.refuseAt == event[0]:
            if self.fail:
                raise ZeroDivisionError()
            raise SMTPReply(554, "5.7.1", f"refused by {self.name}")

    def headersReceived(self, headers):
        self._maybe(("headers", tuple(headers.fields), headers.error))

    def lineReceived(self, line):
        self._maybe(("line", line))

    def eomReceived(self):
        self._maybe(("eom",))


@implementer(IContentPolicy)
class RecordingPolicy:
    def __init__(self, log, name, refuseAt=None, fail=False, skip=False):
        self.log, self.name = log, name
        self.refuseAt, self.fail, self.skip = refuseAt, fail, skip
        self.envelopes = []

    def startMessage(self, envelope):
        self.envelopes.append(envelope)
        if self.refuseAt == "start":
            if self.fail:
                raise ZeroDivisionError()
            raise SMTPReply(554, "5.7.1", f"refused by {self.name}")
        if self.skip:
            return None
        return Recorder(self.log, self.name, self.refuseAt, self.fail)


class ChainTests(unittest.TestCase):
    def test_order(self):
        log = []
        a, b = RecordingPolicy(log, "a"), RecordingPolicy(log, "b")
        self.assertIsNone(
            check(ContentPolicyChain([a, b]), b"X: 1\r\n Y\r\n\r\nl1\r\n")
        )
        fields = (("X", "1 Y"),)
        self.assertEqual(
            log,
            [
                ("a", "headers", fields, None),
                ("b", "headers", fields, None),
                ("a", "line", b"l1"),
                ("b", "line", b"l1"),
                ("a", "eom"),
                ("b", "eom"),
            ],
        )
        self.assertEqual(a.envelopes, [ENVELOPE])

    def test_headersOnce(self):
        """
        headersReceived comes once per policy; later empty lines are body.
        """
        log = []
        chain = ContentPolicyChain(
            [RecordingPolicy(log, "a"), RecordingPolicy(log, "b")]
        )
        check(chain, b"X: 1\r\n\r\n\r\nY: 2\r\n")
        self.assertEqual(
            [entry[:2] for entry in log],
            [
                ("a", "headers"),
                ("b", "headers"),
                ("a", "line"),
                ("b", "line"),
                ("a", "line"),
                ("b", "line"),
                ("a", "eom"),
                ("b", "eom"),
            ],
        )

    def test_sameHeadersObject(self):
        seen = []

        class Keep(Recorder):
            def headersReceived(self, headers):
                seen.append(headers)

        @implementer(IContentPolicy)
        class KeepPolicy:
            def startMessage(self, envelope):
                return Keep([], "k")

        check(ContentPolicyChain([KeepPolicy(), KeepPolicy()]), GOOD)
        self.assertEqual(len(seen), 2)
        self.assertIs(seen[0], seen[1])

    def test_headersAtEom(self):
        log = []
        check(ContentPolicyChain([RecordingPolicy(log, "a")]), b"X: 1\r\n")
        self.assertEqual(log, [("a", "headers", (("X", "1"),), None), ("a", "eom")])

    def test_malformedLineIsBody(self):
        log = []
        check(ContentPolicyChain([RecordingPolicy(log, "a")]), b"X: 1\r\nbody\r\n")
        self.assertEqual(
            log,
            [
                (
                    "a",
                    "headers",
                    (("X", "1"),),
                    "line 2 is neither a header field nor a continuation line",
                ),
                ("a", "line", b"body"),
                ("a", "eom"),
            ],
        )

    def test_firstRefusalWins(self):
        for at in ["headers", "line", "eom"]:
            log = []
            chain = ContentPolicyChain(
                [RecordingPolicy(log, "a", at), RecordingPolicy(log, "b", at)]
            )
            checker = chain.startMessage(ENVELOPE)
            e = None
            try:
                for line in [b"X: 1", b"", b"body"]:
                    checker.lineReceived(line)
                checker.eomReceived()
            except SMTPReply as refusal:
                e = refusal
            self.assertEqual(e.text, "refused by a")
            self.assertEqual(log[-1][:2], ("a", at))
            self.assertNotIn("b", [entry[0] for entry in log if entry[1] == at])
            # Later calls repeat the refusal without reaching any policy.
            count = len(log)
            self.assertIs(self.assertRaises(SMTPReply, checker.lineReceived, b"x"), e)
            self.assertIs(self.assertRaises(SMTPReply, checker.eomReceived), e)
            self.assertEqual(len(log), count)

    def test_refusalAtStart(self):
        log = []
        chain = ContentPolicyChain([RecordingPolicy(log, "a", "start")])
        e = self.assertRaises(SMTPReply, chain.startMessage, ENVELOPE)
        self.assertEqual(e.text, "refused by a")

    def test_failingPolicy(self):
        """
        A policy failing with anything but SMTPReply makes the message fail
        temporarily, and is logged.
        """
        for at in ["start", "headers", "line", "eom"]:
            chain = ContentPolicyChain(
                [RecordingPolicy([], "a", at, fail=True), RecordingPolicy([], "b")]
            )
            e = check(chain, b"X: 1\r\n\r\nbody\r\n")
            self.assertEqual(
                (e.code, e.status, e.text),
                (451, "4.3.0", "Error: temporary local problem, try again later"),
            )
            self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_collectorLimitRefuses(self):
        chain = ContentPolicyChain([RecordingPolicy([], "a")], maxHeaderFields=2)
        e = check(chain, b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n")
        self.assertEqual((e.code, e.status), (552, "5.3.4"))
        chain = ContentPolicyChain([RecordingPolicy([], "a")], maxHeaderSize=10)
        e = check(chain, b"A: 1234567\r\n\r\n")
        self.assertEqual((e.code, e.status), (552, "5.3.4"))

    def test_skippingPolicy(self):
        """
        A policy whose startMessage returns None is not consulted for that
        message; with no checker at all nothing is parsed.
        """
        log = []
        chain = ContentPolicyChain([RecordingPolicy(log, "a", skip=True)])
        checker = chain.startMessage(ENVELOPE)
        checker.lineReceived(b" not even a header")
        checker.eomReceived()
        self.assertEqual(log, [])
        self.assertIsNone(checker.headers)

    def test_empty(self):
        chain = ContentPolicyChain([])
        self.assertEqual(len(chain), 0)
        self.assertIsNone(check(chain, b"X: " + b"x" * 100000 + b"\r\n"))

    def test_builtinsTogether(self):
        chain = ContentPolicyChain([HeaderPolicy(), MimePartsPolicy(maxParts=1)])
        self.assertIsNone(check(chain, GOOD))
        message = GOOD.split(b"\r\n\r\n")[0] + b"\r\n" + multipart(b"b", [text()] * 2)
        e = check(chain, message)
        self.assertEqual(e.text, "Message refused: more than 1 MIME body parts")
        e = check(chain, without(message, b"Date"))
        self.assertEqual(e.code, 550)


@implementer(IContentPolicy)
class Configurable:
    def __init__(self, **options):
        self.options = options

    def startMessage(self, envelope):
        return None


class NotAPolicy:
    def __init__(self, **options):
        pass


def notAClass():
    raise ValueError("boom")


class Nested:
    Inner = Configurable


class LoadPoliciesTests(unittest.TestCase):
    def test_builtins(self):
        chain = loadPolicies(
            [
                {"name": "headers", "require_message_id": False, "single_from": False},
                {"name": "mime-parts", "max_parts": 5, "max_part_size": 10},
                {"name": "headers"},
            ]
        )
        names = [name for name, _ in chain.policies]
        self.assertEqual(names, ["headers", "mime-parts", "headers"])
        headers, mime, default = (p for _, p in chain.policies)
        self.assertIsInstance(headers, HeaderPolicy)
        self.assertEqual(
            headers.required, {"From": True, "Date": True, "Message-ID": False}
        )
        self.assertFalse(headers.singleFrom)
        self.assertEqual((mime.maxParts, mime.maxPartSize, mime.maxDepth), (5, 10, 20))
        self.assertEqual(default.required["Message-ID"], True)

    def test_empty(self):
        self.assertEqual(len(loadPolicies([])), 0)

    def test_headerLimits(self):
        chain = loadPolicies([], maxHeaderSize=100, maxHeaderFields=3)
        self.assertEqual((chain.maxHeaderSize, chain.maxHeaderFields), (100, 3))

    def assertError(self, specs, message):
        e = self.assertRaises(ValueError, loadPolicies, specs)
        self.assertEqual(str(e), message)

    def test_builtinOptionErrors(self):
        self.assertError(
            [{"name": "headers", "require_to": True}],
            "content policy 'headers': unknown option 'require_to' (known: "
            "require_from, require_date, require_message_id, single_from)",
        )
        self.assertError(
            [{"name": "headers", "require_date": "no"}],
            "content policy 'headers': require_date must be a boolean",
        )
        self.assertError(
            [{"name": "mime-parts", "max_parts": True}],
            "content policy 'mime-parts': max_parts must be an integer",
        )
        self.assertError(
            [{"name": "mime-parts", "max_parts": -1}],
            "content policy 'mime-parts': maxParts must not be negative",
        )

    def test_shapeErrors(self):
        self.assertError("headers", "content policies must be a list of tables")
        self.assertError(["headers"], "content policy 'headers': must be a table")
        self.assertError(
            [{"max_parts": 1}], "content policy {'max_parts': 1}: needs a name"
        )

    def test_dottedPath(self):
        chain = loadPolicies(
            [{"name": "tests.test_content:Configurable", "a": 1, "b_c": "x"}]
        )
        [(name, policy)] = chain.policies
        self.assertEqual(name, "tests.test_content:Configurable")
        self.assertIsInstance(policy, Configurable)
        self.assertEqual(policy.options, {"a": 1, "b_c": "x"})
        [(_, inner)] = loadPolicies(
            [{"name": "tests.test_content:Nested.Inner"}]
        ).policies
        self.assertIsInstance(inner, Configurable)

    def test_unknownName(self):
        self.assertError(
            [{"name": "spamassassin"}],
            "unknown content policy 'spamassassin': give a built-in name "
            "(headers, mime-parts) or module:Class",
        )

    def test_importErrors(self):
        e = self.assertRaises(
            ValueError, loadPolicies, [{"name": "no_such_module_xyz:Policy"}]
        )
        self.assertIn(
            "content policy 'no_such_module_xyz:Policy': cannot import "
            "no_such_module_xyz",
            str(e),
        )
        self.assertError(
            [{"name": "tests.test_content:Missing"}],
            "content policy 'tests.test_content:Missing': tests.test_content has "
            "no Missing",
        )

    def test_notAPolicy(self):
        e = self.assertRaises(
            ValueError, loadPolicies, [{"name": "tests.test_content:NotAPolicy"}]
        )
        self.assertIn("content policy 'tests.test_content:NotAPolicy': ", str(e))
        self.assertIn("does not provide IContentPolicy", str(e))

    def test_constructorFails(self):
        self.assertError(
            [{"name": "tests.test_content:notAClass"}],
            "content policy 'tests.test_content:notAClass': cannot create it: boom",
        )
        e = self.assertRaises(
            ValueError,
            loadPolicies,
            [{"name": "tests.example_policy:RequireHeader", "wrong": 1}],
        )
        self.assertIn("cannot create it", str(e))
        self.assertIn("wrong", str(e))


class ExamplePolicyTests(unittest.TestCase):
    def setUp(self):
        self.chain = loadPolicies(
            [
                {"name": "headers"},
                {
                    "name": "tests.example_policy:RequireHeader",
                    "header": "X-Digipoort-Berichttype",
                },
            ]
        )

    def test_loaded(self):
        [_, (name, policy)] = self.chain.policies
        self.assertIsInstance(policy, RequireHeader)
        self.assertEqual(policy.header, "X-Digipoort-Berichttype")

    def test_present(self):
        message = adding(GOOD, b"x-digipoort-berichttype: aangifte")
        self.assertIsNone(check(self.chain, message))

    def test_missing(self):
        e = check(self.chain, GOOD)
        self.assertEqual(
            (e.code, e.status, e.text),
            (
                550,
                "5.6.0",
                "Message refused: exactly one X-Digipoort-Berichttype: header "
                "field is required",
            ),
        )

    def test_headerPolicyFirst(self):
        e = check(self.chain, without(GOOD, b"From"))
        self.assertIn("From:", e.text)

    def test_values(self):
        chain = loadPolicies(
            [
                {
                    "name": "tests.example_policy:RequireHeader",
                    "header": "X-Digipoort-Berichttype",
                    "values": ["aangifte", "suppletie"],
                }
            ]
        )
        ok = adding(GOOD, b"X-Digipoort-Berichttype: Suppletie")
        self.assertIsNone(check(chain, ok))
        bad = adding(GOOD, b"X-Digipoort-Berichttype: spam")
        self.assertEqual(
            check(chain, bad).text,
            "Message refused: unknown X-Digipoort-Berichttype",
        )

    def test_badOption(self):
        self.assertRaises(
            ValueError,
            loadPolicies,
            [{"name": "tests.example_policy:RequireHeader", "header": ""}],
        )
