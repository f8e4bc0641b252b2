# -*- test-case-name: tests.test_pop3 -*-
"""
The TRANSACTION state's view of a locked mailbox (RFC 1939 5): message
numbers over the snapshot, the messages marked deleted, and the replies of
STAT, LIST, UIDL, DELE and RSET, and the UPDATE state at QUIT
(L{Maildrop.update}).  The mailbox's files are read only by
L{msa.pop3.retrieval}, and deleted only at QUIT.

A message number is looked up only in this session's own snapshot, so no
number, uid or name a client sends can reach another account's message.
"""

import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa.envelope import StoredMessage
from msa.interfaces import IMailbox
from msa.pop3.replies import SYS_TEMP, Reply, error, ok

log = Logger()

_NUMBER = re.compile(rb"[1-9][0-9]{0,9}")


def parseNumber(argument: bytes) -> int | None:
    """
    A message number as RFC 1939 writes it (decimal, no sign, no zero),
    or L{None}.
    """
    if _NUMBER.fullmatch(argument) is None:
        return None
    return int(argument)


class Maildrop:
    """
    One session's mailbox in the TRANSACTION state.

    @ivar mailbox: the locked mailbox (the session's avatar).
    @ivar messages: its snapshot, in delivery order; number n is index n-1.
    @ivar deleted: the numbers marked by DELE, undone by RSET, removed at
        QUIT.
    """

    def __init__(self, mailbox: IMailbox) -> None:
        self.mailbox = mailbox
        self.messages: list[StoredMessage] = list(mailbox.messages())
        self.deleted: set[int] = set()

    def message(self, argument: bytes | None) -> tuple[int, StoredMessage] | Reply:
        """
        The message a command's argument names, or the C{-ERR} to answer.
        """
        number = parseNumber(argument or b"")
        if number is None:
            return error("Invalid message number")
        if number > len(self.messages) or number in self.deleted:
            return error("No such message")
        return number, self.messages[number - 1]

    def _live(self) -> list[tuple[int, StoredMessage]]:
        return [(n, m) for n, m in enumerate(self.messages, 1) if n not in self.deleted]

    def stat(self) -> Reply:
        live = self._live()
        return ok(f"{len(live)} {sum(m.size for _, m in live)}")

    def listing(self, argument: bytes | None) -> Reply:
        """
        LIST [msg]: the size of one message, or of each.
        """
        return self._perMessage(argument, lambda m: str(m.size))

    def uidl(self, argument: bytes | None) -> Reply:
        """
        UIDL [msg] (RFC 1939 7): the unique id of one message, or of each.
        """
        return self._perMessage(argument, lambda m: m.uid)

    def _perMessage(self, argument: bytes | None, field) -> Reply:
        if argument is not None:
            found = self.message(argument)
            if isinstance(found, Reply):
                return found
            number, message = found
            return ok(f"{number} {field(message)}")
        live = self._live()
        lines = tuple(f"{n} {field(m)}".encode("ascii") for n, m in live)
        return ok(f"{len(live)} messages", lines)

    def delete(self, argument: bytes | None) -> Reply:
        found = self.message(argument or b"")
        if isinstance(found, Reply):
            return found
        number, _ = found
        self.deleted.add(number)
        return ok(f"Message {number} marked for deletion")

    def reset(self) -> Reply:
        self.deleted.clear()
        return self.stat()

    def deletedUids(self) -> list[str]:
        """
        The uids to remove at QUIT, in delivery order.
        """
        return [self.messages[n - 1].uid for n in sorted(self.deleted)]

    def update(self, sessionId: str) -> defer.Deferred[Reply]:
        """
        The UPDATE state (QUIT): remove the messages marked by DELE through
        L{IMailbox.commitDeletions}; the reply is C{+OK} only once that is
        durable, C{-ERR [SYS/TEMP]} when it fails (what was not removed
        stays).  The caller releases the mailbox after it.
        """
        uids = self.deletedUids()
        if not uids:
            return defer.succeed(Reply(True, "Bye, nothing deleted", close=True))
        d = defer.maybeDeferred(self.mailbox.commitDeletions, uids)

        def failed(failure: Failure) -> Reply:
            log.failure(
                "session {session}: deletions in {account} failed",
                failure,
                session=sessionId,
                account=self.mailbox.account,
            )
            return error(
                SYS_TEMP + "Cannot delete now; what is not deleted is kept", close=True
            )

        return d.addCallbacks(
            lambda _: Reply(True, f"Bye, {len(uids)} message(s) deleted", close=True),
            failed,
        )
