# -*- test-case-name: tests.test_waiting -*-
"""
The one way the tests wait for something to happen: poll a predicate until
it gives a true value, and fail loudly, naming what was awaited, when it
never does.

A poll loop that simply ends when its time is up lets the test carry on
and fail later on a confusing assertion, or worse pass while the thing it
waited for never happened.  Every wait here either returns the
predicate's true value or raises L{FailTest} saying what did not happen
within how long.

L{waitUntil} is for code on the reactor (trial tests returning
L{Deferred}s, C{async def} tests through L{defer.ensureDeferred}, since a
L{Deferred} can be awaited); L{waitUntilBlocking} is its twin for code
that runs in a thread (C{threads.deferToThread}) or never runs the reactor.
"""

import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.trial.unittest import FailTest

#: Seconds between two looks at the predicate.
INTERVAL = 0.02

#: What to wait for: a description, or a callable giving one at the
#: time-out (so that it can show the state it found).
What = str | Callable[[], str]


def timedOut(what: What, timeout: float, value: Any) -> FailTest:
    """
    The failure of a wait: what was awaited, for how long, and the
    predicate's last value.
    """
    description = what() if callable(what) else what
    return FailTest(
        f"timed out after {timeout}s waiting for {description} (last value: {value!r})"
    )


@defer.inlineCallbacks
def waitUntil(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: What = "the condition",
    interval: float = INTERVAL,
    clock: IReactorTime | None = None,
):
    """
    Poll C{predicate} without blocking the reactor until it gives a true
    value.

    @param predicate: called with no arguments; may return a L{Deferred}.
    @param timeout: seconds (on C{clock}) before giving up.
    @param what: what is awaited, for the failure message.
    @param interval: seconds between two calls of C{predicate}.
    @param clock: the clock to sleep on; the global reactor by default.
    @return: a L{Deferred} firing with the predicate's true value, or
        failing with L{FailTest} naming C{what} and C{timeout} when the
        predicate is still false after C{timeout} seconds (it is always
        asked once more at the deadline).
    """
    if clock is None:
        from twisted.internet import reactor as clock
    deadline = clock.seconds() + timeout
    while True:
        value = yield defer.maybeDeferred(predicate)
        if value:
            return value
        if clock.seconds() >= deadline:
            raise timedOut(what, timeout, value)
        yield task.deferLater(clock, interval, lambda: None)


def waitUntilBlocking(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: What = "the condition",
    interval: float = INTERVAL,
) -> Any:
    """
    L{waitUntil} for a thread: poll C{predicate}, sleeping in between.

    Never call this in the reactor thread while the reactor has work to
    do: it blocks the thread it runs in.

    @return: the predicate's true value.
    @raise FailTest: naming C{what} and C{timeout}, when the predicate is
        still false after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise timedOut(what, timeout, value)
        time.sleep(interval)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """
    Whether something accepts TCP connections on C{host}:C{port}: a
    predicate for waiting until a started process listens.
    """
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0
