# -*- test-case-name: tests.test_mailbox_pg_sessions -*-
"""
The PostgreSQL mailbox store's POP3 side (issue 19,
L{msa.mailbox.pgsession}) against a real throwaway server: the lock across
stores (as two instances hold them) and its end with the connection, the
accounts kept apart, and expiry.  The round trips, delivery failures and
quota are in L{tests.test_mailbox_pg}.
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.errors import MailboxInUse
from msa.mailbox.pgsession import StoredRow
from tests.test_mailbox_pg import (
    MESSAGE,
    PostgresStoreMixin,
    digest,
    readInBlocks,
)
from tests.waiting import waitUntil


class SessionLockTests(PostgresStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_inUseAcrossStores(self):
        """
        While a session holds a mailbox, a second one, of this store or of
        another (another instance), gets L{MailboxInUse}; other mailboxes
        open; after L{release} it opens again.
        """
        other = self.makeStore()
        box = yield self.store.open("alice")
        yield self.assertFailure(self.store.open("alice"), MailboxInUse)
        yield self.assertFailure(other.open("alice"), MailboxInUse)
        yield self.opened(other, "bob")
        yield box.release()
        yield self.opened(other, "alice")

    @defer.inlineCallbacks
    def test_releaseThenOpenAtOnce(self):
        """
        A client that quits and comes straight back finds its mailbox
        free: an open waits for the release under way.
        """
        box = yield self.store.open("alice")
        dispatched: list[str] = []
        run = self.store.database.run
        self.patch(
            self.store.database,
            "run",
            lambda f, *a: (dispatched.append(f.__name__), run(f, *a))[1],
        )
        box.release()
        reopened = self.store.open("alice")
        # The open is not even tried while the lock is being given up (on
        # another of the store's threads it would find it still held).
        self.assertEqual(dispatched, ["_unlockBlocking"])
        box = yield reopened
        self.addCleanup(box.release)
        self.assertEqual(dispatched, ["_unlockBlocking", "_openBlocking"])

    @defer.inlineCallbacks
    def test_lockDiesWithTheConnection(self):
        """
        When the connection holding a session's lock dies (the instance
        crashed, the network broke), the server drops the lock: another
        instance opens the mailbox; the orphaned session's release is
        harmless.
        """
        box = yield self.store.open("alice")
        [(pid,)] = self.sql(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
        self.sql("SELECT pg_terminate_backend(%s)", pid)
        other = self.makeStore()

        @defer.inlineCallbacks
        def opens():
            try:
                opened = yield other.open("alice")
            except MailboxInUse:
                return None
            return opened

        again = yield waitUntil(opens, what="the mailbox free after the kill")
        yield box.release()
        yield again.release()

    @defer.inlineCallbacks
    def test_serverNoticesAVanishedInstance(self):
        """
        The backend holding a session's lock has TCP keepalives of its own
        (about 11 seconds to notice a peer that is gone, not the kernel's
        two hours): an instance whose host vanishes without closing its
        connections does not keep the mailbox locked.
        """
        box = yield self.opened()
        settings = box._connection.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ("
            "'tcp_keepalives_idle', 'tcp_keepalives_interval', "
            "'tcp_keepalives_count', 'tcp_user_timeout') ORDER BY name"
        ).fetchall()
        self.assertEqual(
            settings,
            [
                ("tcp_keepalives_count", "3"),
                ("tcp_keepalives_idle", "5"),
                ("tcp_keepalives_interval", "2"),
                ("tcp_user_timeout", "15000"),
            ],
        )

    @defer.inlineCallbacks
    def test_releaseAfterTheStoreStopped(self):
        """
        A session that outlives its store (the daemon stopping while a
        client is connected) still gives its lock up, on the reactor's
        threads: no new pool of threads is left behind.
        """
        box = yield self.store.open("alice")
        yield self.store.close()
        yield box.release()
        self.assertIsNone(self.store.database._pool)
        yield self.opened(self.makeStore())

    @defer.inlineCallbacks
    def test_noReadAfterRelease(self):
        """
        A message opened in a session cannot be read on after the session
        released its lock (the client left mid-RETR): its connection is
        the store's again.
        """
        uid = yield self.deliver()
        box = yield self.store.open("alice")
        reader = yield box.openMessage(uid)
        yield box.release()
        yield self.assertFailure(threads.deferToThread(readInBlocks, reader), OSError)

    @defer.inlineCallbacks
    def test_accountsKeptApart(self):
        """
        Alice's session cannot read or delete Bob's message by naming its
        uid (L{KeyError}); and should its snapshot ever hold a uid of
        another account, the statements themselves, scoped by account,
        read and delete nothing.
        """
        bobs = yield self.deliver(account="bob")
        box = yield self.opened()
        yield self.assertFailure(box.openMessage(bobs), KeyError)
        yield self.assertFailure(box.commitDeletions([bobs]), KeyError)
        box._rows[bobs] = StoredRow(bobs, len(MESSAGE), digest(MESSAGE))
        box._order.append(bobs)
        yield self.assertFailure(box.openMessage(bobs), FileNotFoundError)
        yield box.commitDeletions([bobs])
        self.assertEqual(self.uids("bob"), [bobs])
        self.assertEqual(self.auditRecords("mailbox-deleted"), [])


class ExpiryTests(PostgresStoreMixin, unittest.TestCase):
    def age(self, uid: str, days: int) -> None:
        self.sql(
            "UPDATE msa_mailbox_messages SET delivered_at = now() - make_interval("
            "days => %s) WHERE uid = %s",
            days,
            uid,
        )

    @defer.inlineCallbacks
    def test_expire(self):
        """
        Messages older than the age given are removed with a
        C{mailbox-expired} record each; younger ones stay.
        """
        old = yield self.deliver()
        oldOfBob = yield self.deliver(account="bob")
        young = yield self.deliver()
        self.age(old, 8)
        self.age(oldOfBob, 8)
        self.assertEqual((yield self.store.expire(7 * 86400)), 2)
        self.assertEqual(self.uids("alice"), [young])
        self.assertEqual(self.uids("bob"), [])
        self.assertEqual(
            sorted(
                (r["account"], r["uid"]) for r in self.auditRecords("mailbox-expired")
            ),
            sorted([("alice", old), ("bob", oldOfBob)]),
        )
        self.assertEqual((yield self.store.expire(7 * 86400)), 0)

    @defer.inlineCallbacks
    def test_lockedMailboxWaits(self):
        """
        A mailbox a POP3 session holds (here through another store) is
        left for the next sweep: the session's snapshot stays readable.
        """
        old = yield self.deliver()
        self.age(old, 8)
        box = yield self.makeStore().open("alice")
        self.assertEqual((yield self.store.expire(7 * 86400)), 0)
        self.assertEqual(self.uids("alice"), [old])
        yield box.release()
        self.assertEqual((yield self.store.expire(7 * 86400)), 1)
