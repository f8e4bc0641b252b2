# -*- test-case-name: tests.test_auditrotate,tests.test_audit -*-
"""
Where the audit log's files go when it rotates, and what the daemon logs
about its chain head (see L{msa.audit}): a rotated file is renamed to the
next C{<path>.NNNNNN} and never renamed again, whether the rotation came
from C{max_bytes} or from the operator (C{digipoort-msa-admin audit
rotate}, SIGHUP).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from msa.audit.chain import _ROTATED, rotatedFiles

_log = Logger()

#: Why a file was rotated, as the C{rotated} record's C{reason}: it grew
#: past C{max_bytes}.
BY_SIZE = "size"


@attrs.frozen
class Rotation:
    """
    One rotation of the audit log.

    @ivar file: the path the full file was renamed to.
    @ivar seq: the C{seq} of its last record.
    @ivar head: the SHA-256 of its last record: the C{prev} of the new
        file's first record, and the C{--anchor} of C{audit verify} once
        the file is archived.
    @ivar reason: why (L{BY_SIZE}, or who asked).
    """

    file: str
    seq: int
    head: str
    reason: str

    def toJSON(self) -> dict[str, Any]:
        """
        The rotation as the control socket's reply carries it.
        """
        return {
            "file": self.file,
            "seq": self.seq,
            "sha256": self.head,
            "reason": self.reason,
        }


def nextRotatedPath(path: str) -> str:
    """
    The name the log at C{path} takes when it rotates now: C{<path>.NNNNNN},
    one more than its newest rotated predecessor's number.
    """
    older = rotatedFiles(path)
    number = 1
    if older:
        m = _ROTATED.search(older[-1])
        assert m is not None
        number = int(m.group(1)) + 1
    return f"{path}.{number:06d}"


def logRotation(rotation: Rotation) -> None:
    """
    Log a rotation with the hash the renamed file ends with, for an anchor
    outside the files.
    """
    _log.info(
        "audit log rotated: {file} ends at seq {seq} sha256 {anchor} (the "
        "--anchor of audit verify once it is archived; rotated by {reason})",
        event="audit-rotated",
        reason=rotation.reason,
        file=rotation.file,
        seq=rotation.seq,
        anchor=rotation.head,
    )


def logHead(audit: Any, why: str) -> None:
    """
    Log the chain head of C{audit} (an L{msa.audit.AuditLog}), for an
    anchor outside the file (see L{msa.audit}).
    """
    _log.info(
        "audit log head ({why}): seq {seq} sha256 {head} in {path}",
        event="audit-head",
        why=why,
        seq=audit.seq,
        head=audit.head,
        path=audit.path,
    )
