# -*- test-case-name: tests.test_dsn,tests.test_relay,tests.test_faultunits -*-
"""
The queue runner's delivery status notifications (L{NoticesMixin}): the
"failed" notice of a permanent failure or an expiry (L{onPermanentFailure}),
the "delayed" one, and notices owed because an earlier try at queueing
them failed, retried with the delivery backoff until they are queued.  A
notice is itself a queued message (L{msa.queue.dsn}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from msa.queue import dsn, integrity
from msa.queue.spool import Spool, SpoolEntry

log = Logger(namespace="msa.relay.runner")

#: Start of the reply passed to L{NoticesMixin.onPermanentFailure} on expiry.
EXPIRED = "expired after"


class NoticesMixin:
    """
    The notices of L{msa.relay.runner.RelayRunner}, which provides the
    attributes and methods declared here.
    """

    spool: Spool
    downstream: Any
    dsnHostname: str | None
    maxLifetime: float
    running: bool | int
    _reactor: Any
    _noticeTries: dict[str, int]

    def retryDelay(self, attempts: int) -> float:
        raise NotImplementedError()

    def _schedule(self, queueId: str, delay: float) -> None:
        raise NotImplementedError()

    async def _finish(self, entry: SpoolEntry) -> None:
        raise NotImplementedError()

    async def _holdUnremovable(self, entry: SpoolEntry, error: Exception) -> None:
        raise NotImplementedError()

    async def _holdMismatch(
        self, entry: SpoolEntry, mismatch: integrity.Mismatch
    ) -> None:
        raise NotImplementedError()

    async def _hook(self, entry: SpoolEntry, recipients: list[str], reply: str) -> bool:
        """
        Call L{onPermanentFailure}.

        @return: whether it succeeded (the notice, if any, is queued).
        """
        try:
            await defer.maybeDeferred(self.onPermanentFailure, entry, recipients, reply)
        except Exception as e:
            log.error(
                "cannot report the failure of {queueId} ({error}); it stays "
                "queued until the notice is queued",
                queueId=entry.queueId,
                error=e,
            )
            return False
        return True

    def _noticeDelay(self, queueId: str) -> float:
        """
        The delay before the next try at queueing owed notices, with the
        same backoff as deliveries.
        """
        tries = self._noticeTries.get(queueId, 0) + 1
        self._noticeTries[queueId] = tries
        return self.retryDelay(tries)

    async def _payNotices(self, entry: SpoolEntry) -> bool:
        """
        Queue the "failed" notices C{entry} owes (an earlier try failed):
        the entry leaves the queue only once they are durably queued.  If
        they are not, the entry is rescheduled; if they are but the spool
        cannot record it, the entry is held (L{_holdUnremovable}), so that
        the notice is not queued twice.

        @return: whether recipients are still to be delivered now.
        """
        queueId = entry.queueId
        try:
            await self._notifyOrRaise(entry, entry.owedNotices, dsn.FAILED)
        except Exception as e:
            log.error(
                "cannot queue the failure notice about {queueId} ({error}); "
                "retry later",
                queueId=queueId,
                error=e,
            )
            now = self._reactor.seconds()
            entry.nextAttempt = now + self._noticeDelay(queueId)
            await self.spool.update(entry)
            if self.running:
                self._schedule(queueId, entry.nextAttempt - now)
            return False
        self._noticeTries.pop(queueId, None)
        entry.owedNotices = []
        try:
            if not entry.pendingRecipients():
                await self._finish(entry)
                return False
            await self.spool.update(entry)
        except Exception as e:
            await self._holdUnremovable(entry, e)
            return False
        return True

    def onPermanentFailure(
        self, entry: SpoolEntry, recipients: list[str], reply: str
    ) -> defer.Deferred | None:
        """
        Called for permanent failures and expiry (C{reply} then starts with
        L{EXPIRED}), before the state is written or the entry removed, so
        C{entry.messagePath} is still readable.  Logs, and queues a
        "failed" notification to the sender when C{dsnHostname} is set.

        @return: a L{Deferred} firing when the notification is queued.
        """
        log.error(
            "{queueId} from <{sender}> FAILED for {recipients}: {reply}",
            queueId=entry.queueId,
            sender=entry.envelope.sender,
            recipients=", ".join(recipients),
            reply=reply,
        )
        audited = self.spool.auditEvent(
            "expired" if reply.startswith(EXPIRED) else "bounced",
            queueId=entry.queueId,
            recipients=list(recipients),
            reply=reply,
            replies={r: entry.errors.get(r, "") for r in recipients},
        )
        return audited.addCallback(
            lambda _: defer.ensureDeferred(
                self._notifyOrRaise(entry, recipients, dsn.FAILED)
            )
        )

    async def _notify(
        self, entry: SpoolEntry, recipients: list[str], action: str
    ) -> bool:
        """
        Queue a notification of C{action} about C{recipients} of C{entry};
        a failure is logged.

        @return: whether one was queued.
        """
        try:
            return await self._notifyOrRaise(entry, recipients, action)
        except Exception as e:
            log.error(
                "cannot queue the {action} DSN about {queueId}: {error}",
                action=action,
                queueId=entry.queueId,
                error=e,
            )
            return False

    async def _notifyOrRaise(
        self, entry: SpoolEntry, recipients: list[str], action: str
    ) -> bool:
        """
        Queue a notification of C{action} about C{recipients} of C{entry}.

        @return: whether one was queued (none is due for the null sender,
            a DSN, or without C{dsnHostname}).
        @raise Exception: when it could not be queued.
        """
        if self.dsnHostname is None or not dsn.needsNotification(entry):
            return False
        remote = getattr(self.downstream, "host", "")
        statuses = [
            dsn.recipientStatus(r, action, entry.errors.get(r, ""), remote)
            for r in recipients
        ]
        try:
            await dsn.queueDSN(
                self.spool,
                entry,
                statuses,
                self.dsnHostname,
                self._reactor.seconds(),
                willRetryUntil=entry.createdAt + self.maxLifetime,
            )
        except integrity.IntegrityError as e:
            # No notification quoting altered bytes: held (the caller
            # keeps the notice owed until the entry is released).
            await self._holdMismatch(entry, e.mismatch)
            raise
        return True
