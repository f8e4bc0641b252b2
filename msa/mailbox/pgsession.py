# -*- test-case-name: tests.test_mailbox_pg_sessions -*-
"""
One mailbox of the PostgreSQL store (L{msa.mailbox.pgstore}) locked for a
POP3 session (L{PostgresMailbox}), and a message of it read chunk by chunk
(L{MessageReader}).

The session owns one database connection for its whole life: the
session-level advisory lock that keeps every other session out, on any
instance, lives on it, so it ends with the session (L{release}), with the
connection, and with the instance that held it (the server drops a dead
client's locks).  The connection is in autocommit: each read is one
statement, and L{PostgresMailbox.commitDeletions} is one explicit
transaction.

Every statement names the session's account beside the uid, so a uid of
another account reads and deletes nothing, whatever the caller passes.
"""

from __future__ import annotations

import errno
import hashlib
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from zope.interface import implementer

from msa.envelope import StoredMessage
from msa.interfaces import IMailbox
from msa.mailbox.pgdatabase import StoredRow
from msa.mailbox.pgremoval import deleteMessages

if TYPE_CHECKING:
    from msa.mailbox.pgstore import PostgresMailboxStore

__all__ = ["MessageReader", "PostgresMailbox", "StoredRow"]

_READ_CHUNK = """
    SELECT c.data FROM msa_mailbox_chunks c
    JOIN msa_mailbox_messages m ON m.uid = c.uid
    WHERE m.account = %s AND c.uid = %s AND c.seq = %s
"""


class MessageReader(io.RawIOBase):
    """
    A message of the database as a readable binary file: one chunk (at most
    the store's chunk size) is in memory at a time, fetched when the
    previous one is used up.  Its reads block: the caller reads in a thread
    (as it reads a Maildir file), never on the reactor.

    At the end the bytes read are checked against the size and SHA-256 of
    the delivery: a message that comes out shorter, longer or different
    raises L{OSError} instead of ending, so a client never receives a
    damaged message as a whole one.

    @ivar chunksRead: how many chunks were fetched so far.
    """

    def __init__(self, fetch: Callable[[int], bytes | None], row: StoredRow) -> None:
        super().__init__()
        self._fetch = fetch
        self._row = row
        self._buffer = memoryview(b"")
        self._served = 0
        self._digest = hashlib.sha256()
        self.chunksRead = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        if self.closed:
            raise ValueError("read of a closed message")
        if not self._buffer:
            if self._served >= self._row.size:
                return 0
            self._nextChunk()
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def _nextChunk(self) -> None:
        chunk = self._fetch(self.chunksRead)
        self.chunksRead += 1
        if not chunk:
            raise self._damaged(f"ends after {self._served} octets")
        self._served += len(chunk)
        self._digest.update(chunk)
        if self._served > self._row.size:
            raise self._damaged(f"has more than {self._row.size} octets")
        if self._served == self._row.size and (
            self._digest.hexdigest() != self._row.sha256
        ):
            raise self._damaged(f"has SHA-256 {self._digest.hexdigest()}")
        self._buffer = memoryview(chunk)

    def _damaged(self, what: str) -> OSError:
        return OSError(
            errno.EIO,
            f"message {self._row.uid} {what}; it was delivered with "
            f"{self._row.size} octets, SHA-256 {self._row.sha256}",
        )

    def close(self) -> None:
        self._buffer = memoryview(b"")
        super().close()


@implementer(IMailbox)
class PostgresMailbox:
    """
    A mailbox locked by L{PostgresMailboxStore.open} for one POP3 session:
    its snapshot, in delivery order, and the connection holding its lock.
    Nothing in the database changes until L{commitDeletions}.
    """

    def __init__(
        self,
        store: PostgresMailboxStore,
        account: str,
        connection: Any,
        rows: Sequence[StoredRow],
    ) -> None:
        self.account = account
        self._store = store
        self._connection: Any = connection
        self._rows = {row.uid: row for row in rows}
        self._order = [row.uid for row in rows]
        self._released: defer.Deferred[None] | None = None

    def messages(self) -> list[StoredMessage]:
        return [
            StoredMessage(uid=uid, size=self._rows[uid].size) for uid in self._order
        ]

    def _row(self, uid: str) -> StoredRow:
        """
        @raise KeyError: C{uid} is not in this session's snapshot (another
            account's, deleted, or made up), or the session is released.
        """
        if self._connection is None:
            raise KeyError(f"the mailbox of {self.account} is released")
        return self._rows[uid]

    def openMessage(self, uid: str) -> defer.Deferred[MessageReader]:
        """
        See L{IMailbox.openMessage}: fails with L{KeyError} for a uid not in
        the snapshot, with L{FileNotFoundError} when the message is no
        longer in the database.
        """
        try:
            row = self._row(uid)
        except KeyError as e:
            return defer.fail(e)
        return self._store.database.run(self._openBlocking, self._connection, row)

    def _openBlocking(self, connection: Any, row: StoredRow) -> MessageReader:
        with self._store.database.errors():
            found = connection.execute(
                "SELECT 1 FROM msa_mailbox_messages WHERE account = %s AND uid = %s",
                (self.account, row.uid),
            ).fetchone()
        if found is None:
            raise FileNotFoundError(
                errno.ENOENT, f"message {row.uid} of {self.account} is gone"
            )

        def fetch(seq: int) -> bytes | None:
            if self._connection is not connection:
                # Released (the client left mid-RETR): the connection is
                # back with the store, for other work, and the lock gone.
                raise OSError(errno.EIO, f"the session on {self.account} is over")
            with self._store.database.errors():
                result = connection.execute(
                    _READ_CHUNK, (self.account, row.uid, seq), binary=True
                ).fetchone()
            return None if result is None else bytes(result[0])

        return MessageReader(fetch, row)

    def commitDeletions(self, uids: Sequence[str]) -> defer.Deferred[None]:
        """
        See L{IMailbox.commitDeletions}: one transaction, durable at its
        COMMIT (the server's C{synchronous_commit}), then a
        C{mailbox-deleted} audit record per message removed.  Fails with
        L{KeyError} if a uid is not in the snapshot (then nothing is
        deleted).
        """
        try:
            rows = [self._row(uid) for uid in uids]
        except KeyError as e:
            return defer.fail(e)
        d = self._store.database.run(
            deleteMessages,
            self._store.database,
            self._store.audit,
            self._connection,
            self.account,
            [row.uid for row in rows],
        )

        def deleted(_: object) -> None:
            for row in rows:
                if self._rows.pop(row.uid, None) is not None:
                    self._order.remove(row.uid)

        return d.addCallback(deleted)

    def release(self) -> defer.Deferred[None]:
        """
        Give the lock up and the connection back (see L{IMailbox.release});
        the work is done in the store's threads.

        @return: a L{Deferred} firing when the lock is given up; calling it
            again returns the same.
        """
        if self._released is None:
            connection, self._connection = self._connection, None
            self._released = self._store._release(self.account, connection)
        released: defer.Deferred[None] = defer.Deferred()
        self._released.addCallback(released.callback)
        return released
