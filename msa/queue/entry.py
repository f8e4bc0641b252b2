# -*- test-case-name: tests.test_spool,tests.test_crash -*-
"""
A spool entry as the relay sees it (L{SpoolEntry}, the JSON of its state:
L{msa.queue.queuefile}),
the queue ids, and what the spool's writer and reader share.
See L{msa.queue.spool} for the layout.
"""

from __future__ import annotations

import errno
import json
import secrets
import time

import attrs

from msa.envelope import Envelope

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


#: Errors that mean the spool's file system is full (RFC 3463 4.3.1).
_FULL = (errno.ENOSPC, errno.EDQUOT)


_lastTimestamp = 0


def newQueueId() -> str:
    """
    A new queue id: 13 upper-case hex digits of microseconds since the epoch
    (strictly increasing within this process) and 5 random hex digits, so
    ids sort by arrival time and do not collide between processes.
    """
    global _lastTimestamp
    now = max(time.time_ns() // 1000, _lastTimestamp + 1)
    _lastTimestamp = now
    return f"{now:013X}{secrets.randbits(20):05X}"


@attrs.define
class SpoolEntry:
    """
    One committed message as the relay sees it.

    @ivar recipients: recipient address to status (L{PENDING},
        L{DELIVERED} or L{FAILED}), in RCPT order.
    @ivar errors: recipient address to the last reply about it.
    @ivar nextAttempt: POSIX time of the next delivery attempt.
    @ivar eightBit: whether the message has bytes above 127.
    @ivar held: put on hold by the operator: never attempted until released.
    @ivar isBounce: a delivery status notification made by this MSA (never
        the subject of another one).
    @ivar delayWarned: a "delayed" notification was sent for it.
    @ivar owedNotices: failed recipients whose "failed" notification could
        not be queued yet: the entry stays in the queue until it is.
    @ivar sha256: the SHA-256 of the message bytes acknowledged with the
        250 (after the trace header); C{""} for an entry spooled by an
        earlier version.  See L{msa.queue.integrity}.
    @ivar traceLength: the length of the trace header the MSA put in front.
    @ivar traceSha256: its SHA-256 (C{""} when there is none).
    @ivar heldReason: why the MSA itself put the entry on hold (an
        integrity mismatch); C{""} otherwise.
    @ivar contentOffset: where the message starts in the file at
        C{messagePath} (L{msa.queue.queuefile}); 0 for an entry spooled by
        an earlier version, whose C{.msg} file is the message alone.
    """

    queueId: str
    envelope: Envelope
    recipients: dict[str, str]
    attempts: int = 0
    nextAttempt: float = 0.0
    lastError: str = ""
    createdAt: float = 0.0
    errors: dict[str, str] = attrs.Factory(dict)
    eightBit: bool = False
    messagePath: str = ""
    size: int = 0
    held: bool = False
    isBounce: bool = False
    delayWarned: bool = False
    owedNotices: list[str] = attrs.Factory(list)
    sha256: str = ""
    traceLength: int = 0
    traceSha256: str = ""
    heldReason: str = ""
    contentOffset: int = 0

    def pendingRecipients(self) -> list[str]:
        return [r for r, status in self.recipients.items() if status == PENDING]

    def toJSON(self) -> dict:
        return {
            "version": 1,
            "queueId": self.queueId,
            "envelope": self.envelope.toJSON(),
            "recipients": self.recipients,
            "errors": self.errors,
            "attempts": self.attempts,
            "nextAttempt": self.nextAttempt,
            "lastError": self.lastError,
            "createdAt": self.createdAt,
            "eightBit": self.eightBit,
            "held": self.held,
            "isBounce": self.isBounce,
            "delayWarned": self.delayWarned,
            "owedNotices": self.owedNotices,
            "sha256": self.sha256,
            "traceLength": self.traceLength,
            "traceSha256": self.traceSha256,
            "heldReason": self.heldReason,
        }

    @classmethod
    def fromJSON(cls, data: dict, messagePath: str, size: int) -> SpoolEntry:
        return cls(
            queueId=data["queueId"],
            envelope=Envelope.fromJSON(data["envelope"]),
            recipients=dict(data["recipients"]),
            attempts=int(data.get("attempts", 0)),
            nextAttempt=float(data.get("nextAttempt", 0.0)),
            lastError=data.get("lastError", ""),
            createdAt=float(data.get("createdAt", 0.0)),
            errors=dict(data.get("errors", {})),
            eightBit=bool(data.get("eightBit", False)),
            messagePath=messagePath,
            size=size,
            held=bool(data.get("held", False)),
            isBounce=bool(data.get("isBounce", False)),
            delayWarned=bool(data.get("delayWarned", False)),
            owedNotices=list(data.get("owedNotices", [])),
            # Absent in a state written by an earlier version.
            sha256=str(data.get("sha256", "")),
            traceLength=int(data.get("traceLength", 0)),
            traceSha256=str(data.get("traceSha256", "")),
            heldReason=str(data.get("heldReason", "")),
        )


def encodeState(entry: SpoolEntry) -> bytes:
    return json.dumps(entry.toJSON(), sort_keys=True).encode("utf-8")
