# -*- test-case-name: tests.test_content,tests.test_content_e2e -*-
"""
Pluggable content policies (R12): checks run on every message while it
streams in, able to refuse it with an exact SMTP reply.

The header section of a message is parsed once, by L{HeaderCollector}, and
the result (L{Headers}) is handed to every policy; each policy then sees the
body lines and the end of the message.  L{ContentPolicyChain} runs the
configured policies in order and stops at the first refusal.

A policy provides L{msa.interfaces.IContentPolicy}: C{startMessage(envelope)}
returns a per-message checker providing L{IContentChecker} (or L{None} when
the policy has nothing to check in that message)::

    checker.headersReceived(headers)  # once, the parsed header section
    checker.lineReceived(line)        # each body line (bytes, no CRLF)
    checker.eomReceived()             # the final dot

Each may raise L{msa.errors.SMTPReply}.  Checks are synchronous.

The configuration names the policies to run (L{loadPolicies})::

    [[content.policy]]
    name = "headers"
    require_message_id = false

    [[content.policy]]
    name = "mime-parts"
    max_parts = 50

    [[content.policy]]
    name = "mypackage.policies:MyPolicy"   # any importable class
    some_option = "value"

Reply codes: a malformed or incomplete header section is refused with
C{550 5.6.0}; every limit (header section size, number of header fields,
number, nesting and size of MIME parts) with C{552 5.3.4}; a policy that
fails with anything but L{SMTPReply} makes the message fail temporarily
with C{451 4.3.0} (and is logged).
"""

import re
from collections.abc import Callable, Iterator
from typing import Any

from twisted.logger import Logger
from zope.interface import Interface

from msa.errors import SMTPReply

log = Logger()

#: Default bounds of the top-level header section.
MAX_HEADER_SIZE = 65536
MAX_HEADER_FIELDS = 1000

_TEMPORARY = ("4.3.0", "Error: temporary local problem, try again later")

# RFC 5322 3.6.8: field-name = 1*ftext (printable US-ASCII except ":"); the
# obsolete syntax (4.5) allows white space before the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WSP = (b" ", b"\t")


class IContentChecker(Interface):
    """
    The checker of one message for one policy, returned by
    L{msa.interfaces.IContentPolicy.startMessage}.  Every method may raise
    L{msa.errors.SMTPReply} to refuse the message; after a refusal no
    method is called again.
    """

    def headersReceived(headers):
        """
        The header section is complete (the empty line after it arrived, a
        malformed line ended it, or the message ended without a body).
        Called exactly once, before any body line.

        @param headers: L{Headers}, shared by all policies: do not modify.
        """

    def lineReceived(line):
        """
        One line of the body, L{bytes} without its CRLF, dot-unstuffed.
        """

    def eomReceived():
        """
        The message is complete.
        """


class Headers:
    """
    A parsed header section: the fields in order, unfolded.

    @ivar fields: L{list} of C{(name, value)} L{str} pairs in message order.
        Names are as written (case preserved, obsolete white space before
        the colon removed); values are unfolded (line breaks removed) with
        leading and trailing white space stripped.  Bytes are decoded as
        UTF-8 with C{surrogateescape}, so C{value.encode("utf-8",
        "surrogateescape")} gives back the exact octets.
    @ivar error: L{None}, or L{str} saying why the header section is not
        well formed (RFC 5322 2.2); then C{fields} holds the fields before
        the fault.
    @ivar size: octets of the header section, CRLFs included, without the
        empty line that ends it.
    """

    def __init__(
        self, fields: list[tuple[str, str]], error: str | None = None, size: int = 0
    ) -> None:
        self.fields = fields
        self.error = error
        self.size = size
        self._index: dict[str, list[str]] = {}
        for name, value in fields:
            self._index.setdefault(name.lower(), []).append(value)

    def getAll(self, name: str) -> list[str]:
        """
        The values of every field called C{name} (any case), in order.
        """
        return list(self._index.get(name.lower(), ()))

    def get(self, name: str, default: str | None = None) -> str | None:
        """
        The value of the first field called C{name}, or C{default}.
        """
        values = self._index.get(name.lower())
        return values[0] if values else default

    def count(self, name: str) -> int:
        return len(self._index.get(name.lower(), ()))

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._index

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"<Headers {self.fields!r} error={self.error!r}>"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


