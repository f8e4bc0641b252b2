# -*- test-case-name: tests.test_spool,tests.test_groupcommit,tests.test_faults -*-
"""
The writer of one message being received (L{SpoolWriter}): its queue file
(L{msa.queue.queuefile}) in C{tmp/}, the bytes hashed on the way, and the
commit that makes it a queue entry.  See L{msa.queue.spool} for the layout
and the order of the commit.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, BinaryIO

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from msa.audit import AuditError
from msa.durable import unlinkQuietly, writeSynced
from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import ISpoolWriter
from msa.queue import queuefile
from msa.queue.entry import _FULL, PENDING, SpoolEntry

if TYPE_CHECKING:
    from msa.queue.spool import Spool

log = Logger()

#: Size of the writer's buffer: at most this much of a message is in memory.
WRITE_BUFFER = 64 * 1024


@implementer(ISpoolWriter)
class SpoolWriter:
    """
    The file of one message being received, in C{tmp/}.  Data goes to the
    file through a buffer of L{WRITE_BUFFER} bytes, never kept whole, and
    is hashed on its way (L{sha256}), so that the commit records the digest
    of exactly the bytes stored (L{msa.queue.integrity}).

    The file is created only when the data outgrows that buffer; a message
    that fits (the common case) is written, fsynced and closed by the
    commit, in the thread of its fsyncs.  A larger one has its file created
    in the thread pool too, as soon as the data outgrows the buffer; the
    data arriving meanwhile (one thread hand-off's worth) is buffered and
    written once the file exists.  So the reactor thread never waits for a
    file creation, which on a busy journal can stall it.  A failure to
    create the file (EMFILE, ENOSPC) surfaces at the next write or the
    commit, as a 4xx: never acknowledged either way.

    @ivar isBounce: set before L{commit} for a delivery status notification.
    """

    isBounce = False

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self._spool = spool
        self.envelope = envelope
        self.queueId = envelope.queueId
        self._msgPath = os.path.join(spool.tmpDirectory, self.queueId)
        #: The size of the queue file's state slots: the content follows.
        self._slotSize = queuefile.slotSizeFor(envelope)
        self._file: BinaryIO | None = None
        #: The creation of the file in the thread pool, while it runs.
        self._creating: defer.Deferred[None] | None = None
        #: Why the file could not be created.
        self._createError: OSError | None = None
        self._pending = bytearray()
        self._size = 0
        self._eightBit = False
        self._committing = False
        self._done = False
        self._abortRequested = False
        self._digest = hashlib.sha256()
        self._traceLength = 0
        self._traceSha256 = ""
        #: What the submission adds to the acceptance record (L{noteAudit}).
        #: The state committed (L{commit}).
        self._state: dict = {}
        self._auditFields: dict = {}

    def writeTrace(self, data: bytes) -> None:
        """
        Write the MSA's trace header, in front of the message: hashed apart
        from it, so that L{sha256} is the digest of the client's bytes.
        Only before any L{write}.
        """
        if self._size:
            raise RuntimeError("the trace header goes before the message")
        self.write(data)
        self._digest = hashlib.sha256()
        self._traceLength = len(data)
        self._traceSha256 = hashlib.sha256(data).hexdigest()

    def sha256(self) -> str:
        """
        The SHA-256 of the bytes written so far after the trace header.
        """
        return self._digest.hexdigest()

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the message file.

        @raise SMTPReply: 452 when the disk refuses the data.
        """
        if self._done or self._committing:
            raise RuntimeError(f"message {self.queueId} is no longer open")
        if not self._eightBit and not data.isascii():
            self._eightBit = True
        try:
            if self._createError is not None:
                raise self._createError
            if self._file is not None:
                self._file.write(data)
            else:
                self._pending += data
                if len(self._pending) > WRITE_BUFFER and self._creating is None:
                    self._startCreating()
        except OSError as e:
            log.error(
                "spool write failed for {queueId}: {e}", queueId=self.queueId, e=e
            )
            raise SMTPReply(452, "4.3.1", "Insufficient system storage")
        self._size += len(data)
        self._digest.update(data)

    def commit(self) -> defer.Deferred:
        """
        Make the message durable; see the module docstring for the order.

        @return: a L{Deferred} firing with the queue id, or failing with
            L{SMTPReply} 451 when the message could not be made durable.
        """
        if self._done or self._committing:
            return defer.fail(RuntimeError(f"message {self.queueId} already closed"))
        self._committing = True
        spool = self._spool
        entry = SpoolEntry(
            queueId=self.queueId,
            envelope=self.envelope,
            recipients={r: PENDING for r in self.envelope.recipients},
            createdAt=spool.reactor.seconds(),
            nextAttempt=spool.reactor.seconds(),
            eightBit=self._eightBit,
            isBounce=self.isBounce,
            sha256=self.sha256(),
            traceLength=self._traceLength,
            traceSha256=self._traceSha256,
        )
        self._state = entry.toJSON()
        head = queuefile.preamble(self._slotSize) + queuefile.encodeSlot(
            self._state, 1, self._slotSize
        )
        # After the file's creation, if it is being created.
        d = self._creating or defer.succeed(None)
        d.addCallback(lambda _: spool._runBlocking(self._commitBlocking, head))
        d.addCallbacks(self._committed, self._commitFailed)
        return d

    def _startCreating(self) -> None:
        """
        Create the message file in the thread pool; once it exists, what
        was buffered meanwhile goes into it.
        """

        def created(f: BinaryIO) -> None:
            self._creating = None
            if self._done:
                # Aborted meanwhile: abort() could not remove it yet.
                self._file = f
                self._closeQuietly()
                unlinkQuietly(self._msgPath, keepErrors=True)
                return
            self._file = f
            try:
                f.write(self._pending)
            except OSError as e:
                self._createError = e
            self._pending = bytearray()

        def failed(failure) -> None:
            self._creating = None
            self._createError = failure.value
            if not failure.check(OSError):
                log.failure("cannot create {path}", failure, path=self._msgPath)
                self._createError = OSError(str(failure.value))

        self._creating = self._spool._runBlocking(self._create)
        self._creating.addCallbacks(created, failed)

    def _create(self) -> BinaryIO:
        """
        Create the queue file, its content to follow the state slots
        (blocks: in a thread).
        """
        fd = os.open(self._msgPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        f = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        f.seek(queuefile.contentOffset(self._slotSize))
        return f

    def _commitBlocking(self, head: bytes) -> None:
        """
        The disk part of L{commit}: runs in a thread.  On failure nothing
        of the message is left, durably, before the client hears the 4xx
        (L{_discardBlocking}).
        """
        try:
            self._publishBlocking(head)
        except BaseException:
            self._discardBlocking()
            raise

    def _publishBlocking(self, head: bytes) -> None:
        """
        The preamble and first state (C{head}) go in front of the content,
        the file is fsynced once and renamed into C{queue/}; the directory
        fsync and the audit record are one round of the spool's group
        commit (L{msa.queue.spool.Spool.commits}).
        """
        spool = self._spool
        if self._createError is not None:
            raise self._createError
        if self._file is None:
            # The whole message is in the buffer: one write of the file,
            # the gap after slot 0 (slot 1, unused yet) as zeros, which is
            # what the file read back as when it was a hole.
            whole = head.ljust(queuefile.contentOffset(self._slotSize), b"\0")
            writeSynced(self._msgPath, whole + self._pending, exclusive=True)
        else:
            self._file.write(self._pending)
            self._file.flush()
            fd = self._file.fileno()
            os.pwrite(fd, head, 0)
            os.fsync(fd)
            self._file.close()
        self._pending = bytearray()
        os.replace(self._msgPath, spool.queuePath(self.queueId))
        spool._slots[self.queueId] = queuefile.QueueFileState(self._slotSize, 1, 0)
        # One round of the spool's group commit: the directory's fsync, then
        # the acceptance record, durable before the 250 (msa.audit); if
        # either fails the commit fails and the message is removed.
        spool.commits.commitAccepted(
            None if spool.audit is None else self.auditRecord()
        )

    def _discardBlocking(self) -> None:
        """
        A commit failed: remove what there is of the message, in C{tmp/}
        and in C{queue/}.  If it had reached C{queue/} (only the audit
        record or the directory's fsync failed), the directory is fsynced
        after the removal: otherwise a crash could bring back, and deliver,
        a message its client was told was not queued (and may send again).
        """
        self._closeQuietly()
        spool = self._spool
        spool._slots.pop(self.queueId, None)
        published = False
        for path in (self._msgPath, spool.queuePath(self.queueId)):
            existed = os.path.lexists(path)
            error = unlinkQuietly(path, keepErrors=True)
            if error is not None:
                # Never acknowledged: recover() removes it at the next start.
                log.error("cannot remove {path}: {e}", path=path, e=error)
            elif existed and os.path.dirname(path) == spool.queueDirectory:
                published = True
        if published:
            try:
                spool.commits.syncBlocking()
            except OSError as e:
                log.error(
                    "cannot make the removal of {queueId} durable: {e}",
                    queueId=self.queueId,
                    e=e,
                )

    def _finish(self) -> None:
        """
        The writer is done (committed, failed or aborted): no commit of
        its is on its way to the spool's rounds any more.
        """
        self._done = True
        self._spool.commits.writerClosed(self)

    def noteAudit(self, **fields) -> None:
        """
        Add C{fields} to this message's acceptance record (the submission's
        facts: TLS version, the digest of the bytes acknowledged...).
        """
        self._auditFields.update(fields)

    def auditRecord(self) -> dict:
        """
        The audit record of this commit: C{accepted} for a submission,
        C{dsn-queued} for a notification made by the MSA.
        """
        envelope = self.envelope
        return {
            "event": "dsn-queued" if self.isBounce else "accepted",
            "queueId": self.queueId,
            "account": envelope.account,
            "client": envelope.clientAddress,
            "sender": envelope.sender,
            "recipients": list(envelope.recipients),
            "size": self._size,
            **self._auditFields,
        }

    def _committed(self, _: None) -> str | defer.Deferred[None]:
        self._finish()
        if self._abortRequested:
            # Whoever asked for the abort will not announce this message.
            # (The SMTP server never does this: a message whose final dot
            # arrived is delivered even if its client leaves before the
            # 250, see msa.submission.transaction.  abort() stays safe at any time.)
            log.info(
                "queue id {queueId} dropped: aborted during commit",
                queueId=self.queueId,
            )
            self._spool.auditEvent(
                "dropped", queueId=self.queueId, reason="aborted during its commit"
            )
            # The 451 only once the removal is durable.
            removed = self._spool.remove(self.queueId)
            return removed.addBoth(self._abortedReply)
        # The server logs the acceptance (with more detail); this is for
        # debugging the spool itself.
        log.debug(
            "queued {queueId}: {size} bytes from <{sender}> for {count} recipient(s)",
            queueId=self.queueId,
            size=self._size,
            sender=self.envelope.sender,
            count=len(self.envelope.recipients),
        )
        # The entry as a load of its queue file would give it, for the
        # relay's first load (no read of the file just written).
        fresh = SpoolEntry.fromJSON(
            self._state, self._spool.queuePath(self.queueId), self._size
        )
        fresh.contentOffset = queuefile.contentOffset(self._slotSize)
        self._spool.remember(fresh)
        self._spool._notify(self.queueId)
        return self.queueId

    @staticmethod
    def _abortedReply(_: object) -> None:
        raise SMTPReply(451, "4.3.0", "Message aborted")

    def _commitFailed(self, failure):
        """
        The commit failed: nothing of the message may stay behind and the
        client hears a 4xx (the message is not queued; it may send it
        again).  On a full file system (ENOSPC, EDQUOT) that is 452 4.3.1
        ("mail system full", RFC 3463); on any other error 451 4.3.0.
        """
        self._finish()
        if failure.check(OSError, AuditError):
            # The disk's answer (ENOSPC, EIO...): expected, no traceback.
            log.error(
                "cannot commit {queueId}: {error}",
                queueId=self.queueId,
                error=failure.value,
            )
        else:
            log.failure("cannot commit {queueId}", failure, queueId=self.queueId)
        if isinstance(failure.value, OSError) and failure.value.errno in _FULL:
            raise SMTPReply(452, "4.3.1", "Insufficient system storage")
        raise SMTPReply(451, "4.3.0", "Cannot queue the message, try again later")

    def _closeQuietly(self) -> None:
        """
        Close the message file, whose data is being thrown away: closing
        flushes the buffer, which fails again on a full disk (the file
        descriptor is closed all the same), and must not stop the cleanup.
        """
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError as e:
            log.info("discarding the data of {queueId}: {e}", queueId=self.queueId, e=e)

    def abort(self) -> None:
        """
        Forget the message.  Safe to call more than once; during a commit,
        the message is removed as soon as the commit is done and the commit
        fails instead of announcing it.
        """
        if self._done:
            return
        if self._committing:
            self._abortRequested = True
            return
        self._finish()
        self._closeQuietly()
        error = unlinkQuietly(self._msgPath, keepErrors=True)
        if error is not None:
            log.error("cannot remove {path}: {e}", path=self._msgPath, e=error)
