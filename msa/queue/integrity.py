# -*- test-case-name: tests.test_integrity -*-
"""
Integrity at hand-off: a queued message is handed over (to the core MTA,
to the outbox, or quoted in a delivery status notification) only when its
bytes are still the ones acknowledged with the 250.

The spool writer (L{msa.queue.writer.SpoolWriter}) hashes what it writes
and records, with the message's state, in the same commit as the message:

  - C{sha256}: the SHA-256 of the message as accepted from the client,
    unstuffed, with CRLF line ends (the digest of the acceptance log line);
  - C{traceLength} and C{traceSha256}: the length and SHA-256 of the
    Received header the MSA put in front of it (0 and C{""} when there is
    none, e.g. a notification made by the MSA).

The spool holds exactly these bytes (the trace header, then the message,
not dot-stuffed), so whoever hands the message over hashes the bytes it
reads from the spool file, as it hands them over, with a L{Digester}, and
compares (L{Digester.mismatch}).  On a mismatch the message is held
(L{msa.relay.runner.RelayRunner}), never handed over.

A message spooled by an earlier version has no recorded digest: it is
delivered as it is, with a warning (L{NO_DIGEST}), and C{queue verify}
lists it as unverifiable.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import attrs

from msa.queue import queuefile
from msa.queue.entry import SpoolEntry

#: Why a message without a recorded digest cannot be verified.
NO_DIGEST = "no recorded digest (spooled by an earlier version)"

_CHUNK = 65536


@attrs.frozen
class Mismatch:
    """
    The bytes of a queued message are not the ones acknowledged.

    @ivar part: C{"message"} (the client's bytes) or C{"trace header"} (the
        Received header the MSA prepended).
    """

    queueId: str
    expected: str
    actual: str
    part: str = "message"

    @property
    def reason(self) -> str:
        """
        The reason shown in C{queue list} and C{queue show}.
        """
        return (
            f"integrity mismatch: sha256 of the queued {self.part} is "
            f"{self.actual}, acknowledged {self.expected}"
        )


class IntegrityError(Exception):
    """
    A hand-off stopped because of a L{Mismatch}.
    """

    def __init__(self, mismatch: Mismatch) -> None:
        super().__init__(mismatch.reason)
        self.mismatch = mismatch


def recorded(entry: SpoolEntry) -> bool:
    """
    Whether C{entry} has a recorded digest (one spooled by an earlier
    version has none: its C{sha256} is C{""}).
    """
    return bool(entry.sha256)


class Digester:
    """
    The running SHA-256s of a spooled message's bytes, fed in chunks of any
    size: the first C{traceLength} bytes are the trace header, the rest the
    message.
    """

    def __init__(self, traceLength: int = 0) -> None:
        self._traceLength = traceLength
        self._seen = 0
        self._trace = hashlib.sha256()
        self._message = hashlib.sha256()

    def update(self, data: bytes) -> None:
        if self._seen < self._traceLength:
            room = self._traceLength - self._seen
            self._trace.update(data[:room])
            self._seen += min(room, len(data))
            if len(data) <= room:
                return
            data = data[room:]
        self._message.update(data)
        self._seen += len(data)

    def sha256(self) -> str:
        return self._message.hexdigest()

    def traceSha256(self) -> str:
        return self._trace.hexdigest()

    def mismatch(self, entry: SpoolEntry) -> Mismatch | None:
        """
        Compare with what C{entry} recorded.

        @return: the L{Mismatch}, or L{None} when the bytes are the
            acknowledged ones (or nothing was recorded: see L{recorded}).
        """
        if not recorded(entry):
            return None
        if self.sha256() != entry.sha256:
            return Mismatch(entry.queueId, entry.sha256, self.sha256())
        if entry.traceSha256 and self.traceSha256() != entry.traceSha256:
            return Mismatch(
                entry.queueId, entry.traceSha256, self.traceSha256(), "trace header"
            )
        return None


def digesterFor(entry: SpoolEntry) -> Digester:
    return Digester(entry.traceLength)


def checkedChunks(
    entry: SpoolEntry, messageFile: BinaryIO, chunkSize: int = _CHUNK
) -> Iterator[bytes]:
    """
    The rest of C{messageFile} in chunks, hashed as they are read.

    @raise IntegrityError: after the last chunk, before the caller can
        complete its hand-off, when the bytes read are not the
        acknowledged ones.
    """
    digester = digesterFor(entry)
    while chunk := messageFile.read(chunkSize):
        digester.update(chunk)
        yield chunk
    mismatch = digester.mismatch(entry)
    if mismatch is not None:
        raise IntegrityError(mismatch)


def verifyDescriptor(entry: SpoolEntry, fd: int) -> Mismatch | None:
    """
    Hash the file open as C{fd} from its start (without moving its
    position) and compare.
    """
    if not recorded(entry):
        return None
    digester = digesterFor(entry)
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        digester.update(chunk)
        offset += len(chunk)
    return digester.mismatch(entry)


def verifyFile(entry: SpoolEntry, messageFile: BinaryIO) -> Mismatch | None:
    """
    Hash C{messageFile} from its start and compare; the file's position is
    at its start afterwards.
    """
    if not recorded(entry):
        return None
    try:
        fd = messageFile.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    else:
        messageFile.seek(0)
        return verifyDescriptor(entry, fd)
    messageFile.seek(0)
    try:
        for _ in checkedChunks(entry, messageFile):
            pass
    except IntegrityError as e:
        return e.mismatch
    finally:
        messageFile.seek(0)
    return None


def verifyPath(entry: SpoolEntry) -> Mismatch | None:
    """
    L{verifyFile} on C{entry}'s message (L{queuefile.openContent}).

    @raise OSError: when the file cannot be read.
    """
    with queuefile.openContent(entry) as f:
        return verifyFile(entry, f)


@attrs.frozen
class Verdict:
    """
    The result of re-hashing one queued message (C{queue verify}).

    @ivar status: C{"ok"}, C{"mismatch"} or C{"unverifiable"}.
    """

    queueId: str
    status: str
    detail: str = ""


def verifySpool(spool: Any, queueIds: Iterable[str] | None = None) -> list[Verdict]:
    """
    Re-hash every message queued in C{spool} (a L{msa.queue.spool.Spool}),
    oldest first.  A message that leaves the queue meanwhile is skipped.

    @param queueIds: the messages to verify, when not all of
        C{spool.pending()} (the admin command passes them through its
        progress line).
    """
    verdicts = []
    for queueId in spool.pending() if queueIds is None else queueIds:
        try:
            entry = spool.load(queueId)
            if not recorded(entry):
                verdicts.append(Verdict(queueId, "unverifiable", NO_DIGEST))
                continue
            mismatch = verifyPath(entry)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            verdicts.append(Verdict(queueId, "unverifiable", f"cannot read: {e}"))
            continue
        if mismatch is None:
            verdicts.append(Verdict(queueId, "ok", entry.sha256))
        else:
            verdicts.append(Verdict(queueId, "mismatch", mismatch.reason))
    return verdicts
