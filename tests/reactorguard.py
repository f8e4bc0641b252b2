# -*- test-case-name: tests.test_reactorguard -*-
"""
A guard for the end-to-end tests: blocking disk work done by the MSA on
the reactor thread fails the test.

Each of these stalls every session while it runs, so the daemon does them
in the reactor's thread pool: an fsync (C{os.fsync}, C{os.fdatasync}), the
creation of a file (C{os.open} with C{O_CREAT}), and the hashing of more
than L{HASH_LIMIT} bytes by one hash object within one reactor iteration
(the streaming hash of a message as it arrives or is sent is a few KiB per
read or write; the re-hash of a whole queued message is not).

L{ReactorThreadGuard} wraps those functions while an in-process daemon runs
(L{tests.e2e.RunningMSA} installs it): a call on the reactor thread from the
MSA's code (a frame of the C{msa} package on the stack, none of the test's
own: the reactor dispatched the work to the daemon) is recorded with its
stack, and the test fails at its end with each violation's stack.  Work the
test itself does on the reactor thread (writing a fixture, tampering with
a spool file) is the test's business and is not counted.
"""

from __future__ import annotations

import hashlib
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.python import threadable

import msa

#: Bytes one hash object may hash on the reactor thread within one reactor
#: iteration.  Above the largest read from a socket (64 KiB), so that the
#: streaming hashes of the writer and the relay pass; far below a queued
#: message being re-hashed.
HASH_LIMIT = 128 * 1024

_MSA = os.path.dirname(os.path.abspath(msa.__file__)) + os.sep
_TESTS = os.path.dirname(os.path.abspath(__file__)) + os.sep
_HERE = os.path.abspath(__file__)

#: The guards installed now (nested daemons in one test share the wrappers).
_active: list[ReactorThreadGuard] = []
_originals: dict[str, Any] = {}
_lock = threading.Lock()


def _daemonStack() -> list[traceback.FrameSummary] | None:
    """
    The stack of the current call, without this module's frames, when the
    MSA's code makes it on the reactor thread on its own; else L{None}.
    """
    if not _active or not threadable.isInIOThread():
        return None
    stack = [
        f
        for f in traceback.extract_stack()[:-1]
        if os.path.abspath(f.filename) != _HERE
    ]
    files = [os.path.abspath(f.filename) for f in stack]
    if any(f.startswith(_TESTS) for f in files):
        return None
    if not any(f.startswith(_MSA) for f in files):
        return None
    return stack


def _record(what: str) -> None:
    stack = _daemonStack()
    if stack is None:
        return
    for guard in _active:
        if not guard._allowed:
            guard.violations.append((what, stack))


class _GuardedHash:
    """
    A hash object counting what it hashes on the reactor thread per
    reactor iteration.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._iteration = -1
        self._hashed = 0

    def update(self, data: Any) -> None:
        if _active and threadable.isInIOThread():
            iteration = _active[0].iterations
            if iteration != self._iteration:
                self._iteration, self._hashed = iteration, 0
            before = self._hashed
            self._hashed += len(data)
            if before <= HASH_LIMIT < self._hashed:
                _record(f"hashing of {self._hashed} bytes in one reactor iteration")
        self._inner.update(data)

    def copy(self) -> _GuardedHash:
        return _GuardedHash(self._inner.copy())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _sha256(data: bytes = b"", **kwargs: Any) -> _GuardedHash:
    guarded = _GuardedHash(_originals["sha256"](**kwargs))
    if data:
        guarded.update(data)
    return guarded


def _fsync(fd: Any) -> None:
    _record("os.fsync")
    _originals["fsync"](fd)


def _fdatasync(fd: Any) -> None:
    _record("os.fdatasync")
    _originals["fdatasync"](fd)


def _open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
    if flags & os.O_CREAT:
        _record(f"os.open({os.fspath(path)!r}, O_CREAT)")
    return _originals["open"](path, flags, *args, **kwargs)


_WRAPPERS: dict[str, tuple[Any, Callable[..., Any]]] = {
    "fsync": (os, _fsync),
    "fdatasync": (os, _fdatasync),
    "open": (os, _open),
    "sha256": (hashlib, _sha256),
}


class ReactorThreadGuard:
    """
    Record the blocking work the MSA does on the reactor thread while
    installed; see the module docstring.

    @ivar violations: C{(what, stack)} per call.
    @ivar iterations: reactor iterations since L{install}.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.violations: list[tuple[str, list[traceback.FrameSummary]]] = []
        self.iterations = 0
        self._allowed = False
        self._doIteration: Any = None

    def install(self) -> None:
        with _lock:
            if not _active:
                for name, (module, wrapper) in _WRAPPERS.items():
                    _originals[name] = getattr(module, name)
                    setattr(module, name, wrapper)
            _active.append(self)
        self._doIteration = self._reactor.__dict__.get("doIteration")
        original = self._reactor.doIteration

        def doIteration(*args: Any) -> Any:
            self.iterations += 1
            return original(*args)

        self._reactor.doIteration = doIteration

    def uninstall(self) -> None:
        with _lock:
            if self not in _active:
                return
            _active.remove(self)
            if not _active:
                for name, (module, _) in _WRAPPERS.items():
                    setattr(module, name, _originals.pop(name))
        if self._doIteration is None:
            del self._reactor.doIteration
        else:
            self._reactor.doIteration = self._doIteration

    @contextmanager
    def allowed(self) -> Iterator[None]:
        """
        Within the block, nothing is recorded: for a genuine necessity,
        with a comment saying which.
        """
        self._allowed = True
        try:
            yield
        finally:
            self._allowed = False

    def report(self) -> str:
        """
        The violations, each with its stack (the MSA's frames only), for
        the failure message.
        """
        parts = []
        for what, stack in self.violations:
            ours = [f for f in stack if os.path.abspath(f.filename).startswith(_MSA)]
            parts.append(
                f"{what} on the reactor thread:\n"
                + "".join(traceback.format_list(ours or stack))
            )
        return "\n".join(parts)

    def check(self, testCase: Any) -> None:
        """
        Uninstall, and fail C{testCase} if anything was recorded.
        """
        self.uninstall()
        if self.violations:
            testCase.fail(
                f"{len(self.violations)} blocking call(s) on the reactor "
                "thread:\n" + self.report()
            )


def guardReactorThread(testCase: Any, reactor: Any = None) -> ReactorThreadGuard:
    """
    Install a L{ReactorThreadGuard} for the rest of C{testCase}: it fails
    the test at its end (after the cleanups registered later, such as the
    daemon's stop) if the MSA blocked the reactor thread.
    """
    if reactor is None:
        from twisted.internet import reactor
    guard = ReactorThreadGuard(reactor)
    guard.install()
    testCase.addCleanup(guard.check, testCase)
    return guard
