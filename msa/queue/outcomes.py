# -*- test-case-name: tests.test_unrecorded -*-
"""
The outcomes the spool could not record (L{OutcomeLedger}).

When the core MTA has accepted or refused a message and the spool cannot
record it (the spool's file system was remounted read-only: the queue file
can be neither changed nor removed), sending the message again would
deliver it twice.  The relay then writes the entry's new state here, in a
directory on another file system (under the state directory), durably:
L{msa.queue.spool.Spool.load} prefers it to the spool's own state, in
this process and after a restart, so the message stays known as delivered
(C{queue list} shows its recipients delivered and the entry held) and is
never attempted again; once the spool can be changed again, the relay
removes the entry and, with it, its outcome here.

When the state directory is on the spool's (read-only) file system too,
nothing can be written anywhere: the relay holds the entry in memory only,
and says so at critical level.
"""

from __future__ import annotations

import os

from msa.durable import fsyncDirectory, unlinkQuietly, writeDurably

#: The ledger's directory, in the server's state directory.
OUTCOMES_DIRECTORY = "unrecorded-outcomes"


def outcomesDirectoryIn(stateDirectory: str) -> str:
    """
    The ledger's directory of a server whose state directory is
    C{stateDirectory}: where the daemon writes and the admin command reads.
    """
    return os.path.join(stateDirectory, OUTCOMES_DIRECTORY)


class OutcomeLedger:
    """
    C{<directory>/<queueId>.json}: the newest state of an entry, as
    L{msa.queue.entry.encodeState} writes it.  The methods that write
    block (call them in a thread); the set of ids is read once, at start.

    @param directory: created (mode 0700) at the first L{record}.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            names = []
        self._ids = {n[:-5] for n in names if n.endswith(".json")}

    def _path(self, queueId: str) -> str:
        return os.path.join(self.directory, queueId + ".json")

    def __contains__(self, queueId: str) -> bool:
        return queueId in self._ids

    def ids(self) -> set[str]:
        return set(self._ids)

    def state(self, queueId: str) -> bytes | None:
        """
        The recorded state of C{queueId}, or L{None}.
        """
        if queueId not in self._ids:
            return None
        try:
            with open(self._path(queueId), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def record(self, queueId: str, state: bytes) -> None:
        """
        Write C{state} for C{queueId} durably.

        @raise OSError: when it cannot be written.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        writeDurably(self._path(queueId), state)
        self._ids.add(queueId)

    def forget(self, queueId: str) -> None:
        """
        Remove the state of C{queueId} (the spool has recorded a newer one,
        or the entry is gone), durably: an older state coming back after a
        crash would override the spool's.
        """
        if queueId not in self._ids:
            return
        unlinkQuietly(self._path(queueId))
        self._ids.discard(queueId)
        fsyncDirectory(self.directory)
