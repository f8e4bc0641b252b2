# -*- test-case-name: tests.test_dsn,tests.test_dsn_notify -*-
"""
Delivery status notifications (RFC 3464): what the sender of a message gets
when the core MTA refused it for good, when it expired in the queue,
(optionally) when it has been waiting for a while, or when it was relayed
to a core that does not report delivery itself.

A DSN is a C{multipart/report; report-type=delivery-status} with three
parts: a text for people, the C{message/delivery-status} for programs, and
the original message's header (C{text/rfc822-headers}; never the body,
whatever C{RET} the client asked: C{RET=HDRS} is what it always gets).  It
is queued in the spool with the null sender like any other message, so that
it is relayed, retried and expired the same way; it is never sent about a
message with the null sender, and never about another DSN.

The client's DSN parameters (RFC 3461) are honoured per recipient
(L{msa.queue.dsnparams.wantsNotice}): C{NOTIFY=NEVER} means no notice at
all, otherwise a "failed", "delayed" or "relayed" notice only when its
C{NOTIFY} names FAILURE, DELAY or SUCCESS; without C{NOTIFY}, the failed
and delayed notices as before and no "relayed" one.  The C{ENVID} is echoed
in C{Original-Envelope-Id} and each C{ORCPT} in C{Original-Recipient},
encoded again as xtext (they are stored decoded: L{msa.xtext}).
"""

from __future__ import annotations

import re
import secrets
from email.utils import formatdate
from typing import BinaryIO

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from msa.envelope import Envelope
from msa.queue import integrity
from msa.queue.dsnparams import DELAYED, FAILED, RELAYED, encodeOriginalRecipient
from msa.queue.queuefile import openContent
from msa.xtext import encodeXtext

log = Logger()


#: At most this much of the original header goes into a DSN.
HEADER_LIMIT = 64 * 1024

#: RFC 5322 section 2.1.1, without the CRLF.
MAX_LINE = 998

_REPLY = re.compile(
    r"^(?:[A-Za-z ()?]+: )?([245]\d\d)(?:[ -]([245])\.(\d{1,3})\.(\d{1,3}))?(?=\s|$)"
)


@attrs.frozen
class RecipientStatus:
    """
    The per-recipient part of a report.

    @ivar action: L{FAILED} or L{DELAYED}.
    @ivar status: the RFC 3463 status code, e.g. C{"5.1.1"}.
    @ivar diagnostic: the last reply or error about this recipient, e.g.
        C{"550 5.1.1 no such user"}; a C{Diagnostic-Code} only when it is
        an SMTP reply.
    @ivar remoteMTA: the core's host name, for C{Remote-MTA}.
    @ivar originalRecipient: the client's C{ORCPT}, encoded
        (L{msa.queue.dsnparams.encodeOriginalRecipient}), for
        C{Original-Recipient}.
    """

    recipient: str
    action: str
    status: str
    diagnostic: str = ""
    remoteMTA: str = ""
    originalRecipient: str = ""


def needsNotification(entry) -> bool:
    """
    Whether a problem with C{entry} (a L{msa.queue.entry.SpoolEntry}) is
    reported to its sender: not for the null sender, not for a DSN.
    """
    return bool(entry.envelope.sender) and not entry.isBounce


def isSMTPReply(text: str) -> bool:
    return _REPLY.match(text) is not None


def statusFromReply(text: str, action: str) -> str:
    """
    The RFC 3463 status for a reply: its enhanced code when it has one of
    the right class, otherwise one derived from the reply code; without a
    reply (network or TLS failure), C{4.4.7} (expired) for a failure and
    C{4.4.1} (no answer) for a delay.
    """
    match = _REPLY.match(text)
    if match is None:
        return "4.4.7" if action == FAILED else "4.4.1"
    code, klass = match.group(1), match.group(2)
    if klass is not None and klass == code[0]:
        return f"{klass}.{int(match.group(3))}.{int(match.group(4))}"
    return f"{code[0]}.0.0"


def recipientStatus(
    recipient: str, action: str, error: str, remoteMTA: str = "", orcpt: str = ""
) -> RecipientStatus:
    """
    The report about C{recipient}: its status from C{error}, the last
    reply (C{2.0.0} for L{RELAYED}, whose reply is the core's 250).

    @param orcpt: the recipient's decoded C{ORCPT} parameter, if any.
    """
    status = "2.0.0" if action == RELAYED else statusFromReply(error, action)
    original = encodeOriginalRecipient(orcpt) if orcpt else ""
    return RecipientStatus(recipient, action, status, error, remoteMTA, original)


