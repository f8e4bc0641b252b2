# -*- test-case-name: tests.test_testing -*-
"""
Return messages in memory: L{MemoryMailboxStore}, an L{IMailboxStore}
with the store's lock, snapshots and deletions at C{commitDeletions}.
Part of L{msa.testing}.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from msa import envelope
from msa.errors import MailboxInUse
from msa.interfaces import IMailbox, IMailboxStore


@implementer(IMailboxStore)
class MemoryMailboxStore:
    """
    Return messages in memory, per account, in delivery order.

    @ivar mailboxes: account -> L{dict} of uid -> message bytes.
    @ivar locked: the accounts a session holds.
    @ivar failNextCommit: make the next C{commitDeletions} fail (and delete
        nothing), to test what a client hears when the disk lets you down.
    """

    def __init__(self) -> None:
        self.mailboxes: dict[str, dict[str, bytes]] = {}
        self.locked: set[str] = set()
        self.failNextCommit = False
        self._next = 0

    def add(self, account: str, message: bytes) -> str:
        """
        Deliver synchronously; return the new uid.
        """
        self._next += 1
        uid = f"m{self._next:06d}.{account.encode().hex()}"
        self.mailboxes.setdefault(account, {})[uid] = message
        return uid

    def deliver(
        self,
        account: str,
        source: Any,
        size: int,
        sha256: str,
        auditFields: Mapping[str, Any] | None = None,
    ) -> defer.Deferred[str]:
        return defer.succeed(self.add(account, source.read()))

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def open(self, account: str) -> defer.Deferred[IMailbox]:
        if account in self.locked:
            return defer.fail(MailboxInUse(account))
        self.locked.add(account)
        return defer.succeed(MemoryMailbox(self, account))


@implementer(IMailbox)
class MemoryMailbox:
    """
    The L{IMailbox} of L{MemoryMailboxStore}: a snapshot at open.
    """

    def __init__(self, store: MemoryMailboxStore, account: str) -> None:
        self.account = account
        self._store = store
        self._snapshot = dict(store.mailboxes.get(account, {}))
        self.released = False

    def messages(self) -> list[envelope.StoredMessage]:
        return [envelope.StoredMessage(u, len(m)) for u, m in self._snapshot.items()]

    def openMessage(self, uid: str) -> defer.Deferred[Any]:
        return defer.succeed(io.BytesIO(self._snapshot[uid]))

    def commitDeletions(self, uids: Sequence[str]) -> defer.Deferred[None]:
        if self._store.failNextCommit:
            self._store.failNextCommit = False
            return defer.fail(OSError("simulated disk failure"))
        for uid in uids:
            self._snapshot.pop(uid, None)
            self._store.mailboxes[self.account].pop(uid, None)
        return defer.succeed(None)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._store.locked.discard(self.account)
