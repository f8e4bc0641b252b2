# -*- test-case-name: tests.test_transaction -*-
"""
The mail transaction of L{msa.submission.server.SubmissionServer}, one
L{MailTransaction} per session, owned by the server: MAIL, RCPT and DATA
(RFC 5321 3.3) with the replies of the spec example (R7), complete
addresses (R8), SIZE (RFC 1870), and the message streamed through the DATA
filter into the account's avatar, which spools it once.  The 250 after the
final dot goes out only when the spool says the message is on disk.

When the session ends before the 250, one rule decides what happens to the
message, and it is the final dot:

  - Before the final dot has been taken, nothing is kept.  Whether the
    client leaves in DATA, or the server ends the session (idle timeout
    421, too many errors, shutdown), the message and its spool file are
    dropped, and whatever the client sends after the server's 421 or 221 is
    never read as commands or message text.  The client saw no 250 and
    sends the message again.
  - Once the final dot has been taken, the message is committed and
    delivered, even if the client leaves (or the grace period of a shutdown
    ends) before the 250 reaches it.  This is what Postfix does.  The 250
    can be lost on the wire after the commit whatever the server does, so
    SMTP always leaves a window in which a client resends a message the MSA
    already has (RFC 1047); aborting the commit when the connection drops
    would narrow that window only by the time an fsync takes, would make
    the outcome depend on when the kernel reports the loss, and would drop
    the message of a client that sent its final dot and QUIT without
    waiting for the reply.  Such a message is logged as accepted like any
    other.  (While the commit runs the session does not read, so it
    usually learns that the client left only afterwards.)
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa import metrics
from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import IAcceptedMessage
from msa.submission import addresses
from msa.submission.chunking import ChunkReceiver
from msa.submission.framing import END, DataFilter
from msa.submission.parameters import sizeOctets
from msa.submission.phase import SessionPhase
from msa.submission.tlsrequired import TLSRequiredScan
from msa.tls import describeTLS

if TYPE_CHECKING:
    from msa.submission.server import SubmissionServer

log = Logger()

#: Below this many buffered bytes of complete lines the body is taken line
#: by line; above it, in one block when it is ordinary text.
BLOCK_MINIMUM = 512

#: The reply to a local failure: the client keeps the message and retries.
TEMPORARY_FAILURE = SMTPReply(
    451, "4.3.0", "Error: temporary local problem, try again later"
)


def _lower(serverLimit: int, accountLimit: int | None) -> int:
    """
    The server's limit, or the account's where it is lower (R10).  EHLO
    keeps advertising the server's SIZE.
    """
    if accountLimit is None:
        return serverLimit
    return min(serverLimit, accountLimit)


class MailTransaction:
    """
    MAIL, RCPT and DATA of one session.  The server owns this object,
    passes it the commands and, in the DATA phase, the lines of the message;
    it answers through the server's C{reply}, C{protocolError} and C{wait}
    and reads the logged-in C{avatar}.  The checks that precede each
    command return their refusal (L{mailRefusal}, L{rcptRefusal},
    L{dataRefusal}) rather than send it.

    @ivar sender: the reverse-path of the open transaction, C{None} when no
        MAIL has been accepted.
    @ivar mailParams: the MAIL parameters (upper-case keys).
    @ivar recipients: the accepted forward-paths, in RCPT order.
    @ivar recipientParams: the RCPT parameters of each, in the same order.
    @ivar message: the avatar's message object from the 354 to the final dot.
    @ivar queueId: the spool's id of the message of the last DATA (C{""}
        when the avatar gave none), for the log.
    @ivar filter: the L{DataFilter} judging the lines of the message.
    @ivar committing: the message whose final dot was taken, while the spool
        commits it; C{None} otherwise.
    @ivar chunks: the BDAT chunks of the transaction (L{ChunkReceiver}).
    @ivar headerScan: looks for C{TLS-Required: No} in the message's header
        section (L{TLSRequiredScan}).
    @ivar envelope: the envelope of the message being received.
    @ivar _lineByLine: how many more lines go one by one before a block is
        tried again (see L{dataBlock}).
    """

    #: The reply to a local failure (for L{ChunkReceiver}).
    temporaryFailure = TEMPORARY_FAILURE

    def __init__(self, server: "SubmissionServer") -> None:
        self._server = server
        self.sender: str | None = None
        self.mailParams: dict[str, str | None] = {}
        self.recipients: list[str] = []
        self.recipientParams: list[dict[str, str | None]] = []
        self.message: IAcceptedMessage | None = None
        self.queueId = ""
        self.filter: DataFilter | None = None
        self.committing: IAcceptedMessage | None = None
        self.chunks = ChunkReceiver(self)
        self.headerScan = TLSRequiredScan()
        self.envelope: Envelope | None = None
        self._lineByLine = 0

    @property
    def inProgress(self) -> bool:
        """
        Whether a MAIL command has been accepted and the transaction is open.
        """
        return self.sender is not None

    @property
    def receiving(self) -> bool:
        """
        Whether message text is being received: the DATA phase, a BDAT
        chunk, or a BDAT transaction between its chunks.
        """
        return (
            self._server.phase in (SessionPhase.DATA, SessionPhase.CHUNK)
            or self.chunks.open
        )

    def reset(self) -> None:
        """
        End the transaction (RSET, HELO, EHLO, after the final dot).
        """
        # The avatar releases what it held for the transaction (a rate slot).
        if self._server.avatar is not None:
            self._server.avatar.endTransaction()
        if self.chunks.open:
            # RSET, EHLO between BDAT chunks: the message is dropped.
            self.abortMessage()
            self.filter = None
        self.chunks.reset()
        self.sender = None
        self.mailParams = {}
        self.recipients = []
        self.recipientParams = []

    def resetSession(self) -> None:
        """
        The session starts anew (STARTTLS): no transaction, no message.
        """
        self.reset()
        self.message = None
        self.queueId = ""
        self.filter = None

    def maxMessageSize(self) -> int:
        """
        The message size limit of this session: the server's, or the
        account's where it is lower.
        """
        avatar = self._server.avatar
        return _lower(
            self._server.policy.maxMessageSize,
            avatar.maxMessageSize if avatar is not None else None,
        )

    def maxRecipients(self) -> int:
        """
        The recipients per message of this session: the server's limit, or
        the account's where it is lower.
        """
        avatar = self._server.avatar
        return _lower(
            self._server.policy.maxRecipients,
            avatar.maxRecipients if avatar is not None else None,
        )

    # -- MAIL, RCPT ---------------------------------------------------

    def mailRefusal(self) -> SMTPReply | None:
        """
        Why a MAIL command cannot be taken now, if it cannot.
        """
        if self._server.avatar is None:
            return SMTPReply(530, "5.7.0", "Authentication required")
        if self.sender is not None:
            return SMTPReply(503, "5.5.1", "Error: nested MAIL command")
        return None

    def mail(self, rest: bytes) -> None:
        """
        MAIL FROM: parse it, check SIZE, and let the avatar validate the
        sender; 250 once it has.
        """
        server = self._server
        refusal = self.mailRefusal()
        if refusal is not None:
            server.protocolError(refusal.code, refusal.status, refusal.text)
            return
        try:
            sender, params = addresses.parseMailArgument(rest, server.policy.extensions)
            size = sizeOctets(params)
            if size is not None and size > self.maxMessageSize():
                raise SMTPReply(
                    552, "5.3.4", "Message size exceeds fixed maximum message size"
                )
        except SMTPReply as e:
            server.protocolError(e.code, e.status, e.text)
            return
        assert server.avatar is not None
        d = defer.maybeDeferred(
            server.avatar.validateFrom, server.session, sender, params
        )

        def accepted(_: object) -> None:
            self.sender = sender
            self.mailParams = params
            server.reply(250, "2.1.0", "Ok")

        d.addCallbacks(accepted, self._validationFailed)
        server.wait(d)

    def rcptRefusal(self) -> SMTPReply | None:
        """
        Why a RCPT command cannot be taken now, if it cannot.
        """
        if self._server.avatar is None:
            return SMTPReply(530, "5.7.0", "Authentication required")
        if self.sender is None:
            return SMTPReply(503, "5.5.1", "Error: need MAIL command")
        if self.chunks.open:
            return SMTPReply(503, "5.5.1", "Error: RCPT after BDAT")
        return None

    def rcpt(self, rest: bytes) -> None:
        """
        RCPT TO: parse it, check the recipient limit, and let the avatar
        validate the recipient; 250 once it has.
        """
        server = self._server
        refusal = self.rcptRefusal()
        if refusal is not None:
            server.protocolError(refusal.code, refusal.status, refusal.text)
            return
        try:
            recipient, params = addresses.parseRcptArgument(
                rest, server.policy.extensions, "SMTPUTF8" in self.mailParams
            )
        except SMTPReply as e:
            server.protocolError(e.code, e.status, e.text)
            return
        assert server.avatar is not None
        if len(self.recipients) >= self.maxRecipients():
            server.reply(452, "4.5.3", "Error: too many recipients")
            return
        d = defer.maybeDeferred(
            server.avatar.validateTo, server.session, recipient, params
        )

        def accepted(_: object) -> None:
            self.recipients.append(recipient)
            self.recipientParams.append(params)
            server.reply(250, "2.1.5", "Ok")

        d.addCallbacks(accepted, self._validationFailed)
        server.wait(d)

    def _validationFailed(self, failure: Failure) -> None:
        server = self._server
        error = failure.value
        if isinstance(error, SMTPReply):
            server.protocolError(error.code, error.status, error.text)
        else:
            log.failure(
                "session {session}: validation error",
                failure,
                session=server.session.sessionId,
            )
            server.sendReply(TEMPORARY_FAILURE)

    # -- DATA ---------------------------------------------------------

    def dataRefusal(self, rest: bytes) -> SMTPReply | None:
        """
        Why a DATA command cannot be taken now, if it cannot.
        """
        if self._server.avatar is None:
            return SMTPReply(530, "5.7.0", "Authentication required")
        if rest.strip():
            return SMTPReply(501, "5.5.4", "Syntax: DATA")
        if self.sender is None:
            return SMTPReply(503, "5.5.1", "Error: need MAIL command")
        if self.chunks.open:
            return SMTPReply(503, "5.5.1", "Error: DATA in a BDAT transaction")
        if self.mailParams.get("BODY") == "BINARYMIME":
            return SMTPReply(503, "5.5.1", "Error: BODY=BINARYMIME requires BDAT")
        if not self.recipients:
            return SMTPReply(554, "5.5.1", "Error: no valid recipients")
        return None

    def data(self, rest: bytes) -> None:
        """
        DATA: the avatar starts the message; 354 and the DATA phase.
        """
        server = self._server
        refusal = self.dataRefusal(rest)
        if refusal is not None:
            server.protocolError(refusal.code, refusal.status, refusal.text)
            return
        refusal = self.openMessage(transparency=True)
        if refusal is not None:
            server.sendReply(refusal)
            return
        server.enter(SessionPhase.DATA)
        server.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def openMessage(self, transparency: bool) -> SMTPReply | None:
        """
        The avatar starts the message of this transaction (DATA, or the
        first BDAT chunk), and its DATA filter and deadline start.

        @param transparency: the text has dot-stuffing and a final dot
            (DATA), or not (BDAT).
        @return: the reply when the avatar cannot start it.
        """
        server = self._server
        assert self.sender is not None and server.avatar is not None
        session = server.session
        tlsVersion, cipher = describeTLS(server.transport)
        session.tlsVersion, session.tlsCipher = tlsVersion, cipher
        envelope = Envelope(
            sender=self.sender,
            recipients=list(self.recipients),
            account=session.account,
            mailParams=dict(self.mailParams),
            recipientParams=[dict(p) for p in self.recipientParams],
            clientAddress=session.clientAddress,
            helo=session.helo,
            # The reactor's clock, as for every other time of the session
            # (a fake clock in tests: the Received date is reproducible).
            receivedAt=server.factory.reactor.seconds(),
        )
        self._lineByLine = 0
        try:
            self.message = server.avatar.startMessage(session, envelope)
            self.queueId = self.message.queueId
        except SMTPReply as e:
            return e
        except Exception:
            log.failure(
                "session {session}: cannot start message",
                session=session.sessionId,
            )
            return TEMPORARY_FAILURE
        self.envelope = envelope
        self.headerScan = TLSRequiredScan()
        self.filter = DataFilter(
            maxSize=self.maxMessageSize(),
            maxLineLength=server.policy.maxLineLength,
            transparency=transparency,
        )
        server.deadlines.startData()
        return None

    @property
    def framingLimit(self) -> int:
        """
        The longest line of message text the framer hands over whole.
        """
        assert self.filter is not None
        return self.filter.framingLimit

    def dataBlock(self) -> bool:
        """
        Take all complete lines of the message body buffered at once, when
        the DATA filter and the message allow it (see
        L{DataFilter.blockReceived}).

        @return: whether it took any.
        """
        if self._lineByLine or self.message is None or not self.message.acceptsBlocks:
            return False
        assert self.filter is not None
        framer = self._server.framer
        block = framer.completeLines()
        # Up to the final dot, if it is there: that line goes the usual way.
        end = (b"\r\n" + block).find(b"\r\n.\r\n")
        if end >= 0:
            block = block[:end]
        if len(block) < BLOCK_MINIMUM:
            return False
        data = self.filter.blockReceived(block)
        if data is None:
            # Its lines go one by one before the next block is tried, so that
            # the same bytes are not judged as a block again for each line.
            self._lineByLine = block.count(b"\r\n")
            return False
        framer.skip(len(block))
        self.headerScan.blockReceived(data)
        self.store(self.message.blockReceived, data)
        if self.filter.error is not None:
            self.abortMessage()
        return True

    def store(self, write: Callable[[bytes], None], data: bytes) -> None:
        """
        Hand judged message text to the message (one of its methods,
        C{write}): a refusal it raises (a full disk) refuses the message,
        and so does any other failure, as a temporary one.
        """
        assert self.filter is not None
        try:
            write(data)
        except SMTPReply as e:
            self.filter.refuse(e)
        except Exception:
            log.failure(
                "session {session}: spool write failed",
                session=self._server.session.sessionId,
            )
            self.filter.refuse(TEMPORARY_FAILURE)

    def dataLine(self, line: bytes, tooLong: bool) -> None:
        """
        One line of message text (or the final dot).
        """
        if self._lineByLine:
            self._lineByLine -= 1
        assert self.filter is not None
        hadError = self.filter.error is not None
        result = self.filter.lineReceived(line, tooLong)
        if result is END:
            self.endOfData()
            return
        if result is not None:
            assert self.message is not None and isinstance(result, bytes)
            self.headerScan.lineReceived(result)
            self.store(self.message.lineReceived, result)
        if not hadError and self.filter.error is not None:
            self.abortMessage()

    def _refused(self, reply: SMTPReply, queueId: str) -> None:
        """
        Log and count a message refused after its final dot.  C{queueId} is
        the id the spool gave it at DATA (its file is gone), so that the
        refusal can be found beside the session's other events.
        """
        session = self._server.session
        metrics.MESSAGES.labels(str(reply.code)).inc()
        fields = dict(
            event="refused",
            session=session.sessionId,
            account=session.account,
            client=session.clientAddress,
            code=reply.code,
            status=reply.status,
            reply=str(reply),
        )
        if queueId:
            log.info(
                "session {session}: message {queueId} from {account} refused: {reply}",
                queueId=queueId,
                **fields,
            )
        else:
            log.info(
                "session {session}: message from {account} refused: {reply}", **fields
            )

    def abandon(self, reason: str) -> None:
        """
        The session ends in DATA, before the final dot: the message is
        dropped with its spool file (the client saw no 250).
        """
        log.info(
            "session {session}: message {queueId} abandoned before its final "
            "dot: {reason}",
            event="abandoned",
            session=self._server.session.sessionId,
            client=self._server.session.clientAddress,
            queueId=self.queueId or "-",
            reason=reason,
        )
        self.abortMessage()
        self.chunks.reset()
        self._server.enter(SessionPhase.COMMAND)
        self.filter = None

    def abortMessage(self) -> None:
        message, self.message = self.message, None
        if message is not None:
            try:
                message.connectionLost()
            except Exception:
                log.failure(
                    "session {session}: abort failed",
                    session=self._server.session.sessionId,
                )

    def endOfData(self) -> None:
        server = self._server
        session = server.session
        server.enter(SessionPhase.COMMAND)
        dataFilter = self.filter
        assert dataFilter is not None
        self.filter = None
        message, self.message = self.message, None
        recipients = len(self.recipients)
        self.reset()
        queueId = self.queueId
        if dataFilter.error is not None:
            self._refused(dataFilter.error, queueId)
            server.protocolError(
                dataFilter.error.code, dataFilter.error.status, dataFilter.error.text
            )
            return
        # A message that was not refused is still open.
        assert message is not None
        envelope, self.envelope = self.envelope, None
        if (
            envelope is not None
            and self.headerScan.found
            and "REQUIRETLS" not in envelope.mailParams
        ):
            # RFC 8689 5: noted for the relay (ignored after REQUIRETLS).
            envelope.tlsRequiredNo = True
        # From here on the message is committed whatever the client does
        # (see the module docstring).
        self.committing = message
        d = defer.maybeDeferred(message.eomReceived)

        def committed(result: object) -> object:
            self.committing = None
            return result

        d.addBoth(committed)

        def queued(queueId: str) -> None:
            # The reply first: the client waits for it, not for the log
            # line (the message is durable, and so is its audit record).
            server.reply(250, "2.0.0", f"Ok: queued as {queueId}")
            # The one INFO line of a successful session's message: it
            # carries the session's facts (client, TLS, account, duration)
            # whose own events are DEBUG.
            log.info(
                "session {session}: message {queueId} accepted from {account} "
                "at {client}:{port} over {tls}, {size} octets, {recipients} "
                "recipient(s), sha256 {sha256}, after {duration:.3f}s",
                event="accepted",
                session=session.sessionId,
                account=session.account,
                mechanism=session.mechanism,
                client=session.clientAddress,
                port=session.clientPort,
                tls=session.tlsVersion or "plaintext",
                cipher=session.tlsCipher,
                queueId=queueId,
                size=dataFilter.size,
                recipients=recipients,
                sha256=message.sha256(),
                duration=server.sessionSeconds(),
            )
            metrics.MESSAGES.labels("250").inc()
            metrics.BYTES_ACCEPTED.inc(dataFilter.size)

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, SMTPReply):
                self._refused(error, queueId)
                server.sendReply(error)
                return
            metrics.MESSAGES.labels("451").inc()
            log.failure(
                "session {session}: message not queued",
                failure,
                session=session.sessionId,
            )
            server.sendReply(TEMPORARY_FAILURE)

        d.addCallbacks(queued, failed)
        server.wait(d)
