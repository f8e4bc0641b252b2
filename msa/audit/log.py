# -*- test-case-name: tests.test_audit -*-
"""
The audit log's writer, L{AuditLog} (group-committed appends under a lock,
rotation, a torn tail cut off), and what the daemon does with it at start:
L{recoverRecords} and L{logHead}.  See L{msa.audit}.
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
from twisted.logger import Logger

from msa.audit.chain import (
    _ROTATED,
    DEFAULT_MAX_BYTES,
    GENESIS,
    AuditError,
    chainFiles,
    encodeRecord,
    lineHash,
    rotatedFiles,
    timestamp,
)
from msa.durable import fsyncDirectory

_log = Logger()

#: fdatasync where the system has it (Linux), else fsync.
_FDATASYNC: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _lastLine(fd: int, size: int) -> tuple[bytes | None, int]:
    """
    The last complete line of the file open on C{fd} (of C{size} bytes),
    without its LF, and the offset just after it (where a torn tail
    starts).  C{(None, 0)} when there is no complete line.
    """
    end = size
    chunk = 8192
    tail = b""
    pos = size
    while pos > 0:
        start = max(0, pos - chunk)
        tail = os.pread(fd, pos - start, start) + tail
        pos = start
        last = tail.rfind(b"\n")
        if last < 0:
            continue
        end = pos + last + 1
        before = tail.rfind(b"\n", 0, last)
        if before >= 0 or pos == 0:
            return tail[before + 1 : last], end
    return None, 0


@attrs.define
class _Round:
    """
    One write and fdatasync of L{AuditLog} and the records it carries.
    """

    records: list[dict[str, Any]] = attrs.Factory(list)
    seqs: list[int] = attrs.Factory(list)
    done: bool = False
    error: BaseException | None = None


class AuditLog:
    """
    The writer of the audit log at C{path}: see the module docstring.

    @ivar seq: the C{seq} of the last record written (0: none yet).
    @ivar head: the hash of the last record written (L{GENESIS}: none yet).
    @ivar syncs: how many rounds (write and fdatasync) ran, for tests.
    """

    def __init__(
        self,
        path: str,
        maxBytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        fdatasync: Callable[[int], None] = _FDATASYNC,
    ) -> None:
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
        self._cond = threading.Condition()
        self._pending: _Round | None = None
        self._running = False

    # -- opening and the chain head ------------------------------------

    def open(self) -> None:
        """
        Open (create) the file and read the chain head, cutting off a torn
        tail; blocking.

        @raise AuditError: when the file cannot be opened or its last
            record cannot be read.
        """
        with self._cond:
            try:
                self._ensureOpen()
                with self._locked():
                    self._sync()
            except AuditError:
                raise
            except OSError as e:
                raise AuditError(f"{self.path}: {e}") from e

    def close(self) -> None:
        """
        Close the files (after a round in progress); a later L{append}
        opens them again.
        """
        with self._cond:
            while self._running:
                self._cond.wait()
            for name in ("_fd", "_lockFd"):
                fd = getattr(self, name)
                if fd is not None:
                    os.close(fd)
                    setattr(self, name, None)
            self._ino = None

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
        line, end = _lastLine(self._fd, size)
        if line is None:
            self.seq, self.head = self._previousHead()
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

    def _previousHead(self) -> tuple[int, str]:
        """
        The head of an empty current file: the last record of its newest
        rotated predecessor, if any, else the genesis.
        """
        older = rotatedFiles(self.path)
        if not older:
            return 0, GENESIS
        fd = os.open(older[-1], os.O_RDONLY)
        try:
            line, _ = _lastLine(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if line is None:
            return 0, GENESIS
        try:
            return int(json.loads(line)["seq"]), lineHash(line)
        except (ValueError, KeyError, TypeError) as e:
            raise AuditError(f"{older[-1]}: the last record is unreadable ({e})")

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
        Append one record and make it durable; blocking (call it in a
        thread, except for rare events).  Concurrent callers share a write
        and an fdatasync.

        @return: the record's C{seq}.
        @raise AuditError: when it could not be made durable; then it is
            not in the file (cut back) and the event must not be
            acknowledged.
        """
        record: dict[str, Any] = {"event": event, **fields}
        with self._cond:
            current = self._pending
            if current is None:
                current = self._pending = _Round()
            index = len(current.records)
            current.records.append(record)
            while not current.done:
                if self._running:
                    self._cond.wait()
                    continue
                self._pending = None
                self._running = True
                try:
                    self._runRound(current)
                finally:
                    current.done = True
                    self._running = False
                    self._cond.notify_all()
        if current.error is not None:
            raise AuditError(f"{self.path}: {current.error}") from current.error
        return current.seqs[index]

    def _runRound(self, current: _Round) -> None:
        """
        Write a round's records; the condition's lock is released while the
        disk works, so that the next round's callers can queue.
        """
        self._cond.release()
        try:
            self._ensureOpen()
            with self._locked():
                self._sync()
                first = self._write(current.records)
            current.seqs = list(range(first, first + len(current.records)))
        except BaseException as e:
            current.error = e
        finally:
            self._cond.acquire()


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


# -- after a crash ---------------------------------------------------------


def recoverRecords(audit: AuditLog, spool: Any) -> list[str]:
    """
    At start, after the spool's recovery: record the queued messages that
    were committed just before a crash, before their acceptance record was
    durable (their client got no 250, but the MSA delivers them as any
    message whose final dot was taken), so that nothing leaves the queue
    unrecorded.  Each gets a C{recovered} record.

    Looked for in the current file and its newest predecessor: a message
    queued since the first record there with no C{accepted} or
    C{dsn-queued} record.  (Messages older than that, or queued before the
    log existed, are not looked at.)

    @param spool: a L{msa.queue.spool.Spool} (C{pending()}, C{load(id)}).
    @return: the queue ids recorded.
    """
    files = chainFiles(audit.path)[-2:]
    recorded: set[str] = set()
    since = ""
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                since = since or str(record.get("time", ""))
                if record.get("event") in ("accepted", "dsn-queued", "recovered"):
                    recorded.add(str(record.get("queueId")))
    if not since:
        return []
    found = []
    for queueId in spool.pending():
        if queueId in recorded:
            continue
        try:
            entry = spool.load(queueId)
        except (OSError, ValueError):
            continue
        if timestamp(entry.createdAt) < since:
            continue
        envelope = entry.envelope
        audit.append(
            "recovered",
            queueId=queueId,
            account=envelope.account,
            client=envelope.clientAddress,
            sender=envelope.sender,
            recipients=list(envelope.recipients),
            size=entry.size,
            reason="committed just before a crash, before its acceptance record: "
            "the client got no 250; it is delivered",
        )
        found.append(queueId)
    return found
