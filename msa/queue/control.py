# -*- test-case-name: tests.test_queue_control -*-
"""
Operator control of the relay queue: flush, hold, release, delete and a
description of every entry.

L{QueueControl} is a small object the queue runner
(L{msa.relay.runner.RelayRunner}) owns as its C{control}; the control socket
(L{msa.service.controlsocket}) calls it.  What it needs of the runner is the
narrow L{QueueRunner} interface: whether an entry is in flight or held
unremovable, and scheduling.  What the operator asks about an entry in
flight (hold, release, flush, delete) is kept here and handed back to the
runner when the attempt ends (L{QueueControl.isDeleted},
L{QueueControl.applyRequests}, L{QueueControl.attemptEnded}).

Every change of state goes through L{msa.queue.spool.Spool.update} or
L{msa.queue.spool.Spool.remove} (their disk work in a thread: the commands
return a L{Deferred} firing when the change is durable), with one
exception: a flush writes nothing.  It only asks the runner to attempt the
entries now; their C{nextAttempt} on disk stays as it was, so that a flush
of a large backlog costs no write per message (as Postfix's C{postqueue
-f}).  After a crash before the attempt, the entries wait for their recorded
time again: the operator's flush is lost, never a message.  An unknown (or
malformed) queue id raises C{KeyError(queueId)}.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa.queue.spool import Spool, SpoolEntry

log = Logger()

_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")


def describeEntry(entry: SpoolEntry, now: float, inFlight: bool = False) -> dict:
    """
    One queue entry as the admin command shows it (see
    L{QueueControl.describe}).
    """
    return {
        "id": entry.queueId,
        "age": max(0.0, now - entry.createdAt),
        "size": entry.size,
        "sender": entry.envelope.sender,
        "recipients": dict(entry.recipients),
        "errors": dict(entry.errors),
        "attempts": entry.attempts,
        "nextAttempt": entry.nextAttempt,
        "lastError": entry.lastError,
        "held": entry.held,
        "inFlight": inFlight,
        "isBounce": entry.isBounce,
    } | ({"heldReason": entry.heldReason} if entry.heldReason else {})


class QueueRunner(Protocol):
    """
    What L{QueueControl} needs of the queue runner that owns it.
    """

    def isInFlight(self, queueId: str) -> bool:
        """
        Whether a delivery attempt of C{queueId} is running now.
        """

    def isUnremovable(self, queueId: str) -> bool:
        """
        Whether C{queueId} is held in memory because the spool could not
        record its delivery: it must never be attempted again.
        """

    def attemptNow(self, queueId: str) -> None:
        """
        Attempt C{queueId} as soon as a delivery slot is free (nothing
        while the runner is stopped).
        """

    def unschedule(self, queueId: str) -> None:
        """
        Cancel the scheduled attempt of C{queueId}, if any.
        """

    def queued(self) -> list[str]:
        """
        The ids of the entries the runner will attempt (scheduled, due or in
        flight), in no particular order; held and unremovable ones are not
        among them.
        """


class QueueControl:
    """
    The operator's commands on the queue.

    @param spool: the spool of the queue.
    @param runner: the queue runner delivering from C{spool}.
    @param clock: the runner's clock (C{nextAttempt} and ages are its
        seconds).
    """

    def __init__(self, spool: Spool, runner: QueueRunner, clock: IReactorTime) -> None:
        self.spool = spool
        self._runner = runner
        self._clock = clock
        # Operator requests about entries in flight, applied when the
        # attempt ends.
        self._deleted: set[str] = set()
        self._heldInFlight: dict[str, bool] = {}
        self._flushAfter: set[str] = set()

    def _load(self, queueId: Any) -> SpoolEntry:
        if (
            not isinstance(queueId, str)
            or not _QUEUE_ID.fullmatch(queueId)
            or queueId in self._deleted
        ):
            raise KeyError(queueId)
        try:
            return self.spool.load(queueId)
        except FileNotFoundError:
            raise KeyError(queueId) from None

    def flush(self, queueId: str | None = None) -> list[str]:
        """
        Attempt C{queueId}, or every entry not on hold, now.  An entry in
        flight is attempted again right after its attempt.  Nothing is
        written (see the module's docstring): for the whole queue not even
        read, the runner knows what it will attempt.

        @return: the ids scheduled, oldest first (a held or unremovable
            entry is not).
        @raise KeyError: for an unknown C{queueId}.
        """
        if queueId is not None:
            entry = self._load(queueId)
            candidates = [] if entry.held else [queueId]
        else:
            candidates = sorted(
                q
                for q in set(self._runner.queued())
                if q not in self._deleted
                and not self._heldInFlight.get(q)
                and not self.spool.isBeingRemoved(q)
            )
        flushed = []
        for name in candidates:
            if self._runner.isUnremovable(name):
                continue
            flushed.append(name)
            if self._runner.isInFlight(name):
                self._flushAfter.add(name)
            else:
                self._runner.attemptNow(name)
        log.info("flush: {count} message(s)", count=len(flushed))
        return flushed

    def hold(self, queueId: str) -> defer.Deferred[None]:
        """
        Put C{queueId} on hold: it is not attempted until L{release}d (a
        delivery in flight finishes, but is not retried).

        @return: a L{Deferred} firing when the hold is durable and
            its audit record written (L{_audit}).
        @raise KeyError: for an unknown C{queueId}.
        """
        entry = self._load(queueId)
        entry.held = True
        written = self.spool.update(entry)
        self._runner.unschedule(queueId)
        if self._runner.isInFlight(queueId):
            self._heldInFlight[queueId] = True
        log.info("{queueId} put on hold", queueId=queueId)
        return written.addCallback(lambda _: self._audit("held", entry))

    def release(self, queueId: str) -> defer.Deferred[None]:
        """
        Take C{queueId} off hold and attempt it now (right after its
        attempt in flight, if any).

        @return: a L{Deferred} firing when the release is durable and
            its audit record written (L{_audit}).
        @raise KeyError: for an unknown C{queueId}.
        """
        entry = self._load(queueId)
        entry.held = False
        # An integrity hold comes back at the next attempt if the bytes are
        # still not the acknowledged ones.
        entry.heldReason = ""
        entry.nextAttempt = self._clock.seconds()
        inFlight = self._runner.isInFlight(queueId)
        if inFlight:
            self._heldInFlight[queueId] = False
            self._flushAfter.add(queueId)
        # The spool's readers see the new state at once: the attempt may
        # start before it is on disk.
        written = self.spool.update(entry)
        if not inFlight:
            self._runner.attemptNow(queueId)
        log.info("{queueId} released", queueId=queueId)
        return written.addCallback(lambda _: self._audit("released", entry))

    def delete(self, queueId: str) -> defer.Deferred[None]:
        """
        Remove C{queueId} from the queue, without a notification.  A
        delivery in flight finishes (the core may still get the message)
        but its outcome is ignored.

        @return: a L{Deferred} firing when the removal is durable and
            its audit record written (L{_audit}).
        @raise KeyError: for an unknown C{queueId}.
        """
        entry = self._load(queueId)
        self._runner.unschedule(queueId)
        if self._runner.isInFlight(queueId):
            self._deleted.add(queueId)
        removed = self.spool.remove(queueId)
        log.warn("{queueId} deleted by the operator", queueId=queueId)
        return removed.addCallback(lambda _: self._audit("deleted", entry))

    def _audit(self, event: str, entry: SpoolEntry) -> defer.Deferred[None] | None:
        """
        The audit record of an operator's command (L{msa.audit}), appended
        in the reactor's thread pool: its write and fdatasync may wait for
        the disk, never on the reactor thread.  The change is made whether
        or not it is recorded: when the record cannot be written the log
        counts it as lost (a C{lost} record follows when it can write,
        L{msa.audit.lost}), the critical log line says so, and the command
        reports the error.

        @return: L{None} without an audit log; else a L{Deferred} firing
            when the record is durable, or failing with
            L{msa.audit.AuditError}.
        """
        audit = self.spool.audit
        if audit is None:
            return None
        d = audit.submitFact(
            event,
            queueId=entry.queueId,
            by="operator",
            sender=entry.envelope.sender,
            recipients=list(entry.envelope.recipients),
        )

        def failed(failure: Failure) -> Failure:
            log.critical(
                "AUDIT RECORD LOST: {what} of {queueId}: {error}",
                what=event,
                queueId=entry.queueId,
                error=failure.value,
            )
            return failure

        return d.addCallbacks(lambda _: None, failed)

    def describe(self) -> list[dict]:
        """
        The queue, oldest first: per entry C{id}, C{age} (seconds),
        C{size} (bytes), C{sender}, C{recipients} (address to
        C{"pending"}, C{"delivered"} or C{"failed"}), C{errors} (address to
        the last reply about it), C{attempts}, C{nextAttempt} (POSIX time),
        C{lastError}, C{held}, C{inFlight}, C{isBounce}, and
        C{heldReason} (why the MSA held it, L{msa.queue.integrity}) when
        it did.
        """
        now = self._clock.seconds()
        out = []
        for queueId in self.spool.pending():
            try:
                entry = self._load(queueId)
            except (KeyError, ValueError):
                continue
            out.append(describeEntry(entry, now, self._runner.isInFlight(queueId)))
        return out

    # What the runner asks when an attempt ends.

    def isDeleted(self, queueId: str) -> bool:
        """
        Whether the operator deleted C{queueId} while it was in flight: the
        outcome of the attempt is to be ignored.
        """
        return queueId in self._deleted

    def applyRequests(self, entry: SpoolEntry, now: float) -> None:
        """
        Apply to C{entry}, whose attempt just ended, what the operator asked
        during it: the hold or release, and a flush (the next attempt at
        C{now}).  The runner then writes C{entry}.
        """
        entry.held = self._heldInFlight.get(entry.queueId, entry.held)
        if entry.queueId in self._flushAfter:
            entry.nextAttempt = now

    def flushRequested(self, queueId: str) -> bool:
        """
        Whether a flush of C{queueId} was asked during its attempt, also
        after L{applyRequests}, while its new state was being written.
        """
        return queueId in self._flushAfter

    def attemptEnded(self, queueId: str) -> None:
        """
        The attempt of C{queueId} is over: forget the requests about it.
        """
        self._deleted.discard(queueId)
        self._heldInFlight.pop(queueId, None)
        self._flushAfter.discard(queueId)
