# -*- test-case-name: tests.test_pop3 -*-
"""
What a POP3 command handler returns (L{Reply}) and the response codes of
RFC 2449 8 and RFC 3206 that the server puts in them.
"""

import attrs

#: RFC 2449 8.1.2: the mailbox is locked by another session.
IN_USE = "[IN-USE] "
#: RFC 3206 5: the credentials were wrong (not a temporary problem).
AUTH = "[AUTH] "
#: RFC 3206 4: a temporary problem of the server; try again later.
SYS_TEMP = "[SYS/TEMP] "
#: RFC 3206 4: a permanent problem of the server or of this session.
SYS_PERM = "[SYS/PERM] "


@attrs.frozen
class Reply:
    """
    One POP3 response: C{+OK text} or C{-ERR text}, and for a multi-line
    response its lines (without CRLF; the server dot-stuffs them).

    @ivar close: the server closes the connection after sending it.
    """

    ok: bool
    text: str
    lines: tuple[bytes, ...] | None = None
    close: bool = False

    def encode(self) -> bytes:
        """
        The response's bytes, terminating line included.
        """
        status = b"+OK" if self.ok else b"-ERR"
        first = status + (b" " + self.text.encode("ascii") if self.text else b"")
        out = [first + b"\r\n"]
        if self.lines is not None:
            for line in self.lines:
                out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
            out.append(b".\r\n")
        return b"".join(out)


def ok(text: str = "", lines: tuple[bytes, ...] | None = None) -> Reply:
    """
    A positive response.
    """
    return Reply(True, text, lines)


def error(text: str, close: bool = False) -> Reply:
    """
    A negative response; with C{close}, the last of the session.
    """
    return Reply(False, text, close=close)
