# -*- test-case-name: tests.test_framing,tests.test_mutants -*-
"""
The two pure state machines under the SMTP server: L{LineFramer} cuts the
byte stream into CRLF-terminated lines with bounded memory, and L{DataFilter}
decides what happens to each line of a message between DATA and the final
dot (dot-unstuffing, bare CR/LF, over-long lines, size).  No transport here:
bytes in, decisions out, so both are tested exhaustively without sockets.

Only CRLF ends a line, and only CRLF "." CRLF ends DATA: a bare LF or bare
CR never ends anything, which closes the SMTP smuggling hole (a message that
contains one is refused instead, so none ever reaches the core MTA).
"""

import attrs

from msa.errors import SMTPReply


class LineFramer:
    """
    Split a byte stream into lines ending in CRLF.

    Lines are taken one at a time with L{nextLine}, so that the caller can
    change the length limit between lines (a command line and a line of
    message text have different limits) and can stop taking lines (after
    STARTTLS, the rest of the buffer must be thrown away, not executed).

    Memory is bounded: a line longer than the limit is not kept; only the
    fact that it was too long is, until its CRLF arrives.
    """

    def __init__(self) -> None:
        # The bytes not yet taken start at _pos: taking a line moves the
        # offset instead of copying the rest of the buffer each time.
        self._buffer = bytearray()
        self._pos = 0
        self._discarding = False
        self._kept = b""

    def feed(self, data: bytes) -> None:
        """
        Add received bytes.  Linear in the bytes fed, however they are cut:
        the bytes are appended in place (amortised), and the prefix already
        taken is dropped only once it is at least as long as what is left,
        so no byte is moved more than a bounded number of times.  (Copying
        the whole buffer on each call made a flood of small packets, held
        while a reply was pending, quadratic.)
        """
        buffer, pos = self._buffer, self._pos
        if pos and pos >= len(buffer) - pos:
            del buffer[:pos]
            self._pos = 0
        buffer += data

    def clear(self) -> None:
        """
        Throw away everything received and not yet taken as a line.
        """
        self._buffer = bytearray()
        self._pos = 0
        self._discarding = False
        self._kept = b""

    def completeLines(self) -> bytes:
        """
        Every complete line buffered, CRLFs included, without taking them
        (see L{skip}); C{b""} when there is none or while an over-long line
        is being thrown away.
        """
        if self._discarding:
            return b""
        end = self._buffer.rfind(b"\r\n", self._pos)
        if end < 0:
            return b""
        return bytes(self._buffer[self._pos : end + 2])

    def skip(self, count: int) -> None:
        """
        Take C{count} bytes that L{completeLines} returned.
        """
        self._pos += count

    def take(self, count: int) -> bytes:
        """
        Take up to C{count} buffered bytes as they are, lines or not: the
        octets of a BDAT chunk (RFC 3030), which are not cut into lines.
        Only between lines (after a command line's CRLF).
        """
        data = bytes(self._buffer[self._pos : self._pos + count])
        self._pos += len(data)
        return data

    @property
    def midLine(self) -> bool:
        """
        Whether part of a line has been received without its CRLF (held, or
        being thrown away as too long).
        """
        return self._discarding or self.buffered > 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def nextLine(self, maxLength: int) -> tuple[bytes, bool] | None:
        """
        Take the next complete line.

        @param maxLength: the longest line accepted, without its CRLF.
        @return: C{(line, tooLong)} without the CRLF, or L{None} when no
            complete line is buffered.  When C{tooLong} is true, C{line} is
            only the first C{maxLength} bytes of it.
        """
        buffer, pos = self._buffer, self._pos
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            if len(buffer) - pos > maxLength + 1:
                # Keep a trailing CR: it may start the CRLF of the next packet.
                if not self._discarding:
                    self._kept = bytes(buffer[pos : pos + maxLength])
                    self._discarding = True
                self._buffer = bytearray(b"\r" if buffer[-1:] == b"\r" else b"")
                self._pos = 0
            return None
        self._pos = end + 2
        if self._discarding:
            kept = self._kept
            self._discarding = False
            self._kept = b""
            return kept, True
        if end - pos > maxLength:
            return bytes(buffer[pos : pos + maxLength]), True
        return bytes(buffer[pos:end]), False


#: What L{DataFilter.lineReceived} says to do with a line.
END = object()


