# -*- test-case-name: tests.test_mailbox_pg -*-
"""
The mailbox store in PostgreSQL (issue 19, L{msa.mailbox.pgstore}) against
a real throwaway server (L{tests.pgserver}): round trips byte for byte in
chunks, uids, delivery failures and outages, quota (also with two stores
delivering at once, as two instances would).  The POP3 lock, the accounts
kept apart and expiry are in L{tests.test_mailbox_pg_sessions}; the store
through the daemon in L{tests.test_mailbox_pg_daemon}.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading

import psycopg
from twisted.internet import defer, threads
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.accounts.pgstore import connect, describe
from msa.audit import AuditError, AuditLog
from msa.errors import SMTPReply
from msa.interfaces import IMailbox, IMailboxStore
from msa.mailbox import Quota
from msa.mailbox.pgstore import MailboxDatabaseError, PostgresMailboxStore
from tests.pgserver import PostgreSQLServer
from tests.test_audit import records
from tests.waiting import waitUntil

MESSAGE = b"From: core@digipoort.example\r\nSubject: ack\r\n\r\nbody\r\n"

#: The chunk size of the stores under test: small, so that a message of a
#: few hundred KiB spans several chunks.
CHUNK = 64 * 1024

#: A message of three whole chunks and a part of a fourth, every byte
#: value in it, lines starting with dots.
LARGE = (b"Subject: large\r\n\r\n" + bytes(range(256)) * 800 + b"\r\n.\r\n")[
    : 3 * CHUNK + 4321
]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RecordingSource(io.BytesIO):
    """
    A message source that remembers the size of each read asked of it.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.asked.append(-1 if size is None else size)
        return super().read(size)


def readInBlocks(reader, block: int = 64 * 1024) -> bytes:
    """
    What a POP3 RETR does with an opened message (in a thread): read it in
    blocks until its end, then close it.
    """
    pieces = []
    try:
        while piece := reader.read(block):
            pieces.append(piece)
    finally:
        reader.close()
    return b"".join(pieces)


class FlakyCommit:
    """
    A connection whose next COMMIT, once armed, fails: C{"after"} it is
    done (the answer lost on the way back), or C{"before"} (rolled back).
    """

    def __init__(self, connection) -> None:
        object.__setattr__(self, "_connection", connection)
        object.__setattr__(self, "armed", None)

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def __setattr__(self, name, value):
        if name == "armed":
            object.__setattr__(self, name, value)
        else:
            setattr(self._connection, name, value)

    def commit(self) -> None:
        armed = self.armed
        object.__setattr__(self, "armed", None)
        if armed == "before":
            self._connection.rollback()
        else:
            self._connection.commit()
        if armed is not None:
            raise psycopg.OperationalError("server closed the connection unexpectedly")


class PostgresStoreMixin:
    """
    A throwaway server, an audit log, and stores on them.
    """

    def setUp(self) -> None:
        self.pg = PostgreSQLServer(self)
        base = self.mktemp()
        os.makedirs(base)
        self.audit = AuditLog(os.path.join(base, "audit.log"))
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.store = self.makeStore()

    def makeStore(self, **kwargs) -> PostgresMailboxStore:
        kwargs.setdefault("audit", self.audit)
        kwargs.setdefault("chunkSize", CHUNK)
        kwargs.setdefault("connect", functools.partial(connect, self.pg.url))
        store = PostgresMailboxStore(where=describe(self.pg.url), **kwargs)
        self.addCleanup(store.close)
        return store

    def deliver(self, store=None, account="alice", data=MESSAGE, **kwargs):
        return (store or self.store).deliver(
            account, io.BytesIO(data), len(data), digest(data), **kwargs
        )

    def sql(self, statement: str, *args) -> list[tuple]:
        with psycopg.connect(self.pg.url, autocommit=True) as connection:
            cursor = connection.execute(statement, args or None)
            return cursor.fetchall() if cursor.description else []

    def auditRecords(self, event: str) -> list[dict]:
        return [r for r in records(self.audit.path) if r["event"] == event]

    def uids(self, account: str) -> list[str]:
        return [
            uid
            for (uid,) in self.sql(
                "SELECT uid FROM msa_mailbox_messages WHERE account = %s ORDER BY id",
                account,
            )
        ]

    @defer.inlineCallbacks
    def opened(self, store=None, account="alice"):
        box = yield (store or self.store).open(account)
        self.addCleanup(box.release)
        return box


