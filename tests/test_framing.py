"""
L{msa.framing}: the line framer and the DATA filter, exhaustively and
without sockets.
"""

from twisted.trial import unittest

from msa.framing import END, DataFilter, LineFramer


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
