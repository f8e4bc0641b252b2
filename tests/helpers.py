"""
Shared test fixtures: an in-memory portal and spool for protocol unit tests
(no sockets, no disk: the real spool and real sockets are exercised by the
end-to-end tests), and a harness that drives a L{SubmissionServer} over a
L{StringTransport}.

They live in L{msa.testing}, shipped for embedders; these names are kept so
that the tests keep importing them from here.
"""

from msa.testing import (
    SENDERS,
    Harness,
    MemoryChecker,
    MemorySpool,
    MemoryWriter,
    TLSStringTransport,
    memoryPortal,
    memoryRealm,
    testAccount,
)

#: An account of the unit tests: C{FakeAccount(name)} may send as L{SENDERS}.
FakeAccount = testAccount


def SimpleRealm(
    spool, hostname, serverRules=None, extras=None, contentPolicy=None, users=("alice",)
):
    """
    The realm of L{memoryPortal}: the real L{msa.checkers.SubmissionRealm}
    and avatar over in-memory accounts C{users}.
    """
    return memoryRealm(spool, hostname, users, serverRules, extras, contentPolicy)


__all__ = [
    "SENDERS",
    "FakeAccount",
    "Harness",
    "MemoryChecker",
    "MemorySpool",
    "MemoryWriter",
    "SimpleRealm",
    "TLSStringTransport",
    "memoryPortal",
]
