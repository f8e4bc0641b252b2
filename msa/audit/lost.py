# -*- test-case-name: tests.test_auditgaps -*-
"""
Records that could not be written: the audit log's account of its own gaps.

An event that has happened (a message relayed, an operator's command) is
not undone because its record cannot be written (a full or failing audit
file system).  Such a record is a I{fact}: when it cannot be made durable,
L{msa.audit.AuditLog} counts it here, and the next round that can write
puts a C{lost} record into the chain, before its own records, with what
was lost (L{LostRecords.fields}): how many records, the time of the first
and the last, how many of each event, the queue ids (at most
L{MAX_QUEUE_IDS}) and the last error.  C{audit verify} reports every
C{lost} record and exits 3 (L{msa.audit.verify}), so that the gap is the
operator's evidence, not a silence.

What is counted only in memory until it is written: a crash (or a stop
while the disk is still full) before the C{lost} record loses the count
too; the daemon's log has a critical line for each lost record.
"""

from __future__ import annotations

from typing import Any

import attrs

#: The most queue ids a C{lost} record names; the rest are counted.
MAX_QUEUE_IDS = 100


@attrs.define
class LostRecords:
    """
    The facts that could not be recorded since the last C{lost} record.

    @ivar count: how many records.
    @ivar first: the time (the records' format) the first one was lost.
    @ivar last: the time the last one was lost.
    @ivar events: how many of each event.
    @ivar queueIds: their queue ids, in order, at most L{MAX_QUEUE_IDS}.
    @ivar queueIdsOmitted: how many queue ids did not fit.
    @ivar error: the last error.
    """

    count: int = 0
    first: str = ""
    last: str = ""
    events: dict[str, int] = attrs.Factory(dict)
    queueIds: list[str] = attrs.Factory(list)
    queueIdsOmitted: int = 0
    error: str = ""

    def add(self, record: dict[str, Any], when: str, error: str) -> None:
        """
        Count one record that could not be written at C{when}.
        """
        self.count += 1
        self.first = self.first or when
        self.last = when
        event = str(record.get("event"))
        self.events[event] = self.events.get(event, 0) + 1
        queueId = record.get("queueId")
        if isinstance(queueId, str):
            if len(self.queueIds) < MAX_QUEUE_IDS:
                self.queueIds.append(queueId)
            else:
                self.queueIdsOmitted += 1
        self.error = error

    def putBack(self, earlier: LostRecords) -> None:
        """
        Take back C{earlier}, a tally whose C{lost} record could not be
        written either: its records come before this one's.
        """
        later = attrs.evolve(self)
        self.count, self.first, self.last, self.error = 0, "", "", ""
        self.events, self.queueIds, self.queueIdsOmitted = {}, [], 0
        self._absorb(earlier)
        self._absorb(later)

    def _absorb(self, later: LostRecords) -> None:
        """
        Add the tally C{later} after this one's records.
        """
        if not later.count:
            return
        self.count += later.count
        self.first = self.first or later.first
        self.last, self.error = later.last, later.error
        for event, n in later.events.items():
            self.events[event] = self.events.get(event, 0) + n
        room = MAX_QUEUE_IDS - len(self.queueIds)
        self.queueIds += later.queueIds[:room]
        self.queueIdsOmitted += later.queueIdsOmitted + len(later.queueIds[room:])

    def fields(self) -> dict[str, Any]:
        """
        The fields of the C{lost} record that accounts for these records.
        """
        return {
            "event": "lost",
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "events": dict(sorted(self.events.items())),
            "queueIds": list(self.queueIds),
            "queueIdsOmitted": self.queueIdsOmitted,
            "error": self.error,
        }


def describeLost(record: dict[str, Any]) -> str:
    """
    A C{lost} record as C{audit verify} reports it.
    """
    events = record.get("events")
    kinds = (
        ", ".join(f"{n} {event}" for event, n in events.items())
        if isinstance(events, dict)
        else "?"
    )
    ids = record.get("queueIds")
    named = " ".join(ids) if isinstance(ids, list) and ids else "none"
    omitted = record.get("queueIdsOmitted")
    more = f" (and {omitted} more)" if isinstance(omitted, int) and omitted else ""
    return (
        f"{record.get('count')} record(s) lost between {record.get('first')} and "
        f"{record.get('last')} ({kinds}); queue ids: {named}{more}; "
        f"error: {record.get('error')}"
    )
