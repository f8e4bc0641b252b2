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
from collections.abc import Iterable, Sequence

__all__ = ["fsyncDirectory", "publish", "writeDurably", "writeSynced"]


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


def _removeQuietly(path: str) -> None:
    """
    Remove a temporary file after a failure, keeping that failure the one
    reported: a file system that refuses even this (read-only) leaves it
    for the caller's recovery.
    """
    try:
        os.unlink(path)
    except OSError:
        pass


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
        _removeQuietly(tmpPath)
        raise
