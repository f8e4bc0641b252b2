# -*- test-case-name: tests.test_classictext -*-
"""
L{msa.service.logs.ClassicText}, the faster formatter of the text log
twistd writes, and L{msa.service.logs.eventText}, of an event's text: the
same text as Twisted's own formatters for every event (property tests with
Twisted's C{formatEventAsClassicLogText} and C{formatEvent} as the
oracles), and L{msa.service.services.LogLevelFilter} giving it to twistd's
text observer while it runs, and giving the old one back on stop.
"""

import io
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.trial import unittest

from msa.service.logs import ClassicText, eventText
from msa.service.services import LogLevelFilter

_TIME_FORMATS = [timeFormatRFC3339, None, "%H:%M:%S.%f", "%Y/%W"]


class _Thing:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Thing {self.name}>"

    def shout(self) -> str:
        return self.name.upper()


class _Unprintable:
    """
    A value whose text cannot be had.  Its C{repr} works: Twisted's report
    of an unformattable event quotes the traceback of a failing C{repr},
    which names the frames it was called from, and those differ by design.
    """

    def __str__(self) -> str:
        raise RuntimeError("no text")

    def __repr__(self) -> str:
        return "<unprintable>"

    def __format__(self, spec: str) -> str:
        raise RuntimeError("no text")


_values = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.builds(_Thing, st.text(max_size=6)),
    st.just(_Unprintable()),
    st.lists(st.integers(), max_size=3),
    st.none(),
)

#: Pieces of a format: literal text (with newlines and escaped braces), and
#: fields of the keys the event has ("a", "b", "thing"), of one it lacks, and
#: of the syntax Twisted and str.format_map may treat differently.
_pieces = st.sampled_from(
    [
        "queued ",
        "x\ny",
        "{{literal}}",
        " (",
        ") ",
        "{a}",
        "{a!r}",
        "{a!s:>8}",
        "{b:>5}",
        "{b!a}",
        "{thing.name}",
        "{thing.shout()}",
        "{thing!r}",
        "{a[0]}",
        "{missing}",
        "{0}",
        "{}",
        "{a",
        "}",
        "{log_namespace}",
        "",
    ]
)


@st.composite
def _events(draw):
    event = {
        "log_format": "".join(draw(st.lists(_pieces, max_size=6))),
        "a": draw(_values),
        "b": draw(_values),
        "thing": _Thing(draw(st.text(max_size=5))),
    }
    if draw(st.booleans()):
        event["log_time"] = draw(
            st.one_of(
                st.floats(min_value=0, max_value=4e9),
                st.integers(min_value=0, max_value=4_000_000_000).map(
                    lambda s: s + 0.9999997
                ),
            )
        )
    if draw(st.booleans()):
        event["log_namespace"] = draw(st.sampled_from(["msa.queue", "x\ny", ""]))
    if draw(st.booleans()):
        event["log_level"] = draw(st.sampled_from(list(LogLevel.iterconstants())))
    if draw(st.booleans()):
        event["log_system"] = draw(st.sampled_from(["worker-1", 7, _Unprintable()]))
    if draw(st.booleans()):
        event["log_format"] = draw(st.sampled_from([None, b"bytes {a}", 5]))
    return event


def _outcome(formatter, event, **kwargs):
    """
    The line, or the error (Twisted's formatter lets some through, such as
    an unprintable C{log_namespace}: the observer's caller logs them).
    """
    try:
        return formatter(event, **kwargs)
    except Exception as e:
        return repr(e)


class ClassicTextTests(unittest.TestCase):
    @settings(max_examples=600, deadline=None)
    @given(_events(), st.sampled_from(_TIME_FORMATS))
    def test_sameAsTwisted(self, event, timeFormat):
        """
        Every event gets the line Twisted's own formatter gives it, with
        the same time format (the oracle: C{formatEventAsClassicLogText}, as
        C{textFileLogObserver} calls it).
        """
        ours = ClassicText(timeFormat)
        expected = _outcome(
            formatEventAsClassicLogText,
            dict(event),
            formatTime=lambda e: formatTime(e, timeFormat),
        )
        self.assertEqual(_outcome(ours, dict(event)), expected)
        # Again: the second is kept from the first line now.
        self.assertEqual(_outcome(ours, dict(event)), expected)

    @settings(max_examples=300, deadline=None)
    @given(_events())
    def test_textSameAsTwisted(self, event):
        """
        L{eventText} (the text a worker sends worker 0, and the JSON log's
        C{text}) is Twisted's C{formatEvent}.
        """
        self.assertEqual(
            _outcome(eventText, dict(event)), _outcome(formatEvent, dict(event))
        )

    def test_failureAndFlattened(self):
        """
        An event with a failure attached, or with fields a worker flattened,
        is formatted by Twisted's formatter (the traceback, the flat values).
        """
        ours = ClassicText(timeFormatRFC3339)
        failure = Failure(ZeroDivisionError("division by zero"))
        event = {"log_format": "failed {a}", "a": 1, "log_failure": failure}
        text = ours(event)
        self.assertIn("ZeroDivisionError", text)
        self.assertEqual(text, formatEventAsClassicLogText(event))
        flat = {"log_format": "{a}", "log_flattened": {"a!s:": "from a worker"}}
        self.assertIn("from a worker", ours(flat))

    def test_secondsChange(self):
        """
        The time text kept for one second is not given to the next.
        """
        ours = ClassicText(timeFormatRFC3339)
        now = time.time()
        for when in (now, now + 0.5, now + 1, now + 1.2, now - 3600):
            event = {"log_format": "x", "log_time": when}
            self.assertEqual(
                ours(event), formatEventAsClassicLogText(event), f"at {when}"
            )


class InstalledTests(unittest.TestCase):
    """
    L{LogLevelFilter} gives twistd's text observer (made by
    C{textFileLogObserver}) a L{ClassicText} while it runs.
    """

    def test_installedAndRemoved(self):
        publisher = LogPublisher()
        out = io.StringIO()
        observer = textFileLogObserver(out)
        original = observer.formatEvent
        other = FileLogObserver(io.StringIO(), lambda event: "other\n")
        publisher.addObserver(observer)
        publisher.addObserver(other)
        service = LogLevelFilter(LogLevel.info, publisher)
        service.startService()
        installed = observer.formatEvent
        assert isinstance(installed, ClassicText)
        self.assertEqual(installed.timeFormat, timeFormatRFC3339)
        # Not made by textFileLogObserver: its formatter stays.
        self.assertNotIsInstance(other.formatEvent, ClassicText)
        log = Logger(namespace="msa.test", observer=publisher)
        log.info("queued {queueId} ({size} bytes)", queueId="Q1", size=10)
        log.debug("not written")
        line = out.getvalue()
        self.assertRegex(
            line,
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
            r"\[msa\.test#info\] queued Q1 \(10 bytes\)\n\Z",
        )
        service.stopService()
        self.assertIs(observer.formatEvent, original)
