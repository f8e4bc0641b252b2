# -*- test-case-name: tests.test_chunking -*-
"""
BDAT (RFC 3030, CHUNKING): the message as chunks of a declared number of
octets, C{BDAT <size> [LAST]}, read as they are (no dot-stuffing, no end
of data in the text), each answered once all its octets are in.

The same rules as DATA apply, through the same code: the message is
opened, sized, spooled, hashed and committed by
L{msa.submission.transaction.MailTransaction} (the 250 of C{LAST} only
once the spool says it is on disk), within the DATA phase's deadline
(L{msa.submission.deadlines}: from the first chunk to C{LAST}); a text
body (C{BODY=7BIT}, C{8BITMIME} or none) is cut into lines across chunk
boundaries and each judged by the DATA filter (L{DataFilter} without its
transparency: bare CR or LF 550 5.5.2, over-long lines 550 5.6.0, size
552 5.3.4), so that BDAT cannot smuggle what DATA refuses.  A
C{BODY=BINARYMIME} body has no lines: only its size is judged, and its
octets are stored as they came.

The octets of a chunk are always read, whatever its reply (RFC 3030 2: the
server cannot tell where the next command starts otherwise): a BDAT that
cannot be taken (no MAIL, no RCPT, not logged in) or that brings the
message past its limit, or whose content breaks a line rule, is answered
only after its last octet, with the error, and the transaction ends (the
message is dropped, nothing was acknowledged).  Later BDATs of that
transaction get 503 5.5.1, their octets read too.  A BDAT line that is not
C{BDAT <size> [LAST]} is 501 5.5.4, and what follows it is read as
commands (its size is unknown).  DATA in a BDAT transaction, and DATA after
C{BODY=BINARYMIME}, are 503 5.5.1; RCPT once the first chunk is in is
503 5.5.1.
"""

import re
from typing import TYPE_CHECKING, Protocol, cast

from twisted.logger import Logger

from msa.errors import SMTPReply
from msa.submission.framing import LineFramer
from msa.submission.phase import SessionPhase

if TYPE_CHECKING:
    from msa.submission.transaction import MailTransaction

log = Logger()

_BDAT = re.compile(rb"([0-9]{1,20})(?:[ \t]+(LAST))?[ \t]*\Z", re.I)

#: Octets of complete lines of a text body judged at once, at least.
BLOCK_MINIMUM = 512


class ChunkMessage(Protocol):
    """
    What a message (L{msa.interfaces.IAcceptedMessage}) offers beside
    C{lineReceived} for BDAT: the spool's does (L{msa.submission.avatar}).
    """

    acceptsBlocks: bool

    def lineReceived(self, line: bytes) -> None:
        """
        One judged line, without its CRLF.
        """

    def blockReceived(self, data: bytes) -> None:
        """
        Complete lines, CRLFs included, already judged.
        """

    def chunkReceived(self, data: bytes) -> None:
        """
        Octets of a BINARYMIME body, cut anywhere.
        """


