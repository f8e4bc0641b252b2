# -*- test-case-name: tests.test_audit -*-
"""
The audit log's format (see L{msa.audit}): the record line, its hash, the
chain's first C{prev}, the files of a chain (the log and its rotated
predecessors) and how a writer finds the last record of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any

#: The C{prev} of the first record of the first file.
GENESIS = "0" * 64

#: The default C{[audit] max_bytes}: 64 MiB per file.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_ROTATED = re.compile(r"\.(\d{6,})$")

#: Fields a record must have, with their types.
_REQUIRED: dict[str, type] = {"seq": int, "time": str, "prev": str, "event": str}


class AuditError(Exception):
    """
    An audit record could not be made durable (the cause is chained): the
    event it records must not be acknowledged.
    """


def lineHash(line: bytes) -> str:
    """
    The SHA-256 (hex) of one record's line, without its final LF: the
    C{prev} of the next record.
    """
    return hashlib.sha256(line).hexdigest()


def timestamp(seconds: float) -> str:
    """
    POSIX time as the records' C{time}: UTC, ISO 8601, microseconds.
    """
    whole = int(seconds)
    micro = int(round((seconds - whole) * 1_000_000))
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micro:06d}Z"


def encodeRecord(record: dict[str, Any]) -> bytes:
    """
    One record's line, without the LF: compact ASCII JSON, C{seq}, C{time},
    C{prev} and C{event} first, the rest in the caller's order.
    """
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def rotatedFiles(path: str) -> list[str]:
    """
    The rotated predecessors of the log at C{path}, oldest first.
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(base + "."):
            m = _ROTATED.search(name[len(base) :])
            if m and len(m.group(0)) == len(name) - len(base):
                found.append((int(m.group(1)), os.path.join(directory, name)))
    return [p for _, p in sorted(found)]


def chainFiles(path: str) -> list[str]:
    """
    The configured log and its rotated predecessors, in chain order (what
    C{audit verify} checks by default).
    """
    files = rotatedFiles(path)
    if os.path.exists(path):
        files.append(os.path.abspath(path))
    return files


def lastLine(fd: int, size: int) -> tuple[bytes | None, int]:
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


def predecessorHead(path: str) -> tuple[int, str]:
    """
    The chain head for an empty log at C{path}: the C{seq} and hash of the
    last record of its newest rotated predecessor, if any, else C{(0,
    GENESIS)}.

    @raise AuditError: when that record cannot be read.
    """
    older = rotatedFiles(path)
    if not older:
        return 0, GENESIS
    fd = os.open(older[-1], os.O_RDONLY)
    try:
        line, _ = lastLine(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if line is None:
        return 0, GENESIS
    try:
        return int(json.loads(line)["seq"]), lineHash(line)
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{older[-1]}: the last record is unreadable ({e})") from e