def readHeaders(messageFile: BinaryIO, limit: int = HEADER_LIMIT) -> bytes:
    """
    The header of a message (without the blank line that ends it), read
    chunk by chunk and never more than C{limit} bytes; each line ends with
    CRLF and is cut to L{MAX_LINE} bytes.
    """
    data = b""
    while len(data) < limit:
        chunk = messageFile.read(min(8192, limit - len(data)))
        if not chunk:
            break
        data += chunk
        if data.startswith((b"\r\n", b"\n")) or b"\n\r\n" in data or b"\n\n" in data:
            break
    lines = []
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        lines.append(line)
    else:
        # No end of header within the limit (or the data): drop the last,
        # possibly partial, line.
        if lines and len(data) >= limit:
            lines.pop()
    return _lines(lines)


def _lines(lines: list[bytes]) -> bytes:
    """
    C{lines} with CRLF, each cut to L{MAX_LINE} bytes.
    """
    return b"".join(line[:MAX_LINE].replace(b"\r", b" ") + b"\r\n" for line in lines)


def _clean(text: str, room: int) -> str:
    """
    One line of at most C{room} characters.
    """
    return " ".join(text.split())[:room]


def _date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)


def _textPart(
    hostname: str,
    queueId: str,
    arrival: float,
    recipients: list[RecipientStatus],
    willRetryUntil: float | None,
) -> str:
    action = recipients[0].action
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == RELAYED:
        lines += [
            "Your message was handed on to the recipients' mail system, which",
            "does not report delivery: no further notice will follow.",
        ]
    elif action == DELAYED:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying until "
            f"{_date(willRetryUntil or arrival)}.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not be",
            "delivered to the recipients below.  It has been returned without",
            "its body; only its header is attached.",
        ]
    lines += [
        "",
        f"The message arrived at {_date(arrival)} with queue id {queueId}.",
        "",
    ]
    for r in recipients:
        lines.append(_clean(f"<{r.recipient}>: {r.diagnostic or r.status}", 900))
    return "\r\n".join(lines) + "\r\n"


def _statusPart(
    hostname: str,
    arrival: float,
    lastAttempt: float,
    recipients: list[RecipientStatus],
    willRetryUntil: float | None,
    envid: str | None,
) -> str:
    blocks = []
    head = [f"Reporting-MTA: dns; {hostname}"]
    if envid:
        head.append(_clean(f"Original-Envelope-Id: {envid}", MAX_LINE))
    head.append(f"Arrival-Date: {_date(arrival)}")
    blocks.append(head)
    for r in recipients:
        fields = []
        if r.originalRecipient:
            fields.append(
                _clean(f"Original-Recipient: {r.originalRecipient}", MAX_LINE)
            )
        fields += [
            _clean(f"Final-Recipient: rfc822; {r.recipient}", MAX_LINE),
            f"Action: {r.action}",
            f"Status: {r.status}",
        ]
        if r.diagnostic and isSMTPReply(r.diagnostic):
            if r.remoteMTA:
                fields.append(_clean(f"Remote-MTA: dns; {r.remoteMTA}", MAX_LINE))
            fields.append(_clean(f"Diagnostic-Code: smtp; {r.diagnostic}", MAX_LINE))
        elif r.diagnostic:
            fields.append(_clean(f"X-Last-Error: {r.diagnostic}", MAX_LINE))
        fields.append(f"Last-Attempt-Date: {_date(lastAttempt)}")
        if r.action == DELAYED and willRetryUntil is not None:
            fields.append(f"Will-Retry-Until: {_date(willRetryUntil)}")
        blocks.append(fields)
    return "\r\n\r\n".join("\r\n".join(b) for b in blocks) + "\r\n"


