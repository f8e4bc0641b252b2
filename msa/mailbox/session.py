# -*- test-case-name: tests.test_mailbox -*-
"""
One locked mailbox (L{MaildirMailbox}), as a POP3 session holds it, and the
lock file that keeps a second session, of this process or another, out.

The lock is C{fcntl.flock} on C{<mailbox>/.lock}: it belongs to the open
file, so two store objects of one process exclude each other as two
daemons on one host do, and the kernel drops it when the process dies
(kill -9 included): a crash never leaves a mailbox locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from twisted.internet import defer
from zope.interface import implementer

from msa.envelope import StoredMessage
from msa.errors import MailboxInUse
from msa.interfaces import IMailbox
from msa.mailbox.listing import MailboxEntry

if TYPE_CHECKING:
    from msa.mailbox.maildir import MaildirStore

__all__ = ["MaildirMailbox", "lockMailbox", "unlockMailbox"]

LOCK_NAME = ".lock"


def lockMailbox(directory: str) -> int:
    """
    Take the lock of the mailbox in C{directory} without waiting; blocking
    (it may create the lock file).

    @return: the file descriptor that holds it, for L{unlockMailbox}.
    @raise MailboxInUse: when another open file holds it.
    """
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MailboxInUse(directory)
        raise
    return fd


def unlockMailbox(fd: int) -> None:
    """
    Give up the lock taken by L{lockMailbox}.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@implementer(IMailbox)
class MaildirMailbox:
    """
    A mailbox locked by L{MaildirStore.open} for one POP3 session: its
    snapshot, in delivery order.  Nothing on disk changes until
    L{commitDeletions}.
    """

    def __init__(
        self,
        store: MaildirStore,
        account: str,
        entries: Sequence[MailboxEntry],
        lockFd: int,
        onRelease: Callable[[], None],
    ) -> None:
        self.account = account
        self._store = store
        self._entries = {entry.uid: entry for entry in entries}
        self._order = [entry.uid for entry in entries]
        self._lockFd: int | None = lockFd
        self._onRelease = onRelease

    def messages(self) -> list[StoredMessage]:
        return [
            StoredMessage(uid=uid, size=self._entries[uid].size) for uid in self._order
        ]

    def openMessage(self, uid: str) -> defer.Deferred[BinaryIO]:
        entry = self._entries[uid]
        return self._store._runBlocking(open, entry.path, "rb")

    def commitDeletions(self, uids: Sequence[str]) -> defer.Deferred[None]:
        entries = [self._entries[uid] for uid in uids]
        d = self._store._runBlocking(
            self._store._removeBlocking, self.account, entries, "pop3"
        )

        def removed(_: object) -> None:
            for entry in entries:
                self._entries.pop(entry.uid, None)
                self._order.remove(entry.uid)

        return d.addCallback(removed)

    def release(self) -> None:
        if self._lockFd is None:
            return
        fd, self._lockFd = self._lockFd, None
        try:
            unlockMailbox(fd)
        finally:
            self._onRelease()
