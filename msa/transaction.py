"""
The mail transaction of L{msa.server.SubmissionServer}: MAIL, RCPT and
DATA (RFC 5321 3.3) with the replies of the spec example (R7), complete
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

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa import addresses, metrics
from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.framing import END, DataFilter
from msa.serverauth import COMMAND
from msa.tls import describeTLS

log = Logger()

DATA = "DATA"

#: Below this many buffered bytes of complete lines the body is taken line
#: by line; above it, in one block when it is ordinary text.
BLOCK_MINIMUM = 512


def _lower(serverLimit: int, submission, name: str) -> int:
    """
    The server's limit, or the account's where it is lower (R10).  EHLO
    keeps advertising the server's SIZE.
    """
    accountLimit = getattr(submission, name, None)
    if accountLimit is None:
        return serverLimit
    return min(serverLimit, accountLimit)


class MailTransactionMixin:
    """
    MAIL, RCPT, DATA; mixed into the server protocol, whose C{reply},
    C{protocolError}, C{_wait}, C{session} and C{policy} it uses.
    """

    def _maxMessageSize(self) -> int:
        return _lower(self.policy.maxMessageSize, self._submission, "maxMessageSize")

    def smtp_MAIL(self, rest: bytes) -> None:
        if self._submission is None:
            self.protocolError(530, "5.7.0", "Authentication required")
            return
        if self._sender is not None:
            self.protocolError(503, "5.5.1", "Error: nested MAIL command")
            return
        try:
            sender, params = addresses.parseMailArgument(rest)
            size = params.get("SIZE")
            if size is not None and int(size) > self._maxMessageSize():
                raise SMTPReply(
                    552, "5.3.4", "Message size exceeds fixed maximum message size"
                )
        except SMTPReply as e:
            self.protocolError(e.code, e.status, e.text)
            return
        d = defer.maybeDeferred(
            self._submission.validateFrom, self.session, sender, params
        )

        def accepted(_):
            self._sender = sender
            self._mailParams = params
            self.reply(250, "2.1.0", "Ok")

        d.addCallbacks(accepted, self._validationFailed)
        self._wait(d)

    def smtp_RCPT(self, rest: bytes) -> None:
        if self._submission is None:
            self.protocolError(530, "5.7.0", "Authentication required")
            return
        if self._sender is None:
            self.protocolError(503, "5.5.1", "Error: need MAIL command")
            return
        try:
            recipient, params = addresses.parseRcptArgument(rest)
        except SMTPReply as e:
            self.protocolError(e.code, e.status, e.text)
            return
        limit = _lower(self.policy.maxRecipients, self._submission, "maxRecipients")
        if len(self._recipients) >= limit:
            self.reply(452, "4.5.3", "Error: too many recipients")
            return
        d = defer.maybeDeferred(
            self._submission.validateTo, self.session, recipient, params
        )

        def accepted(_):
            self._recipients.append(recipient)
            self.reply(250, "2.1.5", "Ok")

        d.addCallbacks(accepted, self._validationFailed)
        self._wait(d)

    def _validationFailed(self, failure: Failure) -> None:
        if failure.check(SMTPReply):
            self.protocolError(
                failure.value.code, failure.value.status, failure.value.text
            )
        else:
            log.failure(
                "session {session}: validation error",
                failure,
                session=self.session.sessionId,
            )
            self.reply(451, "4.3.0", "Error: temporary local problem, try again later")

    def smtp_DATA(self, rest: bytes) -> None:
        if self._submission is None:
            self.protocolError(530, "5.7.0", "Authentication required")
            return
        if rest.strip():
            self.protocolError(501, "5.5.4", "Syntax: DATA")
            return
        if self._sender is None:
            self.protocolError(503, "5.5.1", "Error: need MAIL command")
            return
        if not self._recipients:
            self.protocolError(554, "5.5.1", "Error: no valid recipients")
            return
        tlsVersion, cipher = describeTLS(self.transport)
        self.session.tlsVersion, self.session.tlsCipher = tlsVersion, cipher
        envelope = Envelope(
            sender=self._sender,
            recipients=list(self._recipients),
            account=self.session.account,
            mailParams=dict(self._mailParams),
            clientAddress=self.session.clientAddress,
            helo=self.session.helo,
            # The reactor's clock, as for every other time of the session
            # (a fake clock in tests: the Received date is reproducible).
            receivedAt=self.factory.reactor.seconds(),
        )
        self._lineByLine = 0
        try:
            self._message = self._submission.startMessage(self.session, envelope)
            self._queueId = getattr(self._message, "queueId", "") or ""
        except SMTPReply as e:
            self.sendReply(e)
            return
        except Exception:
            log.failure(
                "session {session}: cannot start message",
                session=self.session.sessionId,
            )
            self.reply(451, "4.3.0", "Error: temporary local problem, try again later")
            return
        self._filter = DataFilter(
            maxSize=self._maxMessageSize(), maxLineLength=self.policy.maxLineLength
        )
        self.mode = DATA
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _dataBlock(self) -> bool:
        """
        Take all complete lines of the message body buffered at once, when
        the DATA filter and the message allow it (see
        L{DataFilter.blockReceived}).

        @return: whether it took any.
        """
        if self._lineByLine or not getattr(self._message, "acceptsBlocks", False):
            return False
        block = self._framer.completeLines()
        # Up to the final dot, if it is there: that line goes the usual way.
        end = (b"\r\n" + block).find(b"\r\n.\r\n")
        if end >= 0:
            block = block[:end]
        if len(block) < BLOCK_MINIMUM:
            return False
        data = self._filter.blockReceived(block)
        if data is None:
            # Its lines go one by one before the next block is tried, so that
            # the same bytes are not judged as a block again for each line.
            self._lineByLine = block.count(b"\r\n")
            return False
        self._framer.skip(len(block))
        try:
            self._message.blockReceived(data)
        except SMTPReply as e:
            self._filter.refuse(e)
            self._abortMessage()
        except Exception:
            log.failure(
                "session {session}: spool write failed", session=self.session.sessionId
            )
            self._filter.refuse(
                SMTPReply(
                    451, "4.3.0", "Error: temporary local problem, try again later"
                )
            )
            self._abortMessage()
        return True

    def _dataLine(self, line: bytes, tooLong: bool) -> None:
        if self._lineByLine:
            self._lineByLine -= 1
        hadError = self._filter.error is not None
        result = self._filter.lineReceived(line, tooLong)
        if result is END:
            self._endOfData()
            return
        if result is not None:
            try:
                self._message.lineReceived(result)
            except SMTPReply as e:
                self._filter.refuse(e)
            except Exception:
                log.failure(
                    "session {session}: spool write failed",
                    session=self.session.sessionId,
                )
                self._filter.refuse(
                    SMTPReply(
                        451, "4.3.0", "Error: temporary local problem, try again later"
                    )
                )
        if not hadError and self._filter.error is not None:
            self._abortMessage()

    def _refused(self, reply: SMTPReply, queueId: str) -> None:
        """
        Log and count a message refused after its final dot.  C{queueId} is
        the id the spool gave it at DATA (its file is gone), so that the
        refusal can be found beside the session's other events.
        """
        metrics.MESSAGES.labels(str(reply.code)).inc()
        fields = dict(
            event="refused",
            session=self.session.sessionId,
            account=self.session.account,
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

    def _abandonMessage(self, reason: str) -> None:
        """
        The session ends in DATA, before the final dot: the message is
        dropped with its spool file (the client saw no 250).
        """
        log.info(
            "session {session}: message {queueId} abandoned before its final "
            "dot: {reason}",
            event="abandoned",
            session=self.session.sessionId,
            queueId=self._queueId or "-",
            reason=reason,
        )
        self._abortMessage()
        self.mode = COMMAND
        self._filter = None

    def _abortMessage(self) -> None:
        message, self._message = self._message, None
        if message is not None:
            try:
                message.connectionLost()
            except Exception:
                log.failure(
                    "session {session}: abort failed", session=self.session.sessionId
                )

    def _endOfData(self) -> None:
        self.mode = COMMAND
        dataFilter = self._filter
        self._filter = None
        message, self._message = self._message, None
        recipients = len(self._recipients)
        self._resetTransaction()
        queueId = self._queueId
        if dataFilter.error is not None:
            self._refused(dataFilter.error, queueId)
            self.protocolError(
                dataFilter.error.code, dataFilter.error.status, dataFilter.error.text
            )
            return
        # From here on the message is committed whatever the client does
        # (see the module docstring).
        self._committing = message
        d = defer.maybeDeferred(message.eomReceived)

        def committed(result):
            self._committing = None
            return result

        d.addBoth(committed)

        def queued(queueId):
            log.info(
                "session {session}: message {queueId} accepted from {account}, "
                "{size} octets, {recipients} recipient(s), sha256 {sha256}",
                event="accepted",
                session=self.session.sessionId,
                account=self.session.account,
                queueId=queueId,
                size=dataFilter.size,
                recipients=recipients,
                sha256=getattr(message, "sha256", lambda: "")(),
            )
            metrics.MESSAGES.labels("250").inc()
            metrics.BYTES_ACCEPTED.inc(dataFilter.size)
            self.reply(250, "2.0.0", f"Ok: queued as {queueId}")

        def failed(failure):
            if failure.check(SMTPReply):
                self._refused(failure.value, queueId)
                self.sendReply(failure.value)
                return
            metrics.MESSAGES.labels("451").inc()
            log.failure(
                "session {session}: message not queued",
                failure,
                session=self.session.sessionId,
            )
            self.reply(451, "4.3.0", "Error: temporary local problem, try again later")

        d.addCallbacks(queued, failed)
        self._wait(d)
