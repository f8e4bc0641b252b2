# -*- test-case-name: tests.test_spool,tests.test_crash,tests.test_faults -*-
"""
The durable spool: what makes "250 queued as ID" a promise.

Layout under the spool directory::

    tmp/<id>      message being received (never acknowledged)
    queue/<id>    committed message: one queue file (L{msa.queue.queuefile})
                  holding its state (the envelope, per-recipient status,
                  the SHA-256 of the acknowledged bytes: L{msa.queue.integrity})
                  and then its bytes, CRLF line ends, not dot-stuffed

A message is committed when C{queue/<id>} exists: its file, state and
content, is written in C{tmp/} and fsynced, renamed into C{queue/}, then
the directory is fsynced and the acceptance record appended to the audit
log; only then the 250.  A crash at any point leaves either nothing the
client was told about (C{tmp/}: emptied by L{Spool.recover}) or a complete
entry: every file in C{queue/} is whole.  One file created, one fsync, one
rename per message; the directory's fsync and the audit log's fdatasync
are one round of the spool's group commit (L{Spool.commits}, a
L{msa.groupcommit.GroupCommit}), shared with concurrent commits and
removals: a commit holds its round back, at most
L{msa.queue.commits.COMMIT_DELAY}, for
the messages being received beside it, so that under load one fsync of
the directory and one fdatasync of the audit log serve many messages; a
message alone never waits.

The fsyncs of a commit run in the reactor's thread pool (when the reactor has
one; with a fake reactor such as L{twisted.internet.task.Clock} they run
synchronously).  The writer's file is not touched by the reactor thread while
the commit runs.

A change of state (L{Spool.update}: a deferred attempt, a recipient
delivered while another is deferred, a hold, a release) is one C{pwrite}
of the new state into the queue file's other state slot and one
C{fdatasync}: no new file, no rename, no directory fsync.  A deferral is
recorded durably too (its attempt count, next attempt and last reply feed
the backoff, the expiry notice and C{queue show}); it is the rare path, and
costs one fdatasync.  A hold is a state like any other, not a move to
another directory: one C{fdatasync} either way, and C{queue/} stays the
one place the relay looks.

A delivered message leaves with one C{unlink}; the runner's attempt ends
only once the directory's fsync (group-committed with other commits and
removals) made the removal durable.  No "done" mark is written before:
a crash between the core's 250 and that fsync could bring the file back
and deliver it again, which is the window SMTP itself leaves open (the
core's 250 lost on the wire does the same), and was so before.  Marking
every recipient done with its own fdatasync before the unlink would close
only the power-loss half of that window and cost a second fsync per
message.

Entries spooled by an earlier version (C{queue/<id>.msg} and
C{queue/<id>.json}, L{msa.queue.legacy}) are read as they are and
converted to queue files by L{Spool.recover} at the start.

The changes of an entry (L{Spool.update}, L{Spool.remove}) are made in the
thread pool too, so that no session waits for their fsyncs; their order is
kept: the disk work for one entry runs one change at a time, in the order
asked, and the readers of this process (L{Spool.pending}, L{Spool.load})
see each change as soon as it is asked for (the newest state of an entry,
an entry being removed gone), so that the relay's decisions are exact
while the disk catches up.  A change the disk refuses is undone for the
readers, and its L{Deferred} fails.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from typing import BinaryIO

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from zope.interface import implementer

from msa.audit import AuditLog
from msa.durable import unlinkQuietly
from msa.envelope import Envelope
from msa.interfaces import ISpool
from msa.queue import legacy, queuefile
from msa.queue.commits import SpoolCommits
from msa.queue.entry import (
    DELIVERED,
    FAILED,
    PENDING,
    SpoolEntry,
    encodeState,
    newQueueId,
)
from msa.queue.outcomes import OutcomeLedger
from msa.queue.recovery import recoverSpool
from msa.queue.writer import WRITE_BUFFER, SpoolWriter
from msa.threadpool import runBlocking

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

#: How many just-committed entries L{Spool.remember} keeps for their first
#: load (a few hundred bytes each).
FRESH_AT_MOST = 1000


@implementer(ISpool)
class Spool:
    """
    The queue directory; see the module docstring.

    @param directory: created (mode 0700) if missing.
    @param reactor: supplies time and the thread pool for the fsyncs.
    @param outcomesDirectory: where the outcomes go that the spool could
        not record (L{msa.queue.outcomes}); on another file system than
        C{directory}, or it helps nothing.  L{None}: nowhere.
    """

    def __init__(
        self, directory: str, reactor=None, outcomesDirectory: str | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.directory = directory
        self.tmpDirectory = os.path.join(directory, "tmp")
        self.queueDirectory = os.path.join(directory, "queue")
        for d in (directory, self.tmpDirectory, self.queueDirectory):
            os.makedirs(d, mode=0o700, exist_ok=True)
        #: The group commit of C{queue/}'s fsyncs, the acceptance records
        #: and the removals (L{msa.queue.commits}).
        self.commits = SpoolCommits(self, reactor)
        #: The audit log (L{msa.audit}) each commit appends to, if any.
        self.audit: AuditLog | None = None
        self._listeners: list[Callable[[str], object]] = []
        #: Entries being removed by L{removeDelivered}: already gone for
        #: the readers of this process.
        self._removing: set[str] = set()
        #: Entries just committed by this process, as their first load
        #: would read them (L{remember}): the relay's load of a new message
        #: reads no file.  At most L{FRESH_AT_MOST}, the oldest dropped.
        self._fresh: dict[str, SpoolEntry] = {}
        #: The newest state of entries whose L{update} is not on disk yet.
        self._unwritten: dict[str, bytes] = {}
        #: Per entry being changed, the lock that keeps its changes in order.
        self._changing: dict[str, defer.DeferredLock] = {}
        #: Per queue file, where its state in force is, when this process
        #: knows it durable (it wrote and synced it): the next state goes
        #: into the other slot.  For any other, the first change of this
        #: process syncs the file first (L{_updatedBlocking}).
        self._slots: dict[str, queuefile.QueueFileState] = {}
        #: Whether an earlier version's pairs may be in C{queue/}: until a
        #: listing (L{pending}, which recovery ends with, after converting
        #: them all) found none.  This version never writes one, so while
        #: it is false a removal need not look for one (an lstat fewer).
        self._pairsMayExist = True
        #: The outcomes the spool could not record (L{recordOutcome}).
        self.outcomes = (
            None if outcomesDirectory is None else OutcomeLedger(outcomesDirectory)
        )

    def _runBlocking(self, f, *args) -> defer.Deferred:
        return runBlocking(self.reactor, f, *args)

    def _inOrder(self, queueId: str, f, *args) -> defer.Deferred:
        """
        Run C{f(*args)} as L{_runBlocking} does, after the changes of
        C{queueId} asked for before, and before those asked for after.
        """
        lock = self._changing.setdefault(queueId, defer.DeferredLock())
        d = lock.run(self._runBlocking, f, *args)

        def done(result: object) -> object:
            if not lock.locked and not lock.waiting:
                self._changing.pop(queueId, None)
            return result

        return d.addBoth(done)

    # Writing side.

    def newMessage(self, envelope: Envelope) -> SpoolWriter:
        envelope.queueId = newQueueId()
        writer = SpoolWriter(self, envelope)
        self.commits.writerOpened(writer)
        return writer

    @property
    def receiving(self) -> int:
        """
        How many messages are being received (or committed) now: open
        writers (L{newMessage}) not yet committed, failed or aborted.
        """
        return self.commits.receiving()

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

    def queuePath(self, queueId: str) -> str:
        """
        The queue file of C{queueId} (L{msa.queue.queuefile}).
        """
        return os.path.join(self.queueDirectory, queueId)

    def pending(self) -> list[str]:
        """
        The ids of the complete entries in the queue, oldest first.
        """
        names = set(os.listdir(self.queueDirectory))
        pairs = legacy.pairIds(names)
        self._pairsMayExist = bool(pairs)
        ids = {n for n in names if "." not in n} | pairs
        return sorted(ids - self._removing)

    def load(self, queueId: str) -> SpoolEntry:
        """
        @raise FileNotFoundError: when the entry is not (or no longer) there.
        @raise ValueError: when its state is unreadable.
        """
        path = self.queuePath(queueId)
        if queueId in self._removing:
            raise FileNotFoundError(errno.ENOENT, "being removed", path)
        fresh = self._fresh.pop(queueId, None)
        if (
            fresh is not None
            and queueId not in self._unwritten
            and (self.outcomes is None or self.outcomes.state(queueId) is None)
        ):
            return fresh
        try:
            entry, _ = queuefile.loadEntry(path)
        except FileNotFoundError:
            entry = legacy.loadPair(self.queueDirectory, queueId)
        state = self._unwritten.get(queueId)
        if state is None and self.outcomes is not None:
            state = self.outcomes.state(queueId)
        if state is not None:
            newer = SpoolEntry.fromJSON(
                json.loads(state), entry.messagePath, entry.size
            )
            newer.contentOffset = entry.contentOffset
            entry = newer
        return entry

    def remember(self, entry: SpoolEntry) -> None:
        """
        C{entry} was just committed: its first L{load} returns it as it is
        (the caller's to change) instead of reading its queue file.
        """
        self._fresh[entry.queueId] = entry
        if len(self._fresh) > FRESH_AT_MOST:
            del self._fresh[next(iter(self._fresh))]

    def update(self, entry: SpoolEntry) -> defer.Deferred[None]:
        """
        Replace the state of C{entry}, atomically and durably, in the thread
        pool (L{msa.queue.queuefile.writeState}: the other state slot of its
        queue file written, then fdatasynced).  Readers in this process see
        the new state at once.

        @return: a L{Deferred} firing when the new state is durable, or
            failing with the L{OSError}: the old state is then left, on
            disk and for the readers.
        """
        queueId = entry.queueId
        self._fresh.pop(queueId, None)
        state = encodeState(entry)
        self._unwritten[queueId] = state
        d = self._inOrder(queueId, self._updatedBlocking, queueId, json.loads(state))

        def written(result: object) -> object:
            if self._unwritten.get(queueId) is state:
                del self._unwritten[queueId]
            return result

        return d.addBoth(written)

    def _updatedBlocking(self, queueId: str, state: dict) -> None:
        """
        The disk part of L{update}: runs in a thread.  An entry of an
        earlier version is converted to a queue file first.
        """
        path = self.queuePath(queueId)
        if not os.path.exists(path) and legacy.pairIds(
            set(os.listdir(self.queueDirectory))
        ) >= {queueId}:
            legacy.convert(self.queueDirectory, self.tmpDirectory, queueId)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            where = self._slots.pop(queueId, None)
            if where is None:
                # Written by another process, which may have died before
                # its state was durable: make it so before the other slot,
                # which may hold the last durable state, is overwritten.
                _, where = queuefile.readState(fd)
                os.fdatasync(fd)
            try:
                queuefile.writeState(fd, state, where)
            except OSError:
                # The slot may hold the refused state: void it, so that the
                # old one is in force again (the next change re-reads).
                queuefile.voidSlot(fd, where)
                raise
            self._slots[queueId] = where
        finally:
            os.close(fd)
        if self.outcomes is not None:
            # The spool's state is the newest again.
            self.outcomes.forget(queueId)

    def recordOutcome(self, entry: SpoolEntry) -> defer.Deferred[None]:
        """
        Record the new state of C{entry} where the spool could not (see
        L{msa.queue.outcomes}), durably, in the thread pool, after the
        changes of the entry asked before.  L{load} prefers it from now on,
        in this process and after a restart.

        @return: a L{Deferred} firing when it is durable, or failing (with
            L{OSError}; with L{FileNotFoundError} when there is nowhere to
            record it).
        """
        if self.outcomes is None:
            return defer.fail(FileNotFoundError("no directory for outcomes"))
        return self._inOrder(
            entry.queueId, self.outcomes.record, entry.queueId, encodeState(entry)
        )

    def remove(self, queueId: str) -> defer.Deferred[None]:
        """
        Remove an entry that was not delivered (the operator's delete, a
        commit aborted by its client): the same removal as
        L{removeDelivered}.
        """
        return self.removeDelivered(queueId)

    def removeDelivered(self, queueId: str) -> defer.Deferred[None]:
        """
        Remove an entry, with the disk work off the calling (reactor)
        thread: the entry is gone for every reader in this process as soon
        as this returns; then, in the reactor's thread pool, after the
        changes asked before, its queue file is removed; then the
        directory is fsynced, shared with concurrent commits and removals
        (a round of L{commits}: the removal waits up to
        L{msa.queue.commits.REMOVAL_GATHER}
        for company, holding no thread).

        @return: a L{Deferred} firing when the removal is durable, or
            failing with the L{OSError}: when the file could not be
            removed, the entry is unchanged (and visible again); when the
            fsync failed, the entry is gone (and may come back after a
            crash, to be delivered again).
        """
        self._removing.add(queueId)
        self._fresh.pop(queueId, None)
        if queueId in self._changing:
            # After the changes of the entry still being written.
            d = self._inOrder(queueId, self._removedBlocking, queueId)
            d.addCallback(lambda _: self.commits.commit(None))
        else:
            # The unlink in the round itself: no thread hand-off of its own.
            d = self.commits.remove(queueId)
        if self.outcomes is not None and queueId in self.outcomes:
            d.addCallback(lambda _: self._runBlocking(self._forgetOutcome, queueId))

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

    def _removedBlocking(self, queueId: str) -> None:
        """
        The unlink of L{removeDelivered}: runs in a thread.
        """
        self.unlinkEntry(queueId, self.commits.syncBlocking)

    def unlinkEntry(self, queueId: str, syncQueue: Callable[[], None]) -> None:
        """
        Unlink the queue file of C{queueId} (in a thread); an earlier
        version's pair goes state file first, made durable with
        C{syncQueue}, then the message.
        """
        self._slots.pop(queueId, None)
        unlinkQuietly(self.queuePath(queueId))
        if not self._pairsMayExist:
            return
        msgPath, statePath = legacy.pairPaths(self.queueDirectory, queueId)
        if os.path.lexists(statePath):
            # An earlier version's entry: its state file first, durably,
            # and only then its message (a state file implies its message).
            unlinkQuietly(statePath)
            syncQueue()
            unlinkQuietly(msgPath)

    def _forgetOutcome(self, queueId: str) -> None:
        """
        After a removal, its outcome (L{recordOutcome}) goes: runs in a
        thread.
        """
        assert self.outcomes is not None
        try:
            self.outcomes.forget(queueId)
        except OSError as e:
            # The entry is gone: its outcome is dropped by recover().
            log.error("cannot forget the outcome of {q}: {e}", q=queueId, e=e)

    def auditEvent(self, event: str, **fields) -> defer.Deferred[None]:
        """
        Append a record to the audit log, if any, in the thread pool
        (L{msa.audit.AuditLog.submitFact}: holding no thread while its
        round waits, and for company).  A failure is logged at critical
        level, never raised: the event (a delivery, a bounce) has happened
        whether or not it is recorded.
        """
        if self.audit is None:
            return defer.succeed(None)
        if IReactorThreads.providedBy(self.reactor):
            d: defer.Deferred = self.audit.submitFact(event, **fields)
        else:
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
        self.audit.appendFact(event, **fields)

    def openMessage(self, queueId: str, entry: SpoolEntry | None = None) -> BinaryIO:
        """
        @param entry: the entry of C{queueId} as the caller just loaded it
            (where its content is), which saves reading its queue file
            again; L{None}: loaded here.
        @return: the message (the trace header, then the message), opened
            for binary reading (L{msa.queue.queuefile.openContent}).
        """
        return queuefile.openContent(entry or self.load(queueId))

    def recover(self) -> list[str]:
        """
        Clean up after a crash and convert the entries of an earlier
        version: see L{msa.queue.recovery.recoverSpool}.

        @return: the ids of the complete entries.
        """
        return recoverSpool(self)