class RoundTripTests(PostgresStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_interfaces(self):
        verifyObject(IMailboxStore, self.store)
        verifyObject(IMailbox, (yield self.opened()))

    @defer.inlineCallbacks
    def test_deliverListReadDelete(self):
        """
        Delivered messages are listed in delivery order with their sizes,
        read back byte for byte (the large one chunk by chunk, never more
        than a chunk in memory), and deleted for good by
        C{commitDeletions}, chunks included; each step has its audit
        record.
        """
        source = RecordingSource(LARGE)
        first = yield self.deliver(auditFields={"recipient": "retour@acme.nl"})
        second = yield self.store.deliver("alice", source, len(LARGE), digest(LARGE))
        # The source was read a chunk at a time, and stored one per row.
        self.assertLessEqual(max(source.asked), CHUNK)
        self.assertEqual(
            self.sql(
                "SELECT count(*), max(octet_length(data)), sum(octet_length(data)) "
                "FROM msa_mailbox_chunks WHERE uid = %s",
                second,
            ),
            [(4, CHUNK, len(LARGE))],
        )
        box = yield self.opened()
        self.assertEqual(
            [(m.uid, m.size) for m in box.messages()],
            [(first, len(MESSAGE)), (second, len(LARGE))],
        )
        reader = yield box.openMessage(second)
        self.assertEqual((yield threads.deferToThread(readInBlocks, reader)), LARGE)
        self.assertEqual(reader.chunksRead, 4)
        reader = yield box.openMessage(first)
        self.assertEqual((yield threads.deferToThread(readInBlocks, reader)), MESSAGE)

        yield box.commitDeletions([second])
        self.assertEqual([m.uid for m in box.messages()], [first])
        self.assertEqual(self.uids("alice"), [first])
        self.assertEqual(self.sql("SELECT count(*) FROM msa_mailbox_chunks"), [(1,)])
        yield box.release()
        box = yield self.opened()
        self.assertEqual([m.uid for m in box.messages()], [first])

        delivered = self.auditRecords("mailbox-delivered")
        self.assertEqual(
            [(r["account"], r["uid"], r["size"], r["sha256"]) for r in delivered],
            [
                ("alice", first, len(MESSAGE), digest(MESSAGE)),
                ("alice", second, len(LARGE), digest(LARGE)),
            ],
        )
        self.assertEqual(delivered[0]["recipient"], "retour@acme.nl")
        [deleted] = self.auditRecords("mailbox-deleted")
        self.assertEqual(
            (deleted["account"], deleted["uid"], deleted["reason"]),
            ("alice", second, "pop3"),
        )

    @defer.inlineCallbacks
    def test_uidsStableAndUnique(self):
        """
        Uids are printable, at most 70 characters, all different, and a
        new store object (a restarted instance) lists the same ones.
        """
        uids = []
        for _ in range(5):
            uids.append((yield self.deliver()))
        self.assertEqual(len(set(uids)), 5)
        for uid in uids:
            self.assertLessEqual(len(uid), 70)
            self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in uid), uid)
        yield self.store.close()
        box = yield self.opened(self.makeStore())
        self.assertEqual([m.uid for m in box.messages()], uids)

    @defer.inlineCallbacks
    def test_damagedMessageIsNotServedWhole(self):
        """
        A message whose chunks no longer match its size and SHA-256 (a
        chunk changed or missing behind the store's back) raises
        L{OSError} on the read instead of ending.
        """
        changed = yield self.deliver(data=LARGE)
        missing = yield self.deliver(data=LARGE)
        self.sql(
            "UPDATE msa_mailbox_chunks SET data = 'X'::bytea || substr(data, 2) "
            "WHERE uid = %s AND seq = 3",
            changed,
        )
        self.sql("DELETE FROM msa_mailbox_chunks WHERE uid = %s AND seq = 2", missing)
        box = yield self.opened()
        for uid, why in ((changed, "has SHA-256"), (missing, "ends after")):
            reader = yield box.openMessage(uid)
            error = yield self.assertFailure(
                threads.deferToThread(readInBlocks, reader), OSError
            )
            self.assertIn(why, str(error))


