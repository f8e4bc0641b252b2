# -*- test-case-name: tests.test_mailbox -*-
"""
What leaves the mailboxes without being fetched: messages past C{[mailbox]
expire_after} (L{expireMailboxes}) and the leftovers of crashed deliveries
in C{tmp/} (L{removeLeftovers}).  Blocking: the store runs them in a thread.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger

from msa.errors import MailboxInUse
from msa.mailbox.listing import mailboxDirectories
from msa.mailbox.names import decodeAccountDirectory

__all__ = ["expireMailboxes", "removeLeftovers"]

log = Logger()


def expireMailboxes(store: Any, cutoff: float) -> int:
    """
    Remove every message of C{store} (L{msa.mailbox.MaildirStore})
    delivered before C{cutoff} (POSIX time), with a C{mailbox-expired}
    audit record each.  A mailbox that a POP3 session holds is left for the
    next sweep.

    @return: the number removed.
    """
    removed = 0
    for name in mailboxDirectories(store.directory):
        account = decodeAccountDirectory(name)
        try:
            removed += len(
                store.removeMessages(
                    account, lambda e: e.deliveredAt < cutoff, "expired"
                )
            )
        except MailboxInUse:
            log.info("mailbox of {account} in use: expiry later", account=account)
        except OSError as e:
            log.error("cannot expire in {account}: {e}", account=account, e=e)
    return removed


def removeLeftovers(directory: str, cutoff: float) -> int:
    """
    Remove the files in the C{tmp/} of each Maildir under C{directory}
    last changed before C{cutoff} (POSIX time).

    @return: the number removed.
    """
    removed = 0
    for name in mailboxDirectories(directory):
        tmp = os.path.join(directory, name, "tmp")
        for leftover in os.listdir(tmp) if os.path.isdir(tmp) else ():
            path = os.path.join(tmp, leftover)
            try:
                if os.stat(path).st_mtime <= cutoff:
                    os.unlink(path)
                    removed += 1
            except OSError:
                continue
    return removed
