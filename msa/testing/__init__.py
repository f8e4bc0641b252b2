# -*- test-case-name: tests.test_testing -*-
"""
Fakes for testing code that embeds the MSA, shipped with it as C{treq.testing}
ships with treq: an embedder's own realm, avatar, content policy or spool can
be tested against the real protocol without sockets, disk or wall-clock time.

  - L{MemorySpool} (L{msa.testing.spool}): an L{ISpool} that keeps each
    committed message (its envelope and its exact bytes) in a list, and can
    be told to fail the next commit, to test what a client hears when the
    disk lets you down.
  - L{MemoryAccountStore}, L{MemoryChecker}, L{memoryRealm} and
    L{memoryPortal} (L{msa.testing.accounts}): accounts with plain-text
    passwords for AUTH PLAIN and LOGIN, behind the real
    L{msa.accounts.checkers.SubmissionRealm} and the real avatar
    (L{msa.submission.avatar.submissionFactory}).
  - L{MemoryMailboxStore} (L{msa.testing.mailbox}): an L{IMailboxStore} of
    return messages in memory, with the store's lock (C{MailboxInUse}),
    snapshots and deletions only at C{commitDeletions}; it can be told to
    fail the next commit.
  - L{Harness} (L{msa.testing.harness}): one
    L{msa.submission.server.SubmissionServer} on a string transport that
    pretends to start TLS, driven by a L{Clock}, with helpers that speak
    SMTP to it and return the reply lines.

A whole submission in a few lines::

    from msa.testing import Harness

    h = Harness()
    h.login()
    h.submit(b"Subject: hi\\r\\n\\r\\nHello\\r\\n")
    [(envelope, data)] = h.spool.committed

Everything here runs synchronously: the harness advances its clock itself
while the server holds back a reply (the delay after a failed login).
"""

from msa.testing.accounts import (
    SENDERS,
    MemoryAccountStore,
    MemoryChecker,
    memoryPortal,
    memoryRealm,
    testAccount,
)
from msa.testing.harness import Harness, TLSStringTransport, dotStuff
from msa.testing.mailbox import MemoryMailbox, MemoryMailboxStore
from msa.testing.spool import MemorySpool, MemoryWriter, StoredMessage, commitFailed

__all__ = [
    "SENDERS",
    "Harness",
    "MemoryAccountStore",
    "MemoryChecker",
    "MemoryMailbox",
    "MemoryMailboxStore",
    "MemorySpool",
    "MemoryWriter",
    "StoredMessage",
    "TLSStringTransport",
    "commitFailed",
    "dotStuff",
    "memoryPortal",
    "memoryRealm",
    "testAccount",
]
