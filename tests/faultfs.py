"""
Real file system faults for tests: a small tmpfs mounted for one test (a
disk that fills up, a spool that is remounted read-only at runtime), a file
table filled up to EMFILE, and an injected EIO on fsync where the kernel
cannot be made to produce one.
"""

import contextlib
import errno
import os
import resource
import subprocess

from twisted.trial.unittest import SkipTest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def mountTmpfs(testCase, size: str = "1m") -> str:
    """
    Mount a tmpfs of C{size} (mode 0700, as the spool wants) on a new
    directory, unmounted in the test's cleanup.  Mounting needs root (or
    CAP_SYS_ADMIN): without it the test skips, but under CI=true it fails.

    @return: the mount point.
    """
    path = os.path.abspath(testCase.mktemp())
    os.makedirs(path)
    done = _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs: {done.stderr.strip()}"
        if os.environ.get("CI") == "true":
            testCase.fail(reason + " (CI runs the tests as root)")
        raise SkipTest(reason)
    testCase.addCleanup(subprocess.run, ["umount", "-l", path], capture_output=True)
    return path


def remount(path: str, mode: str) -> None:
    """
    Remount the tmpfs at C{path} C{"ro"} or C{"rw"}, as an operator (or the
    kernel after an error) would under a running MSA.
    """
    done = _mount("-o", f"remount,{mode}", path)
    if done.returncode != 0:
        raise RuntimeError(f"remount {mode} {path}: {done.stderr.strip()}")


def fillFileSystem(directory: str) -> str:
    """
    Fill the file system of C{directory} up to ENOSPC with one file.

    @return: the file's path; removing it frees the space.
    """
    path = os.path.join(directory, "filler")
    chunk = b"f" * 65536
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                written = os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
                continue
            if written < len(chunk):
                chunk = chunk[: max(1, len(chunk) // 2)]
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def fileTableFull():
    """
    Within the block, this process cannot open one more file: the soft
    RLIMIT_NOFILE is lowered to just above the open descriptors and the
    rest is filled with /dev/null; both are undone on exit.  Whatever opens
    a file in the block gets a real EMFILE from the kernel.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    held = []
    try:
        while True:
            try:
                held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as e:
                if e.errno != errno.EMFILE:
                    raise
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class FailingFsync:
    """
    Make C{os.fsync} fail with EIO for the files under C{directory} (the
    others, e.g. the test's own, are synced as usual), while C{active}.

    Why injected: a real EIO from fsync needs a block device that fails
    writes (dm-error, dm-flakey or a failing loop device); the test
    machine offers no device mapper and a tmpfs never fails a sync.  The
    spool's code path (the fsync raising OSError in the commit thread) is
    the same.

    @ivar calls: the paths whose fsync failed.
    """

    def __init__(self, testCase, directory: str) -> None:
        self.directory = os.path.realpath(directory) + os.sep
        self.active = True
        self.calls: list[str] = []
        self._fsync = os.fsync
        os.fsync = self
        testCase.addCleanup(setattr, os, "fsync", self._fsync)

    def __call__(self, fd) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        path = os.readlink(f"/proc/self/fd/{fd}")
        if self.active and (path + os.sep).startswith(self.directory):
            self.calls.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._fsync(fd)
