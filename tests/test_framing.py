# -*- test-case-name: tests.test_framing -*-
"""
L{msa.submission.framing}: the line framer and the DATA filter, exhaustively and
without sockets.
"""

from twisted.trial import unittest

from msa.submission.framing import END, DataFilter, LineFramer


def takeAll(framer: LineFramer, maxLength: int = 20) -> list:
    lines = []
    while (item := framer.nextLine(maxLength)) is not None:
        lines.append(item)
    return lines


class LineFramerTests(unittest.TestCase):
    def test_splitOnlyOnCRLF(self):
        framer = LineFramer()
        framer.feed(b"a\nb\rc\r\nd\r\n")
        self.assertEqual(takeAll(framer), [(b"a\nb\rc", False), (b"d", False)])

    def test_everySplitPoint(self):
        """
        However the stream is cut into packets, the lines are the same.
        """
        stream = b"one\r\ntwo\r\n\r\nthree\rx\r\n"
        expected = [
            (b"one", False),
            (b"two", False),
            (b"", False),
            (b"three\rx", False),
        ]
        for cut in range(len(stream) + 1):
            framer = LineFramer()
            lines = []
            for part in (stream[:cut], stream[cut:]):
                framer.feed(part)
                lines += takeAll(framer)
            self.assertEqual(lines, expected, cut)

    def test_byteByByte(self):
        framer = LineFramer()
        lines = []
        for byte in b"ab\r\n" + b"x" * 30 + b"\r\ncd\r\n":
            framer.feed(bytes([byte]))
            lines += takeAll(framer)
        self.assertEqual(lines, [(b"ab", False), (b"x" * 20, True), (b"cd", False)])

    def test_lengthEdge(self):
        framer = LineFramer()
        framer.feed(b"y" * 20 + b"\r\n" + b"z" * 21 + b"\r\n")
        self.assertEqual(takeAll(framer), [(b"y" * 20, False), (b"z" * 20, True)])

    def test_longLineBoundedMemory(self):
        framer = LineFramer()
        for _ in range(1000):
            framer.feed(b"q" * 1000)
            self.assertIsNone(framer.nextLine(20))
            self.assertLessEqual(framer.buffered, 1)
        framer.feed(b"\r\nnext\r\n")
        self.assertEqual(takeAll(framer), [(b"q" * 20, True), (b"next", False)])

    def test_crAtPacketBoundaryOfLongLine(self):
        framer = LineFramer()
        framer.feed(b"w" * 50 + b"\r")
        self.assertIsNone(framer.nextLine(20))
        framer.feed(b"\nafter\r\n")
        self.assertEqual(takeAll(framer), [(b"w" * 20, True), (b"after", False)])

    def test_limitChangesBetweenLines(self):
        framer = LineFramer()
        framer.feed(b"short\r\n" + b"m" * 30 + b"\r\n")
        self.assertEqual(framer.nextLine(10), (b"short", False))
        self.assertEqual(framer.nextLine(100), (b"m" * 30, False))

    def test_clear(self):
        framer = LineFramer()
        framer.feed(b"STARTTLS\r\nEVIL\r\npartial")
        self.assertEqual(framer.nextLine(20), (b"STARTTLS", False))
        framer.clear()
        self.assertEqual(framer.buffered, 0)
        self.assertIsNone(framer.nextLine(20))


class DataFilterTests(unittest.TestCase):
    def test_endAndUnstuffing(self):
        f = DataFilter(maxSize=1000)
        self.assertEqual(f.lineReceived(b"..x"), b".x")
        self.assertEqual(f.lineReceived(b".."), b".")
        self.assertEqual(f.lineReceived(b"plain"), b"plain")
        self.assertIs(f.lineReceived(b"."), END)
        self.assertIsNone(f.error)
        self.assertEqual(f.size, len(b".x\r\n.\r\nplain\r\n"))

    def test_dotWithTrailingSpaceIsNotEnd(self):
        f = DataFilter(maxSize=1000)
        self.assertEqual(f.lineReceived(b". "), b" ")
        self.assertEqual(f.lineReceived(b".\n"), None)
        self.assertEqual(f.error.code, 550)

    def test_bareLineEnds(self):
        for line in [b"a\nb", b"a\rb", b"\n", b"\r", b"x\r", b"\n.", b"..\n"]:
            f = DataFilter(maxSize=1000)
            self.assertIsNone(f.lineReceived(line), line)
            self.assertEqual((f.error.code, f.error.status), (550, "5.5.2"), line)

    def test_sizeEdge(self):
        f = DataFilter(maxSize=10)
        self.assertEqual(f.lineReceived(b"12345678"), b"12345678")
        self.assertIsNone(f.error)
        f = DataFilter(maxSize=10)
        self.assertIsNone(f.lineReceived(b"123456789"))
        self.assertEqual((f.error.code, f.error.status), (552, "5.3.4"))

    def test_tooLong(self):
        f = DataFilter(maxSize=1000, maxLineLength=998)
        self.assertIsNone(f.lineReceived(b"x" * 998, tooLong=True))
        self.assertEqual((f.error.code, f.error.status), (550, "5.6.0"))
        self.assertIn("1000 octets", f.error.text)

    def test_afterErrorLinesDroppedUntilEnd(self):
        f = DataFilter(maxSize=1000)
        f.lineReceived(b"bad\n")
        first = f.error
        self.assertIsNone(f.lineReceived(b"fine"))
        self.assertIsNone(f.lineReceived(b"x" * 2000, tooLong=True))
        self.assertIs(f.error, first)
        self.assertIs(f.lineReceived(b"."), END)


