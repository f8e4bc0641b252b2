# -*- test-case-name: tests.test_queuefile,tests.test_spool,tests.test_crash -*-
"""
The queue file: one file per message, its state and its content.

Layout (all integers big-endian)::

    0             preamble: MAGIC, format version (u16), 0 (u16), the size
                  of a state slot (u32); zeros up to SLOTS
    SLOTS         state slot 0
    SLOTS + s     state slot 1
    SLOTS + 2s    the content: the trace header, then the message, CRLF
                  line ends, not dot-stuffed, to the end of the file

A state slot holds a sequence number (u64), a length (u32), the CRC-32 of
both and of the state (u32), then the state: the entry's JSON
(L{msa.queue.entry.SpoolEntry.toJSON}: envelope, recipients each with its
status, the SHA-256 recorded at acceptance...), zeros after it.  The state
is the valid slot with the highest sequence number.  A new state is
written into the I{other} slot, with the next sequence number, in place
(one C{pwrite}) and made durable by one C{fdatasync}: a write torn by a
crash fails its CRC and leaves the slot before it in force, so a change is
atomic without a second file, a rename or a directory fsync.

The slots are sized when the message is created (L{slotSizeFor}) for the
envelope and, per recipient, a status and a reply of up to
L{ERROR_LIMIT} characters; a longer reply is shortened to fit
(L{encodeSlot}).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from typing import Any, BinaryIO, cast

from msa.envelope import Envelope
from msa.queue.entry import SpoolEntry

#: The first bytes of a queue file.
MAGIC = b"DMSA-QF\n"
#: This format's version (version 1 and 2 were the .msg and .json pairs).
VERSION = 3
_PREAMBLE = struct.Struct(">8sHHI")
#: Where slot 0 starts: one disk sector for the preamble.
SLOTS = 512
_SLOT_HEADER = struct.Struct(">QII")
#: The longest reply kept per recipient in the state.
ERROR_LIMIT = 512


class QueueFileError(ValueError):
    """
    Not a queue file, or one without a readable state.
    """


def slotSizeFor(envelope: Envelope) -> int:
    """
    The size of the state slots of a message with C{envelope}: room for
    the envelope, once more per recipient address (the statuses, the
    owed notices) and, per recipient, a reply of L{ERROR_LIMIT} characters
    even when JSON escapes it; a multiple of 512.
    """
    envelopeBytes = len(json.dumps(envelope.toJSON()))
    perRecipient = sum(3 * len(json.dumps(r)) + 16 for r in envelope.recipients)
    size = 2048 + 2 * envelopeBytes + perRecipient
    size += len(envelope.recipients) * (ERROR_LIMIT + 64)
    return -(-size // 512) * 512


def contentOffset(slotSize: int) -> int:
    """
    Where the content starts in a queue file with slots of C{slotSize}.
    """
    return SLOTS + 2 * slotSize


def preamble(slotSize: int) -> bytes:
    """
    The bytes before slot 0.
    """
    return _PREAMBLE.pack(MAGIC, VERSION, 0, slotSize).ljust(SLOTS, b"\0")


def slotOffset(slotSize: int, index: int) -> int:
    return SLOTS + index * slotSize


def _shortened(state: dict[str, Any], limit: int) -> dict[str, Any]:
    data = dict(state)
    if "errors" in data:
        data["errors"] = {r: e[:limit] for r, e in data["errors"].items()}
    if "lastError" in data:
        data["lastError"] = data["lastError"][:limit]
    return data


def encodeSlot(state: dict[str, Any], sequence: int, slotSize: int) -> bytes:
    """
    The slot that holds C{state} (L{SpoolEntry.toJSON}) with C{sequence};
    replies are shortened when the state would not fit otherwise.

    @raise QueueFileError: when not even the shortest state fits (an
        envelope changed after the slots were sized).
    """
    room = slotSize - _SLOT_HEADER.size
    for limit in (ERROR_LIMIT, 128, 0):
        encoded = json.dumps(_shortened(state, limit), sort_keys=True).encode()
        if len(encoded) <= room:
            break
    else:
        raise QueueFileError(f"the state of {state['queueId']} exceeds its slot")
    header = struct.pack(">QI", sequence, len(encoded))
    crc = zlib.crc32(header + encoded)
    return _SLOT_HEADER.pack(sequence, len(encoded), crc) + encoded


def _decodeSlot(data: bytes) -> tuple[int, bytes] | None:
    """
    @return: the sequence number and state of a valid slot, else L{None}.
    """
    if len(data) < _SLOT_HEADER.size:
        return None
    sequence, length, crc = _SLOT_HEADER.unpack_from(data)
    state = data[_SLOT_HEADER.size : _SLOT_HEADER.size + length]
    if sequence == 0 or len(state) != length:
        return None
    if zlib.crc32(struct.pack(">QI", sequence, length) + state) != crc:
        return None
    return sequence, state


class QueueFileState:
    """
    What a reader learns from a queue file besides the entry: which slot
    holds the state in force and its sequence number, so that the next
    state goes into the other one.
    """

    def __init__(self, slotSize: int, sequence: int, slot: int) -> None:
        self.slotSize = slotSize
        self.sequence = sequence
        self.slot = slot

    @property
    def contentOffset(self) -> int:
        return contentOffset(self.slotSize)


def readState(fd: int) -> tuple[dict, QueueFileState]:
    """
    The state in force of the queue file open as C{fd}.

    @raise QueueFileError: when it is not a queue file or has no valid
        state slot.
    """
    head = os.pread(fd, _PREAMBLE.size, 0)
    if len(head) < _PREAMBLE.size:
        raise QueueFileError("too short for a queue file")
    magic, version, _, slotSize = _PREAMBLE.unpack(head)
    if magic != MAGIC or version != VERSION or slotSize < 512:
        raise QueueFileError("not a queue file of this version")
    best: tuple[int, bytes, int] | None = None
    for index in (0, 1):
        decoded = _decodeSlot(os.pread(fd, slotSize, slotOffset(slotSize, index)))
        if decoded is not None and (best is None or decoded[0] > best[0]):
            best = (decoded[0], decoded[1], index)
    if best is None:
        raise QueueFileError("no valid state slot")
    sequence, state, slot = best
    try:
        data = json.loads(state)
    except ValueError as e:
        raise QueueFileError(f"unreadable state: {e}") from None
    return data, QueueFileState(slotSize, sequence, slot)


def loadEntry(path: str) -> tuple[SpoolEntry, QueueFileState]:
    """
    The entry in the queue file at C{path}.

    @raise FileNotFoundError: when there is no such file.
    @raise QueueFileError: when it has no readable state.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data, where = readState(fd)
        size = os.fstat(fd).st_size - where.contentOffset
    finally:
        os.close(fd)
    entry = SpoolEntry.fromJSON(data, path, max(0, size))
    entry.contentOffset = where.contentOffset
    return entry, where


