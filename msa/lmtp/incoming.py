# -*- test-case-name: tests.test_lmtp -*-
"""
One message arriving over LMTP (L{IncomingMessage}): written to an
anonymous temporary file as it arrives (never held whole in memory) and
hashed on its way, then delivered into each recipient's mailbox
(L{deliverToMailboxes}), one reply per recipient in RCPT order.

The temporary file has no name (C{O_TMPFILE} where the system has it):
whatever happens to the process, nothing of a message that was not
delivered stays on disk.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any, BinaryIO

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from msa.errors import SMTPReply
from msa.interfaces import IMailboxStore
from msa.mailbox.maildir import runBlocking

__all__ = ["IncomingMessage", "Recipient", "deliverToMailboxes"]

log = Logger()

#: Bytes buffered before a write to the temporary file.
WRITE_BUFFER = 64 * 1024

TEMPORARY_FAILURE = SMTPReply(451, "4.3.0", "Cannot store the message, try again later")


@attrs.frozen
class Recipient:
    """
    One accepted RCPT.

    @ivar address: as the client gave it.
    @ivar account: the account whose mailbox receives it.
    """

    address: str
    account: str


class _PositionalReader:
    """
    A reader of its own over a shared file descriptor (C{pread}), so that
    deliveries into several mailboxes can copy one file at once.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(os.fstat(self._fd).st_size - self._offset, 0)
        data = os.pread(self._fd, size, self._offset)
        self._offset += len(data)
        return data


class IncomingMessage:
    """
    The temporary file of one message being received.

    @ivar size: octets written so far.
    """

    def __init__(self, reactor: Any, file: BinaryIO) -> None:
        self._reactor = reactor
        self._file = file
        self._digest = hashlib.sha256()
        self._pending = bytearray()
        self.size = 0

    @classmethod
    def create(cls, reactor: Any, directory: str | None) -> defer.Deferred:
        """
        Make the temporary file in C{directory} (the system's by default),
        in the thread pool.

        @return: a L{Deferred} firing with an L{IncomingMessage}.
        """
        return runBlocking(
            reactor, lambda: cls(reactor, tempfile.TemporaryFile(dir=directory))
        )

    def write(self, data: bytes) -> None:
        """
        Append C{data} (unstuffed message text, CRLF line endings).
        """
        self._digest.update(data)
        self.size += len(data)
        self._pending += data
        if len(self._pending) >= WRITE_BUFFER:
            self._flushPending()

    def _flushPending(self) -> None:
        self._file.write(self._pending)
        self._pending = bytearray()

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def finish(self) -> None:
        """
        Write what is buffered; the file is complete.
        """
        self._flushPending()
        self._file.flush()

    def reader(self) -> _PositionalReader:
        """
        A reader positioned at the first byte, of its own.
        """
        return _PositionalReader(self._file.fileno())

    def discard(self) -> None:
        """
        Close (and so remove) the temporary file, in the thread pool: the
        last close of a large file frees its blocks, which takes time.
        """
        runBlocking(self._reactor, self._closeQuietly)

    def _closeQuietly(self) -> None:
        try:
            self._file.close()
        except OSError as e:
            log.info("closing an LMTP temporary file: {e}", e=e)


def deliverToMailboxes(
    store: IMailboxStore,
    message: IncomingMessage,
    sender: str,
    recipients: Sequence[Recipient],
    auditFields: dict[str, Any] | None = None,
) -> defer.Deferred[list[SMTPReply]]:
    """
    Deliver C{message} once into the mailbox of each account among
    C{recipients} (two addresses of one account share one copy), all at
    once.

    @return: a L{Deferred} firing with one reply per recipient, in their
        order: 250 2.0.0 with the uid once that mailbox has the message
        durably, else the store's refusal (452 4.2.2 over quota, 451).
        It never fails.
    """
    try:
        message.finish()
    except OSError as e:
        log.error("cannot write an LMTP message: {e}", e=e)
        return defer.succeed([TEMPORARY_FAILURE for _ in recipients])
    byAccount: dict[str, list[str]] = {}
    for recipient in recipients:
        byAccount.setdefault(recipient.account, []).append(recipient.address)
    deliveries = {}
    for account, addresses in byAccount.items():
        fields = {"sender": sender, "recipients": addresses, **(auditFields or {})}
        deliveries[account] = defer.maybeDeferred(
            store.deliver,
            account,
            message.reader(),
            message.size,
            message.sha256,
            auditFields=fields,
        )

    def reply(result: Any) -> SMTPReply:
        if isinstance(result, str):
            return SMTPReply(250, "2.0.0", f"Ok: delivered as {result}")
        if result.check(SMTPReply):
            return result.value
        log.failure("mailbox delivery failed", result)
        return TEMPORARY_FAILURE

    accounts = list(deliveries)
    d = defer.DeferredList(
        [deliveries[account] for account in accounts], consumeErrors=True
    )

    def collect(results: list) -> list[SMTPReply]:
        byName = {
            account: reply(value)
            for account, (ok, value) in zip(accounts, results, strict=True)
        }
        return [byName[recipient.account] for recipient in recipients]

    return d.addCallback(collect)
