# -*- test-case-name: tests.test_relay,tests.test_relay_failures -*-
"""
The relay: the queue runner that takes committed messages out of the spool
and hands them to a downstream (the core MTA over SMTP,
L{msa.relay.client.SMTPDownstream}, or an outbox directory,
L{msa.relay.outbox.OutboxDownstream}, when no core MTA is configured), with
retries and expiry.

A message leaves the spool only after the downstream accepted it (the
core's 250 to the data); recipients already accepted are never sent again.
Permanent failures and expiry produce a delivery status notification
(L{msa.queue.dsn}) to the sender, queued like any message.  The operator
controls the queue through the runner's L{RelayRunner.control}, a
L{msa.queue.control.QueueControl}, which calls back only through the
runner's L{msa.queue.control.QueueRunner} interface (L{RelayRunner.isInFlight},
L{RelayRunner.isUnremovable}, L{RelayRunner.attemptNow},
L{RelayRunner.unschedule}, L{RelayRunner.queued}).  What an attempt's
result does to its entry is decided by L{msa.relay.results}; its notices
are queued by L{msa.relay.notices}, its holds by L{msa.relay.holds}.
"""

from __future__ import annotations

import functools
import random

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from msa.interfaces import IDownstream, IRelay
from msa.queue import integrity
from msa.queue.control import QueueControl
from msa.queue.spool import Spool, SpoolEntry
from msa.relay.holds import Holds
from msa.relay.notices import EXPIRED, Notices
from msa.relay.results import (
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
    decidedByCore,
    logAttempt,
    settleRecipients,
    settleTemporary,
)

log = Logger()


__all__ = ["EXPIRED", "RelayRunner"]


