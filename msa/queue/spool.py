# -*- test-case-name: tests.test_spool,tests.test_crash,tests.test_faults -*-
"""
The durable spool: what makes "250 queued as ID" a promise.

Layout under the spool directory::

    tmp/<id>.msg      message being received (never acknowledged)
    tmp/<id>.json     its state file, written just before the commit
    queue/<id>.msg    committed message, CRLF line endings, not dot-stuffed
    queue/<id>.json   committed state: the envelope and per-recipient status,
                      and the SHA-256 of the acknowledged bytes
                      (L{msa.queue.integrity})

A message is committed when C{queue/<id>.json} exists: the message file is
fsynced and renamed into C{queue/} first, then the state file, then the
directory is fsynced.  A crash at any point leaves either nothing the client
was told about (C{tmp/}, an orphan C{queue/<id>.msg}: both removed by
L{Spool.recover}) or a complete entry.

The fsyncs of a commit run in the reactor's thread pool (when the reactor has
one; with a fake reactor such as L{twisted.internet.task.Clock} they run
synchronously).  The writer's file is not touched by the reactor thread while
the commit runs.  The fsyncs of C{queue/} itself are shared by concurrent
commits and removals (L{msa.durable.DirectorySync}, a group commit): each
commit still returns only after an fsync of the directory that started
after its own renames.  L{Spool.update} and L{Spool.remove} are
synchronous: they are small and their ordering with the relay's decisions
must be exact.  L{Spool.removeDelivered} makes the entry invisible to this
process's readers at once (L{Spool.pending}, L{Spool.load}) and leaves all
the disk work to a thread: the removal of the state file, the directory
fsync and the removal of the message file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from typing import BinaryIO

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from msa.audit import AuditError, AuditLog
from msa.durable import (
    DirectorySync,
    fsyncDirectory,
    writeDurably,
    writeSynced,
)
from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.interfaces import ISpool, ISpoolWriter

log = Logger()

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

#: Size of the writer's buffer: at most this much of a message is in memory.
WRITE_BUFFER = 64 * 1024


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _discard(path: str) -> None:
    """
    Remove a file that nobody was told about, on a path that must not fail
    (a refusal already on its way to the client): a disk that refuses even
    that is logged, and L{Spool.recover} removes the file at the next start.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("cannot remove {path}: {e}", path=path, e=e)


#: Errors that mean the spool's file system is full (RFC 3463 4.3.1).
_FULL = (errno.ENOSPC, errno.EDQUOT)


_lastTimestamp = 0


