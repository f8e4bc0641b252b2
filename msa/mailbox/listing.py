# -*- test-case-name: tests.test_mailbox -*-
"""
What a Maildir of the store holds: its messages in delivery order
(L{listMaildir}) and the mailboxes under the store's directory
(L{mailboxDirectories}).  Reading only, blocking: call these in a thread.
"""

from __future__ import annotations

import os

import attrs

from msa.mailbox.names import parseMessageName

__all__ = ["MailboxEntry", "listMaildir", "mailboxDirectories"]


@attrs.frozen
class MailboxEntry:
    """
    One message file of a mailbox, as a listing found it.

    @ivar uid: its unique id (POP3 UIDL).
    @ivar size: its length in octets.
    @ivar sha256: the hex SHA-256 kept with it (C{""} if the name has none).
    @ivar deliveredAt: POSIX time of its delivery.
    @ivar path: the file.
    """

    uid: str
    size: int
    sha256: str
    deliveredAt: float
    path: str


def listMaildir(path: str) -> list[MailboxEntry]:
    """
    The messages in C{new/} and C{cur/} of the Maildir at C{path}, in
    delivery order (time, then uid).  A file whose name does not say its
    size or time (another Maildir writer's) is measured instead.
    """
    entries = []
    for sub in ("new", "cur"):
        directory = os.path.join(path, sub)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for fileName in names:
            parsed = parseMessageName(fileName)
            if parsed is None:
                continue
            filePath = os.path.join(directory, fileName)
            size, deliveredAt = parsed.size, parsed.deliveredAt
            if size is None or deliveredAt is None:
                try:
                    st = os.stat(filePath)
                except FileNotFoundError:
                    continue
                size = st.st_size if size is None else size
                deliveredAt = st.st_mtime if deliveredAt is None else deliveredAt
            entries.append(
                MailboxEntry(
                    uid=parsed.uid,
                    size=size,
                    sha256=parsed.sha256,
                    deliveredAt=deliveredAt,
                    path=filePath,
                )
            )
    entries.sort(key=lambda e: (e.deliveredAt, e.uid))
    return entries


def mailboxDirectories(directory: str) -> list[str]:
    """
    The names of the Maildirs under C{directory}, sorted (dot files left
    out).
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        n
        for n in names
        if not n.startswith(".") and os.path.isdir(os.path.join(directory, n, "new"))
    )