def writeState(
    fd: int, state: dict[str, Any], where: QueueFileState, sync: bool = True
) -> None:
    """
    Write C{state} (L{SpoolEntry.toJSON}) into the slot not in force, then
    (with C{sync}) fdatasync it; C{where} then describes the new state.
    Blocks.
    """
    sequence = where.sequence + 1
    slot = 1 - where.slot
    data = encodeSlot(state, sequence, where.slotSize)
    os.pwrite(fd, data, slotOffset(where.slotSize, slot))
    if sync:
        os.fdatasync(fd)
    where.sequence, where.slot = sequence, slot


def voidSlot(fd: int, where: QueueFileState) -> None:
    """
    After a refused L{writeState}: overwrite the header of the slot not in
    force, so that it cannot pass for the newest state; best effort (the
    disk refused a write already), errors are ignored.
    """
    try:
        os.pwrite(
            fd, bytes(_SLOT_HEADER.size), slotOffset(where.slotSize, 1 - where.slot)
        )
    except OSError:
        pass


class ContentFile(io.RawIOBase):
    """
    The content of a queue file, read-only, as if it were the whole file:
    position 0 is the first byte of the trace header, the end is the end
    of the message.  No C{fileno}: whoever needs a descriptor of the
    message alone (a hard link, C{sendfile} from 0) cannot have one.
    """

    def __init__(self, path: str, offset: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._offset = offset
        self._position = 0
        self.name = path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(buffer), self._offset + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            position += self._position
        elif whence == io.SEEK_END:
            position += self.size()
        self._position = max(0, position)
        return self._position

    def tell(self) -> int:
        return self._position

    def size(self) -> int:
        return max(0, os.fstat(self._fd).st_size - self._offset)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("the content of a queue file has no fileno")

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def openContent(entry: SpoolEntry) -> BinaryIO:
    """
    The message of C{entry} (the trace header and the message), open for
    binary reading from its start: the content of its queue file, or the
    whole C{.msg} file of an entry spooled by an earlier version.
    """
    offset = entry.contentOffset
    if offset:
        # A file object for every reader (read, seek, a context manager).
        return cast(BinaryIO, ContentFile(entry.messagePath, offset))
    return open(entry.messagePath, "rb")
