# -*- test-case-name: tests.test_queuefile -*-
"""
Entries spooled by earlier versions: a pair of files per message,
C{queue/<id>.msg} (the message) and C{queue/<id>.json} (its state; format
version 1 without the recorded digest, version 2 with it).  See the
fixtures C{tests/fixtures/spool-v1} and C{spool-v2}.

The spool reads them as they are (L{loadPair}) and its recovery converts
each to a queue file (L{convert}): written in C{tmp/}, fsynced, renamed
into C{queue/}, the directory fsynced, and only then the pair removed.  A
crash in between leaves both; the queue file wins (it is whole: renamed
only once fsynced) and the next recovery removes the pair.
"""

from __future__ import annotations

import json
import os
import shutil

from msa.durable import fsyncDirectory, unlinkQuietly
from msa.queue import queuefile
from msa.queue.entry import SpoolEntry

#: The suffixes of an earlier version's pair.
MESSAGE, STATE = ".msg", ".json"


def pairPaths(queueDirectory: str, queueId: str) -> tuple[str, str]:
    """
    The message and state file of an earlier version's entry.
    """
    base = os.path.join(queueDirectory, queueId)
    return base + MESSAGE, base + STATE


def pairIds(names: set[str]) -> set[str]:
    """
    The ids of the complete pairs among the file names C{names}.
    """
    return {
        n[: -len(STATE)]
        for n in names
        if n.endswith(STATE) and n[: -len(STATE)] + MESSAGE in names
    }


def loadPair(queueDirectory: str, queueId: str) -> SpoolEntry:
    """
    @raise FileNotFoundError: when the pair is not there.
    @raise ValueError: when the state file is unreadable.
    """
    msgPath, statePath = pairPaths(queueDirectory, queueId)
    with open(statePath, "rb") as f:
        data = json.loads(f.read())
    return SpoolEntry.fromJSON(data, msgPath, os.stat(msgPath).st_size)


def removePair(queueDirectory: str, queueId: str) -> None:
    """
    Remove the pair, the state file first (a state file implies its
    message file).  The caller fsyncs the directory.
    """
    msgPath, statePath = pairPaths(queueDirectory, queueId)
    unlinkQuietly(statePath)
    unlinkQuietly(msgPath)


def convert(queueDirectory: str, tmpDirectory: str, queueId: str) -> None:
    """
    Replace the pair of C{queueId} with a queue file holding the same state
    and bytes, durably; blocks.
    """
    entry = loadPair(queueDirectory, queueId)
    slotSize = queuefile.slotSizeFor(entry.envelope)
    tmpPath = os.path.join(tmpDirectory, queueId)
    fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(queuefile.preamble(slotSize))
            out.write(queuefile.encodeSlot(entry.toJSON(), 1, slotSize))
            out.seek(queuefile.contentOffset(slotSize))
            with open(entry.messagePath, "rb") as message:
                shutil.copyfileobj(message, out)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlinkQuietly(tmpPath, keepErrors=True)
        raise
    os.close(fd)
    os.replace(tmpPath, os.path.join(queueDirectory, queueId))
    fsyncDirectory(queueDirectory)
    removePair(queueDirectory, queueId)
