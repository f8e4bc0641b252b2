# -*- test-case-name: tests.test_jsonlog -*-
"""
Log output for operators and log shippers: one flat JSON object per line
per event, in C{[logging] json_file} or, with C{twistd --logger
msa.service.logs.jsonLogger}, on standard output (for journald, Loki,
Elasticsearch).  The fields are documented in README.rst ("JSON log
lines") and are stable:

  - C{time} (ISO 8601, UTC), C{level}, C{event}, C{namespace}, C{text};
  - C{session}, C{queue_id}, C{account}, C{client} when known;
  - the event's own fields (C{outcome}, C{mechanism}, C{size}, C{sha256},
    ...), their names in snake_case;
  - C{traceback} for an error.

C{event} names what happened: connection, tls, auth, accepted, refused,
relay, disconnected; C{log} for the MSA's other messages and C{error} for
an error without a name of its own.  Only the MSA's own events go there,
and errors (with their traceback) from anywhere; not Twisted's
informational lines (such as the metrics listener's HTTP access lines).
No event ever carries a password, a password hash or a SASL response.
"""

import datetime
import json
import math
import re
import sys
from collections import OrderedDict
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

#: The fields every line has, or has when known, in this order.
COMMON_FIELDS = (
    "time",
    "level",
    "event",
    "session",
    "queue_id",
    "account",
    "client",
    "namespace",
    "text",
)

#: The names of Twisted's levels in the output (syslog's spelling).
_LEVELS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}

#: Keys of an event that are Twisted's bookkeeping (the legacy
#: C{twisted.python.log} ones too), not fields of the event.
_INTERNAL = {"message", "isError", "system", "time", "format", "why", "failure"}

#: Event keys that become common fields, under their common name.
_COMMON_KEYS = {
    "event": "event",
    "session": "session",
    "queueId": "queue_id",
    "account": "account",
    "client": "client",
}

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

#: How many sessions and queued messages the observer remembers the client
#: and account of (the oldest are forgotten first).
REMEMBER = 10000


def _snake(name: str) -> str:
    return _CAMEL.sub("_", name).lower()


