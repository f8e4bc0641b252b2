# -*- test-case-name: tests.test_mailbox_pg -*-
"""
The database under the PostgreSQL mailbox store (L{msa.mailbox.pgstore}):
its tables, its advisory lock keys, and L{MailboxDatabase}, the store's
own thread pool with the connections it keeps between uses.

How to connect is given (the accounts' C{msa.accounts.pgstore.connect}:
its keepalives, time-outs and statement time-out, its messages without
passwords), so this package parses no URL.  Every statement runs on the
pool's threads, never on the reactor.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import psycopg
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from msa.threadpool import PrivatePool

__all__ = [
    "SCHEMA_SQL",
    "MailboxDatabase",
    "MailboxDatabaseError",
    "StoredRow",
    "listRows",
    "lockKey",
]

SCHEMA_SQL = [
    """CREATE TABLE IF NOT EXISTS msa_mailbox_messages (
        uid text PRIMARY KEY,
        id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        account text NOT NULL,
        delivered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        size bigint NOT NULL,
        sha256 text NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS msa_mailbox_messages_account
        ON msa_mailbox_messages (account, id)""",
    """CREATE INDEX IF NOT EXISTS msa_mailbox_messages_delivered_at
        ON msa_mailbox_messages (delivered_at)""",
    """CREATE TABLE IF NOT EXISTS msa_mailbox_chunks (
        uid text NOT NULL REFERENCES msa_mailbox_messages (uid) ON DELETE CASCADE,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (uid, seq)
    )""",
]


#: The server's side of the TCP keepalives (the client's are the accounts'
#: C{connect}'s): a POP3 session's lock lives in its connection's backend,
#: and the server must notice within seconds, not the kernel's two hours,
#: that an instance's host vanished without closing it.
SERVER_KEEPALIVES = (
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
)
#: The most milliseconds sent data may stay unacknowledged (PostgreSQL 12
#: and later).
SERVER_USER_TIMEOUT = "SET tcp_user_timeout = 15000"


def lockKey(purpose: str, account: str) -> int:
    """
    The advisory lock key (a signed 64-bit integer) of C{account} for
    C{purpose} (C{"session"}, C{"quota"}, C{"schema"}): distinct purposes
    never share a key, so a delivery does not wait for a POP3 session.
    """
    digest = hashlib.sha256(f"msa-mailbox\0{purpose}\0{account}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@attrs.frozen
class StoredRow:
    """
    One message of a mailbox, as a POP3 session's snapshot or a listing
    found it.

    @ivar uid: its unique id (POP3 UIDL).
    @ivar size: its length in octets.
    @ivar sha256: the hex SHA-256 delivered with it.
    @ivar deliveredAt: POSIX time of its delivery, by the database's clock
        (in a listing: the metrics, the admin tool).
    """

    uid: str
    size: int
    sha256: str
    deliveredAt: float = 0.0


def listRows(connection: Any, account: str | None) -> list[tuple[str, StoredRow]]:
    """
    The messages of C{account}'s mailbox (of every mailbox for L{None}),
    each with its account, in delivery order.
    """
    where, args = (
        ("WHERE account = %s", (account,)) if account is not None else ("", ())
    )
    rows = connection.execute(
        "SELECT account, uid, size, sha256, "
        "extract(epoch FROM delivered_at)::float8 "
        f"FROM msa_mailbox_messages {where} ORDER BY account, id",
        args,
    ).fetchall()
    return [(owner, StoredRow(*fields)) for owner, *fields in rows]


class MailboxDatabaseError(OSError):
    """
    The mailbox database cannot be reached or refused a statement; the
    message names it (without a password) and why.  An L{OSError}, as a
    Maildir's disk error is: the POP3 server answers it the same way.
    """


def oneLine(e: BaseException) -> str:
    """
    An error's message on one line.
    """
    return " ".join(str(e).split()) or e.__class__.__name__


class MailboxDatabase:
    """
    A thread pool of its own and the connections kept between uses: one
    per statement under way at the most, plus those POP3 sessions hold.

    @ivar where: the database, without a password, for messages and logs.
    """

    def __init__(
        self, connect: Callable[[], Any], where: str, reactor: Any, threads: int
    ) -> None:
        self.where = where
        self._connect = connect
        self._reactor = reactor
        self._threads = threads
        self._pool: ThreadPool | None = None
        self._idle: list[Any] = []
        self._idleLock = threading.Lock()
        self._schemaReady = False
        self._closed = False

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """
        Call C{f} on one of the pool's threads; after L{close} (a POP3
        session that outlives the store at shutdown releasing its lock) on
        the reactor's, which the reactor stops, rather than on a new pool
        that nothing would stop.
        """
        if self._closed:
            pool = self._reactor.getThreadPool()
            return threads.deferToThreadPool(self._reactor, pool, f, *args)
        if self._pool is None:
            self._pool = PrivatePool(0, self._threads, name="mailbox-db")
            self._pool.start()
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args)

    @contextmanager
    def errors(self) -> Iterator[None]:
        """
        Turn a driver's error into L{MailboxDatabaseError}.
        """
        try:
            yield
        except psycopg.Error as e:
            raise MailboxDatabaseError(f"{self.where}: {oneLine(e)}") from e

    def take(self, autocommit: bool = False) -> Any:
        """
        An idle connection that still answers (one kept from before the
        server restarted would fail the first statement given it), or a new
        one, the first of which creates the tables; blocking.

        @raise MailboxDatabaseError: when none can be had.
        """
        with self._idleLock:
            connection = self._idle.pop() if self._idle else None
        if connection is not None:
            try:
                connection.execute("SELECT 1")
                connection.rollback()
            except psycopg.Error:
                self.discard(connection)
                connection = None
        if connection is None:
            try:
                connection = self._connect()
            except Exception as e:
                raise MailboxDatabaseError(oneLine(e)) from e
            try:
                with self.errors():
                    for setting in SERVER_KEEPALIVES:
                        connection.execute(setting)
                    if connection.info.server_version >= 120000:
                        connection.execute(SERVER_USER_TIMEOUT)
                    connection.commit()
                    if not self._schemaReady:
                        self._ensureSchema(connection)
            except MailboxDatabaseError:
                self.discard(connection)
                raise
            self._schemaReady = True
        connection.autocommit = autocommit
        return connection

    def _ensureSchema(self, connection: Any) -> None:
        """
        Create the tables if missing (idempotent; instances starting
        together take turns).
        """
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (lockKey("schema", ""),))
            cursor.execute("SELECT to_regclass('msa_mailbox_chunks') IS NOT NULL")
            row = cursor.fetchone()
            if row is None or not row[0]:
                for statement in SCHEMA_SQL:
                    cursor.execute(statement)
        connection.commit()

    def giveBack(self, connection: Any) -> None:
        """
        Keep C{connection} for the next use if it is idle and open, else
        close it.
        """
        idle = psycopg.pq.TransactionStatus.IDLE
        if connection.closed or connection.info.transaction_status != idle:
            self.discard(connection)
            return
        with self._idleLock:
            self._idle.append(connection)

    def rollBack(self, connection: Any) -> None:
        """
        End C{connection}'s transaction without its changes and keep it,
        or close it if that fails.
        """
        try:
            connection.rollback()
        except psycopg.Error:
            self.discard(connection)
            return
        self.giveBack(connection)

    def discard(self, connection: Any) -> None:
        """
        Close C{connection} (which ends its transaction and its locks).
        """
        try:
            connection.close()
        except Exception:
            pass

    def close(self) -> defer.Deferred[None]:
        """
        Stop the threads (after the statements under way) and close the
        idle connections.
        """
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            self._closeIdle()
            return defer.succeed(None)
        pool.callInThread(self._closeIdle)
        return threads.deferToThread(pool.stop)

    def _closeIdle(self) -> None:
        with self._idleLock:
            idle, self._idle = self._idle, []
        for connection in idle:
            self.discard(connection)