class HeaderCollector:
    """
    Collect the header section of a message from its lines, bounded in
    size and number of fields.

    Feed lines with L{feed} until it returns the L{Headers}; if the message
    ends first, L{finish} returns them.  A line that is neither a header
    field (C{name: value}) nor a continuation (starting with a space or tab)
    after one ends the header section as malformed: it is then the first
    body line, available as C{firstBodyLine}.
    """

    def __init__(
        self, maxSize: int = MAX_HEADER_SIZE, maxFields: int = MAX_HEADER_FIELDS
    ) -> None:
        self.maxSize = maxSize
        self.maxFields = maxFields
        self.firstBodyLine: bytes | None = None
        self._fields: list[tuple[str, str]] = []
        self._name: bytes | None = None
        self._value: list[bytes] = []
        self._size = 0
        self._lineNumber = 0
        self._result: Headers | None = None

    def feed(self, line: bytes) -> Headers | None:
        """
        One line of the message.

        @return: L{None} while the header section goes on, then the
            L{Headers} (once: the collector is done after that).
        @raise SMTPReply: C{552 5.3.4} when the header section exceeds
            C{maxSize} octets or C{maxFields} fields.
        """
        if self._result is not None:
            raise RuntimeError("the header section is already complete")
        self._lineNumber += 1
        if line == b"":
            return self._complete(None)
        if line[:1] in _WSP:
            if self._name is None:
                self.firstBodyLine = line
                return self._complete("the first line is a continuation line")
            self._grow(line)
            self._value.append(line)
            return None
        match = _FIELD.match(line)
        if match is None:
            self.firstBodyLine = line
            return self._complete(
                f"line {self._lineNumber} is neither a header field nor a "
                "continuation line"
            )
        self._grow(line)
        if len(self._fields) + (self._name is not None) >= self.maxFields:
            raise SMTPReply(
                552,
                "5.3.4",
                f"Message refused: more than {self.maxFields} header fields",
            )
        self._endField()
        self._name = match.group(1)
        self._value = [line[match.end() :]]
        return None

    def _grow(self, line: bytes) -> None:
        self._size += len(line) + 2
        if self._size > self.maxSize:
            raise SMTPReply(
                552,
                "5.3.4",
                f"Message refused: header section exceeds {self.maxSize} octets",
            )

    def finish(self) -> Headers:
        """
        The message ended: the header section is whatever was collected.
        """
        if self._result is not None:
            return self._result
        return self._complete(None)

    def _endField(self) -> None:
        if self._name is not None:
            value = b"".join(self._value).strip(b" \t")
            self._fields.append((_decode(self._name), _decode(value)))
        self._name = None
        self._value = []

    def _complete(self, error: str | None) -> Headers:
        self._endField()
        self._result = Headers(self._fields, error, self._size)
        return self._result


class MessageChecker:
    """
    The checker of one message for a whole L{ContentPolicyChain}: give it
    every line of the message (header section and body, as received, without
    CRLF), then L{eomReceived}.  Both raise L{SMTPReply} at the first
    refusal, and raise it again if called after it.
    """

    def __init__(
        self,
        checkers: list[tuple[str, IContentChecker]],
        maxHeaderSize: int = MAX_HEADER_SIZE,
        maxHeaderFields: int = MAX_HEADER_FIELDS,
    ) -> None:
        self._checkers = checkers
        self._collector: HeaderCollector | None = None
        if checkers:
            self._collector = HeaderCollector(maxHeaderSize, maxHeaderFields)
        self.headers: Headers | None = None
        self.refusal: SMTPReply | None = None

    def lineReceived(self, line: bytes) -> None:
        if self.refusal is not None:
            raise self.refusal
        if not self._checkers:
            return
        if self._collector is not None:
            try:
                headers = self._collector.feed(line)
            except SMTPReply as e:
                self.refusal = e
                raise
            if headers is None:
                return
            spilled = self._collector.firstBodyLine
            self._collector = None
            self._headersDone(headers)
            if spilled is None:
                return
            line = spilled
        self._each("lineReceived", lambda checker: checker.lineReceived(line))

    def eomReceived(self) -> None:
        if self.refusal is not None:
            raise self.refusal
        if self._collector is not None:
            headers = self._collector.finish()
            self._collector = None
            self._headersDone(headers)
        self._each("eomReceived", lambda checker: checker.eomReceived())

    def _headersDone(self, headers: Headers) -> None:
        self.headers = headers
        self._each("headersReceived", lambda checker: checker.headersReceived(headers))

    def _each(self, method: str, call: Callable[[IContentChecker], None]) -> None:
        """
        Give each policy's checker the event (C{call}, named C{method} in
        the log); the first refusal stops the message.
        """
        for name, checker in self._checkers:
            try:
                call(checker)
            except SMTPReply as e:
                self.refusal = e
                raise
            except Exception:
                log.failure(
                    "content policy {policy}: {method} failed",
                    policy=name,
                    method=method,
                )
                self.refusal = SMTPReply(451, *_TEMPORARY)
                raise self.refusal


class ContentPolicyChain:
    """
    The configured policies, run in order on every message.

    @ivar policies: L{list} of C{(name, policy)}: the name (for logs) and an
        L{IContentPolicy} provider.
    """

    def __init__(
        self,
        policies: list,
        maxHeaderSize: int = MAX_HEADER_SIZE,
        maxHeaderFields: int = MAX_HEADER_FIELDS,
    ) -> None:
        self.policies: list[tuple[str, Any]] = [
            p if isinstance(p, tuple) else (type(p).__name__, p) for p in policies
        ]
        self.maxHeaderSize = maxHeaderSize
        self.maxHeaderFields = maxHeaderFields

    def startMessage(self, envelope) -> MessageChecker:
        """
        Begin checking one message.

        @param envelope: L{msa.envelope.Envelope}.
        @return: a L{MessageChecker}.
        @raise SMTPReply: a policy refused the message from its envelope
            alone (C{451 4.3.0} if a policy failed).
        """
        checkers = []
        for name, policy in self.policies:
            try:
                checker = policy.startMessage(envelope)
            except SMTPReply:
                raise
            except Exception:
                log.failure("content policy {policy}: startMessage failed", policy=name)
                raise SMTPReply(451, *_TEMPORARY)
            if checker is not None:
                checkers.append((name, checker))
        return MessageChecker(checkers, self.maxHeaderSize, self.maxHeaderFields)

    def __len__(self) -> int:
        return len(self.policies)


# Helpers for policies (see msa.policy.contentpolicies for the built-in ones).


def _refuse(text: str) -> SMTPReply:
    return SMTPReply(550, "5.6.0", f"Message refused: {text}")


def _tooBig(text: str) -> SMTPReply:
    return SMTPReply(552, "5.3.4", f"Message refused: {text}")


class _NullChecker:
    def headersReceived(self, headers: Headers) -> None:
        pass

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> None:
        pass
