# -*- test-case-name: tests.test_adminprogress -*-
"""
Progress of the admin command's long runs (C{queue verify} over a large
spool, C{accounts import} of a large file): one line rewritten in place
with a carriage return on a terminal, nothing at all when the stream is a
pipe or a file, so that scripts and logs see only the results.  Written to
standard error, so that standard output stays the command's answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "isTerminal"]

T = TypeVar("T")


def isTerminal(stream: Any) -> bool:
    """
    Whether C{stream} is a terminal (a test's L{io.StringIO} is not).
    """
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """
    C{what: done/total (percent)}, at most every C{interval} seconds and
    once at the end, then the line is cleared.

    @ivar shown: whether anything is written (C{stream} is a terminal).
    """

    def __init__(
        self,
        what: str,
        total: int,
        stream: Any,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.what = what
        self.total = total
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self.shown = isTerminal(stream)
        self.done = 0
        self._last: float | None = None
        self._width = 0

    def step(self, count: int = 1) -> None:
        """
        C{count} more items done.
        """
        self.done += count
        if not self.shown:
            return
        now = self.clock()
        if (
            self._last is not None
            and now - self._last < self.interval
            and self.done < self.total
        ):
            return
        self._last = now
        percent = 100 * self.done // self.total if self.total else 100
        line = f"{self.what}: {self.done}/{self.total} ({percent}%)"
        self._width = max(self._width, len(line))
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()

    def finish(self) -> None:
        """
        Clear the line, so that the results that follow start clean.
        """
        if self.shown and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()

    def over(self, items: Iterable[T]) -> Iterator[T]:
        """
        C{items}, one step each, the line cleared after the last.
        """
        try:
            for item in items:
                yield item
                self.step()
        finally:
            self.finish()
