# -*- test-case-name: tests.test_durable -*-
"""
Durable file replacement, the one way the MSA writes a file that must
survive a power loss: the spool's state files and committed messages, the
outbox, the account file.

The order is what makes it durable and atomic: write a temporary file in
the target's directory, fsync it, rename it over the target (atomic on
POSIX: a reader sees the old file or the new one, never a mix), then fsync
the directory, so that the rename itself is on disk.  A failure at any step
before the rename leaves the old file as it was and removes the temporary
file.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "DirectorySync",
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
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Round:
    """
    One directory fsync of L{DirectorySync} and the callers it serves.
    """

    done = False
    error: BaseException | None = None


class DirectorySync:
    """
    Group commit of a directory's fsync: threads that each need their own
    changes to the directory (renames, creations, removals) made durable
    call L{sync}; concurrent callers share one fsync.

    The guarantee for each caller is the same as its own L{fsyncDirectory}
    would give: L{sync} returns only after an fsync of the directory that
    I{started after} the call did, so after every change the caller made
    before calling it.  Callers that arrive while an fsync runs join the
    next round, which one of them runs when the current one is over; so at
    most one fsync of the directory runs at a time, and under load one
    fsync serves many messages.

    @ivar fsyncs: how many fsyncs were run (for tests and curiosity).
    @ivar waiting: how many callers wait for another's fsync (for tests).
    """

    def __init__(
        self, path: str, fsync: Callable[[str], None] = fsyncDirectory
    ) -> None:
        self.path = path
        self._fsync = fsync
        self._lock = threading.Condition()
        self._pending: _Round | None = None
        self._running = False
        self.fsyncs = 0
        self.waiting = 0

    def sync(self) -> None:
        """
        Make the entries of the directory durable, as L{fsyncDirectory}
        does; blocks (call it in a thread, never the reactor's).

        @raise OSError: the error of the fsync that served this call: every
            caller of a failed round gets it.
        """
        with self._lock:
            current = self._pending
            if current is None:
                current = self._pending = _Round()
            while not current.done:
                if self._running:
                    self.waiting += 1
                    self._lock.wait()
                    self.waiting -= 1
                    continue
                # Nobody runs an fsync: this caller runs its round's.
                self._pending = None
                self._running = True
                self._lock.release()
                try:
                    self._fsync(self.path)
                except BaseException as e:
                    current.error = e
                finally:
                    self._lock.acquire()
                    self.fsyncs += 1
                    current.done = True
                    self._running = False
                    self._lock.notify_all()
        if current.error is not None:
            raise current.error


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
) -> None:
    """
    Replace the file at C{path} with C{data}, atomically and durably: see
    the module docstring.

    @param mode: of the new file, less the umask.
    @param tmpPath: the temporary file, in C{path}'s directory; by default a
        new unique name, C{.<name>.<random>.tmp}, so that two writers never
        share one.  A given name is truncated if it exists (a leftover of a
        crash).
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
        publish([(tmpPath, path)], directory)
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
