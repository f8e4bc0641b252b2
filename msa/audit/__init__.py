# -*- test-case-name: tests.test_audit -*-
"""
The tamper-evident audit log: an append-only file of JSON lines, one record
per event that matters (a message accepted, relayed, bounced, expired,
deleted or held by the operator; an account added, changed, disabled or
removed), chained by SHA-256.

Each record is one line: a JSON object (ASCII only, no spaces) with at
least::

    seq    1, 2, 3...: one more than the previous record's, across files
    time   UTC, ISO 8601 with microseconds, e.g. 2026-12-01T23:59:59.123456Z
    prev   the SHA-256 (hex) of the previous record's line: its exact bytes
           without the final LF; for the first record of the first file,
           L{GENESIS} (64 zeros)
    event  what happened; the other fields depend on it

so that editing, removing or reordering a record breaks the link to the
next one, which L{verifyFiles} (C{digipoort-msa-admin audit verify})
finds.  Records never carry passwords, password hashes or SASL data.

Rotation keeps the chain: when the file would grow beyond C{max_bytes},
or when the operator asks (C{digipoort-msa-admin audit rotate}, SIGHUP:
L{AuditLog.rotateWhenIdle}, in the daemon's rounds), it is renamed to
C{<path>.<NNNNNN>} (the next free number, never renamed again) and the
new file starts with a C{rotated} record whose C{prev} is the hash of the
old file's last line, whose C{previousFile} names the old file and whose
C{reason} says why (C{size}, C{admin}, C{SIGHUP}).

Durability and more than one writer: L{AuditLog.append} returns only after
the record's line is written and fdatasync'ed.  Concurrent callers (the
spool's commits, in the reactor's thread pool, and the reactor's own
records, L{AuditLog.submitFact}, whose rounds run in that pool) share one
write and one fdatasync: a round of L{msa.groupcommit.GroupCommit} writes every
record queued so far in one C{write}.  Another process (the admin
command's account records) may append too: every round takes an exclusive
C{fcntl.flock} on C{<path>.lock}, and under it re-reads the chain head from
the file when the file is not as this process left it (another writer
appended, or rotated it).

A record of an event that has happened whatever the log says (a delivery,
an operator's command) and that cannot be written is counted, and the next
round that can write puts a C{lost} record into the chain
(L{msa.audit.lost}); C{audit verify} reports it.

A torn last line (no final LF: a write cut short by a crash, never
acknowledged since the fdatasync comes after it) is cut off by the next
writer under the lock, which then appends a C{torn-tail-removed} record
with the removed bytes' length and SHA-256; L{verifyFiles} reports such a
tail as incomplete, not as tampering.

What the chain cannot show by itself: records removed from the I{end} of
the newest file, or a whole file rewritten with a freshly computed chain,
by someone who can write it.  Only a copy of a head hash kept elsewhere
shows that: the daemon logs the head (C{audit log head: seq N sha256 H})
at start, at each rotation and at stop, and C{audit verify} prints it, so
that an operator can anchor it (a remote syslog, an external notary).
Likewise at the other end: once the oldest files are archived, C{audit
verify} accepts a chain that does not start at the genesis only from the
hash the operator kept (C{--anchor}, L{msa.audit.verify}).
"""

from msa.audit.chain import (
    DEFAULT_MAX_BYTES,
    GENESIS,
    AuditError,
    chainFiles,
    encodeRecord,
    lineHash,
    rotatedFiles,
    timestamp,
)
from msa.audit.log import AuditLog
from msa.audit.recovery import recoverRecords
from msa.audit.rotation import Rotation, logHead
from msa.audit.verify import Verification, verifyFiles

__all__ = [
    "DEFAULT_MAX_BYTES",
    "GENESIS",
    "AuditError",
    "AuditLog",
    "Verification",
    "chainFiles",
    "encodeRecord",
    "lineHash",
    "logHead",
    "Rotation",
    "recoverRecords",
    "rotatedFiles",
    "timestamp",
    "verifyFiles",
]