def buildDSN(
    *,
    hostname: str,
    sender: str,
    queueId: str,
    arrival: float,
    lastAttempt: float,
    recipients: list[RecipientStatus],
    headers: bytes,
    willRetryUntil: float | None = None,
    envid: str | None = None,
    messageId: str | None = None,
) -> bytes:
    """
    A complete DSN message, CRLF line endings, no line over L{MAX_LINE}.

    @param sender: the original envelope sender (the DSN goes to it).
    @param queueId: the original message's queue id.
    @param recipients: all with the same action.
    @param headers: the original header, from L{readHeaders}.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    headers = _lines([x for x in (y.rstrip(b"\r") for y in headers.split(b"\n")) if x])
    boundary = f"=_dsn_{queueId}_{secrets.token_hex(8)}"
    subject = {
        DELAYED: "Delayed Mail (still being retried)",
        RELAYED: "Successful Mail Relay Report",
    }.get(recipients[0].action, "Undelivered Mail Returned to Sender")
    messageId = messageId or f"{queueId}.{secrets.token_hex(6)}"
    text = _textPart(hostname, queueId, arrival, recipients, willRetryUntil)
    status = _statusPart(
        hostname, arrival, lastAttempt, recipients, willRetryUntil, envid
    )

    def encoding(data: str | bytes) -> str:
        return "7bit" if data.isascii() else "8bit"

    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        _clean(f"To: <{sender}>", MAX_LINE),
        f"Subject: {subject}",
        f"Date: {_date(lastAttempt)}",
        f"Message-ID: <{messageId}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        'Content-Type: text/plain; charset="utf-8"',
        f"Content-Transfer-Encoding: {encoding(text)}",
        "",
    ]
    out = "\r\n".join(top).encode("utf-8") + b"\r\n" + text.encode("utf-8")
    out += "\r\n".join(
        [
            "",
            f"--{boundary}",
            "Content-Description: Delivery report",
            "Content-Type: message/delivery-status",
            f"Content-Transfer-Encoding: {encoding(status)}",
            "",
            "",
        ]
    ).encode("utf-8") + status.encode("utf-8")
    out += (
        "\r\n".join(
            [
                "",
                f"--{boundary}",
                "Content-Description: Message header",
                "Content-Type: text/rfc822-headers",
                f"Content-Transfer-Encoding: {encoding(headers)}",
                "",
                "",
            ]
        ).encode("utf-8")
        + headers
    )
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return out


def queueDSN(
    spool,
    entry,
    recipients: list[RecipientStatus],
    hostname: str,
    now: float,
    willRetryUntil: float | None = None,
) -> defer.Deferred:
    """
    Build the DSN about C{entry} (a L{msa.queue.entry.SpoolEntry} whose message
    file is still there) and queue it in C{spool} with the null sender.

    The original's bytes are checked against its recorded digest first
    (L{msa.queue.integrity}), in C{spool}'s thread pool (the original may
    be 50 MiB): a notification never quotes a header that is not the
    acknowledged one.

    @return: a L{Deferred} firing with the DSN's queue id when it is
        committed, or L{None} when no DSN is due (null sender, or C{entry}
        is itself a DSN); failing with L{integrity.IntegrityError} (nothing
        queued) when the original's bytes are not the acknowledged ones.
    """
    if not needsNotification(entry) or not recipients:
        return defer.succeed(None)
    d = spool._runBlocking(verifiedHeaders, entry)
    d.addCallback(
        _queueWithHeaders, spool, entry, recipients, hostname, now, willRetryUntil
    )
    return d


def verifiedHeaders(entry) -> bytes:
    """
    The header section of C{entry}'s message, once its bytes are checked;
    blocks (hashes the whole message).

    @return: the header, or C{b""} when the message cannot be read.
    @raise integrity.IntegrityError: when they are not the acknowledged
        bytes.
    """
    try:
        with openContent(entry) as f:
            mismatch = integrity.verifyFile(entry, f)
            if mismatch is not None:
                raise integrity.IntegrityError(mismatch)
            return readHeaders(f)
    except OSError as e:
        log.warn(
            "no header for the DSN about {queueId}: {e}", queueId=entry.queueId, e=e
        )
        return b""


def _queueWithHeaders(
    headers: bytes,
    spool,
    entry,
    recipients: list[RecipientStatus],
    hostname: str,
    now: float,
    willRetryUntil: float | None,
) -> defer.Deferred:
    """
    The rest of L{queueDSN}, with the original's C{headers}.
    """
    sender = entry.envelope.sender
    envelope = Envelope(
        sender="",
        recipients=[sender],
        account="",
        mailParams={} if sender.isascii() else {"SMTPUTF8": None},
        receivedAt=now,
    )
    writer = spool.newMessage(envelope)
    writer.isBounce = True
    try:
        writer.write(
            buildDSN(
                hostname=hostname,
                sender=sender,
                queueId=entry.queueId,
                arrival=entry.createdAt or entry.envelope.receivedAt,
                lastAttempt=now,
                recipients=recipients,
                headers=headers,
                willRetryUntil=willRetryUntil,
                envid=encodeXtext((entry.envelope.mailParams or {}).get("ENVID") or ""),
                messageId=writer.queueId,
            )
        )
    except Exception:
        writer.abort()
        return defer.fail()

    def queued(dsnId: str) -> str:
        log.info(
            "{dsnId}: {action} DSN about {queueId} to <{sender}> for {recipients}",
            dsnId=dsnId,
            action=recipients[0].action,
            queueId=entry.queueId,
            sender=sender,
            recipients=", ".join(r.recipient for r in recipients),
        )
        return dsnId

    return writer.commit().addCallback(queued)
