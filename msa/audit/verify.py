# -*- test-case-name: tests.test_audit -*-
"""
C{digipoort-msa-admin audit verify}: L{verifyFiles} walks a chain of audit
files and reports the first broken link.  See L{msa.audit}.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs

from msa.audit.chain import _REQUIRED, GENESIS, lineHash


@attrs.define
class Verification:
    """
    The result of L{verifyFiles}.

    @ivar error: the first broken link, C{"<file>:<line>: <what>"}, or
        L{None} when the chain is intact.
    @ivar notes: what is not an error but worth saying (an incomplete last
        line, a chain that starts after the genesis).
    """

    records: int = 0
    firstSeq: int = 0
    lastSeq: int = 0
    firstTime: str = ""
    lastTime: str = ""
    head: str = GENESIS
    files: list[str] = attrs.Factory(list)
    error: str | None = None
    notes: list[str] = attrs.Factory(list)


def _describe(record: dict[str, Any]) -> str:
    return f"seq {record.get('seq')!r} ({record.get('event')!r})"


def verifyFiles(paths: list[str]) -> Verification:
    """
    Check the chain through C{paths}, in order: every line a JSON record
    with the required fields, each C{seq} one more than the previous one,
    each C{prev} the hash of the previous line (L{GENESIS} for the first
    record, unless the chain starts at a rotated file whose predecessors
    were not given: then a note says so).  Stops at the first broken link.

    An incomplete last line (no LF) at the end of the last file is what a
    crash during a write leaves: a note, not an error.
    """
    result = Verification(files=list(paths))
    prevLine: bytes | None = None
    prevRecord: dict[str, Any] | None = None
    for index, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            result.error = f"{path}: cannot read: {e.strerror or e}"
            return result
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            if index == len(paths) - 1:
                result.notes.append(
                    f"{path}:{len(lines) + 1}: incomplete last line ({len(tail)} "
                    "bytes without a line end): a write cut short by a crash, "
                    "never acknowledged; not part of the chain (the next writer "
                    "cuts it off and records that)"
                )
            else:
                result.error = (
                    f"{path}:{len(lines) + 1}: incomplete last line in a file "
                    "that is not the newest: truncated"
                )
                return result
        if not lines and not tail:
            result.notes.append(f"{path}: empty")
        for number, line in enumerate(lines, 1):
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                result.error = f"{where}: not a JSON record ({e}): edited or truncated"
                return result
            for name, kind in _REQUIRED.items():
                value = record.get(name)
                if not isinstance(value, kind) or isinstance(value, bool):
                    result.error = (
                        f"{where}: field {name!r} missing or not {kind.__name__}"
                    )
                    return result
            if prevRecord is None:
                if record["prev"] == GENESIS and record["seq"] == 1:
                    pass
                elif record["event"] == "rotated" and number == 1:
                    result.notes.append(
                        f"{where}: the chain starts at seq {record['seq']}, after "
                        f"{record.get('previousFile')!r} (not given): verified "
                        "from there"
                    )
                else:
                    result.error = (
                        f"{where}: the first record should be seq 1 with the "
                        f"genesis prev, but is {_describe(record)}: records "
                        "removed from the start"
                    )
                    return result
                result.firstSeq = record["seq"]
                result.firstTime = record["time"]
            else:
                expected = lineHash(prevLine or b"")
                if record["prev"] != expected:
                    if record["seq"] != prevRecord["seq"] + 1:
                        what = (
                            f"{_describe(record)} follows seq {prevRecord['seq']!r}: "
                            "records removed or reordered"
                        )
                    else:
                        what = (
                            f"{_describe(record)}: its prev does not match the "
                            "previous line: the previous record was edited, or "
                            "this one forged"
                        )
                    result.error = f"{where}: broken link: {what}"
                    return result
                if record["seq"] != prevRecord["seq"] + 1:
                    result.error = (
                        f"{where}: {_describe(record)} follows seq "
                        f"{prevRecord['seq']!r} with a matching prev: sequence "
                        "number edited"
                    )
                    return result
                if number == 1 and record["event"] != "rotated":
                    result.notes.append(
                        f"{where}: a file that does not start with a rotated record"
                    )
                elif number == 1 and record.get("previousFile") != os.path.basename(
                    paths[index - 1]
                ):
                    result.notes.append(
                        f"{where}: names {record.get('previousFile')!r} as its "
                        f"predecessor, given as {os.path.basename(paths[index - 1])!r}"
                        " (renamed? the hashes match)"
                    )
            prevLine, prevRecord = line, record
            result.records += 1
            result.lastSeq = record["seq"]
            result.lastTime = record["time"]
            result.head = lineHash(line)
    return result
