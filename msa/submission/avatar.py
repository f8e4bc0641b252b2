# -*- test-case-name: tests.test_authorization,tests.test_testing -*-
"""
The avatar of an authenticated account (L{Submission}): it judges MAIL and
RCPT for that account and streams each accepted message, with one Received
trace header in front, into the spool exactly once, however many recipients
it has.  The protocol layer never touches files; this is where a message
meets the disk.
"""

import email.utils

from twisted.internet import defer
from zope.interface import implementer

from msa.accounts.model import Account
from msa.envelope import Envelope, SessionInfo
from msa.errors import SMTPReply
from msa.interfaces import (
    IAcceptedMessage,
    IRateReservation,
    ISpool,
    ISpoolWriter,
    ISubmission,
)
from msa.policy.authorization import (
    AccountRules,
    HeaderFromPolicy,
    ServerRules,
)
from msa.policy.content import MAX_HEADER_FIELDS, MAX_HEADER_SIZE, ContentPolicyChain
from msa.submission.framing import LineFramer

#: The longest line of a BINARYMIME body a content policy is shown whole.
CHECKED_LINE = 998

SOFTWARE = "digipoort-msa"


def receivedHeader(hostname: str, session: SessionInfo, envelope: Envelope) -> bytes:
    """
    The Received trace header (RFC 5321 4.4) the MSA prepends, folded, with
    CRLF line ends.  ESMTPSA: ESMTP, TLS and AUTH (RFC 3848).  The account
    name is not disclosed; the queue id ties the header to the logs.
    """
    helo = session.helo or "unknown"
    tls = ""
    if session.tlsVersion:
        tls = f" ({session.tlsVersion}:{session.tlsCipher})"
    protocol = (
        "ESMTPSA" if session.account else "ESMTPS" if session.tlsVersion else "ESMTP"
    )
    forClause = (
        f" for <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
    )
    date = email.utils.formatdate(envelope.receivedAt, localtime=True)
    lines = [
        f"Received: from {helo} ([{session.clientAddress}])",
        f"\tby {hostname} ({SOFTWARE}) with {protocol}{tls}",
        f"\tid {envelope.queueId}{forClause}; {date}",
    ]
    return "\r\n".join(lines).encode("ascii", "replace") + b"\r\n"


@implementer(IAcceptedMessage)
class SpooledMessage:
    """
    One message streaming into the spool.

    @param onCommitted: called once the message is on disk.
    @param onAbandoned: called once if it will not be (refused, aborted, or
        the spool failed); used to release the account's rate slot.
    """

    def __init__(
        self,
        writer: ISpoolWriter,
        onCommitted=None,
        checker=None,
        onAbandoned=None,
    ) -> None:
        self.writer = writer
        self.queueId = writer.queueId
        self._onCommitted = onCommitted
        self._onAbandoned = onAbandoned
        self._checker = checker
        # The writer hashes what it stores (the digest the spool records
        # for the check at hand-off, msa.queue.integrity): no second hash.
        self._size = 0
        #: Cuts a BINARYMIME body into lines for the content policy.
        self._lines = LineFramer()

    def lineReceived(self, line: bytes) -> None:
        if self._checker is not None:
            self._checker.lineReceived(line)
        line += b"\r\n"
        self._size += len(line)
        self.writer.write(line)

    @property
    def acceptsBlocks(self) -> bool:
        """
        Whether L{blockReceived} may be used: not when a content policy
        needs to see each line.
        """
        return self._checker is None

    def blockReceived(self, data: bytes) -> None:
        """
        Several lines at once, each with its CRLF, dot-unstuffed.
        """
        self._size += len(data)
        self.writer.write(data)

    def chunkReceived(self, data: bytes) -> None:
        """
        Octets of a BINARYMIME body (BDAT, RFC 3030), cut anywhere: stored
        as they are.  A content policy still sees lines: the octets cut at
        each CRLF, a line longer than the DATA limit only by its start
        (what is stored is never cut).
        """
        if self._checker is not None:
            self._lines.feed(data)
            while (item := self._lines.nextLine(CHECKED_LINE)) is not None:
                self._checker.lineReceived(item[0])
        self.blockReceived(data)

    def sha256(self) -> str:
        """
        The SHA-256 of the message as accepted from the client (without the
        MSA's Received header), for the log: the digest the spool records.
        """
        return self.writer.sha256()

    def eomReceived(self):
        try:
            if self._checker is not None:
                try:
                    if self._lines.buffered:
                        # A BINARYMIME body's last octets, without a CRLF.
                        self._checker.lineReceived(self._lines.take(CHECKED_LINE))
                    self._checker.eomReceived()
                except BaseException:
                    self.writer.abort()
                    raise
            self.writer.noteAudit(size=self._size, sha256=self.sha256())
            d = self.writer.commit()
        except BaseException:
            self._abandoned()
            raise
        if self._onCommitted is not None:
            d.addCallback(self._committed)
        d.addErrback(self._commitFailed)
        return d

    def _committed(self, queueId):
        self._onCommitted()
        return queueId

    def _commitFailed(self, failure):
        self._abandoned()
        return failure

    def _abandoned(self) -> None:
        onAbandoned, self._onAbandoned = self._onAbandoned, None
        if onAbandoned is not None:
            onAbandoned()

    def connectionLost(self) -> None:
        try:
            self.writer.abort()
        finally:
            self._abandoned()


