# -*- test-case-name: tests.test_commitdelay,tests.test_groupcommit,tests.test_spool -*-
"""
The spool's group commit (L{SpoolCommits}): each round unlinks the queue
files of the removals it carries, fsyncs C{queue/} once (for the commits'
renames and those unlinks), then appends the commits' acceptance records to
the audit log in one round of its own (one write, one fdatasync).

A commit (L{msa.queue.writer.SpoolWriter}, in a thread) joins a round and
waits for it; a removal (from the reactor) joins one and is told through a
L{Deferred}, waiting up to L{REMOVAL_GATHER} for company (a commit's round,
mostly).  A commit holds its round back, at most L{COMMIT_DELAY}, for the
messages being received beside it (their data arriving or being
committed): under load one fsync of C{queue/} and one fdatasync of the
audit log serve many messages; a message alone never waits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from msa.audit import AuditError
from msa.durable import fsyncDirectory
from msa.groupcommit import GroupCommit

if TYPE_CHECKING:
    from msa.queue.spool import Spool

__all__ = ["COMMIT_DELAY", "GATHER_AT_MOST", "REMOVAL_GATHER", "SpoolCommits"]

#: How long the fsync of C{queue/} after a removal waits for company (a
#: commit's, mostly), in seconds.  No client's reply waits for it, nor the
#: relay's delivery slot (L{msa.relay.runner.RelayRunner._settle}).
REMOVAL_GATHER = 0.1

#: How long, at most, a commit holds its round back for the messages
#: close behind it (their data being received or committed), in seconds:
#: the commit delay of L{GroupCommit} (C{[spool] commit_delay}'s default).
#: In bench/run.py's relay burst (C=50; one run of two repetitions) the
#: fsync and fdatasync calls per message were 1.67 at 0.01, 1.50 at 0.02
#: and 1.40 at 0.05, none of them slower; at 0.05 the (b) scenario (20
#: messages per connection) was.  At 0.02 they rise above 1.5 when the
#: machine is slow (1.47 to 1.53 over the runs of one evening: fewer
#: messages per round at a lower rate); at 0.03, 1.44 in a slow run, with
#: the accepted rate within the runs' spread (relay 161 against 165, (b)
#: 256 against 263 msgs/s, 3 alternated repetitions).
COMMIT_DELAY = 0.03

#: A round held back for company stops waiting once this many commits have
#: joined it (each holds one of the reactor pool's ten threads meanwhile).
GATHER_AT_MOST = 6

#: A job of a round: an acceptance record, a queue id to remove, or L{None}
#: (only the directory's fsync).
Job = dict[str, Any] | str | None
#: What a round gives each job: the record's C{seq}, the error that failed
#: it alone (an unlink's, the audit log's), or L{None}.
Outcome = int | OSError | AuditError | None


def raiseOutcome(outcome: Outcome) -> None:
    """
    A job's outcome as its caller's: the error raised.
    """
    if isinstance(outcome, BaseException):
        raise outcome


class SpoolCommits(GroupCommit[Job, Outcome]):
    """
    The group commit of one L{Spool}; see the module docstring.

    @ivar directoryFsync: the fsync of C{queue/} (replaced by the
        fault-injection tests).
    """

    def __init__(self, spool: Spool, reactor: Any) -> None:
        super().__init__(
            self._round,
            reactor,
            gatherDelay=REMOVAL_GATHER,
            commitDelay=COMMIT_DELAY,
            company=self._companyComing,
        )
        self._spool = spool
        self.directoryFsync: Callable[[str], None] = fsyncDirectory
        #: The writers whose data is being received or committed: the
        #: company a commit waits for.
        self._writers: weakref.WeakSet[Any] = weakref.WeakSet()

    def writerOpened(self, writer: object) -> None:
        """
        A message's data is being received: its commit will come.
        """
        self._writers.add(writer)

    def receiving(self) -> int:
        """
        How many messages are being received or committed now.
        """
        return len(self._writers)

    def writerClosed(self, writer: object) -> None:
        """
        C{writer} is done (committed, failed or aborted): no commit of its
        is on its way any more.
        """
        self._writers.discard(writer)

    def _companyComing(self, joined: int) -> bool:
        """
        Whether more commits are on their way than the C{joined} of a round
        (read in a thread).  Once L{GATHER_AT_MOST} have joined, no more are
        waited for: each waits in a thread of the reactor's pool, which the
        others need to get there.
        """
        return joined < GATHER_AT_MOST and len(self._writers) > joined

    def commitAccepted(self, record: dict[str, Any] | None) -> None:
        """
        A commit's renamed queue file made durable, and its acceptance
        record (if any) with it; blocks (in a thread).

        @raise OSError: the fsync's.
        @raise AuditError: the audit log's.
        """
        raiseOutcome(self.commitBlocking(record))

    def syncBlocking(self) -> None:
        """
        Make the entries of C{queue/} durable in a round; blocks (in a
        thread).

        @raise OSError: the fsync's.
        """
        self.commitBlocking(None)

    def remove(self, queueId: str) -> defer.Deferred[None]:
        """
        Unlink the queue file of C{queueId} and make that durable, in the
        next round (from the reactor thread).

        @return: a L{Deferred} firing once durable, or failing with the
            unlink's or the fsync's L{OSError}.
        """
        return self.commit(queueId).addCallback(raiseOutcome)

    def _fsync(self) -> None:
        self.directoryFsync(self._spool.queueDirectory)

    def _round(self, jobs: list[Job]) -> list[Outcome]:
        """
        One round (in a thread, one at a time): the removals' unlinks,
        C{queue/} fsynced, then the acceptance records in one round of the
        audit log.  A failed fsync fails the whole round; a failed unlink
        only its removal, a failed audit write only the jobs with a record:
        their result is the error.

        @return: per job, the record's C{seq}, the error, or L{None}.
        """
        unlinked: dict[int, OSError] = {}
        for index, job in enumerate(jobs):
            if isinstance(job, str):
                try:
                    self._spool.unlinkEntry(job, self._fsync)
                except OSError as e:
                    unlinked[index] = e
        self._fsync()
        results: list[Outcome] = [unlinked.get(i) for i in range(len(jobs))]
        records = [(i, job) for i, job in enumerate(jobs) if isinstance(job, dict)]
        audit = self._spool.audit
        if not records or audit is None:
            return results
        try:
            seqs = audit.appendAll([record for _, record in records])
        except AuditError as e:
            for index, _ in records:
                results[index] = e
        else:
            for (index, _), seq in zip(records, seqs, strict=True):
                results[index] = seq
        return results