class DeliveryFailureTests(PostgresStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_digestMismatch(self):
        """
        A source that does not hold the size and digest given is not
        stored: 451 4.3.0, no row, no chunk.
        """
        d = self.store.deliver("alice", io.BytesIO(LARGE), len(LARGE), "0" * 64)
        error = yield self.assertFailure(d, SMTPReply)
        self.assertEqual((error.code, error.status), (451, "4.3.0"))
        self.assertEqual(self.uids("alice"), [])
        self.assertEqual(self.sql("SELECT count(*) FROM msa_mailbox_chunks"), [(0,)])

    @defer.inlineCallbacks
    def test_auditFailureUndoesDelivery(self):
        """
        A delivery whose audit record cannot be written is refused (451)
        and removed again.
        """

        def broken(*args, **kwargs):
            raise AuditError("disk gone")

        self.patch(self.audit, "append", broken)
        error = yield self.assertFailure(self.deliver(), SMTPReply)
        self.assertEqual((error.code, error.status), (451, "4.3.0"))
        self.assertEqual(self.uids("alice"), [])

    @defer.inlineCallbacks
    def test_commitAnswerLost(self):
        """
        When the connection breaks during the COMMIT, the store asks a new
        connection whether the message is there: a committed one is
        delivered (once), one that is not is refused with 451.
        """
        connections: list[FlakyCommit] = []

        def flaky():
            connections.append(FlakyCommit(connect(self.pg.url)))
            return connections[-1]

        store = self.makeStore(connect=flaky, threads=1)
        yield self.deliver(store)  # the tables are made
        connections[-1].armed = "after"
        uid = yield self.deliver(store)
        self.assertIn(uid, self.uids("alice"))
        connections[-1].armed = "before"
        error = yield self.assertFailure(self.deliver(store), SMTPReply)
        self.assertEqual((error.code, error.status), (451, "4.3.0"))
        self.assertEqual(len(self.uids("alice")), 2)
        self.assertEqual(len(self.auditRecords("mailbox-delivered")), 2)

    @defer.inlineCallbacks
    def test_databaseDown(self):
        """
        While the database is down a delivery is refused with 451 4.3.0
        and a session cannot open (L{MailboxDatabaseError}, not a hang);
        once it is back, both work again on new connections.
        """
        yield self.deliver()
        self.pg.stop()
        error = yield self.assertFailure(self.deliver(), SMTPReply)
        self.assertEqual((error.code, error.status), (451, "4.3.0"))
        error = yield self.assertFailure(self.store.open("alice"), MailboxDatabaseError)
        self.assertIn(describe(self.pg.url), str(error))
        self.pg.start()
        yield self.deliver()
        box = yield self.opened()
        self.assertEqual(len(box.messages()), 2)

    @defer.inlineCallbacks
    def test_databaseRestarted(self):
        """
        A connection kept from before the database restarted is found dead
        before it is used: the first delivery after the restart succeeds.
        """
        yield self.deliver()
        self.pg.stop()
        self.pg.start()
        yield self.deliver()
        self.assertEqual(len(self.uids("alice")), 2)


class QuotaTests(PostgresStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_messagesAtAndPastTheEdge(self):
        store = self.makeStore(quotaFor=lambda account: Quota(maxMessages=2))
        yield self.deliver(store)
        yield self.deliver(store)
        error = yield self.assertFailure(self.deliver(store), SMTPReply)
        self.assertEqual(
            (error.code, error.status, error.text),
            (452, "4.2.2", "Mailbox full: too many messages"),
        )
        self.assertEqual(len(self.uids("alice")), 2)
        yield self.deliver(store, account="bob")

    @defer.inlineCallbacks
    def test_bytesAtAndPastTheEdge(self):
        limit = 2 * len(MESSAGE)
        store = self.makeStore(quotaFor=lambda account: Quota(maxBytes=limit))
        yield self.deliver(store)
        yield self.deliver(store)  # exactly at the limit
        error = yield self.assertFailure(self.deliver(store, data=b"x"), SMTPReply)
        self.assertEqual(
            (error.code, error.status, error.text),
            (452, "4.2.2", "Mailbox full: over its size quota"),
        )
        self.assertEqual(len(self.uids("alice")), 2)

    @defer.inlineCallbacks
    def test_twoInstancesCannotBothPass(self):
        """
        Two stores (two instances) deliver the last message the quota
        allows at the same moment: the second waits for the first's
        transaction, counts its message and is refused with 452.

        The first delivery is held inside its transaction (its source
        blocks) until the second is seen waiting for the account's lock,
        or done.
        """

        def quota(account: str) -> Quota:
            return Quota(maxMessages=1)

        first, second = self.makeStore(quotaFor=quota), self.makeStore(quotaFor=quota)
        yield self.deliver(first, account="bob")  # the tables are made
        reading, go = threading.Event(), threading.Event()

        class HeldSource(io.BytesIO):
            def read(self, size=-1):
                reading.set()
                if not go.wait(30):
                    raise OSError("never let go")
                return super().read(size)

        held = first.deliver("alice", HeldSource(LARGE), len(LARGE), digest(LARGE))
        yield waitUntil(reading.is_set, what="the first delivery reading its source")
        outcomes: list[object] = []
        other = self.deliver(second)
        other.addBoth(outcomes.append)

        def secondWaitsOrIsDone():
            return outcomes or self.sql(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )

        yield waitUntil(secondWaitsOrIsDone, what="the second delivery's lock wait")
        go.set()
        yield held
        yield waitUntil(lambda: outcomes, what="the second delivery's outcome")
        [failure] = outcomes
        self.assertIsInstance(getattr(failure, "value", failure), SMTPReply)
        self.assertEqual(failure.value.code, 452)
        self.assertEqual(len(self.uids("alice")), 1)
