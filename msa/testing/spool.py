# -*- test-case-name: tests.test_testing -*-
"""
The spool double: L{MemorySpool} keeps each committed message (its
envelope and exact bytes) in a list, and can be told to fail the next
commit.  Part of L{msa.testing}.
"""

from __future__ import annotations

import hashlib
import io
from typing import NamedTuple

from twisted.internet import defer
from zope.interface import implementer

from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import ISpool, ISpoolWriter


def commitFailed() -> SMTPReply:
    """
    @return: what the real spool's commit fails with when the disk refuses
        the message (L{msa.queue.writer.SpoolWriter.commit}), and so what
        L{MemorySpool.failNextCommit} fails with by default.
    """
    return SMTPReply(451, "4.3.0", "Cannot queue the message, try again later")


# -- the spool -----------------------------------------------------------


class StoredMessage(NamedTuple):
    """
    One committed message: unpacks as C{(envelope, data)}.

    @ivar envelope: its L{Envelope}, with the queue id set.
    @ivar data: the message exactly as the avatar wrote it (for the real
        avatar: the MSA's Received header, then the message as the client
        sent it, dot-unstuffed, CRLF line ends).
    """

    envelope: Envelope
    data: bytes

    @property
    def queueId(self) -> str:
        return self.envelope.queueId


@implementer(ISpoolWriter)
class MemoryWriter:
    """
    One message being written into a L{MemorySpool}, with the contract of
    L{msa.queue.writer.SpoolWriter}: nothing may be written after L{commit} or
    L{abort}, a second L{commit} fails, L{abort} is safe to call more than
    once and does nothing after a commit, and a failed commit leaves no
    message behind.

    @ivar aborted: L{abort} was called before the message was committed.
    @ivar committed: the commit succeeded.
    @ivar isBounce: set before L{commit} for a delivery status notification,
        as on the real writer.
    @ivar audit: the fields given to L{noteAudit}, as the real writer puts
        them in the message's acceptance record.
    """

    isBounce = False

    def __init__(self, spool: MemorySpool, envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.queueId: str = envelope.queueId
        self.data = io.BytesIO()
        self.aborted = False
        self.committed = False
        self.audit: dict[str, object] = {}
        self._digest = hashlib.sha256()
        self._done = False

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the message.

        @raise RuntimeError: when the message is already committed or aborted.
        """
        if self._done:
            raise RuntimeError(f"message {self.queueId} is no longer open")
        self.data.write(data)
        self._digest.update(data)

    def writeTrace(self, data: bytes) -> None:
        """
        Write the MSA's trace header in front of the message, kept out of
        L{sha256} as the real writer does.

        @raise RuntimeError: after any L{write}.
        """
        if self.data.tell():
            raise RuntimeError("the trace header goes before the message")
        self.write(data)
        self._digest = hashlib.sha256()

    def sha256(self) -> str:
        """
        @return: the SHA-256 of the bytes written after the trace header.
        """
        return self._digest.hexdigest()

    def noteAudit(self, **fields: object) -> None:
        """
        Keep C{fields} in L{audit}.
        """
        self.audit.update(fields)

    def commit(self) -> defer.Deferred[str]:
        """
        Keep the message in C{spool.committed}, or fail as the spool was told
        to (L{MemorySpool.failNextCommit}), leaving nothing behind.

        @return: a L{Deferred} that has already fired with the queue id, or
            failed.
        """
        if self._done:
            return defer.fail(RuntimeError(f"message {self.queueId} already closed"))
        self._done = True
        failure, self.spool.nextCommitFailure = self.spool.nextCommitFailure, None
        if failure is not None:
            return defer.fail(failure)
        self.committed = True
        self.spool.committed.append(StoredMessage(self.envelope, self.data.getvalue()))
        return defer.succeed(self.queueId)

    def abort(self) -> None:
        """
        Forget the message, unless it is already committed.
        """
        if self._done:
            return
        self._done = True
        self.aborted = True


@implementer(ISpool)
class MemorySpool:
    """
    An L{ISpool} in memory.  Queue ids are C{Q0001}, C{Q0002}, ... in the
    order messages are started.

    @ivar committed: every committed message, a L{StoredMessage}, in commit
        order.
    @ivar writers: every L{MemoryWriter} handed out, committed or not.
    @ivar nextCommitFailure: the exception the next commit fails with, or
        L{None}; see L{failNextCommit}.
    """

    def __init__(self) -> None:
        self.committed: list[StoredMessage] = []
        self.writers: list[MemoryWriter] = []
        self.counter = 0
        self.nextCommitFailure: BaseException | None = None
        #: No directory: the messages are in memory.
        self.queueDirectory: str | None = None

    def newMessage(self, envelope: Envelope) -> MemoryWriter:
        """
        Allocate the next queue id (set on C{envelope}) and a writer.
        """
        self.counter += 1
        envelope.queueId = f"Q{self.counter:04d}"
        writer = MemoryWriter(self, envelope)
        self.writers.append(writer)
        return writer

    def failNextCommit(self, exception: BaseException | None = None) -> None:
        """
        Make the next commit fail with C{exception} and keep nothing, as the
        real spool does when the disk is full or the fsync fails.  The
        server sends an L{SMTPReply} to the client as it is; any other
        exception becomes C{451 4.3.0}.

        @param exception: by default the real spool's own commit failure,
            L{commitFailed}.
        """
        self.nextCommitFailure = exception if exception is not None else commitFailed()

    def messages(self) -> list[bytes]:
        """
        @return: the bytes of every committed message, in commit order.
        """
        return [stored.data for stored in self.committed]


# -- accounts ------------------------------------------------------------
