# -*- test-case-name: tests.test_dsn,tests.test_relay,tests.test_faultunits -*-
"""
The queue runner's delivery status notifications (L{Notices}, a
collaborator the runner holds): the "failed" notice of a permanent failure
or an expiry (L{Notices.failed}), the "delayed" one, the "relayed" one
(L{Notices.relayed}), and notices owed because an earlier try at queueing
them failed, retried with the delivery backoff until they are queued.  A
notice is itself a queued message (L{msa.queue.dsn}).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from msa.interfaces import IDownstream
from msa.queue import dsn, dsnparams, integrity
from msa.queue.spool import Spool, SpoolEntry
from msa.relay.results import DeliveryResult

log = Logger(namespace="msa.relay.runner")

#: Start of the reply passed to L{Notices.failed} on expiry.
EXPIRED = "expired after"


class NoticeRunner(Protocol):
    """
    What L{Notices} needs of the queue runner that owns it
    (L{msa.relay.runner.RelayRunner}).
    """

    #: Where the notices name the remote host (its C{host}).
    downstream: IDownstream
    #: The MSA's host name for the notices; L{None}: no notices, failures
    #: are only logged.
    dsnHostname: str | None
    #: How long a message is retried (the C{Will-Retry-Until} of a notice).
    maxLifetime: float

    def retryDelay(self, attempts: int) -> float:
        """
        The delay before the next attempt after C{attempts} failed ones.
        """

    def retryIn(self, queueId: str, delay: float) -> None:
        """
        Attempt C{queueId} again after C{delay} seconds (nothing while the
        runner is stopped).
        """

    async def finish(self, entry: SpoolEntry) -> None:
        """
        Remove C{entry}, which has nothing left to do, from the queue.
        """

    async def holdUnremovable(self, entry: SpoolEntry, error: Exception) -> None:
        """
        Hold C{entry}, decided but not recordable in the spool.
        """

    async def holdMismatch(
        self, entry: SpoolEntry, mismatch: integrity.Mismatch
    ) -> None:
        """
        Hold C{entry}, whose bytes are not the acknowledged ones.
        """

    def onPermanentFailure(
        self, entry: SpoolEntry, recipients: list[str], reply: str
    ) -> defer.Deferred | None:
        """
        The hook for permanent failures and expiry: by default
        L{Notices.failed}.
        """


class Notices:
    """
    The notices of a queue runner: composed into it, calling back only
    through its L{NoticeRunner} interface.

    @param spool: the runner's spool, where the notices are queued.
    @param runner: the L{NoticeRunner}: also the settings (C{dsnHostname},
        C{maxLifetime}), read when a notice is made.
    @param reactor: the runner's clock.
    """

    def __init__(self, spool: Spool, runner: NoticeRunner, reactor: Any) -> None:
        self.spool = spool
        self._runner = runner
        self._reactor = reactor
        # Failed attempts to queue the owed "failed" notices, per entry.
        self._noticeTries: dict[str, int] = {}

    def forget(self, queueId: str) -> None:
        """
        C{queueId} leaves the queue: forget its tries.
        """
        self._noticeTries.pop(queueId, None)

    async def hook(self, entry: SpoolEntry, recipients: list[str], reply: str) -> bool:
        """
        Call the runner's C{onPermanentFailure} (by default L{failed}).

        @return: whether it succeeded (the notice, if any, is queued).
        """
        try:
            await defer.maybeDeferred(
                self._runner.onPermanentFailure, entry, recipients, reply
            )
        except Exception as e:
            log.error(
                "cannot report the failure of {queueId} ({error}); it stays "
                "queued until the notice is queued",
                queueId=entry.queueId,
                error=e,
            )
            return False
        return True

    async def afterAttempt(
        self,
        entry: SpoolEntry,
        failedNow: list[str],
        expired: list[str],
        delayed: list[str],
        reply: str,
        now: float,
    ) -> None:
        """
        The notices of one delivery attempt, queued before the entry's new
        state is written (a crash between them means a duplicate notice,
        never a lost one): "failed" for the recipients refused now and
        those expired (L{hook}), "delayed" for C{delayed}.  A "failed"
        notice that cannot be queued now is owed: the entry stays in the
        queue (its recipients failed) until it is, tried again after
        L{noticeDelay}.
        """
        if failedNow:
            await self._owedUntilQueued(entry, failedNow, reply)
        if expired:
            await self._owedUntilQueued(
                entry,
                expired,
                f"{EXPIRED} {entry.attempts} attempt(s); last error: {entry.lastError}",
            )
        if entry.owedNotices and not entry.pendingRecipients():
            entry.nextAttempt = now + self.noticeDelay(entry.queueId)
        if delayed:
            entry.delayWarned = await self.notify(entry, delayed, dsn.DELAYED)

    async def _owedUntilQueued(
        self, entry: SpoolEntry, recipients: list[str], reply: str
    ) -> None:
        """
        The "failed" notice of C{recipients}: owed from the start, so that
        any state of the entry written meanwhile (a hold of its message,
        when the notice finds the message changed on disk) carries the
        debt, and paid only once the notice is queued.
        """
        entry.owedNotices += recipients
        if await self.hook(entry, recipients, reply):
            entry.owedNotices = [r for r in entry.owedNotices if r not in recipients]

    def noticeDelay(self, queueId: str) -> float:
        """
        The delay before the next try at queueing owed notices, with the
        same backoff as deliveries.
        """
        tries = self._noticeTries.get(queueId, 0) + 1
        self._noticeTries[queueId] = tries
        return self._runner.retryDelay(tries)

    async def payOwed(self, entry: SpoolEntry) -> bool:
        """
        Queue the "failed" notices C{entry} owes (an earlier try failed):
        the entry leaves the queue only once they are durably queued.  If
        they are not, the entry is rescheduled; if they are but the spool
        cannot record it, the entry is held (C{holdUnremovable}), so that
        the notice is not queued twice.

        @return: whether recipients are still to be delivered now.
        """
        queueId = entry.queueId
        try:
            await self.notifyOrRaise(entry, entry.owedNotices, dsn.FAILED)
        except Exception as e:
            log.error(
                "cannot queue the failure notice about {queueId} ({error}); "
                "retry later",
                queueId=queueId,
                error=e,
            )
            now = self._reactor.seconds()
            entry.nextAttempt = now + self.noticeDelay(queueId)
            await self.spool.update(entry)
            self._runner.retryIn(queueId, entry.nextAttempt - now)
            return False
        self._noticeTries.pop(queueId, None)
        entry.owedNotices = []
        try:
            if not entry.pendingRecipients():
                await self._runner.finish(entry)
                return False
            await self.spool.update(entry)
        except Exception as e:
            await self._runner.holdUnremovable(entry, e)
            return False
        return True

    def failed(
        self, entry: SpoolEntry, recipients: list[str], reply: str
    ) -> defer.Deferred:
        """
        The runner's C{onPermanentFailure} by default: called for
        permanent failures and expiry (C{reply} then starts with
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
                self.notifyOrRaise(entry, recipients, dsn.FAILED)
            )
        )

    async def relayed(self, entry: SpoolEntry, result: DeliveryResult) -> bool:
        """
        After a delivery: queue a "relayed" notification (RFC 3464 2.3.3)
        about the recipients the downstream accepted whose NOTIFY asked for
        SUCCESS, when the downstream did not offer DSN (one that does was
        given the NOTIFY and reports delivery itself).  A failure is
        logged: the message was delivered either way.

        @return: whether one was queued.
        """
        if result.dsnOffered:
            return False
        replies = {r: str(result.recipients[r]) for r in result.accepted}
        return await self.notify(entry, list(replies), dsn.RELAYED, replies)

    async def notify(
        self,
        entry: SpoolEntry,
        recipients: list[str],
        action: str,
        replies: dict[str, str] | None = None,
    ) -> bool:
        """
        Queue a notification of C{action} about C{recipients} of C{entry};
        a failure is logged.

        @return: whether one was queued.
        """
        try:
            return await self.notifyOrRaise(entry, recipients, action, replies)
        except Exception as e:
            log.error(
                "cannot queue the {action} DSN about {queueId}: {error}",
                action=action,
                queueId=entry.queueId,
                error=e,
            )
            return False

    async def notifyOrRaise(
        self,
        entry: SpoolEntry,
        recipients: list[str],
        action: str,
        replies: dict[str, str] | None = None,
    ) -> bool:
        """
        Queue a notification of C{action} about those of C{recipients} of
        C{entry} whose NOTIFY asks for it (L{dsnparams.wantsNotice}).

        @param replies: the reply about each recipient; by default its
            last error.
        @return: whether one was queued (none is due for the null sender,
            a DSN, without C{dsnHostname}, or when no recipient's NOTIFY
            asks for it).
        @raise Exception: when it could not be queued.
        """
        hostname = self._runner.dsnHostname
        if hostname is None or not dsn.needsNotification(entry):
            return False
        envelope = entry.envelope
        recipients = [
            r for r in recipients if dsnparams.wantsNotice(envelope, r, action)
        ]
        if not recipients:
            return False
        replies = entry.errors if replies is None else replies
        remote = self._runner.downstream.host
        statuses = [
            dsn.recipientStatus(
                r,
                action,
                replies.get(r, ""),
                remote,
                dsnparams.recipientParameters(envelope, r).get("ORCPT") or "",
            )
            for r in recipients
        ]
        try:
            await dsn.queueDSN(
                self.spool,
                entry,
                statuses,
                hostname,
                self._reactor.seconds(),
                willRetryUntil=entry.createdAt + self._runner.maxLifetime,
            )
        except integrity.IntegrityError as e:
            # No notification quoting altered bytes: held (the caller
            # keeps the notice owed until the entry is released).
            await self._runner.holdMismatch(entry, e.mismatch)
            raise
        return True
