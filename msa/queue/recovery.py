# -*- test-case-name: tests.test_spool,tests.test_crash,tests.test_queuefile -*-
"""
The spool's recovery at the start (L{recoverSpool}): what a crash left
behind is cleaned up, and the entries of an earlier version are converted
to queue files (L{msa.queue.legacy}).  See L{msa.queue.spool} for the
layout.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.logger import Logger

from msa.durable import fsyncDirectory, unlinkQuietly
from msa.queue import legacy, queuefile

if TYPE_CHECKING:
    from msa.queue.spool import Spool

log = Logger()


def recoverSpool(spool: Spool) -> list[str]:
    """
    Remove everything in C{tmp/} (never acknowledged) and, in C{queue/},
    what an earlier version's interrupted changes left; convert the
    entries of an earlier version.  A queue file without a readable state,
    or an earlier version's state file without its message, cannot be
    delivered: it is renamed to C{.broken} and logged.  Blocks (at the
    start, before the reactor runs).

    @return: the ids of the complete entries.
    """
    for name in sorted(os.listdir(spool.tmpDirectory)):
        log.info("recover: removing unacknowledged {name}", name=name)
        unlinkQuietly(os.path.join(spool.tmpDirectory, name))
    queueDirectory = spool.queueDirectory
    names = set(os.listdir(queueDirectory))
    pairs = legacy.pairIds(names)
    for name in sorted(names):
        path = os.path.join(queueDirectory, name)
        stem, _, suffix = name.partition(".")
        if not suffix:
            _setAsideUnreadable(path)
        elif suffix == "tmp" or name.endswith(".json.tmp"):
            log.info("recover: removing interrupted state update {name}", name=name)
            unlinkQuietly(path)
        elif name.endswith(legacy.MESSAGE) and stem not in pairs:
            log.info("recover: removing orphan message file {name}", name=name)
            unlinkQuietly(path)
        elif name.endswith(legacy.STATE) and stem not in pairs:
            log.critical(
                "recover: state file {name} has no message file; set aside",
                name=name,
            )
            os.replace(path, path + ".broken")
    for queueId in sorted(pairs):
        if queueId in names:
            # Converted, the crash came before the pair was removed.
            legacy.removePair(queueDirectory, queueId)
            continue
        log.info("recover: converting {q} to a queue file", q=queueId)
        legacy.convert(queueDirectory, spool.tmpDirectory, queueId)
    fsyncDirectory(queueDirectory)
    ids = spool.pending()
    if spool.outcomes is not None:
        for queueId in sorted(spool.outcomes.ids() - set(ids)):
            log.info("recover: removing the outcome of gone {q}", q=queueId)
            spool.outcomes.forget(queueId)
    log.info("recover: {count} message(s) in the queue", count=len(ids))
    return ids


def _setAsideUnreadable(path: str) -> None:
    """
    Set aside the queue file at C{path} when it has no readable state
    (only a disk that lost acknowledged data does that).
    """
    try:
        queuefile.loadEntry(path)
    except queuefile.QueueFileError as e:
        log.critical(
            "recover: queue file {path} is unreadable ({e}); set aside",
            path=path,
            e=e,
        )
        os.replace(path, path + ".broken")
