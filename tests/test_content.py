# -*- test-case-name: tests.test_content -*-
"""
Tests for L{msa.policy.content}: the header collector and the chain that runs
the content policies in order (one header parse, the first refusal wins, a
failing policy is a temporary failure), and the message helpers the tests of
the policies themselves use (L{tests.test_contentpolicies},
L{tests.test_mimeparts}).
"""

from twisted.trial import unittest
from zope.interface import implementer

from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import IContentPolicy
from msa.policy.content import ContentPolicyChain, HeaderCollector, Headers
from msa.policy.contentpolicies import HeaderPolicy
from msa.policy.mimeparts import MimePartsPolicy

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


def without(message: bytes, name: bytes) -> bytes:
    return b"".join(
        line for line in message.splitlines(True) if not line.startswith(name + b":")
    )


def adding(message: bytes, line: bytes) -> bytes:
    return line + b"\r\n" + message


def multipart(boundary: bytes, parts: list[bytes], ctype=b"mixed") -> bytes:
    out = b"Content-Type: multipart/" + ctype + b'; boundary="' + boundary + b'"\r\n'
    out += b"\r\npreamble\r\n"
    for part in parts:
        out += b"--" + boundary + b"\r\n" + part + b"\r\n"
    return out + b"--" + boundary + b"--\r\nepilogue\r\n"


def text(body: bytes = b"hello") -> bytes:
    return b"Content-Type: text/plain\r\n\r\n" + body


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
