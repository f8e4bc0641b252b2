"""
The relay: the queue runner that takes committed messages out of the spool
and hands them to a downstream (the core MTA over SMTP, or an outbox
directory when no core MTA is configured), with retries and expiry.

A message leaves the spool only after the downstream accepted it (the
core's 250 to the data); recipients already accepted are never sent again.
"""

from __future__ import annotations

import os
import random
from typing import BinaryIO

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger

from msa.smtpclient import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    DotStuffer,
    RecipientResult,
    SMTPDownstream,
    dotStuff,
)
from msa.spool import DELIVERED, FAILED, Spool, SpoolEntry

__all__ = [
    "ACCEPTED",
    "PERMANENT",
    "TEMPORARY",
    "DeliveryResult",
    "DotStuffer",
    "OutboxDownstream",
    "RecipientResult",
    "RelayRunner",
    "SMTPDownstream",
    "dotStuff",
]

log = Logger()


class OutboxDownstream:
    """
    For a start without a core MTA: each message is written, exactly as it
    would go to the core (not stuffed, CRLF-terminated), to
    C{<directory>/<queueId>.eml}, atomically.  Every recipient is accepted.
    """

    def __init__(self, directory: str, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        log.warn(
            "no core MTA configured: accepted messages go to the outbox "
            "directory {directory} and are NOT delivered",
            directory=directory,
        )

    def __repr__(self) -> str:
        return f"<OutboxDownstream {self.directory}>"

    def deliver(self, entry: SpoolEntry, messageFile: BinaryIO) -> defer.Deferred:
        d = threads.deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            self._write,
            entry,
            messageFile,
        )

        def done(path):
            log.info(
                "{queueId} written to the outbox: {path}",
                queueId=entry.queueId,
                path=path,
            )
            ok = RecipientResult(ACCEPTED, 250, f"written to {path}")
            return DeliveryResult(
                {r: ok for r in entry.pendingRecipients()}, f"250 written to {path}"
            )

        def failed(f):
            log.failure(
                "cannot write {queueId} to the outbox", f, queueId=entry.queueId
            )
            bad = RecipientResult(TEMPORARY, 0, f"outbox: {f.getErrorMessage()}")
            return DeliveryResult({r: bad for r in entry.pendingRecipients()}, bad.text)

        return d.addCallbacks(done, failed)

    def _write(self, entry: SpoolEntry, messageFile: BinaryIO) -> str:
        path = os.path.join(self.directory, entry.queueId + ".eml")
        tmpPath = os.path.join(self.directory, "." + entry.queueId + ".eml.tmp")
        try:
            with open(tmpPath, "wb") as out:
                last = b""
                while chunk := messageFile.read(65536):
                    out.write(chunk)
                    last = (last + chunk)[-2:]
                if last and last != b"\r\n":
                    out.write(b"\r\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmpPath, path)
        except BaseException:
            if os.path.exists(tmpPath):
                os.unlink(tmpPath)
            raise
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path


class RelayRunner(Service):
    """
    The queue runner.

    @param spool: the L{Spool}.
    @param downstream: anything with C{deliver(entry, messageFile)}
        returning a L{Deferred} of L{DeliveryResult}.
    @param retryBase: delay after the first failed attempt, doubled after
        each further one up to C{retryMax}, with +-10% jitter.
    @param maxLifetime: after this many seconds in the queue, recipients
        still pending after a failed attempt are failed.
    @param concurrency: deliveries in flight at most.
    @param stopTimeout: how long L{stopService} waits for deliveries.
    """

    name = "relay"

    def __init__(
        self,
        spool: Spool,
        downstream,
        reactor=None,
        retryBase: float = 60,
        retryMax: float = 3600,
        maxLifetime: float = 5 * 86400,
        concurrency: int = 4,
        stopTimeout: float = 30,
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
        self._timers: dict[str, object] = {}
        self._ready: list[str] = []
        self._inFlight: dict[str, defer.Deferred] = {}

    def startService(self) -> None:
        super().startService()
        self.spool.addListener(self.wake)
        now = self._reactor.seconds()
        for queueId in self.spool.pending():
            try:
                entry = self.spool.load(queueId)
            except Exception:
                log.failure("cannot load {queueId}; skipped", queueId=queueId)
                continue
            self._schedule(queueId, entry.nextAttempt - now)
        log.info(
            "relay to {downstream} started, {count} message(s) queued",
            downstream=self.downstream,
            count=len(self._timers),
        )

    def stopService(self) -> defer.Deferred:
        """
        Stop scheduling and wait (at most C{stopTimeout} seconds) for the
        deliveries in flight; their entries stay queued if cut short.
        """
        super().stopService()
        self.spool.removeListener(self.wake)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ready.clear()
        if not self._inFlight:
            return defer.succeed(None)
        stopped = defer.Deferred()
        allDone = defer.DeferredList(list(self._inFlight.values()), consumeErrors=True)

        def fire(_=None):
            if not stopped.called:
                if timer.active():
                    timer.cancel()
                stopped.callback(None)

        def tooLong():
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

    def _schedule(self, queueId: str, delay: float) -> None:
        timer = self._timers.pop(queueId, None)
        if timer is not None:
            timer.cancel()
        self._timers[queueId] = self._reactor.callLater(
            max(0.0, delay), self._makeReady, queueId
        )

    def _makeReady(self, queueId: str) -> None:
        self._timers.pop(queueId, None)
        if queueId in self._inFlight or queueId in self._ready:
            return
        self._ready.append(queueId)
        self._pump()

    def _pump(self) -> None:
        while self.running and self._ready and len(self._inFlight) < self.concurrency:
            queueId = self._ready.pop(0)
            d = defer.ensureDeferred(self._attempt(queueId))
            self._inFlight[queueId] = d
            d.addErrback(self._attemptFailed, queueId)
            d.addBoth(self._attemptDone, queueId)

    def _attemptFailed(self, failure, queueId: str) -> None:
        """
        The attempt itself broke (e.g. the state could not be written): log
        it and try again later, the entry is still in the spool.
        """
        log.failure("relay of {queueId} failed", failure, queueId=queueId)
        if self.running:
            self._schedule(queueId, self.retryBase)

    def _attemptDone(self, _, queueId: str) -> None:
        del self._inFlight[queueId]
        self._pump()

    def retryDelay(self, attempts: int) -> float:
        """
        @return: the delay before the next attempt after C{attempts} failed
            ones, with jitter.
        """
        delay = min(self.retryMax, self.retryBase * 2 ** max(0, attempts - 1))
        return delay * random.uniform(0.9, 1.1)

    async def _attempt(self, queueId: str) -> None:
        try:
            entry = self.spool.load(queueId)
        except FileNotFoundError:
            return
        except Exception:
            log.failure("cannot load {queueId}; retry later", queueId=queueId)
            if self.running:
                self._schedule(queueId, self.retryMax)
            return
        if not entry.pendingRecipients():
            self._finish(entry)
            return
        try:
            messageFile = self.spool.openMessage(queueId)
        except OSError:
            log.failure("cannot open the message of {queueId}", queueId=queueId)
            return
        try:
            result = await self.downstream.deliver(entry, messageFile)
        except Exception as e:
            log.failure("downstream error for {queueId}", queueId=queueId)
            text = f"internal error: {e}"
            bad = RecipientResult(TEMPORARY, 0, text)
            result = DeliveryResult({r: bad for r in entry.pendingRecipients()}, text)
        finally:
            messageFile.close()
        self._apply(entry, result)

    def _apply(self, entry: SpoolEntry, result: DeliveryResult) -> None:
        now = self._reactor.seconds()
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
        delivered = [
            r for r, res in result.recipients.items() if res.status == ACCEPTED
        ]
        if delivered:
            log.info(
                "{queueId} delivered for {recipients}: {reply}",
                queueId=entry.queueId,
                recipients=", ".join(delivered),
                reply=result.reply,
            )
        expired: list[str] = []
        if temporary:
            entry.attempts += 1
            entry.lastError = result.reply or str(result.recipients[temporary[0]])
            if now - entry.createdAt >= self.maxLifetime:
                for rcpt in temporary:
                    entry.recipients[rcpt] = FAILED
                expired = temporary
            else:
                delay = self.retryDelay(entry.attempts)
                entry.nextAttempt = min(now + delay, entry.createdAt + self.maxLifetime)
        if failedNow:
            self.onPermanentFailure(entry, failedNow, result.reply)
        if expired:
            self.onPermanentFailure(
                entry,
                expired,
                f"expired after {entry.attempts} attempt(s); last error: "
                f"{entry.lastError}",
            )
        if entry.pendingRecipients():
            self.spool.update(entry)
            log.info(
                "{queueId} deferred (attempt {attempts}) until {nextAttempt}: {error}",
                queueId=entry.queueId,
                attempts=entry.attempts,
                nextAttempt=entry.nextAttempt,
                error=entry.lastError,
            )
            if self.running:
                self._schedule(entry.queueId, entry.nextAttempt - now)
        else:
            self._finish(entry)

    def _finish(self, entry: SpoolEntry) -> None:
        """
        No recipient is pending: the entry leaves the queue.
        """
        self.spool.remove(entry.queueId)
        log.info("{queueId} removed from the queue", queueId=entry.queueId)

    def onPermanentFailure(
        self, entry: SpoolEntry, recipients: list[str], reply: str
    ) -> None:
        """
        Hook for permanent failures and expiry: DSN generation (a later
        issue) goes here.  It is called before the state is written or the
        entry removed, so C{entry.messagePath} is still readable.  Logs
        only.
        """
        log.error(
            "{queueId} from <{sender}> FAILED for {recipients}: {reply}",
            queueId=entry.queueId,
            sender=entry.envelope.sender,
            recipients=", ".join(recipients),
            reply=reply,
        )
