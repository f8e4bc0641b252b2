"""
The avatar of an authenticated account (L{Submission}): it judges MAIL and
RCPT for that account and streams each accepted message, with one Received
trace header in front, into the spool exactly once, however many recipients
it has.  The protocol layer never touches files; this is where a message
meets the disk.
"""

import email.utils

from zope.interface import implementer

from msa.envelope import Envelope, SessionInfo
from msa.interfaces import IAcceptedMessage, ISpool, ISpoolWriter, ISubmission

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
    """

    def __init__(self, writer: ISpoolWriter) -> None:
        self.writer = writer
        self.queueId = writer.queueId

    def lineReceived(self, line: bytes) -> None:
        self.writer.write(line + b"\r\n")

    def eomReceived(self):
        return self.writer.commit()

    def connectionLost(self) -> None:
        self.writer.abort()


@implementer(ISubmission)
class Submission:
    """
    What an authenticated account may do.  Authorization rules per account
    (R9, R10) hang off this class.
    """

    def __init__(self, account, spool: ISpool, hostname: str) -> None:
        self.accountRecord = account
        self.account: str = account.name
        self.spool = spool
        self.hostname = hostname

    def validateFrom(self, session: SessionInfo, sender: str, params: dict) -> None:
        return None

    def validateTo(self, session: SessionInfo, recipient: str, params: dict) -> None:
        return None

    def startMessage(self, session: SessionInfo, envelope: Envelope) -> SpooledMessage:
        writer = self.spool.newMessage(envelope)
        try:
            writer.write(receivedHeader(self.hostname, session, envelope))
        except BaseException:
            writer.abort()
            raise
        return SpooledMessage(writer)


def submissionFactory(spool: ISpool, hostname: str):
    """
    The C{avatarFactory} for L{msa.accounts.SubmissionRealm}.
    """

    def makeSubmission(account) -> Submission:
        return Submission(account, spool, hostname)

    return makeSubmission
