# -*- test-case-name: tests.test_audit -*-
"""
The audit log's writer, L{AuditLog}: appends group-committed
(L{msa.groupcommit.GroupCommit}) to its file (L{msa.audit.chainedfile}: under
a lock among processes, rotated by size, a torn tail cut off), rotation on
demand through the same rounds, and the records that could not be written
accounted for (L{msa.audit.lost}).  See L{msa.audit}.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from msa.audit.chain import DEFAULT_MAX_BYTES, AuditError, timestamp
from msa.audit.chainedfile import ChainedFile, _fdatasync
from msa.audit.lost import LostRecords
from msa.audit.rotation import Rotation
from msa.groupcommit import GroupCommit

#: How long a round of facts from the reactor (L{AuditLog.submitFact})
#: waits for other records, in seconds: under load it mostly rides on the
#: round of the spool's next commit, one flock and fdatasync fewer.  No
#: client's reply waits for it, nor the relay's delivery slot (the slot
#: goes to the next message once the core has answered:
#: L{msa.relay.runner.RelayRunner._settle}).
FACT_GATHER = 0.1

#: What a round gives each job: a record's C{seq}, a rotation (or L{None}:
#: nothing to rotate; or the error that kept it from happening, which
#: fails that job alone), or L{None}.
_Result = int | Rotation | AuditError | None


@attrs.define(frozen=True)
class _Job:
    """
    What a caller asks of a round of L{AuditLog}: a record to append
    (C{fact} when the event has happened whether or not it is recorded,
    L{msa.audit.lost}), or only to open, to write the C{lost} record, to
    rotate (C{rotate}: who asks), or to close the files.
    """

    record: dict[str, Any] | None = None
    fact: bool = False
    open: bool = False
    rotate: str | None = None
    flush: bool = False
    close: bool = False


class AuditLog(ChainedFile):
    """
    The writer of the audit log at C{path}: see the module docstring.

    Every write goes through one L{GroupCommit}: blocking callers in
    threads (L{append}, L{appendFact}, L{open}, L{close}) and callers on
    the reactor (L{submitFact}, L{closeWhenIdle}, L{rotateWhenIdle}),
    whose rounds run in the reactor's thread pool, never on the reactor
    thread.  The file's methods (L{ChainedFile}) run only in rounds.

    @ivar lostTotal: how many facts could not be written since this writer
        was made (each accounted for by a C{lost} record once the log can
        write again).
    @ivar writeFailures: how many records could not be made durable since
        this writer was made (facts and acceptances alike).
    @ivar lastFailure: what the last round that failed met, or L{None}
        since the last round that wrote (for C{/health}).
    """

    def __init__(
        self,
        path: str,
        maxBytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        fdatasync: Callable[[int], None] = _fdatasync,
        reactor: Any = None,
    ) -> None:
        """
        @param reactor: whose thread pool runs the rounds of
            L{submitFact} and L{closeWhenIdle} (the global reactor by
            default).
        """
        super().__init__(path, maxBytes, clock, fdatasync)
        # A round only facts submitted from the reactor wait for (a
        # delivery, a command) waits FACT_GATHER for company: mostly it
        # rides on a commit's round, one flock and fdatasync fewer.
        self._commits: GroupCommit[_Job, _Result] = GroupCommit(
            self._runRound, reactor, gatherDelay=FACT_GATHER
        )
        #: Facts not yet accounted for by a C{lost} record; only rounds
        #: (one at a time) touch it, the lock is for readers.
        self._lost = LostRecords()
        self._lostLock = threading.Lock()
        self.lostTotal = 0
        self.writeFailures = 0
        self.lastFailure: str | None = None

    # -- opening and the chain head ------------------------------------

    def open(self) -> None:
        """
        Open (create) the file and read the chain head, cutting off a torn
        tail; blocking.

        @raise AuditError: when the file cannot be opened or its last
            record cannot be read.
        """
        try:
            self._commits.commitBlocking(_Job(open=True))
        except AuditError:
            raise
        except OSError as e:
            raise AuditError(f"{self.path}: {e}") from e

    def close(self) -> None:
        """
        Close the files, after a round in progress; blocking (a round may
        be writing).  A later append opens them again.
        """
        try:
            self._commits.commitBlocking(_Job(close=True))
        except Exception:
            # The files are closed all the same; the round's error is its
            # records' callers'.
            pass

    def closeWhenIdle(self) -> defer.Deferred[None]:
        """
        L{close} from the reactor thread: after the round in progress, in
        the thread pool, writing the C{lost} record first if one is owed
        and the log can write it.

        @return: a L{Deferred} firing when the files are closed; it never
            fails.
        """
        d = self._commits.commit(_Job(flush=True, close=True))
        return d.addCallbacks(lambda _: None, lambda _: None)

    def rotate(self, reason: str) -> Rotation | None:
        """
        Rotate now, whatever the size, after the records already asked
        for: blocking (for an admin command when no daemon holds the log).

        @param reason: who asks, for the C{rotated} record and the log.
        @return: the rotation, or L{None} when the file holds no record
            yet (nothing to rotate).
        @raise AuditError: when the files could not be renamed or the
            C{rotated} record written.
        """
        try:
            result = self._commits.commitBlocking(_Job(rotate=reason))
        except Exception as e:
            raise AuditError(f"{self.path}: {e}") from e
        if isinstance(result, AuditError):
            raise result
        assert not isinstance(result, int)
        return result

    def rotateWhenIdle(self, reason: str) -> defer.Deferred[Rotation | None]:
        """
        L{rotate} from the reactor thread (the daemon's C{rotate-audit}
        control command and SIGHUP): the round runs in the thread pool, as
        every write does, so the records asked for before are in the old
        file, those asked for after in the new one, none lost, none
        between the two.

        @return: a L{Deferred} firing with the rotation (or L{None}), or
            failing with L{AuditError}.
        """

        def done(result: _Result) -> Rotation | None:
            if isinstance(result, AuditError):
                raise result
            assert not isinstance(result, int)
            return result

        def failed(failure: Failure) -> Rotation | None:
            raise AuditError(f"{self.path}: {failure.value}") from failure.value

        return self._commits.commit(_Job(rotate=reason)).addCallbacks(done, failed)

    def append(self, event: str, **fields: Any) -> int:
        """
        Append one record and make it durable, for an event that is
        acknowledged only once it is recorded (a message's acceptance);
        blocking (call it in a thread, except for rare events).  Concurrent
        callers share a write and an fdatasync.

        @return: the record's C{seq}.
        @raise AuditError: when it could not be made durable; then it is
            not in the file (cut back) and the event must not be
            acknowledged.
        """
        return self._appendBlocking(_Job({"event": event, **fields}))

    def appendAll(self, records: list[dict[str, Any]]) -> list[int]:
        """
        L{append} for several records (each with its C{event}), in one
        round: the spool's acceptances of a group commit.

        @return: their C{seq}s, in order.
        @raise AuditError: as L{append}, for all of them.
        """
        try:
            seqs = self._commits.commitAllBlocking([_Job(r) for r in records])
        except Exception as e:
            raise AuditError(f"{self.path}: {e}") from e
        return [seq for seq in seqs if isinstance(seq, int)]

    def appendFact(self, event: str, **fields: Any) -> int:
        """
        Append the record of an event that has happened whether or not it
        is recorded (a delivery, a bounce, an operator's command), as
        L{append} does; blocking.

        @raise AuditError: when it could not be made durable; then it is
            counted as lost and the next round that can write puts a
            C{lost} record for it into the chain (L{msa.audit.lost}).
        """
        return self._appendBlocking(_Job({"event": event, **fields}, fact=True))

    def _appendBlocking(self, job: _Job) -> int:
        try:
            seq = self._commits.commitBlocking(job)
        except Exception as e:
            raise AuditError(f"{self.path}: {e}") from e
        assert isinstance(seq, int)
        return seq

    def submitFact(self, event: str, **fields: Any) -> defer.Deferred[int]:
        """
        L{appendFact} from the reactor thread: the round runs in the
        reactor's thread pool.

        @return: a L{Deferred} firing with the record's C{seq}, or failing
            with L{AuditError} (the record then counted as lost).
        """
        d = self._commits.commit(_Job({"event": event, **fields}, fact=True))

        def written(seq: _Result) -> int:
            assert isinstance(seq, int)
            return seq

        def failed(failure: Failure) -> int:
            raise AuditError(f"{self.path}: {failure.value}") from failure.value

        return d.addCallbacks(written, failed)

    def flushLost(self) -> defer.Deferred[None]:
        """
        Write the C{lost} record now if one is owed (the log can write
        again and no other record came to carry it), from the reactor
        thread.

        @return: a L{Deferred} firing when done; it never fails (what is
            still owed stays owed).
        """
        d = self._commits.commit(_Job(flush=True))
        return d.addCallbacks(lambda _: None, lambda _: None)

    @property
    def lostPending(self) -> int:
        """
        How many facts are counted as lost and not yet accounted for by a
        C{lost} record in the file.
        """
        with self._lostLock:
            return self._lost.count

    def _runRound(self, jobs: list[_Job]) -> list[_Result]:
        """
        One round (in a thread, one at a time): the C{lost} record owed, if
        any, then the round's records, in one write and one fdatasync;
        then one rotation if a job asks (and the file holds a record: else
        L{None}); then the files are closed if a job asks.  A rotation
        that fails fails its jobs alone: the round's records are durable.
        When the write fails, the facts among the records are counted as
        lost.
        """
        records = [job.record for job in jobs if job.record is not None]
        with self._lostLock:
            owed, self._lost = self._lost, LostRecords()
        if not (records or any(job.flush for job in jobs)):
            # Nothing to carry the lost record: it stays owed.
            self._putBackLost(owed)
            owed = LostRecords()
        lines = ([owed.fields()] if owed.count else []) + records
        rotateFor = next((job.rotate for job in jobs if job.rotate), None)
        rotation: Rotation | AuditError | None = None
        try:
            first = 0
            if lines or rotateFor or any(job.open for job in jobs):
                self._ensureOpen()
                with self._locked():
                    self._sync()
                    if lines:
                        first = self._write(lines)
                    if rotateFor and self._offset > 0:
                        rotation = self._rotateOnDemand(rotateFor)
        except BaseException as e:
            self._putBackLost(owed)
            self._countLost([job.record for job in jobs if job.fact], e)
            self.writeFailures += len(records)
            self.lastFailure = str(e)
            raise
        finally:
            if any(job.close for job in jobs):
                self._closeFiles()
        if lines:
            self.lastFailure = None
        seq = first + (1 if owed.count else 0)
        results: list[_Result] = []
        for job in jobs:
            if job.rotate:
                results.append(rotation)
            elif job.record is None:
                results.append(None)
            else:
                results.append(seq)
                seq += 1
        return results

    def _rotateOnDemand(self, reason: str) -> Rotation | AuditError:
        """
        Under the lock, after the round's records: L{_rotate}, or the
        error that kept it from happening (the next round goes on in
        whichever file is at C{path}, chained all the same).
        """
        try:
            return self._rotate(reason)
        except OSError as e:
            return AuditError(f"{self.path}: cannot rotate: {e}")

    def _putBackLost(self, owed: LostRecords) -> None:
        with self._lostLock:
            self._lost.putBack(owed)

    def _countLost(
        self, facts: list[dict[str, Any] | None], error: BaseException
    ) -> None:
        when = timestamp(self._clock())
        with self._lostLock:
            for record in facts:
                assert record is not None
                self._lost.add(record, when, str(error))
                self.lostTotal += 1
