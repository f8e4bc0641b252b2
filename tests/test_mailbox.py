"""
Tests for L{msa.mailbox}: the Maildir store of return messages (R16).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.audit import AuditLog
from msa.errors import MailboxInUse, SMTPReply
from msa.interfaces import IMailbox, IMailboxStore
from msa.mailbox import (
    MaildirStore,
    Quota,
    accountDirectoryName,
    decodeAccountDirectory,
    names,
    newUid,
    parseMessageName,
)

MESSAGE = b"From: core@digipoort.example\r\nSubject: ack\r\n\r\nbody\r\n"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StoreMixin:
    """
    A store on a temporary directory, with an audit log.
    """

    def setUp(self) -> None:
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.directory = os.path.join(self.base, "mailboxes")
        self.audit = AuditLog(os.path.join(self.base, "audit.log"))
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.store = self.makeStore()

    def makeStore(self, **kwargs) -> MaildirStore:
        kwargs.setdefault("audit", self.audit)
        return MaildirStore(self.directory, **kwargs)

    def deliver(self, store=None, account="alice", data=MESSAGE, **kwargs):
        store = store or self.store
        return store.deliver(
            account, io.BytesIO(data), len(data), digest(data), **kwargs
        )

    def auditRecords(self, event: str) -> list[dict]:
        with open(self.audit.path, "rb") as f:
            records = [json.loads(line) for line in f]
        return [r for r in records if r["event"] == event]

    def files(self, account: str, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.directory, account, sub)))


class DeliveryTests(StoreMixin, unittest.TestCase):
    def test_interfaces(self) -> defer.Deferred:
        verifyObject(IMailboxStore, self.store)
        d = self.store.open("alice")
        d.addCallback(lambda box: (verifyObject(IMailbox, box), box.release()))
        return d

    @defer.inlineCallbacks
    def test_deliveredBytesAndName(self):
        """
        The file in C{new/} holds exactly the delivered bytes; its name
        carries the uid, the size and the SHA-256; C{tmp/} is empty; one
        C{mailbox-delivered} record names all of them and the audit fields.
        """
        uid = yield self.deliver(auditFields={"recipient": "a@example.nl"})
        [name] = self.files("alice", "new")
        self.assertEqual(name, f"{uid},S={len(MESSAGE)},H={digest(MESSAGE)}")
        with open(os.path.join(self.directory, "alice", "new", name), "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(self.files("alice", "tmp"), [])
        [record] = self.auditRecords("mailbox-delivered")
        self.assertEqual(
            {k: record[k] for k in ("account", "uid", "size", "sha256", "recipient")},
            {
                "account": "alice",
                "uid": uid,
                "size": len(MESSAGE),
                "sha256": digest(MESSAGE),
                "recipient": "a@example.nl",
            },
        )

    @defer.inlineCallbacks
    def test_durabilityOrder(self):
        """
        The message file is fsynced before it is linked into C{new/}, C{new/}
        is fsynced after the link, and the audit record is written last:
        only then does the delivery's L{Deferred} fire.
        """
        events: list[str] = []
        realFsync, realLink, realAppend = os.fsync, os.link, self.audit.append
        self.patch(os, "fsync", lambda fd: (events.append("fsync"), realFsync(fd)))
        self.patch(os, "link", lambda a, b: (events.append("link"), realLink(a, b)))
        self.patch(
            self.audit,
            "append",
            lambda *a, **k: (events.append("audit"), realAppend(*a, **k))[1],
        )
        yield self.deliver()  # creates the Maildir (its fsyncs are not ours)
        events.clear()
        yield self.deliver()
        # fsync(file), link, fsync(new/) (msa.durable.fsyncDirectory), audit
        self.assertEqual(events, ["fsync", "link", "fsync", "audit"])

    @defer.inlineCallbacks
    def test_directoryFsyncFails(self):
        """
        When C{new/} cannot be fsynced the delivery fails with 451 4.3.0 and
        the message is removed again: nothing is visible, nothing recorded.
        """
        yield self.deliver()

        def failing(directory: str) -> None:
            raise OSError(5, "Input/output error")

        self.patch(self.store, "_sync", failing)
        error = yield self.assertFailure(self.deliver(), SMTPReply)
        self.assertEqual((error.code, error.status), (451, "4.3.0"))
        self.assertEqual(len(self.files("alice", "new")), 1)
        self.assertEqual(self.files("alice", "tmp"), [])
        self.assertEqual(len(self.auditRecords("mailbox-delivered")), 1)

    @defer.inlineCallbacks
    def test_diskFull(self):
        """
        A full disk while copying: 452 4.3.1, and no file is left behind.
        """

        def full(path, data, mode=0o600, exclusive=False):
            open(path, "wb").close()
            raise OSError(28, "No space left on device")

        self.patch(
            __import__("msa.mailbox.maildir").mailbox.maildir, "writeSynced", full
        )
        error = yield self.assertFailure(self.deliver(), SMTPReply)
        self.assertEqual((error.code, error.status), (452, "4.3.1"))
        self.assertEqual(self.files("alice", "tmp") + self.files("alice", "new"), [])

    @defer.inlineCallbacks
    def test_auditFailureUndoesDelivery(self):
        """
        A delivery whose audit record cannot be written is not announced:
        451, and its file is gone from C{new/}.
        """
        from msa.audit import AuditError

        def broken(*args, **kwargs):
            raise AuditError("disk gone")

        self.patch(self.audit, "append", broken)
        error = yield self.assertFailure(self.deliver(), SMTPReply)
        self.assertEqual(error.code, 451)
        self.assertEqual(self.files("alice", "new"), [])

    @defer.inlineCallbacks
    def test_digestMismatch(self):
        """
        A source whose bytes do not match the size and digest given is not
        stored: 451.
        """
        d = self.store.deliver("alice", io.BytesIO(MESSAGE), len(MESSAGE), "0" * 64)
        error = yield self.assertFailure(d, SMTPReply)
        self.assertEqual(error.code, 451)
        self.assertEqual(self.files("alice", "new"), [])


class QuotaTests(StoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_messagesAtAndPastTheEdge(self):
        store = self.makeStore(quotaFor=lambda account: Quota(maxMessages=2))
        yield self.deliver(store)
        yield self.deliver(store)
        error = yield self.assertFailure(self.deliver(store), SMTPReply)
        self.assertEqual((error.code, error.status), (452, "4.2.2"))
        self.assertEqual(len(self.files("alice", "new")), 2)
        # Another account has its own quota.
        yield self.deliver(store, account="bob")

    @defer.inlineCallbacks
    def test_bytesAtAndPastTheEdge(self):
        """
        A message that fills the quota exactly is stored; one byte more
        gets 452 4.2.2.
        """
        store = self.makeStore(
            quotaFor=lambda account: Quota(maxBytes=2 * len(MESSAGE) + 1)
        )
        yield self.deliver(store)
        yield self.deliver(store, data=MESSAGE + b"x")
        error = yield self.assertFailure(self.deliver(store, data=b"y"), SMTPReply)
        self.assertEqual((error.code, error.status), (452, "4.2.2"))
        self.assertEqual(len(self.files("alice", "new")), 2)


class UidTests(StoreMixin, unittest.TestCase):
    def test_uidShape(self):
        uids = {newUid() for _ in range(1000)}
        self.assertEqual(len(uids), 1000)
        for uid in uids:
            self.assertLessEqual(len(uid), 70)
            self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in uid), uid)
            self.assertNotIn(",", uid)
            self.assertEqual(parseMessageName(f"{uid},S=1,H={'a' * 64}").uid, uid)

    @defer.inlineCallbacks
    def test_stableAcrossReopen(self):
        """
        A second store object on the same directory (a restart) lists the
        same uids and sizes in the same (delivery) order.
        """
        delivered = []
        for n in range(3):
            delivered.append((yield self.deliver(data=MESSAGE * (n + 1))))
        box = yield self.store.open("alice")
        first = box.messages()
        box.release()
        self.assertEqual([m.uid for m in first], delivered)
        self.assertEqual([m.size for m in first], [len(MESSAGE) * n for n in (1, 2, 3)])
        box = yield self.makeStore().open("alice")
        self.assertEqual(box.messages(), first)
        box.release()

    @defer.inlineCallbacks
    def test_neverReused(self):
        uid = yield self.deliver()
        box = yield self.store.open("alice")
        yield box.commitDeletions([uid])
        box.release()
        again = yield self.deliver()
        self.assertNotEqual(uid, again)

    def test_accountDirectoryNames(self):
        for account, expected in [
            ("alice", "alice"),
            ("a.b@example.nl", "a.b@example.nl"),
            ("../etc", "%2E.%2Fetc"),
            (".hidden", "%2Ehidden"),
            ("50%", "50%25"),
            ("é x", "%C3%A9%20x"),
        ]:
            self.assertEqual(accountDirectoryName(account), expected)
            self.assertEqual(decodeAccountDirectory(expected), account)


class SessionTests(StoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_snapshotAndRead(self):
        uid = yield self.deliver()
        box = yield self.store.open("alice")
        later = yield self.deliver()  # after the snapshot: not in it
        self.assertEqual([m.uid for m in box.messages()], [uid])
        f = yield box.openMessage(uid)
        with f:
            self.assertEqual(f.read(), MESSAGE)
        box.release()
        box = yield self.store.open("alice")
        self.assertEqual([m.uid for m in box.messages()], [uid, later])
        box.release()

    @defer.inlineCallbacks
    def test_lockInProcess(self):
        box = yield self.store.open("alice")
        yield self.assertFailure(self.store.open("alice"), MailboxInUse)
        other = yield self.store.open("bob")
        other.release()
        box.release()
        box.release()  # twice is harmless
        box = yield self.store.open("alice")
        box.release()

    @defer.inlineCallbacks
    def test_lockAcrossStores(self):
        """
        Two store objects on one directory (two instances on one host)
        exclude each other through the lock file.
        """
        second = self.makeStore()
        box = yield self.store.open("alice")
        yield self.assertFailure(second.open("alice"), MailboxInUse)
        box.release()
        box = yield second.open("alice")
        yield self.assertFailure(self.store.open("alice"), MailboxInUse)
        box.release()

    @defer.inlineCallbacks
    def test_commitDeletions(self):
        """
        Deleted messages are gone from disk, each with a C{mailbox-deleted}
        record; release without a commit deletes nothing.
        """
        first = yield self.deliver()
        second = yield self.deliver()
        box = yield self.store.open("alice")
        box.release()
        box = yield self.store.open("alice")
        yield box.commitDeletions([first])
        self.assertEqual([m.uid for m in box.messages()], [second])
        box.release()
        [name] = self.files("alice", "new")
        self.assertTrue(name.startswith(second + ","))
        [record] = self.auditRecords("mailbox-deleted")
        self.assertEqual((record["uid"], record["reason"]), (first, "pop3"))


class ExpiryTests(StoreMixin, unittest.TestCase):
    def setUp(self) -> None:
        super().setUp()
        # The uids' times come from the store's clock, which these tests
        # move; start this test's uids from it, not from an earlier test's.
        self.patch(names, "_lastMicroseconds", 0)

    @defer.inlineCallbacks
    def test_expire(self):
        """
        Messages older than the age given are removed, with one
        C{mailbox-expired} record each; younger ones stay.
        """
        now = [time.time()]
        store = self.makeStore(clock=lambda: now[0])
        old = yield self.deliver(store)
        now[0] += 100
        young = yield self.deliver(store)
        removed = yield store.expire(50)
        self.assertEqual(removed, 1)
        box = yield store.open("alice")
        self.assertEqual([m.uid for m in box.messages()], [young])
        box.release()
        [record] = self.auditRecords("mailbox-expired")
        self.assertEqual((record["account"], record["uid"]), ("alice", old))

    @defer.inlineCallbacks
    def test_lockedMailboxWaits(self):
        """
        A mailbox a POP3 session holds is left for the next sweep.
        """
        now = [time.time()]
        store = self.makeStore(clock=lambda: now[0])
        yield self.deliver(store)
        box = yield store.open("alice")
        now[0] += 100
        self.assertEqual((yield store.expire(50)), 0)
        box.release()
        self.assertEqual((yield store.expire(50)), 1)

    @defer.inlineCallbacks
    def test_recoverOldLeftovers(self):
        """
        A crashed delivery's file in C{tmp/} is removed once it is old.
        """
        yield self.deliver()
        leftover = os.path.join(self.directory, "alice", "tmp", "crashed")
        with open(leftover, "wb") as f:
            f.write(b"partial")
        self.assertEqual(self.store.recover(), 0)
        os.utime(leftover, (time.time() - 7200, time.time() - 7200))
        self.assertEqual(self.store.recover(), 1)
        self.assertFalse(os.path.exists(leftover))