def newQueueId() -> str:
    """
    A new queue id: 13 upper-case hex digits of microseconds since the epoch
    (strictly increasing within this process) and 5 random hex digits, so
    ids sort by arrival time and do not collide between processes.
    """
    global _lastTimestamp
    now = max(time.time_ns() // 1000, _lastTimestamp + 1)
    _lastTimestamp = now
    return f"{now:013X}{secrets.randbits(20):05X}"


@attrs.define
class SpoolEntry:
    """
    One committed message as the relay sees it.

    @ivar recipients: recipient address to status (L{PENDING},
        L{DELIVERED} or L{FAILED}), in RCPT order.
    @ivar errors: recipient address to the last reply about it.
    @ivar nextAttempt: POSIX time of the next delivery attempt.
    @ivar eightBit: whether the message has bytes above 127.
    @ivar held: put on hold by the operator: never attempted until released.
    @ivar isBounce: a delivery status notification made by this MSA (never
        the subject of another one).
    @ivar delayWarned: a "delayed" notification was sent for it.
    @ivar owedNotices: failed recipients whose "failed" notification could
        not be queued yet: the entry stays in the queue until it is.
    @ivar sha256: the SHA-256 of the message bytes acknowledged with the
        250 (after the trace header); C{""} for an entry spooled by an
        earlier version.  See L{msa.queue.integrity}.
    @ivar traceLength: the length of the trace header the MSA put in front.
    @ivar traceSha256: its SHA-256 (C{""} when there is none).
    @ivar heldReason: why the MSA itself put the entry on hold (an
        integrity mismatch); C{""} otherwise.
    """

    queueId: str
    envelope: Envelope
    recipients: dict[str, str]
    attempts: int = 0
    nextAttempt: float = 0.0
    lastError: str = ""
    createdAt: float = 0.0
    errors: dict[str, str] = attrs.Factory(dict)
    eightBit: bool = False
    messagePath: str = ""
    size: int = 0
    held: bool = False
    isBounce: bool = False
    delayWarned: bool = False
    owedNotices: list[str] = attrs.Factory(list)
    sha256: str = ""
    traceLength: int = 0
    traceSha256: str = ""
    heldReason: str = ""

    def pendingRecipients(self) -> list[str]:
        return [r for r, status in self.recipients.items() if status == PENDING]

    def toJSON(self) -> dict:
        return {
            "version": 1,
            "queueId": self.queueId,
            "envelope": self.envelope.toJSON(),
            "recipients": self.recipients,
            "errors": self.errors,
            "attempts": self.attempts,
            "nextAttempt": self.nextAttempt,
            "lastError": self.lastError,
            "createdAt": self.createdAt,
            "eightBit": self.eightBit,
            "held": self.held,
            "isBounce": self.isBounce,
            "delayWarned": self.delayWarned,
            "owedNotices": self.owedNotices,
            "sha256": self.sha256,
            "traceLength": self.traceLength,
            "traceSha256": self.traceSha256,
            "heldReason": self.heldReason,
        }

    @classmethod
    def fromJSON(cls, data: dict, messagePath: str, size: int) -> SpoolEntry:
        return cls(
            queueId=data["queueId"],
            envelope=Envelope.fromJSON(data["envelope"]),
            recipients=dict(data["recipients"]),
            attempts=int(data.get("attempts", 0)),
            nextAttempt=float(data.get("nextAttempt", 0.0)),
            lastError=data.get("lastError", ""),
            createdAt=float(data.get("createdAt", 0.0)),
            errors=dict(data.get("errors", {})),
            eightBit=bool(data.get("eightBit", False)),
            messagePath=messagePath,
            size=size,
            held=bool(data.get("held", False)),
            isBounce=bool(data.get("isBounce", False)),
            delayWarned=bool(data.get("delayWarned", False)),
            owedNotices=list(data.get("owedNotices", [])),
            # Absent in a state written by an earlier version.
            sha256=str(data.get("sha256", "")),
            traceLength=int(data.get("traceLength", 0)),
            traceSha256=str(data.get("traceSha256", "")),
            heldReason=str(data.get("heldReason", "")),
        )


def _encodeState(entry: SpoolEntry) -> bytes:
    return json.dumps(entry.toJSON(), sort_keys=True).encode("utf-8")


@implementer(ISpoolWriter)
class SpoolWriter:
    """
    The file of one message being received, in C{tmp/}.  Data goes to the
    file through a buffer of L{WRITE_BUFFER} bytes, never kept whole, and
    is hashed on its way (L{sha256}), so that the commit records the digest
    of exactly the bytes stored (L{msa.queue.integrity}).

    The file is created only when the data outgrows that buffer; a message
    that fits (the common case) is written, fsynced and closed by the
    commit, in the thread of its fsyncs, so the reactor thread never waits
    for a file creation, which on a busy journal can stall it.  A failure
    to create the file (EMFILE, ENOSPC) then surfaces at the commit, as a
    4xx to the final dot instead of to DATA: never acknowledged either way.

    @ivar isBounce: set before L{commit} for a delivery status notification.
    """

    isBounce = False

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self._spool = spool
        self.envelope = envelope
        self.queueId = envelope.queueId
        self._msgPath = os.path.join(spool.tmpDirectory, self.queueId + ".msg")
        self._statePath = os.path.join(spool.tmpDirectory, self.queueId + ".json")
        self._file: BinaryIO | None = None
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
            if self._file is not None:
                self._file.write(data)
            elif len(self._pending) + len(data) <= WRITE_BUFFER:
                self._pending += data
            else:
                self._file = self._create()
                self._file.write(data)
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
        state = _encodeState(entry)
        d = spool._runBlocking(self._commitBlocking, state)
        d.addCallbacks(self._committed, self._commitFailed)
        return d

    def _create(self) -> BinaryIO:
        """
        Create the message file and write what was buffered so far.
        """
        fd = os.open(self._msgPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        f = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        try:
            f.write(self._pending)
        except BaseException:
            # Closing flushes again, which fails again: the cleanup goes on.
            self._file = f
            raise
        self._pending = bytearray()
        return f

    def _commitBlocking(self, state: bytes) -> None:
        """
        The disk part of L{commit}: runs in a thread.
        """
        queueDir = self._spool.queueDirectory
        if self._file is None:
            self._file = self._create()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        writeSynced(self._statePath, state)
        # The message first: a .json in queue/ implies its .msg.
        os.replace(self._msgPath, os.path.join(queueDir, self.queueId + ".msg"))
        os.replace(self._statePath, os.path.join(queueDir, self.queueId + ".json"))
        self._spool.queueSync.sync()
        # The acceptance record, durable before the 250 (msa.audit); if it
        # cannot be written the commit fails and the message is removed.
        if self._spool.audit is not None:
            self._spool.audit.append(**self.auditRecord())

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

    def _committed(self, _: None) -> str:
        self._done = True
        if self._abortRequested:
            # Whoever asked for the abort will not announce this message.
            # (The SMTP server never does this: a message whose final dot
            # arrived is delivered even if its client leaves before the
            # 250, see msa.submission.transaction.  abort() stays safe at any time.)
            self._spool.remove(self.queueId)
            log.info(
                "queue id {queueId} dropped: aborted during commit",
                queueId=self.queueId,
            )
            self._spool.auditEvent(
                "dropped", queueId=self.queueId, reason="aborted during its commit"
            )
            raise SMTPReply(451, "4.3.0", "Message aborted")
        # The server logs the acceptance (with more detail); this is for
        # debugging the spool itself.
        log.debug(
            "queued {queueId}: {size} bytes from <{sender}> for {count} recipient(s)",
            queueId=self.queueId,
            size=self._size,
            sender=self.envelope.sender,
            count=len(self.envelope.recipients),
        )
        self._spool._notify(self.queueId)
        return self.queueId

    def _commitFailed(self, failure):
        """
        The commit failed: nothing of the message may stay behind and the
        client hears a 4xx (the message is not queued; it may send it
        again).  On a full file system (ENOSPC, EDQUOT) that is 452 4.3.1
        ("mail system full", RFC 3463); on any other error 451 4.3.0.
        """
        self._done = True
        if failure.check(OSError, AuditError):
            # The disk's answer (ENOSPC, EIO...): expected, no traceback.
            log.error(
                "cannot commit {queueId}: {error}",
                queueId=self.queueId,
                error=failure.value,
            )
        else:
            log.failure("cannot commit {queueId}", failure, queueId=self.queueId)
        self._closeQuietly()
        _discard(self._msgPath)
        _discard(self._statePath)
        queueDir = self._spool.queueDirectory
        # The order of the renames means a .json in queue/ implies its .msg.
        _discard(os.path.join(queueDir, self.queueId + ".json"))
        _discard(os.path.join(queueDir, self.queueId + ".msg"))
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
        self._done = True
        self._closeQuietly()
        _discard(self._msgPath)


@implementer(ISpool)
class Spool:
    """
    The queue directory; see the module docstring.

    @param directory: created (mode 0700) if missing.
    @param reactor: supplies time and the thread pool for the fsyncs.
    """

    def __init__(self, directory: str, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.directory = directory
        self.tmpDirectory = os.path.join(directory, "tmp")
        self.queueDirectory = os.path.join(directory, "queue")
        for d in (directory, self.tmpDirectory, self.queueDirectory):
            os.makedirs(d, mode=0o700, exist_ok=True)
        #: The group commit of C{queue/}'s fsyncs (commits and removals).
        self.queueSync = DirectorySync(self.queueDirectory)
        #: The audit log (L{msa.audit}) each commit appends to, if any.
        self.audit: AuditLog | None = None
        self._listeners: list[Callable[[str], object]] = []
        #: Entries being removed by L{removeDelivered}: already gone for
        #: the readers of this process.
        self._removing: set[str] = set()

    def _runBlocking(self, f, *args) -> defer.Deferred:
        getThreadPool = getattr(self.reactor, "getThreadPool", None)
        if getThreadPool is None:
            return defer.maybeDeferred(f, *args)
        return threads.deferToThreadPool(self.reactor, getThreadPool(), f, *args)

    # Writing side.

    def newMessage(self, envelope: Envelope) -> SpoolWriter:
        envelope.queueId = newQueueId()
        return SpoolWriter(self, envelope)

    def addListener(self, listener: Callable[[str], object]) -> None:
        """
        Call C{listener(queueId)} after each commit.
        """
        self._listeners.append(listener)

    def removeListener(self, listener: Callable[[str], object]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, queueId: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(queueId)
            except Exception:
                log.failure("spool listener failed for {queueId}", queueId=queueId)

    # Reading side.

    def _paths(self, queueId: str) -> tuple[str, str]:
        base = os.path.join(self.queueDirectory, queueId)
        return base + ".msg", base + ".json"

    def pending(self) -> list[str]:
        """
        The ids of the complete entries in the queue, oldest first.
        """
        names = set(os.listdir(self.queueDirectory))
        return sorted(
            n[:-5]
            for n in names
            if n.endswith(".json")
            and n[:-5] + ".msg" in names
            and n[:-5] not in self._removing
        )

    def load(self, queueId: str) -> SpoolEntry:
        """
        @raise FileNotFoundError: when the entry is not (or no longer) there.
        @raise ValueError: when the state file is unreadable.
        """
        msgPath, statePath = self._paths(queueId)
        if queueId in self._removing:
            raise FileNotFoundError(errno.ENOENT, "being removed", statePath)
        with open(statePath, "rb") as f:
            data = json.loads(f.read())
        return SpoolEntry.fromJSON(data, msgPath, os.stat(msgPath).st_size)

    def update(self, entry: SpoolEntry) -> None:
        """
        Atomically replace the state of C{entry}: write a temporary file,
        fsync it, rename it over the state file, fsync the directory.
        """
        _, statePath = self._paths(entry.queueId)
        # The temporary name ends in .tmp: recover() removes a leftover.
        writeDurably(statePath, _encodeState(entry), tmpPath=statePath + ".tmp")

    def remove(self, queueId: str) -> None:
        """
        Remove an entry: the state file first, so that a crash in between
        leaves an orphan message file (removed by L{recover}), never an
        entry without its message.
        """
        msgPath, statePath = self._paths(queueId)
        _unlinkQuietly(statePath)
        fsyncDirectory(self.queueDirectory)
        _unlinkQuietly(msgPath)

    def removeDelivered(self, queueId: str) -> defer.Deferred[None]:
        """
        Remove an entry, as L{remove} does, with the disk work off the
        calling (reactor) thread: the entry is gone for every reader in
        this process as soon as this returns; then, in the reactor's thread
        pool, the state file is removed, the directory fsynced (shared with
        concurrent commits and removals, L{DirectorySync}) and only then is
        the message file removed.

        @return: a L{Deferred} firing when the removal is durable, or
            failing with the L{OSError}: when the state file could not be
            removed, the entry is unchanged (and visible again); when the
            fsync failed, the entry is gone and its message file left for
            L{recover}.
        """
        self._removing.add(queueId)
        d = self._runBlocking(self._removedBlocking, *self._paths(queueId))

        def visible(result: object) -> object:
            self._removing.discard(queueId)
            return result

        return d.addBoth(visible)

    def isBeingRemoved(self, queueId: str) -> bool:
        """
        Whether L{removeDelivered} is removing C{queueId} (for this
        process's readers it is gone already).
        """
        return queueId in self._removing

    def _removedBlocking(self, msgPath: str, statePath: str) -> None:
        """
        The disk part of L{removeDelivered}: runs in a thread.
        """
        _unlinkQuietly(statePath)
        self.queueSync.sync()
        _unlinkQuietly(msgPath)

    def auditEvent(self, event: str, **fields) -> defer.Deferred[None]:
        """
        Append a record to the audit log, if any, in the thread pool.  A
        failure is logged at critical level, never raised: the event (a
        delivery, a bounce) has happened whether or not it is recorded.
        """
        if self.audit is None:
            return defer.succeed(None)
        d = self._runBlocking(self._auditBlocking, event, fields)

        def failed(failure) -> None:
            log.critical(
                "AUDIT RECORD LOST: {what} of {queueId}: {error}",
                what=event,
                queueId=fields.get("queueId", "-"),
                error=failure.value,
            )

        return d.addCallbacks(lambda _: None, failed)

    def _auditBlocking(self, event: str, fields: dict) -> None:
        """
        The disk part of L{auditEvent}: runs in a thread.
        """
        assert self.audit is not None
        self.audit.append(event, **fields)

    def openMessage(self, queueId: str):
        """
        @return: the message file, opened for binary reading.
        """
        return open(self._paths(queueId)[0], "rb")

    def recover(self) -> list[str]:
        """
        Clean up after a crash: remove everything in C{tmp/} (never
        acknowledged), orphan message files and leftover temporary state
        files in C{queue/}.  A state file without its message cannot be
        delivered: it is renamed to C{.broken} and logged.

        @return: the ids of the complete entries.
        """
        for name in sorted(os.listdir(self.tmpDirectory)):
            log.info("recover: removing unacknowledged {name}", name=name)
            _unlinkQuietly(os.path.join(self.tmpDirectory, name))
        names = set(os.listdir(self.queueDirectory))
        for name in sorted(names):
            path = os.path.join(self.queueDirectory, name)
            if name.endswith(".tmp"):
                log.info("recover: removing interrupted state update {name}", name=name)
                _unlinkQuietly(path)
            elif name.endswith(".msg") and name[:-4] + ".json" not in names:
                log.info("recover: removing orphan message file {name}", name=name)
                _unlinkQuietly(path)
            elif name.endswith(".json") and name[:-5] + ".msg" not in names:
                log.critical(
                    "recover: state file {name} has no message file; set aside",
                    name=name,
                )
                os.replace(path, path + ".broken")
        fsyncDirectory(self.queueDirectory)
        ids = self.pending()
        log.info("recover: {count} message(s) in the queue", count=len(ids))
        return ids