@implementer(ISubmission)
class Submission:
    """
    What an authenticated account may do (R9, R10): send as the addresses
    issued to it, to the recipients the gateway serves, within its limits.
    """

    def __init__(
        self,
        account: Account,
        spool: ISpool,
        hostname: str,
        serverRules: ServerRules | None = None,
        contentPolicy: ContentPolicyChain | None = None,
    ) -> None:
        self.accountRecord = account
        self.account: str = account.name
        self.spool = spool
        self.hostname = hostname
        self.serverRules = serverRules if serverRules is not None else ServerRules()
        self.rules = AccountRules.fromExtra(account.extra)
        self.maxMessageSize = self.rules.maxMessageSize
        self.maxRecipients = self.rules.maxRecipients
        self.maxSessions = self.rules.maxSessions
        #: The rate slot reserved at MAIL, until the message takes it over
        #: (L{startMessage}) or the transaction ends (L{endTransaction}).
        self._reservation: IRateReservation | None = None
        #: The session is over: a reservation answered after it is released.
        self._loggedOut = False
        policies = list(contentPolicy.policies) if contentPolicy is not None else []
        if self.rules.requireHeaderFrom:
            policies.append(
                ("account-header-from", HeaderFromPolicy(self.rules.senders))
            )
        self.contentPolicy = None
        if policies:
            self.contentPolicy = ContentPolicyChain(
                policies,
                maxHeaderSize=(
                    contentPolicy.maxHeaderSize
                    if contentPolicy is not None
                    else MAX_HEADER_SIZE
                ),
                maxHeaderFields=(
                    contentPolicy.maxHeaderFields
                    if contentPolicy is not None
                    else MAX_HEADER_FIELDS
                ),
            )

    def validateFrom(
        self, session: SessionInfo, sender: str, params: dict
    ) -> defer.Deferred | None:
        if not sender:
            raise SMTPReply(
                553, "5.7.1", "The null sender <> is not accepted for submissions"
            )
        if not self.rules.senders.matches(sender):
            raise SMTPReply(
                553,
                "5.7.1",
                f"Sender address <{sender}> is not owned by the authenticated account",
            )
        self.endTransaction()
        # The memory limiter answers (or raises) at once; a shared one
        # (Redis) answers with a Deferred.
        reservation = self.serverRules.rates.reserve(self.account, self.rules)
        if isinstance(reservation, defer.Deferred):
            return reservation.addCallback(self._reserved)
        self._reserved(reservation)
        return None

    def _reserved(self, reservation: IRateReservation) -> None:
        if self._loggedOut:
            # The session ended while the reservation was made.
            reservation.release()
            return
        self._reservation = reservation

    def endTransaction(self) -> None:
        """
        The transaction ended (RSET, HELO/EHLO, or a new MAIL) before any
        message took over its rate slot: release the slot
        (L{ISubmission.endTransaction}).
        """
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            reservation.release()

    def logout(self) -> None:
        """
        The session is over (called by the realm's logout): a slot still
        reserved is released.
        """
        self._loggedOut = True
        self.endTransaction()

    def validateTo(self, session: SessionInfo, recipient: str, params: dict) -> None:
        for allowed in (self.serverRules.recipients, self.rules.recipients):
            if allowed is not None and not allowed.matches(recipient):
                raise SMTPReply(
                    550,
                    "5.7.1",
                    f"Recipient <{recipient}> is not served by this gateway "
                    "for this account",
                )

    def startMessage(self, session: SessionInfo, envelope: Envelope) -> SpooledMessage:
        checker = None
        if self.contentPolicy is not None:
            checker = self.contentPolicy.startMessage(envelope)
        writer = self.spool.newMessage(envelope)
        writer.noteAudit(
            session=session.sessionId,
            clientPort=session.clientPort,
            mechanism=session.mechanism,
            tls=session.tlsVersion or "plaintext",
            cipher=session.tlsCipher,
        )
        try:
            writer.writeTrace(receivedHeader(self.hostname, session, envelope))
        except BaseException:
            writer.abort()
            raise
        reservation, self._reservation = self._reservation, None
        if reservation is None:
            # MAIL was judged elsewhere (an embedder's protocol): count only.
            return SpooledMessage(
                writer, lambda: self.serverRules.rates.record(self.account), checker
            )
        return SpooledMessage(
            writer, reservation.commit, checker, onAbandoned=reservation.release
        )


def submissionFactory(
    spool: ISpool,
    hostname: str,
    serverRules: ServerRules | None = None,
    contentPolicy: ContentPolicyChain | None = None,
):
    """
    The C{avatarFactory} for L{msa.accounts.checkers.SubmissionRealm}.
    """
    if serverRules is None:
        serverRules = ServerRules()

    def makeSubmission(account: Account) -> Submission:
        return Submission(account, spool, hostname, serverRules, contentPolicy)

    return makeSubmission
