# -*- test-case-name: tests.test_audit -*-
"""
The audit log's format (see L{msa.audit}): the record line, its hash, the
chain's first C{prev}, and the files of a chain (the log and its rotated
predecessors).
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