class TransparencyDotTests(unittest.TestCase):
    """
    RFC 5321 4.5.3.1.6: a text line is at most 998 octets without its CRLF,
    and the dot a client adds for transparency does not count.  Both the
    line path and the block path judge the unstuffed line.
    """

    def test_framingLimit(self):
        f = DataFilter(maxSize=10**6)
        self.assertEqual(f.framingLimit, 999)
        framer = LineFramer()
        framer.feed(b".." + b"x" * 997 + b"\r\n" + b".." + b"x" * 998 + b"\r\n")
        self.assertEqual(framer.nextLine(f.framingLimit), (b".." + b"x" * 997, False))
        self.assertEqual(framer.nextLine(f.framingLimit), (b".." + b"x" * 997, True))

    def test_lineEdge(self):
        f = DataFilter(maxSize=10**6)
        self.assertEqual(f.lineReceived(b".." + b"x" * 997), b"." + b"x" * 997)
        self.assertEqual(f.lineReceived(b"." + b"y" * 998), b"y" * 998)
        self.assertEqual(f.lineReceived(b"z" * 998), b"z" * 998)
        self.assertIsNone(f.error)
        for line in [b".." + b"x" * 998, b"x" * 999, b"." + b"x" * 999]:
            f = DataFilter(maxSize=10**6)
            self.assertIsNone(f.lineReceived(line), line[:3])
            self.assertEqual((f.error.code, f.error.status), (550, "5.6.0"))

    def test_blockEdge(self):
        f = DataFilter(maxSize=10**6)
        block = (b".." + b"x" * 997 + b"\r\n") * 3
        self.assertEqual(f.blockReceived(block), (b"." + b"x" * 997 + b"\r\n") * 3)
        self.assertEqual(f.size, 3 * 1000)
        # One unstuffed octet too many: the block path declines, the line
        # path refuses.
        f = DataFilter(maxSize=10**6)
        self.assertIsNone(f.blockReceived(block + b".." + b"x" * 998 + b"\r\n"))
        self.assertIsNone(f.error)
        self.assertEqual(f.size, 0)


class _CountingBuffer(bytearray):
    """
    A framer buffer that adds up the bytes moved by dropping a prefix.
    """

    moved = 0

    def __delitem__(self, index):
        before = len(self)
        super().__delitem__(index)
        self.moved += len(self)
        assert isinstance(index, slice) and before - len(self) == index.stop


class LinearFeedTests(unittest.TestCase):
    """
    Issue 9 item 8: feeding is linear in the bytes fed, however they are
    cut, so a flood of small packets held while a reply is pending does not
    cost quadratic copying.  Asserted on the buffer's structure, not time.
    """

    def test_appendsInPlace(self):
        """
        Bytes fed while nothing is taken go into one buffer, never copied.
        """
        framer = LineFramer()
        buffer = framer._buffer
        for _ in range(100000):
            framer.feed(b"x")
        self.assertIs(framer._buffer, buffer)
        self.assertEqual(len(buffer), 100000)
        self.assertEqual(framer.buffered, 100000)

    def test_takenBytesMovedAtMostOnce(self):
        """
        Lines taken while more arrive: the bytes moved to drop taken
        prefixes add up to less than the bytes fed, and the taken prefix
        kept never outgrows what is left.
        """
        framer = LineFramer()
        framer._buffer = buffer = _CountingBuffer()
        fed = 0
        for i in range(20000):
            packet = b"NOOP %d\r\n" % i
            for part in (packet[:3], packet[3:]):
                framer.feed(part)
                # Right after a feed, the taken prefix is at most half.
                self.assertLessEqual(len(buffer), 2 * framer.buffered)
            fed += len(packet)
            if i % 3 == 0:
                while framer.nextLine(100) is not None:
                    pass
        self.assertIs(framer._buffer, buffer)
        self.assertLess(buffer.moved, fed)
