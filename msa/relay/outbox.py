"""
The downstream for a start without a core MTA: an outbox directory.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from twisted.internet import defer, threads
from twisted.logger import Logger

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
            log.info(
                "{queueId} written to the outbox: {path}",
                queueId=entry.queueId,
                path=path,
            )
            ok = RecipientResult(ACCEPTED, 250, f"written to {path}")
            return DeliveryResult(
                {r: ok for r in entry.pendingRecipients()}, f"250 written to {path}"
            )

        def failed(f):
            log.failure(
                "cannot write {queueId} to the outbox", f, queueId=entry.queueId
            )
            bad = RecipientResult(TEMPORARY, 0, f"outbox: {f.getErrorMessage()}")
            return DeliveryResult({r: bad for r in entry.pendingRecipients()}, bad.text)

        return d.addCallbacks(done, failed)

    def _write(self, entry: SpoolEntry, messageFile: BinaryIO) -> str:
        path = os.path.join(self.directory, entry.queueId + ".eml")
        tmpPath = os.path.join(self.directory, "." + entry.queueId + ".eml.tmp")
        try:
            with open(tmpPath, "wb") as out:
                last = b""
                while chunk := messageFile.read(65536):
                    out.write(chunk)
                    last = (last + chunk)[-2:]
                if last and last != b"\r\n":
                    out.write(b"\r\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmpPath, path)
        except BaseException:
            if os.path.exists(tmpPath):
                os.unlink(tmpPath)
            raise
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path
