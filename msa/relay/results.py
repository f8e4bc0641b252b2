# -*- test-case-name: tests.test_relay,tests.test_faultunits -*-
"""
The result of one delivery attempt, which every downstream returns
(L{DeliveryResult}: a L{RecipientResult} per recipient, L{ACCEPTED},
L{TEMPORARY} or L{PERMANENT}; L{resultFor} maps a refusal to one), and
what it does to its spool entry: the
recipients the core accepted or refused, the retry time or the expiry of
those deferred, and the attempt's log line and metrics.  The queue runner
(L{msa.relay.runner.RelayRunner}) applies them, queues the notifications
and writes the entry's new state; these functions only decide, on the
entry in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.logger import Logger

from msa import metrics
from msa.queue import dsn
from msa.queue.integrity import Mismatch
from msa.queue.spool import DELIVERED, FAILED, SpoolEntry
from msa.relay.protocol import Reply

log = Logger(namespace="msa.relay.runner")

__all__ = [
    "ACCEPTED",
    "PERMANENT",
    "TEMPORARY",
    "DeliveryResult",
    "RecipientResult",
    "decidedByCore",
    "logAttempt",
    "resultFor",
    "settleRecipients",
    "settleTemporary",
]

ACCEPTED = "accepted"
TEMPORARY = "temporary"
PERMANENT = "permanent"


@attrs.frozen
class RecipientResult:
    """
    What became of one recipient: L{ACCEPTED}, L{TEMPORARY} or L{PERMANENT},
    with the reply (code and text) that said so.
    """

    status: str
    code: int = 0
    text: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


@attrs.define
class DeliveryResult:
    """
    The outcome of one delivery attempt.

    @ivar recipients: recipient address to L{RecipientResult}.
    @ivar reply: the core's final reply (for a success, with its queue id).
    @ivar mismatch: see L{msa.queue.integrity}.
    """

    recipients: dict[str, RecipientResult] = attrs.Factory(dict)
    reply: str = ""
    #: Set when the message was not handed over because its bytes are not
    #: the acknowledged ones (L{msa.queue.integrity}): it is to be held.
    mismatch: Mismatch | None = None
    #: Whether the downstream offered DSN (RFC 3461): it then takes over
    #: the NOTIFY=SUCCESS notifications, and the relay sends none itself.
    dsnOffered: bool = False

    def _with(self, status: str) -> list[str]:
        return [r for r, res in self.recipients.items() if res.status == status]

    @property
    def accepted(self) -> list[str]:
        return self._with(ACCEPTED)

    @property
    def temporary(self) -> list[str]:
        return self._with(TEMPORARY)

    @property
    def permanent(self) -> list[str]:
        return self._with(PERMANENT)


def resultFor(reply: Reply) -> RecipientResult:
    """
    What C{reply}, a refusal, means for a recipient: L{PERMANENT} for a
    5xx, L{TEMPORARY} otherwise.
    """
    status = PERMANENT if reply.code >= 500 else TEMPORARY
    return RecipientResult(status, reply.code, reply.text)


def logAttempt(
    entry: SpoolEntry, result: DeliveryResult, seconds: float, downstream: object = "-"
) -> None:
    """
    One relay attempt for the log (its one INFO line: the outcome, where
    to, the core's reply) and the metrics.
    """
    statuses = {r.status for r in result.recipients.values()}
    if statuses == {ACCEPTED}:
        outcome = "delivered"
    elif ACCEPTED in statuses:
        outcome = "partial"
    elif TEMPORARY in statuses or not statuses:
        outcome = "deferred"
    else:
        outcome = "failed"
    metrics.relayOutcome(outcome, seconds)
    delivered = [r for r, res in result.recipients.items() if res.status == ACCEPTED]
    log.info(
        "relay {queueId}: attempt {attempt} {outcome} in {seconds:.3f}s "
        "(delivered for {delivered}) to {downstream}: {reply} sha256={sha256}",
        event="relay",
        downstream=downstream,
        sha256=entry.sha256 or "unrecorded",
        queueId=entry.queueId,
        attempt=entry.attempts + 1,
        outcome=outcome,
        seconds=seconds,
        delivered=", ".join(delivered) or "none",
        reply=result.reply,
    )


def decidedByCore(entry: SpoolEntry, result: DeliveryResult, expiring: bool) -> bool:
    """
    Whether the core has decided about a pending recipient of C{entry}
    (accepted or refused it), or the message expires with recipients
    pending: then the entry must never be sent again, even when its new
    state cannot be recorded.
    """
    pending = entry.pendingRecipients()
    return any(
        result.recipients.get(r) is not None
        and result.recipients[r].status in (ACCEPTED, PERMANENT)
        for r in pending
    ) or (expiring and bool(pending))


def settleRecipients(
    entry: SpoolEntry, result: DeliveryResult
) -> tuple[list[str], list[str]]:
    """
    Mark the pending recipients of C{entry} the core accepted
    (L{DELIVERED}) or refused (L{FAILED}), with the reply about each; a
    recipient the result does not name was deferred.

    @return: the recipients refused now and those deferred, in RCPT order.
    """
    failedNow: list[str] = []
    temporary: list[str] = []
    for rcpt in entry.pendingRecipients():
        outcome = result.recipients.get(rcpt) or RecipientResult(
            TEMPORARY, 0, "no result from the downstream"
        )
        if outcome.status == ACCEPTED:
            entry.recipients[rcpt] = DELIVERED
            entry.errors.pop(rcpt, None)
        elif outcome.status == PERMANENT:
            entry.recipients[rcpt] = FAILED
            entry.errors[rcpt] = str(outcome)
            failedNow.append(rcpt)
        else:
            entry.errors[rcpt] = str(outcome)
            temporary.append(rcpt)
    return failedNow, temporary


def settleTemporary(
    entry: SpoolEntry,
    result: DeliveryResult,
    temporary: list[str],
    now: float,
    maxLifetime: float,
    retryDelay: Callable[[int], float],
    delayWarningAfter: float | None,
) -> tuple[list[str], list[str]]:
    """
    Count the failed attempt of the C{temporary} recipients: past
    C{maxLifetime} in the queue they fail (expired); otherwise the entry
    is due again after C{retryDelay(attempts)}, never past its expiry, and
    a "delayed" notification is due once it has waited
    C{delayWarningAfter} seconds (L{None}: never).

    @return: the recipients expired now and those whose delay is to be
        notified.
    """
    if not temporary:
        return [], []
    entry.attempts += 1
    entry.lastError = result.reply or str(result.recipients[temporary[0]])
    if now - entry.createdAt >= maxLifetime:
        for rcpt in temporary:
            entry.recipients[rcpt] = FAILED
        return temporary, []
    entry.nextAttempt = min(
        now + retryDelay(entry.attempts), entry.createdAt + maxLifetime
    )
    if (
        delayWarningAfter is not None
        and not entry.delayWarned
        and now - entry.createdAt >= delayWarningAfter
        and dsn.needsNotification(entry)
    ):
        return [], temporary
    return [], []
