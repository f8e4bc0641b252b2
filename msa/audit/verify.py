# -*- test-case-name: tests.test_audit -*-
"""
C{digipoort-msa-admin audit verify}: L{verifyFiles} walks a chain of audit
files and reports the first broken link, and every gap the writer recorded
(C{lost} records, L{msa.audit.lost}).  See L{msa.audit}.

A chain must start at the genesis: seq 1 with 64 zeros as its C{prev}.
Once the oldest files are archived (removed from the server), the chain
starts at a C{rotated} record instead, which anybody could have written at
the top of a file; so that start is accepted only from an I{anchor}: the
hash of the last record of the newest file archived, which the operator
kept when archiving it (the daemon logs it at each rotation, and
C{verify} prints it per file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import attrs

from msa.audit.chain import _REQUIRED, GENESIS, lineHash
from msa.audit.lost import describeLost


@attrs.define
class Verification:
    """
    The result of L{verifyFiles}.

    @ivar error: the first broken link, C{"<file>:<line>: <what>"}, or
        L{None} when the chain is intact.
    @ivar notes: what is not an error but worth saying (an incomplete last
        line, a chain that starts at its anchor).
    @ivar gaps: each C{lost} record, C{"<file>:<line>: seq N: <what>"}:
        records the writer could not write (the chain is intact, the trail
        is not complete).
    @ivar lost: how many records the C{lost} records account for.
    @ivar ends: per file, its path, last C{seq} and the hash of its last
        record: the anchor to verify the later files without it.
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
    gaps: list[str] = attrs.Factory(list)
    lost: int = 0
    ends: list[tuple[str, int, str]] = attrs.Factory(list)


def _describe(record: dict[str, Any]) -> str:
    return f"seq {record.get('seq')!r} ({record.get('event')!r})"


def _checkStart(
    record: dict[str, Any], where: str, lineOne: bool, anchor: str | None
) -> str | None:
    """
    The first record of the chain: the genesis, or, given C{anchor}, a
    record chained to it.

    @return: what is wrong, or L{None}.
    """
    if anchor is not None:
        if record["prev"] == anchor:
            return None
        return (
            f"{where}: the chain does not start from the anchor {anchor}: its "
            f"first record, {_describe(record)}, follows {record['prev']}"
        )
    if record["prev"] == GENESIS and record["seq"] == 1:
        return None
    if record["event"] == "rotated" and lineOne:
        return (
            f"{where}: the chain starts at {_describe(record)}, after "
            f"{record.get('previousFile')!r}, not at the genesis: the older "
            "files are missing; if they were archived, give the sha256 of the "
            f"last record of {record.get('previousFile')!r} (kept when it was "
            "archived) with --anchor"
        )
    return (
        f"{where}: the first record should be seq 1 with the genesis prev, but "
        f"is {_describe(record)}: records removed from the start"
    )


def verifyFiles(
    paths: list[str],
    anchor: str | None = None,
    fileVerified: Callable[[str], None] | None = None,
) -> Verification:
    """
    Check the chain through C{paths}, in order: every line a JSON record
    with the required fields, each C{seq} one more than the previous one,
    each C{prev} the hash of the previous line: for the first record,
    L{GENESIS} (seq 1), or C{anchor} when given (see the module
    docstring).  Stops at the first broken link.  Every C{lost} record is
    a gap.

    An incomplete last line (no LF) at the end of the last file is what a
    crash during a write leaves: a note, not an error.

    @param fileVerified: called with each file's path once its records
        are checked and found intact (for a progress line over many
        files: C{audit verify}, L{msa.admin.progress}).
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
                result.error = _checkStart(record, where, number == 1, anchor)
                if result.error is not None:
                    return result
                if anchor is not None:
                    result.notes.append(
                        f"{where}: the chain starts at {_describe(record)}, "
                        f"from the anchor {anchor}"
                    )
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
            if record["event"] == "lost":
                result.gaps.append(
                    f"{where}: seq {record['seq']}: {describeLost(record)}"
                )
                count = record.get("count")
                result.lost += count if isinstance(count, int) else 0
            prevLine, prevRecord = line, record
            result.records += 1
            result.lastSeq = record["seq"]
            result.lastTime = record["time"]
            result.head = lineHash(line)
        if lines:
            result.ends.append((path, result.lastSeq, result.head))
        if fileVerified is not None:
            fileVerified(path)
    return result
