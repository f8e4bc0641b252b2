# -*- test-case-name: tests.test_extensions -*-
"""
The C{TLS-Required: No} header field (RFC 8689 5), seen as a message
streams in: a pure state machine fed the message's lines or blocks, which
looks only at the header section and keeps at most one field's start.

The submission side only notes it in the envelope
(L{msa.envelope.Envelope.tlsRequiredNo}); the relay acts on it.  RFC 8689
5: when the MAIL command had REQUIRETLS, the field is ignored (the
transaction decides that, not this scanner).
"""

import re

#: The field, unfolded, its value compared without case and surrounding
#: white space.
_FIELD = re.compile(rb"tls-required[ \t]*:[ \t]*no[ \t]*\Z", re.I)
#: More of one field than this is not kept: C{TLS-Required: No} is short.
_KEEP = 200


class TLSRequiredScan:
    """
    Whether the header section holds C{TLS-Required: No}.

    @ivar found: the field was seen.
    @ivar done: the header section has ended; nothing more is looked at.
    """

    def __init__(self) -> None:
        self.found = False
        self.done = False
        self._field = b""
        self._partial = b""

    def lineReceived(self, line: bytes) -> None:
        """
        One line of the message, without its CRLF.
        """
        if self.done:
            return
        if line[:1] in (b" ", b"\t") and self._field:
            # A continuation line: unfold (RFC 5322 2.2.3).
            self._field = (self._field + line)[:_KEEP]
            return
        self._endField()
        if line == b"" or b":" not in line:
            self.done = True
            return
        self._field = line[:_KEEP]

    def blockReceived(self, data: bytes) -> None:
        """
        Any run of the message's bytes, cut anywhere (lines end in CRLF).
        """
        data, self._partial = self._partial + data, b""
        start = 0
        while not self.done:
            end = data.find(b"\r\n", start)
            if end < 0:
                rest = data[start:]
                # Its start decides; its last octet may be a CRLF's CR.
                self._partial = rest if len(rest) <= _KEEP else rest[:_KEEP] + rest[-1:]
                return
            self.lineReceived(data[start:end])
            start = end + 2

    def _endField(self) -> None:
        if _FIELD.match(self._field):
            self.found = True
        self._field = b""
