# -*- test-case-name: tests.test_mailbox_pg -*-
"""
The mailboxes in PostgreSQL (R16), for several instances behind one
front: a message delivered over LMTP into any instance can be fetched over
POP3 from any other, because they all read and write one database (the one
that already holds the accounts).

Two tables, created by the first user under an advisory lock:
C{msa_mailbox_messages} (one row per message: uid, account, delivery time,
size, SHA-256) and C{msa_mailbox_chunks} (its bytes, in chunks of at most
1 MiB, deleted with it).  A message up to the size limit (50 MB) never
has to be in memory whole: a delivery streams the source file into chunks,
and a reader fetches one chunk at a time (L{msa.mailbox.pgsession}).

A delivery is one transaction per message and account: when its COMMIT
returns, the message is durable (PostgreSQL's C{synchronous_commit}, on by
default: the commit record is flushed to the write-ahead log first).  With
a quota, the transaction first takes an advisory transaction lock of the
account, so two instances delivering at once count each other's message
and cannot both pass.  If the connection is lost during the COMMIT itself,
the store looks for the message on a new connection before it answers, so
a message that did commit is not refused (and then delivered twice).

A POP3 session's lock is a session-level advisory lock held on a
connection of its own (L{msa.mailbox.pgsession}): the server drops it when
the session releases it, when the connection breaks and when the instance
dies, so a crash never leaves a mailbox locked.

Every statement runs on the store's own thread pool
(L{msa.mailbox.pgdatabase}; a message's chunks in the reader's thread),
never on the reactor.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import psycopg
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from msa.audit import AuditError, AuditLog
from msa.errors import MailboxInUse, SMTPReply
from msa.interfaces import IMailboxStore
from msa.mailbox.maildir import Quota
from msa.mailbox.pgdatabase import (
    MailboxDatabase,
    MailboxDatabaseError,
    StoredRow,
    listRows,
    lockKey,
    oneLine,
)
from msa.mailbox.pgremoval import expireMessages, removeMessages
from msa.mailbox.pgsession import PostgresMailbox

__all__ = ["CHUNK_SIZE", "MailboxDatabaseError", "PostgresMailboxStore"]

#: The most bytes of a message one row of C{msa_mailbox_chunks} holds.
CHUNK_SIZE = 1024 * 1024


def _readUpTo(source: BinaryIO, count: int) -> bytes:
    """
    Up to C{count} bytes of C{source}, fewer only at its end.
    """
    pieces = []
    while count > 0:
        piece = source.read(count)
        if not piece:
            break
        pieces.append(piece)
        count -= len(piece)
    return b"".join(pieces)


@implementer(IMailboxStore)
class PostgresMailboxStore:
    """
    The mailboxes of a PostgreSQL database; see the module docstring.

    @param connect: makes a new connection (not in autocommit); raises
        when it cannot (the accounts' C{msa.accounts.pgstore.connect}).
    @param where: the database, without a password, for messages and logs.
    @param audit: the audit log each delivery, deletion and expiry
        appends to, if any.
    @param quotaFor: the L{Quota} of an account.
    @param chunkSize: the most bytes of a message in one row (and in
        memory while it is copied or read).
    @param threads: the most statements under way at once (one connection
        each).
    @ivar delivered: deliveries made by this store (for the metrics).
    @ivar database: its threads and connections (L{MailboxDatabase}).
    """

    log = Logger()

    def __init__(
        self,
        connect: Callable[[], Any],
        where: str,
        reactor: Any = None,
        audit: AuditLog | None = None,
        quotaFor: Callable[[str], Quota] = lambda account: Quota(),
        chunkSize: int = CHUNK_SIZE,
        threads: int = 4,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.audit = audit
        self.quotaFor = quotaFor
        self.chunkSize = chunkSize
        self.delivered = 0
        self.database = MailboxDatabase(connect, where, reactor, threads)
        #: Releases under way, by account: an L{open} of the same account
        #: waits for them (a client that quits and comes straight back).
        self._releasing: dict[str, defer.Deferred[None]] = {}

    def close(self) -> defer.Deferred[None]:
        """
        Stop the store's threads (after the statements under way) and close
        its idle connections; the sessions' own close on release.
        """
        return self.database.close()

    # -- delivery --------------------------------------------------------

    def deliver(
        self,
        account: str,
        source: BinaryIO,
        size: int,
        sha256: str,
        auditFields: dict[str, Any] | None = None,
    ) -> defer.Deferred[str]:
        """
        Store one message durably in C{account}'s mailbox: see
        L{IMailboxStore.deliver} and the module docstring.  Fails with
        L{SMTPReply} 452 4.2.2 over quota, 451 4.3.0 when the database
        cannot take it (the core keeps it and tries again).

        @param auditFields: added to the C{mailbox-delivered} record.
        """
        return self.database.run(
            self._deliverBlocking, account, source, size, sha256, auditFields or {}
        )

    def _deliverBlocking(
        self,
        account: str,
        source: BinaryIO,
        size: int,
        sha256: str,
        auditFields: dict[str, Any],
    ) -> str:
        uid = uuid.uuid4().hex
        try:
            self._insert(account, uid, source, size, sha256)
        except (MailboxDatabaseError, OSError) as e:
            self.log.error(
                "Cannot deliver to the mailbox of {account} in {where}: {why}",
                account=account,
                where=self.database.where,
                why=oneLine(e),
            )
            raise SMTPReply(451, "4.3.0", "Cannot store the message, try again later")
        if self.audit is not None:
            try:
                self.audit.append(
                    "mailbox-delivered",
                    account=account,
                    uid=uid,
                    size=size,
                    sha256=sha256,
                    **auditFields,
                )
            except AuditError as e:
                self._undoDelivery(account, uid, e)
                raise SMTPReply(
                    451, "4.3.0", "Cannot store the message, try again later"
                )
        self.delivered += 1
        return uid

    def _insert(
        self, account: str, uid: str, source: BinaryIO, size: int, sha256: str
    ) -> None:
        """
        Copy the message in one transaction, committed when this returns.

        @raise SMTPReply: over quota (nothing stored).
        @raise MailboxDatabaseError: the database failed (nothing stored).
        @raise OSError: the source is not the C{size} octets of C{sha256}
            (nothing stored).
        """
        connection = self.database.take()
        committing = False
        try:
            with self.database.errors(), connection.cursor() as cursor:
                quota = self.quotaFor(account)
                if quota.limited:
                    cursor.execute(
                        "SELECT pg_advisory_xact_lock(%s)", (lockKey("quota", account),)
                    )
                    cursor.execute(
                        "SELECT count(*), coalesce(sum(size), 0) "
                        "FROM msa_mailbox_messages WHERE account = %s",
                        (account,),
                    )
                    messages, octets = cursor.fetchone()
                    quota.check(messages, int(octets), size)
                cursor.execute(
                    "INSERT INTO msa_mailbox_messages (uid, account, size, sha256) "
                    "VALUES (%s, %s, %s, %s)",
                    (uid, account, size, sha256),
                )
                self._copyChunks(cursor, uid, source, size, sha256)
                committing = True
                connection.commit()
        except MailboxDatabaseError:
            self.database.discard(connection)
            if committing and self._committed(uid):
                return
            raise
        except BaseException:
            self.database.rollBack(connection)
            raise
        self.database.giveBack(connection)

    def _copyChunks(
        self, cursor: Any, uid: str, source: BinaryIO, size: int, sha256: str
    ) -> None:
        digest = hashlib.sha256()
        copied = seq = 0
        while chunk := _readUpTo(source, self.chunkSize):
            digest.update(chunk)
            copied += len(chunk)
            cursor.execute(
                "INSERT INTO msa_mailbox_chunks (uid, seq, data) VALUES (%s, %s, %b)",
                (uid, seq, chunk),
            )
            seq += 1
        if copied != size or digest.hexdigest() != sha256:
            raise OSError(
                f"the source has {copied} octets (SHA-256 {digest.hexdigest()}),"
                f" not {size} (SHA-256 {sha256})"
            )

    def _committed(self, uid: str) -> bool:
        """
        Whether the message C{uid} is in the database, asked on a new
        connection after its COMMIT's answer was lost.
        """
        try:
            connection = self.database.take()
            with self.database.errors():
                found = connection.execute(
                    "SELECT 1 FROM msa_mailbox_messages WHERE uid = %s", (uid,)
                ).fetchone()
                connection.rollback()
        except MailboxDatabaseError:
            return False
        self.database.giveBack(connection)
        return found is not None

    def _undoDelivery(self, account: str, uid: str, why: Exception) -> None:
        """
        Remove a message whose audit record could not be written: it is
        refused, so it must not stay.
        """
        connection = None
        try:
            connection = self.database.take()
            with self.database.errors():
                connection.execute(
                    "DELETE FROM msa_mailbox_messages WHERE account = %s AND uid = %s",
                    (account, uid),
                )
                connection.commit()
        except MailboxDatabaseError as e:
            if connection is not None:
                self.database.discard(connection)
            self.log.critical(
                "Message {uid} stays in the mailbox of {account} without its "
                "audit record ({why}) and cannot be removed ({error}): the "
                "core, told 451, may deliver it again",
                uid=uid,
                account=account,
                why=why,
                error=e,
            )
            return
        self.database.giveBack(connection)

    # -- POP3 sessions ---------------------------------------------------

    def open(self, account: str) -> defer.Deferred[PostgresMailbox]:
        """
        Lock C{account}'s mailbox and take its snapshot: see
        L{IMailboxStore.open}.  Fails with L{MailboxInUse} when a session
        of any instance holds it, with L{MailboxDatabaseError} when the
        database cannot be reached.
        """
        pending = self._releasing.get(account)
        if pending is not None:
            waited: defer.Deferred[None] = defer.Deferred()
            pending.addCallback(waited.callback)
            return waited.addCallback(lambda _: self.open(account))
        return self.database.run(self._openBlocking, account)

    def _openBlocking(self, account: str) -> PostgresMailbox:
        connection = self.database.take(autocommit=True)
        try:
            with self.database.errors():
                [locked] = connection.execute(
                    "SELECT pg_try_advisory_lock(%s)", (lockKey("session", account),)
                ).fetchone()
                if locked:
                    rows = connection.execute(
                        "SELECT uid, size, sha256 FROM msa_mailbox_messages "
                        "WHERE account = %s ORDER BY id",
                        (account,),
                    ).fetchall()
        except MailboxDatabaseError:
            self.database.discard(connection)
            raise
        if not locked:
            self.database.giveBack(connection)
            raise MailboxInUse(account)
        return PostgresMailbox(
            self, account, connection, [StoredRow(*row) for row in rows]
        )

    # -- the admin tool and the metrics (blocking) ------------------------

    def _listing(self, account: str | None) -> list[tuple[str, StoredRow]]:
        connection = self.database.take(autocommit=True)
        try:
            with self.database.errors():
                rows = listRows(connection, account)
        except MailboxDatabaseError:
            self.database.discard(connection)
            raise
        self.database.giveBack(connection)
        return rows

    def listMessages(self, account: str) -> list[StoredRow]:
        """
        The messages waiting in C{account}'s mailbox, oldest first.

        @raise MailboxDatabaseError: the database failed.
        """
        return [row for _, row in self._listing(account)]

    def mailboxSummary(self) -> list[tuple[str, list[StoredRow]]]:
        """
        Every mailbox's account name and messages, oldest first (the
        metrics, C{mailbox list}).

        @raise MailboxDatabaseError: the database failed.
        """
        summary: dict[str, list[StoredRow]] = {}
        for account, row in self._listing(None):
            summary.setdefault(account, []).append(row)
        return list(summary.items())

    def removeMessages(
        self,
        account: str,
        select: Callable[[StoredRow], bool],
        reason: str,
        auditFields: dict[str, Any] | None = None,
    ) -> list[StoredRow]:
        """
        Remove the messages of C{account}'s mailbox that C{select} picks,
        under the mailbox's lock (the admin tool), with a
        C{mailbox-deleted} audit record each.

        @param auditFields: added to each record (who).
        @return: the messages removed.
        @raise MailboxInUse: a POP3 session of any instance holds it.
        @raise MailboxDatabaseError: the database failed.
        """
        return removeMessages(
            self.database, self.audit, account, select, reason, auditFields or {}
        )

    def _release(self, account: str, connection: Any) -> defer.Deferred[None]:
        """
        Unlock C{account}'s mailbox and keep C{connection} for other uses
        (or close it, which unlocks as well); never fails.
        """
        if connection is None:
            return defer.succeed(None)
        d = self.database.run(self._unlockBlocking, connection)
        self._releasing[account] = d

        def done(_: object) -> None:
            if self._releasing.get(account) is d:
                del self._releasing[account]

        return d.addBoth(done)

    def _unlockBlocking(self, connection: Any) -> None:
        try:
            connection.execute("SELECT pg_advisory_unlock_all()")
        except psycopg.Error:
            self.database.discard(connection)
            return
        self.database.giveBack(connection)

    # -- removal ---------------------------------------------------------

    def expire(self, maxAge: float) -> defer.Deferred[int]:
        """
        Remove every message delivered (by the database's clock, the same
        for every instance) more than C{maxAge} seconds ago, with a
        C{mailbox-expired} audit record each.  A mailbox that a POP3
        session of any instance holds is left for the next sweep.

        @return: a L{Deferred} firing with the number removed, or failing
            with L{MailboxDatabaseError}.
        """
        return self.database.run(
            expireMessages, self.database, self.audit, float(maxAge)
        )
