# -*- test-case-name: tests.test_audit,tests.test_auditrotate -*-
"""
The audit log's file, L{ChainedFile}: the records chained after the head
of the file at its path, written and fdatasync'ed under a lock among
processes, the file rotated (L{msa.audit.rotation}), a torn tail cut off.
Its methods run one at a time, in the rounds of L{msa.audit.log.AuditLog},
which adds the group commit and the accounting of lost records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from msa.audit.chain import (
    DEFAULT_MAX_BYTES,
    GENESIS,
    AuditError,
    encodeRecord,
    lastLine,
    lineHash,
    predecessorHead,
    timestamp,
)
from msa.audit.rotation import (
    BY_SIZE,
    Rotation,
    logHead,
    logRotation,
    nextRotatedPath,
)
from msa.durable import fsyncDirectory


def _fdatasync(fd: int) -> None:
    """
    fdatasync where the system has it (Linux), else fsync; looked up at
    each call, so that a test's wrapper of either sees the audit log's.
    """
    os.fdatasync(fd)


class ChainedFile:
    """
    The audit log's file at C{path} and its chain head; not thread-safe:
    see the module docstring.

    @ivar seq: the C{seq} of the last record written (0: none yet).
    @ivar head: the hash of the last record written (L{GENESIS}: none yet).
    """

    def __init__(
        self,
        path: str,
        maxBytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        fdatasync: Callable[[int], None] = _fdatasync,
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
            self._rotate(BY_SIZE)
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

    def _rotate(self, reason: str) -> Rotation:
        """
        Under the lock: rename the full file to the next C{<path>.NNNNNN}
        and start a new one with a C{rotated} record, chained to the old
        file's last record.
        """
        target = nextRotatedPath(self.path)
        os.rename(self.path, target)
        fsyncDirectory(os.path.dirname(self.path))
        rotation = Rotation(target, self.seq, self.head, reason)
        logRotation(rotation)
        self._openFile()
        self._offset = 0
        self._write(
            [
                {
                    "event": "rotated",
                    "previousFile": os.path.basename(target),
                    "previousSeq": self.seq,
                    "reason": reason,
                }
            ],
            mayRotate=False,
        )
        logHead(self, "rotated")
        return rotation

    def _closeFiles(self) -> None:
        for fd in (self._fd, self._lockFd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lockFd = None
        self._ino = None
