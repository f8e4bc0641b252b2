# -*- test-case-name: tests.test_durable,tests.test_groupcommit -*-
"""
Durable file replacement, the one way the MSA writes a file that must
survive a power loss: the outbox, the account file.  (The spool's queue
files are written once and changed in place: L{msa.queue.queuefile}.)

The order is what makes it durable and atomic: write a temporary file in
the target's directory, fsync it, rename it over the target (atomic on
POSIX: a reader sees the old file or the new one, never a mix), then fsync
the directory, so that the rename itself is on disk.  A failure at any step
before the rename leaves the old file as it was and removes the temporary
file.

Where many writers need the same fsync (the spool's C{queue/} directory,
the audit log), L{GroupCommit} lets them share it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import defer

from msa.groupcommit import GroupCommit

__all__ = [
    "DirectorySync",
    "GroupCommit",
    "fsyncDirectory",
    "publish",
    "unlinkQuietly",
    "writeDurably",
    "writeSynced",
]


def fsyncDirectory(path: str) -> None:
    """
    Make the entries of directory C{path} (created, renamed, removed files)
    durable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """
    Group commit of a directory's fsync (a L{GroupCommit} whose rounds are
    one fsync of the directory): threads that each need their own changes
    to the directory (renames, creations, removals) made durable call
    L{sync}; concurrent callers share one fsync.

    The guarantee for each caller is the same as its own L{fsyncDirectory}
    would give: L{sync} returns only after an fsync of the directory that
    I{started after} the call did, so after every change the caller made
    before calling it.

    @ivar fsyncs: how many fsyncs were run (for tests and curiosity).
    @ivar waiting: how many callers wait for another's fsync (for tests).
    """

    def __init__(
        self,
        path: str,
        fsync: Callable[[str], None] = fsyncDirectory,
        reactor: Any = None,
        gatherDelay: float = 0.0,
    ) -> None:
        """
        @param reactor: for L{syncLater} (see L{GroupCommit}).
        @param gatherDelay: for L{syncLater} (see L{GroupCommit}).
        """
        self.path = path
        self._fsync = fsync
        self._commits: GroupCommit[None, None] = GroupCommit(
            self._round, reactor, gatherDelay
        )

    def _round(self, jobs: list[None]) -> list[None]:
        self._fsync(self.path)
        return [None] * len(jobs)

    @property
    def fsyncs(self) -> int:
        return self._commits.rounds

    @property
    def waiting(self) -> int:
        return self._commits.waiting

    def sync(self) -> None:
        """
        Make the entries of the directory durable, as L{fsyncDirectory}
        does; blocks (call it in a thread, never the reactor's).

        @raise OSError: the error of the fsync that served this call: every
            caller of a failed round gets it.
        """
        self._commits.commitBlocking(None)

    def syncLater(self) -> defer.Deferred[None]:
        """
        L{sync} from the reactor thread, without holding a thread while it
        waits: the round may wait for company (C{gatherDelay}).

        @return: a L{Deferred} firing once the directory's entries are
            durable, or failing with the fsync's L{OSError}.
        """
        return self._commits.commit(None)


def writeSynced(
    path: str,
    data: bytes | Iterable[bytes],
    mode: int = 0o600,
    exclusive: bool = False,
) -> None:
    """
    Write C{data} to the file at C{path} (created with C{mode}, less the
    umask, as L{os.open} does; truncated if it exists, unless C{exclusive})
    and fsync it.  Not atomic by itself: see L{writeDurably}.

    @param data: the bytes, or an iterable of chunks (written as they come,
        never joined in memory).
    @raise OSError: from the file system; the file may be left partly
        written (the caller removes it).
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        for chunk in [data] if isinstance(data, bytes | bytearray) else data:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(moves: Sequence[tuple[str, str]], directory: str) -> None:
    """
    Rename each C{(source, target)} in order (each replacing its target
    atomically), then fsync C{directory}, the targets' directory: the step
    that makes written and fsynced files visible, durably.
    """
    for source, target in moves:
        os.replace(source, target)
    fsyncDirectory(directory)


def writeDurably(
    path: str | os.PathLike[str],
    data: bytes | Iterable[bytes],
    mode: int = 0o600,
    tmpPath: str | None = None,
    directorySync: DirectorySync | None = None,
) -> None:
    """
    Replace the file at C{path} with C{data}, atomically and durably: see
    the module docstring.

    @param mode: of the new file, less the umask.
    @param tmpPath: the temporary file, in C{path}'s directory; by default a
        new unique name, C{.<name>.<random>.tmp}, so that two writers never
        share one.  A given name is truncated if it exists (a leftover of a
        crash).
    @param directorySync: the group commit of C{path}'s directory, when
        concurrent writers share its fsync; by default it is fsynced alone.
    @raise OSError: from the file system; C{path} is then unchanged (unless
        only the final directory fsync failed) and the temporary file gone.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    exclusive = tmpPath is None
    if tmpPath is None:
        name = f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
        tmpPath = os.path.join(directory, name)
    try:
        writeSynced(tmpPath, data, mode, exclusive=exclusive)
        if directorySync is None:
            publish([(tmpPath, path)], directory)
        else:
            os.replace(tmpPath, path)
            directorySync.sync()
    except BaseException:
        # The failure above is the one reported; a file system that refuses
        # even this (read-only) leaves the file for the caller's recovery.
        unlinkQuietly(tmpPath, keepErrors=True)
        raise


def unlinkQuietly(path: str, keepErrors: bool = False) -> OSError | None:
    """
    Remove the file at C{path}; one that is already gone is no error (a
    removal repeated after a crash, the cleanup of a file never created).
    The one way the spool, the relay and the durable writes remove a file.

    @param keepErrors: for a cleanup on a path that must not fail (another
        failure is already being reported, a refusal is on its way to the
        client): any other error (a read-only file system) is returned
        instead of raised, for the caller to log; the file is then left for
        the recovery at the next start (L{msa.queue.spool.Spool.recover}).
    @return: the error kept, or L{None}.
    @raise OSError: any error but a missing file, unless C{keepErrors}.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if not keepErrors:
            raise
        return e
    return None
