# -*- test-case-name: tests.test_faults,tests.test_integrity,tests.test_faultunits -*-
"""
The holds of the queue runner (L{Holds}): an entry that must not be sent
(again), because the core has decided about it and the spool cannot record
that (L{Holds.unrecordable}), or because its bytes are not the ones
acknowledged (L{Holds.mismatch}).
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

from msa.queue import integrity
from msa.queue.control import QueueControl
from msa.queue.spool import Spool, SpoolEntry

log = Logger(namespace="msa.relay.runner")


class HoldRunner(Protocol):
    """
    What L{Holds} needs of the queue runner that owns it.
    """

    #: The operator's commands (whether an entry was deleted in flight).
    control: QueueControl

    def unschedule(self, queueId: str) -> None:
        """
        Cancel the scheduled attempt of C{queueId}, if any.
        """


class Holds:
    """
    The holds of a queue runner (L{msa.relay.runner.RelayRunner}), which
    it calls back only through the L{HoldRunner} interface.

    @ivar unremovable: entries the core has decided about but whose new
        state the spool could not record: never sent again by this
        process; queue id to the reason, for the log and /health.
    """

    def __init__(self, spool: Spool, runner: HoldRunner) -> None:
        self._spool = spool
        self._runner = runner
        self.unremovable: dict[str, str] = {}

    async def unrecordable(self, entry: SpoolEntry, error: Exception) -> None:
        """
        The core has decided about C{entry} (accepted or refused recipients)
        but the spool cannot record it (e.g. it was remounted read-only).
        Sending it again would deliver it twice: it is held, never
        attempted again by this process, logged at critical level and
        reported by /health; and its new state, held, is recorded outside
        the spool (L{msa.queue.outcomes}), so that it stays known as
        delivered after a restart and in C{queue list}.  Where even that
        cannot be written, it is held in memory only: after a restart the
        spool's old state counts again, and the critical log line says
        that the operator must check the core before restarting.
        """
        queueId = entry.queueId
        self._runner.unschedule(queueId)
        reason = (
            f"{queueId}: delivered or failed, but the spool cannot record that "
            f"({error}); held, not sent again"
        )
        self.unremovable[queueId] = reason
        entry.held = True
        entry.heldReason = (
            f"decided by the core, but the spool could not record it ({error})"
        )
        outcomes = self._spool.outcomes
        try:
            await self._spool.recordOutcome(entry)
        except Exception as e:
            log.critical(
                "SPOOL CANNOT BE CHANGED: the core MTA accepted or refused "
                "{queueId} (or its notice is queued), but its state cannot be "
                "written ({error}), nor recorded elsewhere ({recordError}).  It "
                "is held and never sent again by this process; fix the spool, "
                "check the core for {queueId} and delete it from the queue "
                "before a restart.",
                event="unremovable",
                queueId=queueId,
                error=error,
                recordError=e,
            )
            return
        log.critical(
            "SPOOL CANNOT BE CHANGED: the core MTA accepted or refused {queueId} "
            "(or its notice is queued), but its state cannot be written "
            "({error}).  It is held, never sent again, and its outcome kept "
            "in {directory} until the spool can be changed again.",
            event="unremovable",
            queueId=queueId,
            error=error,
            # Recorded: there is a ledger.
            directory=outcomes.directory if outcomes is not None else "-",
        )

    async def mismatch(self, entry: SpoolEntry, mismatch: integrity.Mismatch) -> None:
        """
        C{entry}'s bytes are not the ones acknowledged (a bit flip on disk,
        an edited spool file): nothing was handed over.  It is put on hold,
        durably (never attempted again, across restarts, until the operator
        releases it) with the reason, logged at critical level, and a
        C{held} record goes to the audit log.
        """
        queueId = entry.queueId
        self._runner.unschedule(queueId)
        log.critical(
            "INTEGRITY MISMATCH: {queueId} is not the message acknowledged "
            "(sha256 of the queued {part}: expected {expected}, actual "
            "{actual}).  Nothing was handed over; it is held.  Check the "
            "spool and its disk, then delete or release it.",
            event="integrity",
            queueId=queueId,
            part=mismatch.part,
            expected=mismatch.expected,
            actual=mismatch.actual,
        )
        if self._runner.control.isDeleted(queueId):
            return
        entry.held = True
        entry.heldReason = mismatch.reason
        try:
            await self._spool.update(entry)
        except Exception as e:
            # Held in memory at least: never attempted by this process.
            self.unremovable[queueId] = f"{queueId}: {mismatch.reason} ({e})"
            log.critical(
                "cannot record the hold of {queueId}: {error}; held in memory",
                queueId=queueId,
                error=e,
            )
        await self._spool.auditEvent(
            "held",
            queueId=queueId,
            by="integrity",
            reason=mismatch.reason,
            sender=entry.envelope.sender,
            recipients=list(entry.envelope.recipients),
        )