@attrs.define
class DataFilter:
    """
    One message's lines between 354 and the final dot.

    @ivar maxSize: the largest message accepted, in octets as received
        (CRLF included, dot-stuffing removed).
    @ivar maxLineLength: the longest text line, without its CRLF
        (RFC 5321 4.5.3.1.6: 1000 octets with it), counted after
        dot-unstuffing: the dot a client adds for transparency is not part
        of the line (RFC 5321 4.5.3.1.6, 4.5.2).
    @ivar error: the reply to send after the final dot instead of accepting
        the message, once any line has been refused.
    @ivar size: octets received so far.
    @ivar transparency: the lines carry SMTP's transparency dots and the
        final dot (DATA); false for the content of BDAT chunks (RFC 3030),
        which has neither but is judged by the same line rules otherwise.
    """

    maxSize: int
    maxLineLength: int = 998
    error: SMTPReply | None = None
    size: int = 0
    transparency: bool = True

    @property
    def framingLimit(self) -> int:
        """
        The longest line, as received, that the line framer must hand over
        whole: one octet more than L{maxLineLength}, for the transparency
        dot.  This filter judges the length itself once the dot is gone.
        """
        return self.maxLineLength + int(self.transparency)

    def lineReceived(self, line: bytes, tooLong: bool = False) -> object:
        """
        Judge one line.

        @param tooLong: the framer found the line longer than
            L{framingLimit} (C{line} is then only its start).

        @return: L{END} for the final dot; the unstuffed line to store; or
            L{None} when the line must be dropped (the message is already
            refused, see C{error}).
        """
        if self.transparency:
            if line == b".":
                return END
            if line[:1] == b".":
                line = line[1:]
        if self.error is not None:
            return None
        if tooLong or len(line) > self.maxLineLength:
            self.refuse(
                SMTPReply(
                    550,
                    "5.6.0",
                    "Message refused: a line is longer than "
                    f"{self.maxLineLength + 2} octets (RFC 5321 4.5.3.1.6); "
                    "use a MIME content transfer encoding",
                )
            )
            return None
        if b"\r" in line or b"\n" in line:
            self.refuse(
                SMTPReply(
                    550,
                    "5.5.2",
                    "Message refused: bare CR or LF in message text; "
                    "lines must end with CRLF",
                )
            )
            return None
        if not self.octetsReceived(len(line) + 2):
            return None
        return line

    def octetsReceived(self, count: int) -> bool:
        """
        Count C{count} more octets of the message; past C{maxSize} refuse
        it (552 5.3.4).  Alone, for a BDAT chunk of a BINARYMIME message,
        whose content has no lines to judge.

        @return: whether the message is still within its size.
        """
        self.size += count
        if self.size > self.maxSize:
            self.refuse(
                SMTPReply(
                    552,
                    "5.3.4",
                    f"Message size exceeds fixed maximum message size ({self.maxSize})",
                )
            )
        return self.error is None

    def blockReceived(self, block: bytes) -> bytes | None:
        """
        Judge a run of complete lines at once (each ending in CRLF): the
        fast path for the body of a message.  It applies only when every
        line is ordinary (not the final dot, no bare CR or LF, none too
        long, the message still within its size); then it returns the
        unstuffed bytes to store.  Otherwise it returns L{None} and changes
        nothing, and the caller takes the lines one by one through
        L{lineReceived}, which decides exactly as it always does.
        """
        if self.error is not None:
            return None
        marked = b"\r\n" + block
        if self.transparency and b"\r\n.\r\n" in marked:
            return None
        lines = block.count(b"\r\n")
        if block.count(b"\r") != lines or block.count(b"\n") != lines:
            return None
        data = marked.replace(b"\r\n.", b"\r\n")[2:] if self.transparency else block
        # Without bare CR or LF, the pieces between CRLFs are the lines; their
        # length counts without the transparency dot, as in lineReceived.
        if max(map(len, data.split(b"\r\n"))) > self.maxLineLength:
            return None
        if self.size + len(data) > self.maxSize:
            return None
        self.size += len(data)
        return data

    def refuse(self, reply: SMTPReply) -> None:
        """
        Refuse the message (the first refusal wins); the rest of DATA is
        read and dropped.
        """
        if self.error is None:
            self.error = reply