def parseBDAT(rest: bytes) -> tuple[int, bool]:
    """
    The size and C{LAST} of a BDAT command's argument.

    @raise SMTPReply: 501 5.5.4 when it is not C{<size> [LAST]}.
    """
    match = _BDAT.match(rest.strip(b" \t"))
    if match is None:
        raise SMTPReply(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
    return int(match.group(1)), match.group(2) is not None


class ChunkReceiver:
    """
    The BDAT chunks of one session's transactions.  The transaction owns
    it; the server hands it the BDAT commands (L{command}) and, in
    L{SessionPhase.CHUNK}, lets it take the chunk's octets (L{received}).

    @ivar open: a BDAT transaction is under way: its message is open
        between chunks.
    @ivar remaining: octets of the current chunk still to be read.
    @ivar last: the current chunk is the last (C{LAST}).
    @ivar refusal: the reply to the current chunk once read, when the
        command itself could not be taken.
    @ivar octets: the octets of the open message's chunks so far.
    @ivar binary: the message is C{BODY=BINARYMIME}.
    @ivar lines: cuts a text body into lines across chunks.
    """

    def __init__(self, transaction: "MailTransaction") -> None:
        self._transaction = transaction
        self._server = transaction._server
        self.open = False
        self.remaining = 0
        self.last = False
        self.refusal: SMTPReply | None = None
        self.octets = 0
        self.binary = False
        self.lines = LineFramer()

    def reset(self) -> None:
        """
        The transaction ends (L{MailTransaction.reset}): no chunks open.
        """
        self.open = False
        self.binary = False
        self.lines = LineFramer()
        self.octets = 0

    def _commandRefusal(self) -> SMTPReply | None:
        transaction = self._transaction
        if self._server.avatar is None:
            return SMTPReply(530, "5.7.0", "Authentication required")
        if transaction.sender is None:
            return SMTPReply(503, "5.5.1", "Error: need MAIL command")
        if not transaction.recipients:
            return SMTPReply(554, "5.5.1", "Error: no valid recipients")
        return None

    def command(self, rest: bytes) -> None:
        """
        C{BDAT <size> [LAST]}: start reading the chunk.
        """
        server = self._server
        try:
            size, last = parseBDAT(rest)
        except SMTPReply as e:
            server.protocolError(e.code, e.status, e.text)
            return
        self.remaining, self.last = size, last
        self.refusal = self._commandRefusal()
        if self.refusal is None and not self.open:
            transaction = self._transaction
            self.binary = transaction.mailParams.get("BODY") == "BINARYMIME"
            self.refusal = transaction.openMessage(transparency=False)
            self.open = self.refusal is None
        if not self.open:
            # The octets are read all the same, within the DATA deadline.
            server.deadlines.startData()
        else:
            self._declared(size)
        server.enter(SessionPhase.CHUNK)
        if not size:
            self._chunkDone()

    def _declared(self, size: int) -> None:
        """
        A chunk that will take the message past its size limit refuses it
        now (552 5.3.4 after the chunk): its octets are read, not stored.
        """
        dataFilter = self._transaction.filter
        assert dataFilter is not None
        if self.octets + size > self._transaction.maxMessageSize():
            # Counted as if received: the filter refuses with its reply.
            dataFilter.octetsReceived(self.octets + size - dataFilter.size)
            self._checkRefused()

    def received(self) -> bool:
        """
        Take what is buffered of the current chunk.

        @return: whether any octet was taken (the chunk may be complete).
        """
        data = self._server.framer.take(self.remaining)
        if not data:
            return False
        self.remaining -= len(data)
        if self.open and self._transaction.message is not None:
            self.octets += len(data)
            self._content(data)
        if not self.remaining:
            self._chunkDone()
        return True

    def _content(self, data: bytes) -> None:
        """
        Octets of an open message: judged and stored, or (once it is
        refused) dropped.
        """
        transaction = self._transaction
        dataFilter = transaction.filter
        assert dataFilter is not None
        transaction.headerScan.blockReceived(data)
        message = cast(ChunkMessage, transaction.message)
        if self.binary:
            if dataFilter.octetsReceived(len(data)):
                transaction.store(message.chunkReceived, data)
            self._checkRefused()
            return
        self.lines.feed(data)
        while dataFilter.error is None:
            block = self.lines.completeLines()
            if len(block) >= BLOCK_MINIMUM and message.acceptsBlocks:
                judged = dataFilter.blockReceived(block)
                if judged is not None:
                    self.lines.skip(len(block))
                    transaction.store(message.blockReceived, judged)
                    continue
            item = self.lines.nextLine(dataFilter.framingLimit)
            if item is None:
                break
            line = dataFilter.lineReceived(*item)
            if line is not None:
                assert isinstance(line, bytes)
                transaction.store(message.lineReceived, line)
        self._checkRefused()

    def _checkRefused(self) -> None:
        transaction = self._transaction
        if transaction.filter is not None and transaction.filter.error is not None:
            # Nothing more is stored; the refusal goes out after the chunk.
            transaction.abortMessage()

    def _finishText(self) -> None:
        """
        C{LAST} of a text body: its last line must have ended in CRLF.
        """
        dataFilter = self._transaction.filter
        if self.binary or dataFilter is None or dataFilter.error is not None:
            return
        if self.lines.midLine:
            dataFilter.refuse(
                SMTPReply(
                    550,
                    "5.6.0",
                    "Message refused: a text message must end with CRLF "
                    "(use BODY=BINARYMIME for other content)",
                )
            )
            self._checkRefused()

    def _chunkDone(self) -> None:
        """
        The chunk's last octet is in: its reply.
        """
        server = self._server
        transaction = self._transaction
        server.enter(SessionPhase.COMMAND)
        refusal, self.refusal = self.refusal, None
        if refusal is not None:
            server.protocolError(refusal.code, refusal.status, refusal.text)
            return
        if self.last:
            self._finishText()
        assert transaction.filter is not None
        if self.last or transaction.filter.error is not None:
            self.open = False
            transaction.endOfData()
            return
        server.reply(250, "2.0.0", f"Ok: {self.octets} octets received so far")
