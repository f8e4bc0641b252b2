# -*- test-case-name: tests.test_chunking -*-
"""
L{msa.submission.chunking}: BDAT (RFC 3030) through the protocol, over a
string transport: chunks read by their size whatever they hold, the
replies after each chunk, the DATA filter's rules on a text body across
chunk boundaries, BINARYMIME stored as sent, and every error answered
only after the chunk's last octet.
"""

from twisted.trial import unittest

from tests.helpers import Harness

MESSAGE = b"From: a@example.nl\r\nSubject: x\r\n\r\nline one\r\n.\r\nline three\r\n"


def body(stored) -> bytes:
    """
    A committed message without the MSA's Received header (three lines).
    """
    return stored.data.split(b"\r\n", 3)[3]


class ChunkingTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness(self, maxMessageSize=2000)
        self.h.login()

    def envelope(self, params: bytes = b"") -> None:
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl>" + params), [b"250 2.1.0 Ok"]
        )
        self.assertEqual(self.h.command(b"RCPT TO:<b@example.nl>"), [b"250 2.1.5 Ok"])

    def test_chunks(self):
        """
        Two chunks, the second LAST: each gets its 250, the message is
        stored exactly as the chunks' octets (a line "." is text, not an
        end of data), and a CRLF cut between chunks is one line end.
        """
        self.envelope()
        cut = MESSAGE.index(b"line one\r\n") + len(b"line one\r")
        first, second = MESSAGE[:cut], MESSAGE[cut:]
        self.assertEqual(
            self.h.send(b"BDAT %d\r\n" % len(first) + first),
            [b"250 2.0.0 Ok: %d octets received so far" % cut],
        )
        self.assertEqual(
            self.h.send(b"BDAT %d LAST\r\n" % len(second) + second),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        [stored] = self.h.spool.committed
        self.assertEqual(body(stored), MESSAGE)

    def test_pipelined(self):
        """
        MAIL, RCPT, BDAT chunks and QUIT in one write: one reply each.
        """
        data = (
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
            b"BDAT 10\r\n" + MESSAGE[:10] + b"BDAT %d LAST\r\n" % (len(MESSAGE) - 10)
        )
        replies = self.h.send(data + MESSAGE[10:] + b"QUIT\r\n")
        self.assertEqual(
            replies,
            [
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"250 2.0.0 Ok: 10 octets received so far",
                b"250 2.0.0 Ok: queued as Q0001",
                b"221 2.0.0 Bye",
            ],
        )
        self.assertEqual(body(self.h.spool.committed[0]), MESSAGE)

    def test_emptyLast(self):
        """
        C{BDAT 0 LAST} ends the message.
        """
        self.envelope()
        self.h.send(b"BDAT %d\r\n" % len(MESSAGE) + MESSAGE)
        self.assertEqual(
            self.h.command(b"BDAT 0 LAST"), [b"250 2.0.0 Ok: queued as Q0001"]
        )
        self.assertEqual(body(self.h.spool.committed[0]), MESSAGE)

    def test_bareLineFeed(self):
        """
        A bare LF in a text body (the SMTP smuggling probe, through BDAT)
        is 550 5.5.2 once the chunk is read: its octets are never commands,
        the message is dropped, and the transaction is over.
        """
        self.envelope()
        smuggled = b"Subject: x\r\n\r\nhi\n.\nRSET\r\nNOOP\r\n"
        self.assertEqual(
            self.h.send(b"BDAT %d\r\n" % len(smuggled) + smuggled),
            [
                b"550 5.5.2 Message refused: bare CR or LF in message text; "
                b"lines must end with CRLF"
            ],
        )
        self.assertTrue(self.h.spool.writers[0].aborted)
        self.assertEqual(
            self.h.send(b"BDAT 6 LAST\r\nNOOP\r\n"),
            [b"503 5.5.1 Error: need MAIL command"],
        )
        self.assertEqual(self.h.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.h.spool.committed, [])

    def test_tooLarge(self):
        """
        A chunk that takes the message past its limit is read to its end,
        then 552 5.3.4; the session goes on.
        """
        self.envelope()
        chunk = b"x" * 78 + b"\r\n"
        replies = self.h.send(b"BDAT 3000 LAST\r\n" + chunk * 37 + b"N" * 40)
        self.assertEqual(
            replies,
            [b"552 5.3.4 Message size exceeds fixed maximum message size (2000)"],
        )
        self.assertEqual(self.h.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.h.spool.committed, [])
        # Refused from its declared size: none of its octets was stored,
        # only the Received header had been written.
        [writer] = self.h.spool.writers
        self.assertTrue(writer.aborted)
        self.assertEqual(writer.data.getvalue().count(b"\r\n"), 3)

    def test_connectionLostBetweenChunks(self):
        """
        The client leaves between two chunks: the message is dropped.
        """
        self.envelope()
        self.h.send(b"BDAT 4\r\nab\r\n")
        self.h.close()
        self.assertTrue(self.h.spool.writers[0].aborted)
        self.assertEqual(self.h.spool.committed, [])

    def test_refusedCommandChunkRead(self):
        """
        BDAT without MAIL, or without RCPT: the chunk is read and dropped,
        then 503 or 554 5.5.1.
        """
        self.assertEqual(
            self.h.send(b"BDAT 6\r\nRSET\r\n"), [b"503 5.5.1 Error: need MAIL command"]
        )
        self.h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(
            self.h.send(b"BDAT 6 LAST\r\nQUIT\r\n"),
            [b"554 5.5.1 Error: no valid recipients"],
        )
        self.assertEqual(self.h.spool.writers, [])

    def test_syntax(self):
        for line in (b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 1 FIRST", b"BDAT 1 LAST x"):
            self.assertEqual(
                self.h.command(line), [b"501 5.5.4 Syntax: BDAT <size> [LAST]"], line
            )

    def test_dataAndBdatNotMixed(self):
        """
        DATA between BDAT chunks is 503 5.5.1, and so is RCPT.
        """
        self.envelope()
        self.h.send(b"BDAT 5\r\nab\r\nc")
        self.assertEqual(
            self.h.command(b"DATA"), [b"503 5.5.1 Error: DATA in a BDAT transaction"]
        )
        self.assertEqual(
            self.h.command(b"RCPT TO:<c@example.nl>"),
            [b"503 5.5.1 Error: RCPT after BDAT"],
        )

    def test_rsetDropsMessage(self):
        """
        RSET between chunks drops the message.
        """
        self.envelope()
        self.h.send(b"BDAT 4\r\nab\r\n")
        self.assertEqual(self.h.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.assertTrue(self.h.spool.writers[0].aborted)
        self.assertEqual(
            self.h.send(b"BDAT 4 LAST\r\nab\r\n"),
            [b"503 5.5.1 Error: need MAIL command"],
        )

    def test_textMustEndWithCRLF(self):
        """
        A text body whose last line has no CRLF is refused at LAST.
        """
        self.envelope()
        self.assertEqual(
            self.h.send(b"BDAT 9 LAST\r\nSubject:x"),
            [
                b"550 5.6.0 Message refused: a text message must end with CRLF "
                b"(use BODY=BINARYMIME for other content)"
            ],
        )
        self.assertEqual(self.h.spool.committed, [])
        # Also when that line is too long to be kept.
        self.envelope()
        self.assertEqual(
            self.h.send(b"BDAT 1600 LAST\r\n" + b"Subject: x\r\n\r\n" + b"z" * 1586),
            [
                b"550 5.6.0 Message refused: a text message must end with CRLF "
                b"(use BODY=BINARYMIME for other content)"
            ],
        )
        self.assertEqual(self.h.spool.committed, [])

    def test_longLine(self):
        """
        The line length limit holds in a text body, across chunks.
        """
        self.envelope()
        self.h.send(b"BDAT 600\r\n" + b"l" * 600)
        self.assertEqual(
            self.h.send(b"BDAT 402 LAST\r\n" + b"l" * 400 + b"\r\n"),
            [
                b"550 5.6.0 Message refused: a line is longer than 1000 octets "
                b"(RFC 5321 4.5.3.1.6); use a MIME content transfer encoding"
            ],
        )

    def test_binaryMIME(self):
        """
        BODY=BINARYMIME: stored exactly as sent, bare LF, NUL and long
        lines included; DATA is 503 5.5.1 for it.
        """
        self.envelope(b" BODY=BINARYMIME")
        self.assertEqual(
            self.h.command(b"DATA"),
            [b"503 5.5.1 Error: BODY=BINARYMIME requires BDAT"],
        )
        content = b"Subject: bin\r\n\r\n\x00\n\r" + bytes(range(256)) + b"z" * 1200
        self.assertEqual(
            self.h.send(b"BDAT %d LAST\r\n" % len(content) + content),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        [stored] = self.h.spool.committed
        self.assertEqual(body(stored), content)
        self.assertEqual(stored.envelope.mailParams, {"BODY": "BINARYMIME"})

    def test_switchedOff(self):
        """
        Without CHUNKING, BDAT is an unknown command, EHLO does not offer
        it, and BODY=BINARYMIME is malformed.
        """
        h = Harness(self, extensions=frozenset({"DSN"}))
        ehlo = h.startTLS()
        self.assertNotIn(b"250-CHUNKING", ehlo)
        self.assertIn(b"250-DSN", ehlo)
        h.login()
        self.assertEqual(
            h.command(b"BDAT 1 LAST"), [b"500 5.5.2 Error: command not recognized"]
        )
        self.assertEqual(
            h.command(b"MAIL FROM:<a@example.nl> BODY=BINARYMIME"),
            [b"501 5.5.4 BODY must be 7BIT or 8BITMIME"],
        )

    def test_deadline(self):
        """
        A chunk trickled in slower than the DATA deadline allows ends the
        session with 421 4.4.2, the message dropped.
        """
        self.envelope()
        self.h.send(b"BDAT 100000 LAST\r\nabc")
        for _ in range(40):
            self.h.server.dataReceived(b"x")
            self.h.clock.advance(10)
        self.assertIn(
            b"421 4.4.2 msa.example.nl Error: timeout exceeded (DATA)",
            self.h.transport.value(),
        )
        self.assertTrue(self.h.spool.writers[0].aborted)
