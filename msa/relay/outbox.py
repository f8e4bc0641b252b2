# -*- test-case-name: tests.test_relay,tests.test_durable -*-
"""
The downstream for a start without a core MTA: an outbox directory.

A message that ends with CRLF (as every message the MSA receives does) goes
there by a hard link to its spool file, already fsynced when it was
queued, and an fsync of the outbox directory: no copy and no second fsync
of its bytes.  Otherwise (a message without the final CRLF, an outbox on
another file system, a file system without hard links) it is copied
durably (L{msa.durable.writeDurably}).

Either way the spool file's bytes are first checked against the digest
recorded at acceptance (L{msa.queue.integrity}), and a copy is checked
again as it is written, before it is renamed into place: a message whose
bytes are not the acknowledged ones never appears in the outbox.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import BinaryIO

from twisted.internet import defer, threads
from twisted.logger import Logger

from msa.durable import fsyncDirectory, unlinkQuietly, writeDurably
from msa.queue import integrity
from msa.queue.spool import SpoolEntry
from msa.relay.protocol import ACCEPTED, TEMPORARY, DeliveryResult, RecipientResult

log = Logger()


class OutboxDownstream:
    """
    For a start without a core MTA: each message is written, exactly as it
    would go to the core (not stuffed, CRLF-terminated), to
    C{<directory>/<queueId>.eml}, atomically.  Every recipient is accepted.
    """

    def __init__(self, directory: str, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        log.warn(
            "no core MTA configured: accepted messages go to the outbox "
            "directory {directory} and are NOT delivered",
            directory=directory,
        )

    def __repr__(self) -> str:
        return f"<OutboxDownstream {self.directory}>"

    def deliver(self, entry: SpoolEntry, messageFile: BinaryIO) -> defer.Deferred:
        d = threads.deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            self._write,
            entry,
            messageFile,
        )

        def done(path):
            # The relay runner logs the outcome (INFO); this is the detail.
            log.debug(
                "{queueId} written to the outbox: {path}",
                queueId=entry.queueId,
                path=path,
            )
            ok = RecipientResult(ACCEPTED, 250, f"written to {path}")
            return DeliveryResult(
                {r: ok for r in entry.pendingRecipients()}, f"250 written to {path}"
            )

        def failed(f):
            if f.check(integrity.IntegrityError):
                # The relay runner holds it and logs it at critical level.
                return DeliveryResult(
                    {}, f.value.mismatch.reason, mismatch=f.value.mismatch
                )
            log.failure(
                "cannot write {queueId} to the outbox", f, queueId=entry.queueId
            )
            bad = RecipientResult(TEMPORARY, 0, f"outbox: {f.getErrorMessage()}")
            return DeliveryResult({r: bad for r in entry.pendingRecipients()}, bad.text)

        return d.addCallbacks(done, failed)

    def _write(self, entry: SpoolEntry, messageFile: BinaryIO) -> str:
        path = os.path.join(self.directory, entry.queueId + ".eml")
        # A hidden temporary name: whoever reads the outbox skips it.  Mode
        # 0666 less the umask, as a plain open() gives.
        tmpPath = os.path.join(self.directory, "." + entry.queueId + ".eml.tmp")
        source = getattr(entry, "messagePath", "")
        fileno = getattr(messageFile, "fileno", None)
        if source and fileno is not None and _endsWithCRLF(fileno()):
            # The link is the very file checked here.
            mismatch = integrity.verifyDescriptor(entry, fileno())
            if mismatch is not None:
                raise integrity.IntegrityError(mismatch)
            try:
                _linkDurably(source, path, tmpPath, self.directory)
                return path
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
        chunks = integrity.checkedChunks(entry, messageFile)
        writeDurably(path, _terminated(chunks), mode=0o666, tmpPath=tmpPath)
        return path


#: Errors of L{os.link} that mean "copy instead": another file system, or
#: one without hard links.
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK)


def _endsWithCRLF(fd: int) -> bool:
    """
    Whether the message file open as C{fd} is empty or ends with CRLF: then
    it is exactly what goes to the outbox.  (Read without moving the
    file's position.)
    """
    size = os.fstat(fd).st_size
    return size == 0 or (size >= 2 and os.pread(fd, 2, size - 2) == b"\r\n")


def _linkDurably(source: str, path: str, tmpPath: str, directory: str) -> None:
    """
    Make C{path} a hard link to C{source} (whose bytes are durable), then
    fsync C{directory}.  A C{path} left by an earlier attempt (a crash
    before the spool recorded the delivery) is replaced atomically, through
    C{tmpPath}.
    """
    try:
        os.link(source, path)
    except FileExistsError:
        if not os.path.samefile(source, path):
            unlinkQuietly(tmpPath)
            try:
                os.link(source, tmpPath)
                os.replace(tmpPath, path)
            finally:
                unlinkQuietly(tmpPath)
    fsyncDirectory(directory)


def _terminated(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """
    The message file's C{chunks}, ending with CRLF (added when the
    message does not end with one), as it would go to the core.
    """
    last = b""
    for chunk in chunks:
        yield chunk
        last = (last + chunk)[-2:]
    if last and last != b"\r\n":
        yield b"\r\n"
