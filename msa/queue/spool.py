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
import json
import os
from collections.abc import Callable

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from msa import metrics
from msa.audit import AuditLog
from msa.durable import (
    DirectorySync,
    fsyncDirectory,
    writeDurably,
)
from msa.envelope import Envelope
from msa.interfaces import ISpool
from msa.queue.entry import (
    DELIVERED,
    FAILED,
    PENDING,
    SpoolEntry,
    _unlinkQuietly,
    encodeState,
    newQueueId,
)
from msa.queue.writer import WRITE_BUFFER, SpoolWriter

__all__ = [
    "DELIVERED",
    "FAILED",
    "PENDING",
    "WRITE_BUFFER",
    "Spool",
    "SpoolEntry",
    "SpoolWriter",
    "newQueueId",
]

log = Logger()


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
        writeDurably(statePath, encodeState(entry), tmpPath=statePath + ".tmp")

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
            metrics.auditRecordLost()
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
