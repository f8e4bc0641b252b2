# -*- test-case-name: tests.test_audit -*-
"""
The audit log's writer, L{AuditLog}: appends group-committed
(L{msa.durable.GroupCommit}) under a lock among processes, rotation, a torn
tail cut off, and the records that could not be written accounted for
(L{msa.audit.lost}).  See L{msa.audit}.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa.audit.chain import (
    _ROTATED,
    DEFAULT_MAX_BYTES,
    GENESIS,
    AuditError,
    encodeRecord,
    lastLine,
    lineHash,
    predecessorHead,
    rotatedFiles,
    timestamp,
)
from msa.audit.lost import LostRecords
from msa.durable import GroupCommit, fsyncDirectory

_log = Logger()


#: How long a round of facts from the reactor (L{AuditLog.submitFact})
#: waits for other records, in seconds: nobody's reply waits for them.
FACT_GATHER = 0.02


def _fdatasync(fd: int) -> None:
    """
    fdatasync where the system has it (Linux), else fsync; looked up at
    each call, so that a test's wrapper of either sees the audit log's.
    """
    getattr(os, "fdatasync", os.fsync)(fd)


@attrs.define(frozen=True)
class _Job:
    """
    What a caller asks of a round of L{AuditLog}: a record to append
    (C{fact} when the event has happened whether or not it is recorded,
    L{msa.audit.lost}), or only to open, to write the C{lost} record, or
    to close the files.
    """

    record: dict[str, Any] | None = None
    fact: bool = False
    open: bool = False
    flush: bool = False
    close: bool = False


class AuditLog:
    """
    The writer of the audit log at C{path}: see the module docstring.

    Every write goes through one L{GroupCommit}: blocking callers in
    threads (L{append}, L{appendFact}, L{open}, L{close}) and callers on
    the reactor (L{submitFact}, L{closeWhenIdle}), whose rounds run in the
    reactor's thread pool, never on the reactor thread.

    @ivar seq: the C{seq} of the last record written (0: none yet).
    @ivar head: the hash of the last record written (L{GENESIS}: none yet).
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
        self.path = os.path.abspath(path)
        self.maxBytes = maxBytes
        self._clock = clock
        self._fdatasync = fdatasync
        self._fd: int | None = None
        self._lockFd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._offset = 0
        self.seq = 0
        self.head = GENESIS
        # A round only facts submitted from the reactor wait for (a
        # delivery, a command) waits FACT_GATHER for company: mostly it
        # rides on a commit's round, one flock and fdatasync fewer.
        self._commits: GroupCommit[_Job, int | None] = GroupCommit(
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

    def _ensureOpen(self) -> None:
        directory = os.path.dirname(self.path)
        if self._lockFd is None:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._lockFd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)

    def _openFile(self) -> None:
        """
        (Re)open the file at C{path}, creating it; under the lock.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        created = not os.path.exists(self.path)
        self._fd = os.open(
            self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        if created:
            fsyncDirectory(os.path.dirname(self.path))
        st = os.fstat(self._fd)
        self._ino = (st.st_dev, st.st_ino)
        self._offset = -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """
        The exclusive lock of the log among processes (C{<path>.lock}).
        """
        assert self._lockFd is not None
        fcntl.flock(self._lockFd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lockFd, fcntl.LOCK_UN)

    def _sync(self) -> None:
        """
        Under the lock: make sure C{_fd} is the file at C{path} and that
        C{seq}/C{head} are its last record's, re-reading them when the
        file is not as this writer left it.  A torn tail is cut off and
        recorded.
        """
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if self._fd is None or current != self._ino:
            self._openFile()
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == self._offset:
            return
        line, end = lastLine(self._fd, size)
        if line is None:
            self.seq, self.head = predecessorHead(self.path)
        else:
            try:
                record = json.loads(line)
                seq = record["seq"]
                if not isinstance(seq, int):
                    raise TypeError(seq)
            except (ValueError, KeyError, TypeError) as e:
                raise AuditError(
                    f"{self.path}: the last record is unreadable ({e}); "
                    "check it with: digipoort-msa-admin audit verify"
                ) from None
            self.seq, self.head = seq, lineHash(line)
        self._offset = size
        if end < size:
            torn = os.pread(self._fd, size - end, end)
            os.ftruncate(self._fd, end)
            self._fdatasync(self._fd)
            self._offset = end
            self._write(
                [
                    {
                        "event": "torn-tail-removed",
                        "bytes": len(torn),
                        "sha256": hashlib.sha256(torn).hexdigest(),
                    }
                ]
            )

    # -- appending -----------------------------------------------------

    def _lines(self, records: Iterable[dict[str, Any]]) -> Iterator[bytes]:
        """
        Number, time and chain C{records} after the current head, advancing
        it.
        """
        now = timestamp(self._clock())
        for fields in records:
            self.seq += 1
            record = {"seq": self.seq, "time": now, "prev": self.head}
            record.update(fields)
            line = encodeRecord(record)
            self.head = lineHash(line)
            yield line

    def _write(self, records: list[dict[str, Any]], mayRotate: bool = True) -> int:
        """
        Under the lock: write C{records} after the head in one C{write}
        (rotating first when the file would grow past C{maxBytes}) and
        fdatasync.  On failure the file is cut back to where it was and the
        head restored.

        @return: the C{seq} of the first record.
        """
        assert self._fd is not None
        seq, head, offset = self.seq, self.head, self._offset
        data = b"".join(line + b"\n" for line in self._lines(records))
        if mayRotate and offset > 0 and offset + len(data) > self.maxBytes:
            self.seq, self.head = seq, head
            self._rotate()
            return self._write(records, mayRotate=False)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._fdatasync(self._fd)
        except BaseException:
            self.seq, self.head = seq, head
            try:
                os.ftruncate(self._fd, offset)
            except OSError:
                # Re-read under the lock next time (L{_sync}).
                self._offset = -1
            raise
        self._offset = offset + len(data)
        return seq + 1

    def _rotate(self) -> None:
        """
        Under the lock: rename the full file to the next C{<path>.NNNNNN}
        and start a new one with a C{rotated} record.
        """
        older = rotatedFiles(self.path)
        number = 1
        if older:
            m = _ROTATED.search(older[-1])
            assert m is not None
            number = int(m.group(1)) + 1
        target = f"{self.path}.{number:06d}"
        os.rename(self.path, target)
        fsyncDirectory(os.path.dirname(self.path))
        _log.info(
            "audit log rotated: {file} ends at seq {seq} sha256 {anchor} (the "
            "--anchor of audit verify once it is archived)",
            event="audit-rotated",
            file=target,
            seq=self.seq,
            anchor=self.head,
        )
        self._openFile()
        self._offset = 0
        self._write(
            [
                {
                    "event": "rotated",
                    "previousFile": os.path.basename(target),
                    "previousSeq": self.seq,
                }
            ],
            mayRotate=False,
        )
        logHead(self, "rotated")

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
        assert seq is not None
        return seq

    def submitFact(self, event: str, **fields: Any) -> defer.Deferred[int]:
        """
        L{appendFact} from the reactor thread: the round runs in the
        reactor's thread pool.

        @return: a L{Deferred} firing with the record's C{seq}, or failing
            with L{AuditError} (the record then counted as lost).
        """
        d = self._commits.commit(_Job({"event": event, **fields}, fact=True))

        def written(seq: int | None) -> int:
            assert seq is not None
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

    def _runRound(self, jobs: list[_Job]) -> list[int | None]:
        """
        One round (in a thread, one at a time): the C{lost} record owed, if
        any, then the round's records, in one write and one fdatasync;
        then the files are closed if a job asks.  When the write fails, the
        facts among the records are counted as lost.
        """
        records = [job.record for job in jobs if job.record is not None]
        with self._lostLock:
            owed, self._lost = self._lost, LostRecords()
        if not (records or any(job.flush for job in jobs)):
            # Nothing to carry the lost record: it stays owed.
            self._putBackLost(owed)
            owed = LostRecords()
        lines = ([owed.fields()] if owed.count else []) + records
        try:
            first = 0
            if lines or any(job.open for job in jobs):
                self._ensureOpen()
                with self._locked():
                    self._sync()
                    if lines:
                        first = self._write(lines)
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
        results: list[int | None] = []
        for job in jobs:
            if job.record is None:
                results.append(None)
            else:
                results.append(seq)
                seq += 1
        return results

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

    def _closeFiles(self) -> None:
        for name in ("_fd", "_lockFd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        self._ino = None


def logHead(audit: AuditLog, why: str) -> None:
    """
    Log the chain head, for an anchor outside the file (see the module
    docstring).
    """
    _log.info(
        "audit log head ({why}): seq {seq} sha256 {head} in {path}",
        event="audit-head",
        why=why,
        seq=audit.seq,
        head=audit.head,
        path=audit.path,
    )