def jsonValue(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def _isMSA(namespace: str) -> bool:
    return namespace == "msa" or namespace.startswith("msa.")


class _Recent(OrderedDict):
    """
    A mapping that forgets its oldest entries past L{REMEMBER}.
    """

    def remember(self, key, value: dict) -> None:
        self.setdefault(key, {}).update(value)
        self.move_to_end(key)
        while len(self) > REMEMBER:
            self.popitem(last=False)


@implementer(ILogObserver)
class FlatJSONObserver:
    """
    Write each MSA event (and each error) as one flat JSON object on a line
    of C{outFile}.

    The client address and account of a session, and of a message once it
    is accepted, are remembered from the events that name them, so that
    later events of the same session (and the relay of the message) carry
    them too.
    """

    def __init__(self, outFile: IO[str]) -> None:
        self.outFile = outFile
        self._sessions = _Recent()
        self._messages = _Recent()

    def __call__(self, event: dict) -> None:
        try:
            line = self.flatten(event)
        except Exception as e:
            line = {
                "time": _isoTime(event.get("log_time")),
                "level": "error",
                "event": "error",
                "text": f"cannot write this event as JSON: {e!r}",
            }
        if line is None:
            return
        self.outFile.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.outFile.flush()

    def flatten(self, event: dict) -> dict | None:
        """
        The flat object for C{event}, or L{None} when it does not belong in
        this log.
        """
        namespace = event.get("log_namespace") or ""
        level = event.get("log_level")
        failure = event.get("log_failure")
        isError = (
            failure is not None
            or event.get("isError")
            or level in (LogLevel.error, LogLevel.critical)
        )
        if not _isMSA(namespace) and not isError:
            return None
        line: dict[str, Any] = {
            "time": _isoTime(event.get("log_time")),
            "level": "error" if failure is not None else _LEVELS.get(level, "info"),
            "event": "error" if isError else "log",
        }
        own: dict[str, Any] = {}
        for key, value in event.items():
            if key.startswith("log_") or key in _INTERNAL:
                continue
            if key in _COMMON_KEYS:
                if value not in (None, ""):
                    line[_COMMON_KEYS[key]] = jsonValue(value)
                continue
            name = _snake(key)
            if name in COMMON_FIELDS or name == "traceback":
                name = "field_" + name
            own[name] = jsonValue(value)
        self._remember(line, own)
        line["namespace"] = namespace
        line["text"] = eventText(event) or " ".join(
            str(part) for part in event.get("message", ())
        )
        line.update(own)
        if failure is not None:
            line["traceback"] = failure.getTraceback()
        ordered = {k: line[k] for k in COMMON_FIELDS if k in line}
        ordered.update(line)
        return ordered

    def _remember(self, line: dict, own: dict) -> None:
        """
        Fill in a session's client and account, and a message's, from what
        earlier events said, and learn from this one.
        """
        session, queueId = line.get("session"), line.get("queue_id")
        known = {k: line[k] for k in ("client", "account") if k in line}
        if session:
            if known:
                self._sessions.remember(session, known)
            for key, value in self._sessions.get(session, {}).items():
                line.setdefault(key, value)
        if queueId:
            if line["event"] == "accepted":
                self._messages.remember(
                    queueId, {k: line[k] for k in ("client", "account") if k in line}
                )
            for key, value in self._messages.get(queueId, {}).items():
                line.setdefault(key, value)
            if line["event"] == "relay" and own.get("outcome") in (
                "delivered",
                "failed",
            ):
                self._messages.pop(queueId, None)
        if session and line["event"] == "disconnected":
            self._sessions.pop(session, None)


#: The values of C{[logging] level}: the least severe level written.
LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


@implementer(ILogFilterPredicate)
class LevelPredicate:
    """
    Drop the events below C{level}, before any observer formats or writes
    them (the C{[logging] level} setting).  An event without a level or a
    namespace (which L{LogLevelFilterPredicate} would drop) passes.

    One level for every namespace, so the event's level is compared with it
    directly: L{LogLevelFilterPredicate} looks the level up by namespace
    (splitting and joining the namespace) for every event and observer,
    which showed in the reactor thread's profile (issue 20).
    """

    def __init__(self, level: LogLevel) -> None:
        self.level = level

    def __call__(self, event: dict) -> Any:
        level = event.get("log_level")
        if level is None or not event.get("log_namespace"):
            return PredicateResult.maybe
        if level < self.level:
            return PredicateResult.no
        return PredicateResult.maybe


def levelFilter(observer: ILogObserver, level: LogLevel) -> FilteringLogObserver:
    """
    C{observer}, behind a filter that drops the events below C{level}.
    """
    return FilteringLogObserver(observer, [LevelPredicate(level)])


class ClassicText:
    """
    Twisted's C{formatEventAsClassicLogText} with C{textFileLogObserver}'s
    time format: the same line for every event, made faster for the common
    one, for the text log twistd writes (installed by
    L{msa.service.services.LogLevelFilter}).

    Twisted formats C{log_format} with L{string.Formatter} (written in
    Python, to allow its C{"{f()}"} call syntax) and the time with a
    C{strftime} per event: in the profile of a busy MSA, these were
    two-thirds of the cost of an INFO line, most of what the log costs the
    reactor thread (issue 20).  Here a format without C{"()"} is given to
    C{str.format_map} (the same PEP 3101 syntax, in C), and the time text is
    kept for the second it names when the format has no fraction of a second.
    An event that is anything else (a failure attached, fields flattened by
    Twisted's C{eventAsJSON}, a format that does not format) goes to
    Twisted's own formatter, which also words the errors.
    """

    def __init__(self, timeFormat: str | None) -> None:
        self.timeFormat = timeFormat
        self._perSecond = timeFormat is not None and "%f" not in timeFormat
        #: (second, its text), replaced as a whole: events come from any thread.
        self._lastSecond: tuple[int, str] = (-1, "")

    def formatTime(self, when: float | None) -> str:
        if when is None or not self._perSecond:
            return formatTime(when, self.timeFormat)
        second = math.floor(when)
        if when - second > 0.999999:
            # datetime rounds to the microsecond: this may be the next second.
            return formatTime(when, self.timeFormat)
        last = self._lastSecond
        if last[0] == second:
            return last[1]
        text = formatTime(second, self.timeFormat)
        self._lastSecond = (second, text)
        return text

    def __call__(self, event: dict) -> str | None:
        text = None if "log_failure" in event else _formatted(event)
        if text is None:
            return formatEventAsClassicLogText(event, formatTime=self.formatTime)
        if not text:
            return None
        line = f"{self.formatTime(event.get('log_time'))} [{_system(event)}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def _formatted(event: dict) -> str | None:
    """
    The text of C{event}'s C{log_format} by C{str.format_map}, or L{None}
    when it is for Twisted's formatter: no format, a format with its C{"()"}
    call syntax or that does not format, or fields flattened for JSON.
    """
    form = event.get("log_format")
    if type(form) is not str or "()" in form or "log_flattened" in event:
        return None
    try:
        return form.format_map(event)
    except Exception:
        return None


def eventText(event: dict) -> str:
    """
    Twisted's C{formatEvent}: the text of an event, without time, system or
    traceback; faster for the common event (L{ClassicText}).
    """
    text = _formatted(event)
    return formatEvent(event) if text is None else text


def _system(event: dict) -> str:
    """
    The C{[system]} of a text log line, as Twisted words it.
    """
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        levelName = "-" if level is None else level.name
        return f"{event.get('log_namespace', '-')}#{levelName}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def _isoTime(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    when = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def jsonLogger():
    """
    The observer factory for C{twistd --logger msa.service.logs.jsonLogger}: flat
    JSON lines on standard output.
    """
    return FlatJSONObserver(sys.stdout)
