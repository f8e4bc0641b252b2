# -*- test-case-name: tests.test_relay,tests.test_durable -*-
"""
The downstream for a start without a core MTA: an outbox directory.

Each message is copied durably (L{msa.durable.writeDurably}: a hidden
temporary file, fsynced, renamed to C{<id>.eml}), checked against the
digest recorded at acceptance (L{msa.queue.integrity}) as it is written,
before it is renamed into place: a message whose bytes are not the
acknowledged ones never appears in the outbox.  The outbox directory's
fsync is a group commit (L{msa.durable.DirectorySync}) shared by the
messages written at the same time.

(The queue file holds the message's state in front of its bytes
(L{msa.queue.queuefile}), so the outbox can no longer hard-link it.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from msa.durable import DirectorySync, writeDurably
from msa.interfaces import IDownstream
from msa.queue import integrity
from msa.queue.spool import SpoolEntry
from msa.relay.results import ACCEPTED, TEMPORARY, DeliveryResult, RecipientResult
from msa.threadpool import runBlocking

log = Logger()


@implementer(IDownstream)
class OutboxDownstream:
    """
    For a start without a core MTA: each message is written, exactly as it
    would go to the core (not stuffed, CRLF-terminated), to
    C{<directory>/<queueId>.eml}, atomically.  Every recipient is accepted.
    """

    #: No remote host: the notifications name none.
    host = ""

    def __init__(self, directory: str, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        #: The group commit of the outbox directory's fsyncs.
        self.directorySync = DirectorySync(directory)
        log.warn(
            "no core MTA configured: accepted messages go to the outbox "
            "directory {directory} and are NOT delivered",
            directory=directory,
        )

    def __repr__(self) -> str:
        return f"<OutboxDownstream {self.directory}>"

    def close(self) -> None:
        """
        Nothing is kept open between deliveries.
        """

    def deliver(
        self,
        entry: SpoolEntry,
        messageFile: BinaryIO,
        dataSent: Callable[[], object] | None = None,
    ) -> defer.Deferred:
        """
        Write the message into the outbox, in a thread (C{dataSent} is
        never called: nothing is left to wait for once it is written).
        """
        d = runBlocking(self._reactor, self._write, entry, messageFile)

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
        chunks = integrity.checkedChunks(entry, messageFile)
        writeDurably(
            path,
            _terminated(chunks),
            mode=0o666,
            tmpPath=tmpPath,
            directorySync=self.directorySync,
        )
        return path


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
