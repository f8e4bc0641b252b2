# -*- test-case-name: tests.test_mailbox_pg_sessions -*-
"""
Messages leaving the PostgreSQL mailbox store (L{msa.mailbox.pgstore}):
deleted by their company at the end of a POP3 session, or expired after
C{[mailbox] expire_after}; each with an audit record once it is gone.

Every statement names the account beside the uids (a uid of another
account is never touched), and an expiry skips a mailbox that a POP3
session of any instance holds, as the Maildir store does.  Blocking: the
store calls these on its own threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger

from msa.audit import AuditError, AuditLog
from msa.errors import MailboxInUse
from msa.mailbox.pgdatabase import (
    MailboxDatabase,
    MailboxDatabaseError,
    StoredRow,
    listRows,
    lockKey,
)

__all__ = ["deleteMessages", "expireMessages", "removeMessages"]

log = Logger()

_OLD = "delivered_at < now() - make_interval(secs => %s)"


def deleteMessages(
    database: MailboxDatabase,
    audit: AuditLog | None,
    connection: Any,
    account: str,
    uids: Sequence[str],
) -> None:
    """
    Delete C{account}'s messages C{uids} in one transaction on a POP3
    session's C{connection} (in autocommit), durable at its COMMIT, with a
    C{mailbox-deleted} record each.
    """
    with database.errors(), connection.transaction():
        removed = connection.execute(
            "DELETE FROM msa_mailbox_messages WHERE account = %s "
            "AND uid = ANY(%s) RETURNING uid, size, sha256",
            (account, list(uids)),
        ).fetchall()
    _recordRemovals(audit, "mailbox-deleted", account, removed, "pop3")


def removeMessages(
    database: MailboxDatabase,
    audit: AuditLog | None,
    account: str,
    select: Callable[[StoredRow], bool],
    reason: str,
    auditFields: dict[str, Any],
) -> list[StoredRow]:
    """
    Delete the messages of C{account} that C{select} picks (the admin
    tool), under the account's session lock, with a C{mailbox-deleted}
    record each carrying C{auditFields}.

    @return: the messages deleted.
    @raise MailboxInUse: a POP3 session of any instance holds the mailbox.
    """
    connection = database.take(autocommit=True)
    key = lockKey("session", account)
    try:
        with database.errors():
            [locked] = connection.execute(
                "SELECT pg_try_advisory_lock(%s)", (key,)
            ).fetchone()
            if locked:
                try:
                    chosen = {
                        row.uid: row
                        for _, row in listRows(connection, account)
                        if select(row)
                    }
                    removed = connection.execute(
                        "DELETE FROM msa_mailbox_messages WHERE account = %s "
                        "AND uid = ANY(%s) RETURNING uid, size, sha256",
                        (account, list(chosen)),
                    ).fetchall()
                finally:
                    connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
    except MailboxDatabaseError:
        database.discard(connection)
        raise
    database.giveBack(connection)
    if not locked:
        raise MailboxInUse(account)
    _recordRemovals(audit, "mailbox-deleted", account, removed, reason, auditFields)
    return [chosen[uid] for uid, _, _ in removed]


def expireMessages(
    database: MailboxDatabase, audit: AuditLog | None, maxAge: float
) -> int:
    """
    Delete every message delivered more than C{maxAge} seconds ago by the
    database's clock (the same for every instance), account by account,
    each under the account's session lock (a mailbox in use is left for
    the next sweep), with a C{mailbox-expired} record each.

    @return: how many were deleted.
    @raise MailboxDatabaseError: the database failed (what was deleted
        before stays deleted, and recorded).
    """
    connection = database.take(autocommit=True)
    removed = 0
    try:
        with database.errors():
            accounts = connection.execute(
                f"SELECT DISTINCT account FROM msa_mailbox_messages WHERE {_OLD}",
                (maxAge,),
            ).fetchall()
            for (account,) in accounts:
                key = lockKey("session", account)
                [locked] = connection.execute(
                    "SELECT pg_try_advisory_lock(%s)", (key,)
                ).fetchone()
                if not locked:
                    log.info(
                        "Mailbox of {account} in use: expiry later", account=account
                    )
                    continue
                try:
                    rows = connection.execute(
                        "DELETE FROM msa_mailbox_messages WHERE account = %s "
                        f"AND {_OLD} RETURNING uid, size, sha256",
                        (account, maxAge),
                    ).fetchall()
                finally:
                    connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
                _recordRemovals(audit, "mailbox-expired", account, rows, "expired")
                removed += len(rows)
    except MailboxDatabaseError:
        database.discard(connection)
        raise
    database.giveBack(connection)
    return removed


def _recordRemovals(
    audit: AuditLog | None,
    event: str,
    account: str,
    removed: Sequence[tuple],
    reason: str,
    auditFields: dict[str, Any] | None = None,
) -> None:
    """
    One audit record per message removed: a fact (it is gone whether or
    not the record can be written; one that cannot is counted as lost by
    the audit log, and said here).
    """
    if audit is None:
        return
    for uid, size, sha256 in removed:
        try:
            audit.appendFact(
                event,
                account=account,
                uid=uid,
                size=size,
                sha256=sha256,
                reason=reason,
                **(auditFields or {}),
            )
        except AuditError as e:
            log.critical(
                "Audit record lost: {event} of {uid} in {account}: {why}",
                event=event,
                uid=uid,
                account=account,
                why=e,
            )
