# -*- test-case-name: tests.test_mailbox -*-
"""
The names of a Maildir mailbox: the directory of an account, the unique id
of a message and the file name that carries it with the message's size and
digest.

A delivered message is one file, C{new/<uid>,S=<size>,H=<sha256>}: the
name is what the link into C{new/} makes durable in one atomic step, so a
file visible in C{new/} always has its size and digest with it (no sidecar
that a crash could separate from it).  Dovecot reads C{,S=} the same way.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from urllib.parse import unquote

import attrs

__all__ = [
    "MessageName",
    "accountDirectoryName",
    "decodeAccountDirectory",
    "newUid",
    "parseMessageName",
]

#: The characters an account name keeps as they are in its directory name.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-@")
_UID = re.compile(r"(\d{10,})\.M(\d{6})P(\d+)Q(\d+)R([0-9a-f]{16})")
_SHA256 = re.compile(r"[0-9a-f]{64}")

_counterLock = threading.Lock()
_counter = 0
_lastMicroseconds = 0


def accountDirectoryName(account: str) -> str:
    """
    The directory name of C{account}'s mailbox: the name itself when it is
    made of letters, digits, C{_ - @} and inner dots; otherwise every other
    byte of its UTF-8 form (a C{/}, a leading dot, C{%}, spaces) as
    C{%XX}, so that no name can climb out of the mailboxes directory, hide
    as a dot file or collide with another account's.
    """
    out = []
    for index, char in enumerate(account):
        if char in _SAFE or (char == "." and index > 0):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    name = "".join(out)
    if not name:
        raise ValueError("an account name cannot be empty")
    return name


def decodeAccountDirectory(name: str) -> str:
    """
    The account name of a mailbox directory: L{accountDirectoryName}
    undone.
    """
    return unquote(name, errors="strict")


def newUid(now: float | None = None) -> str:
    """
    A new unique id for a message: C{<seconds>.M<microseconds>P<pid>Q<n>R<64
    random bits in hex>}, about 50 printable ASCII characters (POP3 UIDL
    allows 70).  The time is strictly increasing within this process and
    the counter never repeats within it; the process id and the random part
    keep two processes (or a restarted one whose clock went back) apart.
    A uid is never given twice, so a deleted message's uid is never reused.

    @param now: the POSIX time of the delivery (by default the clock's).
    """
    global _counter, _lastMicroseconds
    with _counterLock:
        micros = time.time_ns() // 1000 if now is None else int(now * 1_000_000)
        micros = max(micros, _lastMicroseconds + 1)
        _lastMicroseconds = micros
        _counter += 1
        counter = _counter
    seconds, micro = divmod(micros, 1_000_000)
    return f"{seconds}.M{micro:06d}P{os.getpid()}Q{counter}R{secrets.token_hex(8)}"


@attrs.frozen
class MessageName:
    """
    What a message file's name says.

    @ivar uid: its unique id (L{newUid}, or the base name of a file another
        Maildir writer put there).
    @ivar size: its length in octets, or C{None} when the name does not say.
    @ivar sha256: the hex SHA-256 of its bytes, or C{""}.
    @ivar deliveredAt: POSIX time of its delivery from the uid, or C{None}.
    """

    uid: str
    size: int | None
    sha256: str
    deliveredAt: float | None

    def fileName(self) -> str:
        """
        The name of the file in C{new/}.
        """
        return f"{self.uid},S={self.size},H={self.sha256}"


def parseMessageName(name: str) -> MessageName | None:
    """
    Read a file name of C{new/} or C{cur/} (C{cur/} adds C{:2,<flags>}).

    @return: what it says, or C{None} for a dot file (a lock, a temporary
        file) or a name that is not a printable uid.
    """
    base = name.split(":", 1)[0]
    if not base or base.startswith("."):
        return None
    uid, *fields = base.split(",")
    if len(uid) > 70 or not all(0x21 <= ord(c) <= 0x7E for c in uid):
        return None
    size: int | None = None
    sha256 = ""
    for field in fields:
        key, _, value = field.partition("=")
        if key == "S" and value.isdigit():
            size = int(value)
        elif key == "H" and _SHA256.fullmatch(value):
            sha256 = value
    match = _UID.fullmatch(uid)
    deliveredAt = (
        int(match.group(1)) + int(match.group(2)) / 1e6 if match is not None else None
    )
    return MessageName(uid=uid, size=size, sha256=sha256, deliveredAt=deliveredAt)
