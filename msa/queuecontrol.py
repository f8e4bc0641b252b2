"""
Operator control of the relay queue: flush, hold, release, delete and a
description of every entry, as a mixin of L{msa.relay.RelayRunner} (which
supplies the spool, the scheduling and the bookkeeping of deliveries in
flight).  Every change of state goes through L{msa.spool.Spool.update}.
"""

from __future__ import annotations

import re

from twisted.logger import Logger

from msa.spool import SpoolEntry

log = Logger()

_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")


def describeEntry(entry, now: float, inFlight: bool = False) -> dict:
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
    }


class QueueControl:
    """
    Mixin for L{msa.relay.RelayRunner}.  An unknown (or malformed) queue
    id raises C{KeyError(queueId)}.
    """

    def _load(self, queueId: str) -> SpoolEntry:
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
        Attempt C{queueId}, or every entry not on hold, now.

        @return: the ids scheduled (a held entry is not).
        @raise KeyError: for an unknown C{queueId}.
        """
        if queueId is not None:
            entries = [self._load(queueId)]
        else:
            entries = []
            for name in self.spool.pending():
                try:
                    entries.append(self._load(name))
                except (KeyError, ValueError):
                    continue
        now = self._reactor.seconds()
        flushed = []
        for entry in entries:
            if entry.held or entry.queueId in self.unremovable:
                continue
            flushed.append(entry.queueId)
            if entry.queueId in self._inFlight:
                self._flushAfter.add(entry.queueId)
                continue
            entry.nextAttempt = now
            self.spool.update(entry)
            if self.running:
                self._schedule(entry.queueId, 0)
        log.info("flush: {count} message(s)", count=len(flushed))
        return flushed

    def hold(self, queueId: str) -> None:
        """
        Put C{queueId} on hold: it is not attempted until L{release}d (a
        delivery in flight finishes, but is not retried).
        """
        entry = self._load(queueId)
        entry.held = True
        self.spool.update(entry)
        self._unschedule(queueId)
        if queueId in self._inFlight:
            self._heldInFlight[queueId] = True
        log.info("{queueId} put on hold", queueId=queueId)

    def release(self, queueId: str) -> None:
        """
        Take C{queueId} off hold and attempt it now.
        """
        entry = self._load(queueId)
        entry.held = False
        entry.nextAttempt = self._reactor.seconds()
        if queueId in self._inFlight:
            self._heldInFlight[queueId] = False
            self._flushAfter.add(queueId)
        self.spool.update(entry)
        if self.running and queueId not in self._inFlight:
            self._schedule(queueId, 0)
        log.info("{queueId} released", queueId=queueId)

    def delete(self, queueId: str) -> None:
        """
        Remove C{queueId} from the queue, without a notification.  A
        delivery in flight finishes (the core may still get the message)
        but its outcome is ignored.
        """
        self._load(queueId)
        self._unschedule(queueId)
        if queueId in self._inFlight:
            self._deleted.add(queueId)
        self.spool.remove(queueId)
        log.warn("{queueId} deleted by the operator", queueId=queueId)

    def describe(self) -> list[dict]:
        """
        The queue, oldest first: per entry C{id}, C{age} (seconds),
        C{size} (bytes), C{sender}, C{recipients} (address to
        C{"pending"}, C{"delivered"} or C{"failed"}), C{errors} (address to
        the last reply about it), C{attempts}, C{nextAttempt} (POSIX time),
        C{lastError}, C{held}, C{inFlight}, C{isBounce}.
        """
        now = self._reactor.seconds()
        out = []
        for queueId in self.spool.pending():
            try:
                entry = self._load(queueId)
            except (KeyError, ValueError):
                continue
            out.append(describeEntry(entry, now, queueId in self._inFlight))
        return out