@implementer(IRelay)
class RelayRunner(Service):
    """
    The queue runner.

    @ivar control: the operator's commands on the queue (flush, hold,
        release, delete, describe).
    @ivar notices: the delivery status notifications (L{Notices}), which
        call back through this runner's L{msa.relay.notices.NoticeRunner}
        interface (L{retryDelay}, L{retryIn}, L{finish},
        L{holdUnremovable}, L{holdMismatch}, L{onPermanentFailure}).
    @ivar holds: what holds an entry that must not be sent (again)
        (L{Holds}).
    @ivar unremovable: entries the core has acknowledged but whose new
        state the spool could not record (e.g. remounted read-only): never
        sent again by this process; queue id to the reason, for the log and
        /health (L{Holds.unremovable}).

    @param spool: the L{Spool}.
    @param downstream: the L{IDownstream}.
    @param retryBase: delay after the first failed attempt, doubled after
        each further one up to C{retryMax}, with +-10% jitter.
    @param maxLifetime: after this many seconds in the queue, recipients
        still pending after a failed attempt are failed.
    @param concurrency: deliveries in flight at most.
    @param stopTimeout: how long L{stopService} waits for deliveries.
    @param dsnHostname: the MSA's host name for the delivery status
        notifications; L{None}: no notifications, failures are only logged.
    @param delayWarningAfter: after this many seconds in the queue, a
        "delayed" notification is sent, once per message; L{None}: never.
    """

    name = "relay"  # type: ignore[assignment]  # Twisted types it as None

    def __init__(
        self,
        spool: Spool,
        downstream: IDownstream,
        reactor=None,
        retryBase: float = 60,
        retryMax: float = 3600,
        maxLifetime: float = 5 * 86400,
        concurrency: int = 4,
        stopTimeout: float = 30,
        dsnHostname: str | None = None,
        delayWarningAfter: float | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.spool = spool
        self.downstream = downstream
        self.retryBase = retryBase
        self.retryMax = retryMax
        self.maxLifetime = maxLifetime
        self.concurrency = concurrency
        self.stopTimeout = stopTimeout
        self.dsnHostname = dsnHostname
        self.delayWarningAfter = delayWarningAfter
        self._timers: dict[str, IDelayedCall] = {}
        # The entries due now, in the order they became due: a dict as an
        # ordered set, so that a flush of thousands costs O(1) per entry.
        self._ready: dict[str, None] = {}
        self._inFlight: dict[str, defer.Deferred[None]] = {}
        #: Attempts the core has answered that are still recording the
        #: outcome (the C{relayed} record, the removal): in flight for
        #: the queue control and L{stopService}, but no longer holding one
        #: of the C{concurrency} delivery slots (L{_settle}).
        self._settling: set[str] = set()
        self.control = QueueControl(spool, self, reactor)
        self.notices = Notices(spool, self, reactor)
        self.holds = Holds(spool, self)

    def startService(self) -> None:
        super().startService()
        self.spool.addListener(self.wake)
        now = self._reactor.seconds()
        held = 0
        for queueId in self.spool.pending():
            try:
                entry = self.spool.load(queueId)
            except Exception:
                log.failure("cannot load {queueId}; skipped", queueId=queueId)
                continue
            if entry.held and _undecided(entry):
                held += 1
                continue
            # Held with nothing left to do (its outcome recorded only
            # outside the spool, msa.queue.outcomes): due for removal.
            self._schedule(queueId, entry.nextAttempt - now)
        log.info(
            "relay to {downstream} started, {count} message(s) queued, {held} held",
            downstream=self.downstream,
            count=len(self._timers),
            held=held,
        )

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop scheduling and wait (at most C{stopTimeout} seconds) for the
        deliveries in flight; their entries stay queued if cut short.  Then
        the downstream's idle connections are closed.
        """
        super().stopService()
        self.spool.removeListener(self.wake)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ready.clear()
        stopped: defer.Deferred[None] = defer.Deferred()
        stopped.addCallback(lambda _: self.downstream.close())
        if not self._inFlight:
            stopped.callback(None)
            return stopped
        allDone = defer.DeferredList(list(self._inFlight.values()), consumeErrors=True)

        def fire(_: object = None) -> None:
            if not stopped.called:
                if timer.active():
                    timer.cancel()
                stopped.callback(None)

        def tooLong() -> None:
            log.warn(
                "relay stopped with {count} delivery(ies) still in flight",
                count=len(self._inFlight),
            )
            fire()

        timer = self._reactor.callLater(self.stopTimeout, tooLong)
        allDone.addBoth(fire)
        return stopped

    def wake(self, queueId: str) -> None:
        """
        Deliver C{queueId} now (the spool calls this after each commit).
        """
        if self.running:
            self._schedule(queueId, 0)

    # The interface of the queue control (msa.queue.control.QueueRunner).

    def isInFlight(self, queueId: str) -> bool:
        """
        Whether a delivery attempt of C{queueId} is running now.
        """
        return queueId in self._inFlight

    def isUnremovable(self, queueId: str) -> bool:
        """
        Whether C{queueId} is in L{unremovable}: never attempted again.
        """
        return queueId in self.unremovable

    def attemptNow(self, queueId: str) -> None:
        """
        Attempt C{queueId} as soon as a delivery slot is free; nothing
        while the runner is stopped.
        """
        if self.running:
            self._schedule(queueId, 0)

    def retryIn(self, queueId: str, delay: float) -> None:
        """
        Attempt C{queueId} again in C{delay} seconds; nothing while the
        runner is stopped.
        """
        if self.running:
            self._schedule(queueId, delay)

    def onPermanentFailure(
        self, entry: SpoolEntry, recipients: list[str], reply: str
    ) -> defer.Deferred | None:
        """
        Called for permanent failures and expiry (C{reply} then starts with
        L{EXPIRED}), before the state is written or the entry removed:
        L{Notices.failed} (a log line, an audit record, a "failed"
        notification).  Replace it to do otherwise.
        """
        return self.notices.failed(entry, recipients, reply)

    def unschedule(self, queueId: str) -> None:
        """
        Cancel the scheduled attempt of C{queueId}, if any.
        """
        timer = self._timers.pop(queueId, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._ready.pop(queueId, None)

    def queued(self) -> list[str]:
        """
        The ids this runner will attempt: scheduled, due or in flight.
        """
        return [*self._timers, *self._ready, *self._inFlight]

    # Scheduling.

    def _schedule(self, queueId: str, delay: float) -> None:
        self.unschedule(queueId)
        self._timers[queueId] = self._reactor.callLater(
            max(0.0, delay), self._makeReady, queueId
        )

    def _makeReady(self, queueId: str) -> None:
        self._timers.pop(queueId, None)
        if queueId in self._inFlight or queueId in self._ready:
            return
        self._ready[queueId] = None
        self._pump()

    def _slotsBusy(self) -> int:
        """
        How many delivery slots are taken: attempts in flight that are
        not settling (L{_settle}).
        """
        return len(self._inFlight) - len(self._settling)

    def _pump(self) -> None:
        while self.running and self._ready and self._slotsBusy() < self.concurrency:
            queueId = next(iter(self._ready))
            del self._ready[queueId]
            d = defer.ensureDeferred(self._attempt(queueId))
            self._inFlight[queueId] = d
            d.addErrback(self._attemptFailed, queueId)
            d.addBoth(self._attemptDone, queueId)

    def _attemptFailed(self, failure: Failure, queueId: str) -> None:
        """
        The attempt itself broke (e.g. the state could not be written): log
        it and try again later, the entry is still in the spool.
        """
        if failure.check(OSError):
            # The disk's answer (read-only, full, EIO): expected, no traceback.
            log.error(
                "relay of {queueId} failed: {error}; it stays queued, retry later",
                queueId=queueId,
                error=failure.value,
            )
        else:
            log.failure("relay of {queueId} failed", failure, queueId=queueId)
        if self.running and not self.control.isDeleted(queueId):
            self._schedule(queueId, self.retryBase)

    def _attemptDone(self, _: object, queueId: str) -> None:
        del self._inFlight[queueId]
        self._settling.discard(queueId)
        self.control.attemptEnded(queueId)
        self._pump()

    def retryDelay(self, attempts: int) -> float:
        """
        @return: the delay before the next attempt after C{attempts} failed
            ones, with jitter.
        """
        delay = min(self.retryMax, self.retryBase * 2 ** max(0, attempts - 1))
        return delay * random.uniform(0.9, 1.1)

    async def _attempt(self, queueId: str) -> None:
        if queueId in self.unremovable:
            # The core has it: never again from this process.
            return
        try:
            entry = self.spool.load(queueId)
        except FileNotFoundError:
            return
        except OSError as e:
            # E.g. EMFILE: the state cannot even be read, so neither can the
            # attempts be counted; try again soon, the entry is intact.
            log.error("cannot load {queueId} ({e}); retry later", queueId=queueId, e=e)
            if self.running:
                self._schedule(queueId, self.retryBase)
            return
        except Exception:
            log.failure("cannot load {queueId}; retry later", queueId=queueId)
            if self.running:
                self._schedule(queueId, self.retryMax)
            return
        if entry.held and _undecided(entry):
            return
        if entry.owedNotices and not await self.notices.payOwed(entry):
            return
        if not entry.pendingRecipients():
            await self.finish(entry)
            return
        try:
            messageFile = self.spool.openMessage(queueId, entry)
        except OSError as e:
            # E.g. EMFILE: a temporary failure of this attempt like any
            # other, so that the backoff, the expiry and the notifications
            # apply (the message is never stranded).
            log.error("cannot open the message of {queueId}: {e}", queueId=queueId, e=e)
            text = f"local error: cannot open the queued message: {e}"
            bad = RecipientResult(TEMPORARY, 0, text)
            result = DeliveryResult({r: bad for r in entry.pendingRecipients()}, text)
            logAttempt(entry, result, 0.0)
            await self._apply(entry, result)
            return
        if not integrity.recorded(entry):
            log.warn(
                "{queueId}: {why}; handed over unverified",
                queueId=queueId,
                why=integrity.NO_DIGEST,
            )
        started = self._reactor.seconds()
        try:
            result = await self.downstream.deliver(
                entry, messageFile, functools.partial(self._dataSent, queueId)
            )
        except Exception as e:
            log.failure("downstream error for {queueId}", queueId=queueId)
            text = f"internal error: {e}"
            bad = RecipientResult(TEMPORARY, 0, text)
            result = DeliveryResult({r: bad for r in entry.pendingRecipients()}, text)
        finally:
            messageFile.close()
        if result.mismatch is not None:
            await self.holdMismatch(entry, result.mismatch)
            return
        logAttempt(entry, result, self._reactor.seconds() - started, self.downstream)
        self._settle(queueId)
        if result.accepted:
            # The audit record of the hand-off, durable before the state.
            await self.spool.auditEvent(
                "relayed",
                queueId=entry.queueId,
                recipients=[
                    r for r in entry.envelope.recipients if r in result.accepted
                ],
                reply=result.reply,
                attempt=entry.attempts + 1,
            )
            await self.notices.relayed(entry, result)
        await self._apply(entry, result)

    def _dataSent(self, queueId: str) -> None:
        """
        The message of C{queueId} is all sent and its connection can carry
        the next one while the core's reply is awaited
        (L{msa.interfaces.IDownstream.deliver}): unless messages are being
        received, its delivery slot goes to the next message now, whose
        commands follow the final dot on the same connection (one round
        trip per message, RFC 2920).  The attempt stays in flight, as in
        L{_settle}.

        Submissions first: while clients are sending messages, the slot
        waits for the core's reply (two round trips per message), and the
        reactor thread the relay shares with the clients goes to them.  On
        two busy cores a relay that kept up with a burst accepted 10-15%
        fewer messages per second during it (bench, C{relay} and (a));
        this way the queue left behind is still drained within a second
        of the burst's end, at the full pipelined rate.
        """
        if self.spool.receiving:
            return
        self._settle(queueId)

    def _settle(self, queueId: str) -> None:
        """
        The core has answered the attempt of C{queueId}: its delivery slot
        goes to the next message now, while this attempt records the
        outcome (the C{relayed} record and the removal, each group-committed
        and so waiting for company; or the new state of a deferral).  The
        attempt stays in flight until that is done: the queue control
        sees it so, no other attempt of the entry starts, and
        L{stopService} waits for it.  Without this, the slots waited for
        the disk and the gathers, and the relay fell behind the
        submissions (bench, C{relay}: the queue minutes behind a burst).
        """
        self._settling.add(queueId)
        self._pump()

    async def _apply(self, entry: SpoolEntry, result: DeliveryResult) -> None:
        """
        Record the outcome of an attempt.  When the core has decided about
        a recipient (accepted or refused it), or the message expires, and
        the spool cannot record it,
        the entry is held in memory (L{holdUnremovable}): sending it again
        would deliver it twice.
        """
        expiring = self._reactor.seconds() - entry.createdAt >= self.maxLifetime
        decided = decidedByCore(entry, result, expiring)
        try:
            await self._applyResult(entry, result)
        except Exception as e:
            if decided:
                await self.holdUnremovable(entry, e)
                return
            # Nothing was delivered: the entry stays as the spool has it and
            # is tried again (L{_attemptFailed}).
            raise

    async def _applyResult(self, entry: SpoolEntry, result: DeliveryResult) -> None:
        queueId = entry.queueId
        if self.control.isDeleted(queueId):
            log.info("{queueId} was deleted during its delivery", queueId=queueId)
            return
        now = self._reactor.seconds()
        failedNow, temporary = settleRecipients(entry, result)
        expired, delayed = settleTemporary(
            entry,
            result,
            temporary,
            now,
            self.maxLifetime,
            self.retryDelay,
            self.delayWarningAfter,
        )
        await self.notices.afterAttempt(
            entry, failedNow, expired, delayed, result.reply, now
        )
        if self.control.isDeleted(queueId):
            log.info("{queueId} was deleted during its delivery", queueId=queueId)
            return
        self.control.applyRequests(entry, now)
        if entry.pendingRecipients() or entry.owedNotices:
            await self.spool.update(entry)
            # The attempt's outcome was logged (INFO) by logAttempt.
            log.debug(
                "{queueId} deferred (attempt {attempts}) until {nextAttempt}: {error}",
                queueId=queueId,
                attempts=entry.attempts,
                nextAttempt=entry.nextAttempt,
                error=entry.lastError,
            )
            if self.running and not entry.held:
                # A flush asked while the state was being written (after
                # applyRequests) is due now, not at the recorded time.
                due = now if self.control.flushRequested(queueId) else entry.nextAttempt
                self._schedule(queueId, due - now)
        else:
            await self.finish(entry)

    async def finish(self, entry: SpoolEntry) -> None:
        """
        No recipient is pending: the entry leaves the queue.  The attempt
        ends only once the removal is durable
        (L{msa.queue.spool.Spool.removeDelivered}: the disk work is done in
        a thread, with the fsyncs of concurrent removals and commits shared).
        """
        self.notices.forget(entry.queueId)
        await self.spool.removeDelivered(entry.queueId)
        log.debug("{queueId} removed from the queue", queueId=entry.queueId)

    async def holdUnremovable(self, entry: SpoolEntry, error: Exception) -> None:
        """
        See L{Holds.unrecordable}.
        """
        await self.holds.unrecordable(entry, error)

    async def holdMismatch(
        self, entry: SpoolEntry, mismatch: integrity.Mismatch
    ) -> None:
        """
        See L{Holds.mismatch}.
        """
        await self.holds.mismatch(entry, mismatch)

    @property
    def unremovable(self) -> dict[str, str]:
        return self.holds.unremovable


def _undecided(entry: SpoolEntry) -> bool:
    """
    Whether C{entry} still has something to do: recipients to deliver or
    notices to queue.
    """
    return bool(entry.pendingRecipients() or entry.owedNotices)
