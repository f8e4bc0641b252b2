# -*- test-case-name: tests.test_mailbox -*-
"""
The default mailbox store (R16): a Maildir per account under the state
directory, C{<directory>/<account>/{tmp,new,cur}}.

A delivery (L{MaildirStore.deliver}) is durable before it is announced, in
the spool's order: the message is copied to C{tmp/<uid>} and fsynced, linked
into C{new/} under a name that carries its size and SHA-256
(L{msa.mailbox.names}), C{new/} is fsynced, and the C{mailbox-delivered}
audit record is appended; only then does the L{Deferred} fire with the uid.
A crash before the link leaves nothing visible (C{tmp/} is emptied by
L{MaildirStore.recover}); after it, the message is whole.  The messages
are kept as delivered: CRLF line endings, so that the digest and a POP3
client see exactly the bytes the core sent.

All file work runs in the reactor's thread pool.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from msa.audit import AuditError, AuditLog
from msa.durable import DirectorySync, fsyncDirectory, writeSynced
from msa.errors import MailboxInUse, SMTPReply
from msa.interfaces import IMailboxStore
from msa.mailbox.listing import MailboxEntry, listMaildir, mailboxDirectories
from msa.mailbox.names import (
    MessageName,
    accountDirectoryName,
    decodeAccountDirectory,
    newUid,
)
from msa.mailbox.retention import expireMailboxes, removeLeftovers
from msa.mailbox.session import MaildirMailbox, lockMailbox, unlockMailbox
from msa.threadpool import runBlocking

__all__ = ["MaildirStore", "Quota", "runBlocking"]

log = Logger()

#: How much of a message is in memory while it is copied.
COPY_BLOCK = 64 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)
#: A file in a mailbox's C{tmp/} this old is a crashed delivery's leftover
#: (a delivery copies for seconds, not hours).
TMP_LEFTOVER_AGE = 3600.0


@attrs.frozen
class Quota:
    """
    The most one mailbox may hold; C{0} means no limit.

    @ivar maxBytes: the sum of its messages' sizes.
    @ivar maxMessages: the number of its messages.
    """

    maxBytes: int = 0
    maxMessages: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.maxBytes or self.maxMessages)

    def check(self, messages: int, octets: int, size: int) -> None:
        """
        @raise SMTPReply: 452 4.2.2 when one more message of C{size}
            octets would take a mailbox holding C{messages} messages of
            C{octets} octets over this quota (every store says it alike).
        """
        if self.maxMessages and messages + 1 > self.maxMessages:
            raise SMTPReply(452, "4.2.2", "Mailbox full: too many messages")
        if self.maxBytes and octets + size > self.maxBytes:
            raise SMTPReply(452, "4.2.2", "Mailbox full: over its size quota")


def _noQuota(account: str) -> Quota:
    return Quota()


def _blocks(source: BinaryIO, digest: Any, counted: list[int]) -> Iterator[bytes]:
    """
    The blocks of C{source}, hashed and counted on their way.
    """
    while block := source.read(COPY_BLOCK):
        digest.update(block)
        counted[0] += len(block)
        yield block


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@implementer(IMailboxStore)
class MaildirStore:
    """
    The Maildirs under C{directory}, one per account; see the module
    docstring.

    @ivar audit: the audit log each delivery, expiry and deletion appends
        to, if any.
    """

    def __init__(
        self,
        directory: str,
        reactor: Any = None,
        audit: AuditLog | None = None,
        quotaFor: Callable[[str], Quota] = _noQuota,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.directory = os.path.abspath(directory)
        self.reactor = reactor
        self.audit = audit
        self.quotaFor = quotaFor
        self._clock = clock
        self._syncs: dict[str, DirectorySync] = {}
        self._syncsLock = threading.Lock()
        self._accountLocks: dict[str, threading.Lock] = {}
        #: Accounts with an open session in this process.
        self._open: set[str] = set()
        #: Deliveries made by this process (for the metrics).
        self.delivered = 0

    def _runBlocking(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return runBlocking(self.reactor, f, *args)

    # -- paths -----------------------------------------------------------

    def mailboxPath(self, account: str) -> str:
        """
        The Maildir of C{account} (L{accountDirectoryName}).
        """
        return os.path.join(self.directory, accountDirectoryName(account))

    def ensureDirectory(self) -> None:
        """
        Create the mailboxes' directory (mode 0700) if it is missing;
        blocking, at startup.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def _ensureMailbox(self, account: str) -> str:
        """
        Create C{account}'s Maildir if it is missing, durably (the new
        directories' entries fsynced); blocking.
        """
        path = self.mailboxPath(account)
        if os.path.isdir(os.path.join(path, "cur")):
            return path
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.makedirs(path, mode=0o700, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        fsyncDirectory(path)
        fsyncDirectory(self.directory)
        return path

    def _sync(self, directory: str) -> None:
        """
        fsync C{directory}, shared with concurrent callers
        (L{DirectorySync}).
        """
        with self._syncsLock:
            sync = self._syncs.get(directory)
            if sync is None:
                sync = self._syncs[directory] = DirectorySync(directory)
        sync.sync()

    def _accountLock(self, account: str) -> threading.Lock:
        with self._syncsLock:
            return self._accountLocks.setdefault(account, threading.Lock())

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
        L{IMailboxStore.deliver} and the module docstring.

        @param auditFields: added to the C{mailbox-delivered} record (the
            LMTP sender and recipient).
        """
        return self._runBlocking(
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
        uid = newUid(self._clock())
        name = MessageName(uid=uid, size=size, sha256=sha256, deliveredAt=None)
        tmpPath = newPath = ""
        try:
            path = self._ensureMailbox(account)
            tmpPath = os.path.join(path, "tmp", uid)
            newPath = os.path.join(path, "new", name.fileName())
            with self._accountLock(account):
                self._checkQuota(account, path, size)
                digest = hashlib.sha256()
                counted = [0]
                writeSynced(tmpPath, _blocks(source, digest, counted), exclusive=True)
                if counted[0] != size or digest.hexdigest() != sha256:
                    raise OSError(
                        errno.EIO,
                        f"copied {counted[0]} bytes (sha256 {digest.hexdigest()}),"
                        f" expected {size} (sha256 {sha256})",
                    )
                # A link never replaces a file: a uid is never given twice.
                os.link(tmpPath, newPath)
                os.unlink(tmpPath)
                self._sync(os.path.join(path, "new"))
            if self.audit is not None:
                self.audit.append(
                    "mailbox-delivered",
                    account=account,
                    uid=uid,
                    size=size,
                    sha256=sha256,
                    **auditFields,
                )
        except SMTPReply:
            raise
        except (OSError, AuditError) as e:
            log.error(
                "cannot deliver to the mailbox of {account}: {error}",
                account=account,
                error=e,
            )
            self._undoDelivery(tmpPath, newPath)
            if isinstance(e, OSError) and e.errno in _FULL:
                raise SMTPReply(452, "4.3.1", "Insufficient system storage")
            raise SMTPReply(451, "4.3.0", "Cannot store the message, try again later")
        self.delivered += 1
        return uid

    def _undoDelivery(self, tmpPath: str, newPath: str) -> None:
        """
        Remove what a failed delivery left: never announced, so it must not
        stay visible.
        """
        if tmpPath:
            _unlinkQuietly(tmpPath)
        if newPath and os.path.exists(newPath):
            _unlinkQuietly(newPath)
            try:
                fsyncDirectory(os.path.dirname(newPath))
            except OSError as e:
                log.error("cannot fsync after removing {path}: {e}", path=newPath, e=e)

    def _checkQuota(self, account: str, path: str, size: int) -> None:
        """
        @raise SMTPReply: 452 4.2.2 when one more message of C{size} octets
            would take C{account}'s mailbox over its L{Quota}.
        """
        quota = self.quotaFor(account)
        if quota.limited:
            entries = listMaildir(path)
            quota.check(len(entries), sum(e.size for e in entries), size)

    # -- reading ---------------------------------------------------------

    def listMessages(self, account: str) -> list[MailboxEntry]:
        """
        The messages waiting in C{account}'s mailbox, oldest first;
        blocking (the admin command, the metrics' thread).
        """
        return listMaildir(self.mailboxPath(account))

    def accountDirectories(self) -> list[str]:
        """
        The directory names (L{accountDirectoryName}) of the mailboxes
        that exist; blocking.
        """
        return mailboxDirectories(self.directory)

    def mailboxSummary(self) -> list[tuple[str, list[MailboxEntry]]]:
        """
        Every mailbox's account name and messages, oldest first; blocking
        (directory listings only: the metrics, C{mailbox list}).
        """
        return [
            (
                decodeAccountDirectory(name),
                listMaildir(os.path.join(self.directory, name)),
            )
            for name in self.accountDirectories()
        ]

    def close(self) -> defer.Deferred[None]:
        """
        Nothing to release: the Maildirs hold no threads or connections of
        their own (L{IMailboxStore.close}).
        """
        return defer.succeed(None)

    # -- POP3 sessions ---------------------------------------------------

    def open(self, account: str) -> defer.Deferred[MaildirMailbox]:
        """
        Lock C{account}'s mailbox and take its snapshot: see
        L{IMailboxStore.open} and L{msa.mailbox.session}.
        """
        if account in self._open:
            return defer.fail(MailboxInUse(account))
        self._open.add(account)
        d = self._runBlocking(self._openBlocking, account)
        d.addErrback(self._openFailed, account)
        return d

    def _openBlocking(self, account: str) -> MaildirMailbox:
        path = self._ensureMailbox(account)
        fd = lockMailbox(path)
        try:
            entries = listMaildir(path)
        except BaseException:
            unlockMailbox(fd)
            raise
        return MaildirMailbox(
            self, account, entries, fd, lambda: self._open.discard(account)
        )

    def _openFailed(self, failure: Any, account: str) -> Any:
        self._open.discard(account)
        return failure

    # -- removal ---------------------------------------------------------

    def _removeBlocking(
        self,
        account: str,
        entries: Sequence[MailboxEntry],
        reason: str,
        auditFields: dict[str, Any] | None = None,
    ) -> None:
        """
        Remove C{entries} of C{account}'s mailbox durably (the directories
        fsynced), then append one audit record each: C{mailbox-expired}
        for C{reason="expired"}, C{mailbox-deleted} otherwise.  The caller
        holds the mailbox's lock.  A message already gone counts as removed.
        """
        directories = set()
        for entry in entries:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            directories.add(os.path.dirname(entry.path))
        for directory in sorted(directories):
            self._sync(directory)
        if self.audit is None:
            return
        event = "mailbox-expired" if reason == "expired" else "mailbox-deleted"
        for entry in entries:
            try:
                self.audit.append(
                    event,
                    account=account,
                    uid=entry.uid,
                    size=entry.size,
                    sha256=entry.sha256,
                    reason=reason,
                    **(auditFields or {}),
                )
            except AuditError as e:
                log.critical(
                    "AUDIT RECORD LOST: {event} of {uid} in {account}: {error}",
                    event=event,
                    uid=entry.uid,
                    account=account,
                    error=e,
                )

    def removeMessages(
        self,
        account: str,
        select: Callable[[MailboxEntry], bool],
        reason: str,
        auditFields: dict[str, Any] | None = None,
    ) -> list[MailboxEntry]:
        """
        Remove the messages of C{account}'s mailbox that C{select} picks,
        under the mailbox's lock; blocking (the admin command, the expiry).

        @param auditFields: added to each removal's audit record (who).

        @return: the messages removed.
        @raise MailboxInUse: a POP3 session holds the mailbox.
        """
        path = self.mailboxPath(account)
        if not os.path.isdir(os.path.join(path, "new")):
            return []
        fd = lockMailbox(path)
        try:
            chosen = [e for e in listMaildir(path) if select(e)]
            if chosen:
                self._removeBlocking(account, chosen, reason, auditFields)
        finally:
            unlockMailbox(fd)
        return chosen

    def expire(self, maxAge: float) -> defer.Deferred[int]:
        """
        Remove every message delivered more than C{maxAge} seconds ago, in
        the thread pool, with a C{mailbox-expired} audit record each.  A
        mailbox that a POP3 session holds is left for the next sweep.

        @return: a L{Deferred} firing with the number removed.
        """
        return self._runBlocking(self._expireBlocking, maxAge)

    def _expireBlocking(self, maxAge: float) -> int:
        self.recover()
        return expireMailboxes(self, self._clock() - maxAge)

    def recover(self, minAge: float = TMP_LEFTOVER_AGE) -> int:
        """
        Remove what crashed deliveries left in the mailboxes' C{tmp/}
        (never announced) once it is C{minAge} seconds old, so that a
        delivery of another instance on the same directory in progress is
        left alone; blocking (at startup and with each expiry sweep).

        @return: the number of files removed.
        """
        return removeLeftovers(self.directory, self._clock() - minAge)
