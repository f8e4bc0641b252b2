# -*- test-case-name: tests.test_mimeparts -*-
"""
The C{mime-parts} content policy (R12): the number, nesting depth and size
of the MIME parts of a message, counted while the body streams by (only the
open boundaries and a bounded piece of each part's Content-Type are kept).
"""

import email.message

from zope.interface import implementer

from msa.interfaces import IContentPolicy
from msa.policy.content import (
    _FIELD,
    _WSP,
    Headers,
    _decode,
    _NullChecker,
    _tooBig,
)

#: Part header bytes kept for the Content-Type value; the rest is skipped.
_MAX_CONTENT_TYPE = 8192


def _contentType(value: str | None, default: str) -> tuple[str, bytes | None]:
    """
    The media type (lower case) and, for a multipart with a usable
    boundary, the boundary as octets.
    """
    if value is None:
        return default, None
    try:
        message = email.message.Message()
        message.set_default_type(default)
        message["Content-Type"] = value
        ctype = message.get_content_type()
        if not ctype.startswith("multipart/"):
            return ctype, None
        boundary = message.get_boundary()
        if not boundary:
            return "text/plain", None
        return ctype, boundary.encode("utf-8", "surrogateescape")
    except Exception:
        return "text/plain", None


class _Multipart:
    __slots__ = ("delimiter", "close", "digest")

    def __init__(self, boundary: bytes, digest: bool) -> None:
        self.delimiter = b"--" + boundary
        self.close = self.delimiter + b"--"
        self.digest = digest


_HEADERS = "headers"
_BODY = "body"


@implementer(IContentPolicy)
class MimePartsPolicy:
    """
    Limit the MIME structure of a message, streaming (RFC 2045, 2046): the
    body is scanned line by line for the boundaries of the multiparts it
    declares, at any depth (message/rfc822 parts are looked into too),
    keeping only the open boundaries in memory.

    Refusals are C{552 5.3.4} (a limit, like the message size).  A broken
    structure (a boundary that never comes, garbage) is not refused: this
    policy counts what it can recognize, the way a MIME parser would.

    @param maxParts: the maximum number of body parts, i.e. entities
        delimited by a boundary (RFC 2046 5.1.1) at any depth: a nested
        multipart counts as one part, and its parts count too.  A message
        that is not multipart has no body parts.  L{None}: no limit.
    @param maxPartSize: the maximum size in octets of the content of any
        leaf entity (a part that is not multipart or message/rfc822, or the
        body of a message that is not multipart), as received (encoded):
        its lines joined with CRLF, the CRLF before the next boundary
        belonging to that boundary.  L{None}: no limit.
    @param maxDepth: the maximum nesting of multiparts (the top-level
        multipart is depth 1).
    """

    options = {
        "max_parts": ("maxParts", int),
        "max_part_size": ("maxPartSize", (int, type(None))),
        "max_depth": ("maxDepth", int),
    }

    def __init__(
        self,
        maxParts: int | None = 100,
        maxPartSize: int | None = None,
        maxDepth: int = 20,
    ) -> None:
        for name, value in (("maxParts", maxParts), ("maxPartSize", maxPartSize)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if maxDepth < 1:
            raise ValueError("maxDepth must be at least 1")
        self.maxParts = maxParts
        self.maxPartSize = maxPartSize
        self.maxDepth = maxDepth

    def startMessage(self, envelope) -> "_MimeChecker":
        return _MimeChecker(self)


class _MimeChecker(_NullChecker):
    def __init__(self, policy: MimePartsPolicy) -> None:
        self.policy = policy
        self.parts = 0
        self.stack: list[_Multipart] = []
        self.mode = _BODY
        self.leaf = False
        self.partSize = 0
        self.partLines = 0
        # Header state of the entity whose headers are being read.
        self.defaultType = "text/plain"
        self.contentType: list[bytes] | None = None
        self.capturing = False
        self.capturedSize = 0

    def headersReceived(self, headers: Headers) -> None:
        self._entity(headers.get("Content-Type"), "text/plain")

    def lineReceived(self, line: bytes) -> None:
        if self.stack and line[:2] == b"--" and self._boundary(line):
            return
        if self.mode is _HEADERS:
            self._headerLine(line)
        elif self.leaf:
            self._content(line)

    def _boundary(self, line: bytes) -> bool:
        stripped = line.rstrip(b" \t")
        for depth in range(len(self.stack) - 1, -1, -1):
            multipart = self.stack[depth]
            if stripped == multipart.delimiter:
                del self.stack[depth + 1 :]
                self.parts += 1
                if self.policy.maxParts is not None:
                    if self.parts > self.policy.maxParts:
                        raise _tooBig(
                            f"more than {self.policy.maxParts} MIME body parts"
                        )
                default = "message/rfc822" if multipart.digest else "text/plain"
                self._startHeaders(default)
                return True
            if stripped == multipart.close:
                # The epilogue follows: part of the enclosing entity, not
                # content of any leaf.
                del self.stack[depth:]
                self.mode = _BODY
                self.leaf = False
                return True
        return False

    def _startHeaders(self, default: str) -> None:
        self.mode = _HEADERS
        self.leaf = False
        self.defaultType = default
        self.contentType = None
        self.capturing = False
        self.capturedSize = 0

    def _headerLine(self, line: bytes) -> None:
        if line == b"":
            self._endHeaders()
            return
        if line[:1] in _WSP:
            if self.capturing:
                self._capture(line)
            return
        match = _FIELD.match(line)
        if match is None:
            # Not a header field: the part has no more headers and this is
            # its first content line.
            self._endHeaders()
            if self.leaf:
                self._content(line)
            return
        self.capturing = (
            self.contentType is None and match.group(1).lower() == b"content-type"
        )
        if self.capturing:
            self.contentType = []
            self._capture(line[match.end() :])

    def _capture(self, data: bytes) -> None:
        room = _MAX_CONTENT_TYPE - self.capturedSize
        if room > 0 and self.contentType is not None:
            self.contentType.append(data[:room])
            self.capturedSize += min(len(data), room)

    def _endHeaders(self) -> None:
        value = None
        if self.contentType is not None:
            value = _decode(b"".join(self.contentType).strip(b" \t"))
        self.capturing = False
        self.contentType = None
        self._entity(value, self.defaultType)

    def _entity(self, contentType: str | None, default: str) -> None:
        ctype, boundary = _contentType(contentType, default)
        if boundary is not None:
            if len(self.stack) >= self.policy.maxDepth:
                raise _tooBig(
                    f"MIME multiparts nested deeper than {self.policy.maxDepth} levels"
                )
            self.stack.append(_Multipart(boundary, ctype == "multipart/digest"))
            self.mode = _BODY
            self.leaf = False
        elif ctype in ("message/rfc822", "message/global"):
            # The content is a message: its header section comes next.
            self._startHeaders("text/plain")
        else:
            self.mode = _BODY
            self.leaf = True
            self.partSize = 0
            self.partLines = 0

    def _content(self, line: bytes) -> None:
        self.partSize += len(line) + (2 if self.partLines else 0)
        self.partLines += 1
        limit = self.policy.maxPartSize
        if limit is not None and self.partSize > limit:
            raise _tooBig(f"a MIME part exceeds {limit} octets")
