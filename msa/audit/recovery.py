# -*- test-case-name: tests.test_audit -*-
"""
What the daemon does with the audit log at start, after the spool's
recovery: L{recoverRecords}.  See L{msa.audit}.
"""

from __future__ import annotations

import json
from typing import Any

from msa.audit.chain import chainFiles, timestamp
from msa.audit.log import AuditLog


def recoverRecords(audit: AuditLog, spool: Any) -> list[str]:
    """
    At start, after the spool's recovery: record the queued messages that
    were committed just before a crash, before their acceptance record was
    durable (their client got no 250, but the MSA delivers them as any
    message whose final dot was taken), so that nothing leaves the queue
    unrecorded.  Each gets a C{recovered} record.

    Looked for in the current file and its newest predecessor: a message
    queued since the first record there with no C{accepted} or
    C{dsn-queued} record.  (Messages older than that, or queued before the
    log existed, are not looked at.)

    @param spool: a L{msa.queue.spool.Spool} (C{pending()}, C{load(id)}).
    @return: the queue ids recorded.
    """
    files = chainFiles(audit.path)[-2:]
    recorded: set[str] = set()
    since = ""
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                since = since or str(record.get("time", ""))
                if record.get("event") in ("accepted", "dsn-queued", "recovered"):
                    recorded.add(str(record.get("queueId")))
    if not since:
        return []
    found = []
    for queueId in spool.pending():
        if queueId in recorded:
            continue
        try:
            entry = spool.load(queueId)
        except (OSError, ValueError):
            continue
        if timestamp(entry.createdAt) < since:
            continue
        envelope = entry.envelope
        audit.append(
            "recovered",
            queueId=queueId,
            account=envelope.account,
            client=envelope.clientAddress,
            sender=envelope.sender,
            recipients=list(envelope.recipients),
            size=entry.size,
            reason="committed just before a crash, before its acceptance record: "
            "the client got no 250; it is delivered",
        )
        found.append(queueId)
    return found
