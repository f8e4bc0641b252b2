# -*- test-case-name: tests.test_loglevel -*-
"""
The C{[logging] level} setting: the predicate and filter of
L{msa.service.logs}, the service that puts the filter in front of the
global log publisher's observers (L{msa.service.services.LogLevelFilter}), and the
configuration error for a bad value.  Its effect over the daemon is the
C{logging.level} row of L{tests.test_everykey}.
"""

import os

from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent
from twisted.python.log import LogPublisher as LegacyLogPublisher
from twisted.trial import unittest

from msa._compat import publisherObservers
from msa.service import logs
from msa.service.config import ConfigError, loadConfig
from msa.service.services import LogLevelFilter
from msa.service.tap import Options, makeService


def _events(publisher: LogPublisher) -> tuple[list[dict], Logger]:
    seen: list[dict] = []
    publisher.addObserver(seen.append)
    return seen, Logger(namespace="msa.test", observer=publisher)


def _filtered(
    level: LogLevel,
) -> tuple[LogPublisher, list[dict], Logger, LogLevelFilter]:
    """
    A publisher with one observer (the list of the events it saw), a
    logger on it, and a L{LogLevelFilter} of C{level} started on it.
    """
    publisher = LogPublisher()
    seen, log = _events(publisher)
    service = LogLevelFilter(level, publisher)
    service.startService()
    return publisher, seen, log, service


class LevelPredicateTests(unittest.TestCase):
    """
    L{logs.levelFilter} drops the events below its level, before the
    observer behind it sees (and formats) them.
    """

    def test_levels(self):
        for name, level in logs.LEVELS.items():
            seen: list[dict] = []
            log = Logger(
                namespace="msa.test", observer=logs.levelFilter(seen.append, level)
            )
            log.debug("d")
            log.info("i")
            log.warn("w")
            log.error("e")
            log.critical("c")
            expected = {
                "debug": ["d", "i", "w", "e", "c"],
                "info": ["i", "w", "e", "c"],
                "warn": ["w", "e", "c"],
                "error": ["e", "c"],
            }[name]
            self.assertEqual([e["log_format"] for e in seen], expected, name)

    def test_notFormatted(self):
        """
        A dropped event is not formatted: an argument whose C{str} would
        raise is never asked for it.
        """

        class Boom:
            def __str__(self):
                raise AssertionError("formatted")

        seen: list[dict] = []
        log = Logger(
            namespace="msa.test",
            observer=logs.levelFilter(
                lambda e: seen.append(formatEvent(e)), LogLevel.info
            ),
        )
        log.debug("{x}", x=Boom())
        log.info("kept {x}", x=1)
        self.assertEqual(seen, ["kept 1"])

    def test_eventWithoutLevelPasses(self):
        """
        An event without a level or a namespace (which Twisted's own
        predicate would drop) passes.
        """
        seen: list[dict] = []
        observer = logs.levelFilter(seen.append, LogLevel.error)
        observer({"log_format": "no level", "log_namespace": "x"})
        observer({"log_format": "no namespace", "log_level": LogLevel.info})
        self.assertEqual(len(seen), 2)


class LogLevelServiceTests(unittest.TestCase):
    """
    L{LogLevelFilter} filters every observer of its publisher while it runs,
    and puts them back when it stops.
    """

    def test_filtersWhileRunning(self):
        publisher, seen, log, service = _filtered(LogLevel.warn)
        log.info("hidden")
        log.warn("shown")
        service.stopService()
        log.debug("after")
        self.assertEqual([e["log_format"] for e in seen], ["shown", "after"])
        self.assertEqual(publisherObservers(publisher), [seen.append])

    def test_removedObserverStaysRemoved(self):
        """
        An observer whose filter was removed while the service ran is not
        put back on stop.
        """
        publisher, seen, log, service = _filtered(LogLevel.info)
        [wrapped] = publisherObservers(publisher)
        publisher.removeObserver(wrapped)
        service.stopService()
        self.assertEqual(publisherObservers(publisher), [])

    def test_observerRemovedWhileRunning(self):
        """
        An observer removed (by itself, as its owner knows it) while the
        filter runs gets no more events, and is not put back on stop.
        """
        publisher, seen, log, service = _filtered(LogLevel.info)
        publisher.removeObserver(seen.append)
        log.warn("after removal")
        service.stopService()
        log.warn("after stop")
        self.assertEqual(seen, [])
        self.assertEqual(publisherObservers(publisher), [])

    def test_observerAddedWhileRunning(self):
        """
        Adding an observer that the filter already stands in for does not
        add it a second time: it sees each event once.
        """
        publisher, seen, log, service = _filtered(LogLevel.info)
        publisher.addObserver(seen.append)
        log.warn("once")
        service.stopService()
        log.warn("still once")
        self.assertEqual([e["log_format"] for e in seen], ["once", "still once"])
        self.assertEqual(publisherObservers(publisher), [seen.append])

    def test_trialObserverBetweenTests(self):
        """
        trial adds its error observer (through the legacy
        L{twisted.python.log} API) before each test and removes it after;
        under C{trial -j} a daemon's filter can start in one test and still
        run in the next.  Each logged error reaches the observer once (it
        was counted twice by C{flushLoggedErrors}).
        """
        publisher = LogPublisher()
        legacy = LegacyLogPublisher(publisher, publisher)
        errors: list[dict] = []
        legacy.addObserver(errors.append)
        service = LogLevelFilter(LogLevel.info, publisher)
        service.startService()
        legacy.removeObserver(errors.append)
        legacy.addObserver(errors.append)
        legacy.msg("next test", isError=True)
        service.stopService()
        legacy.msg("after stop", isError=True)
        self.assertEqual(
            [e["message"] for e in errors], [("next test",), ("after stop",)]
        )

    def test_twoFiltersStopInAnyOrder(self):
        """
        Two filters (two daemons in one process) stopped in the order they
        started leave the observer as it was: unfiltered, once.
        """
        publisher = LogPublisher()
        seen, log = _events(publisher)
        first = LogLevelFilter(LogLevel.warn, publisher)
        second = LogLevelFilter(LogLevel.error, publisher)
        first.startService()
        second.startService()
        log.warn("hidden by the second")
        log.error("shown")
        first.stopService()
        log.warn("still hidden by the second")
        second.stopService()
        log.debug("unfiltered")
        self.assertEqual([e["log_format"] for e in seen], ["shown", "unfiltered"])
        self.assertEqual(publisherObservers(publisher), [seen.append])


class LevelConfigTests(unittest.TestCase):
    """
    C{[logging] level}: default C{info}; anything but debug, info, warn,
    error is the one-line configuration error naming the key.
    """

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_default(self):
        self.assertEqual(loadConfig(self.write(""))["logging"]["level"], "info")

    def test_accepted(self):
        for name in ("debug", "info", "warn", "error"):
            path = self.write(f'[logging]\nlevel = "{name}"\n')
            self.assertEqual(loadConfig(path)["logging"]["level"], name)

    def test_refused(self):
        for value in ('"verbose"', '"INFO"', '"warning"', '""', "3"):
            path = self.write(f"[logging]\nlevel = {value}\n")
            error = self.assertRaises(ConfigError, loadConfig, path)
            self.assertIn(f"{path}: [logging] level: must be ", str(error))

    def test_daemonRefuses(self):
        """
        twistd exits with the one line naming the file and the key.
        """
        path = self.write('[logging]\nlevel = "verbose"\n')
        options = Options()
        options.parseOptions(["--config", path])
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(
            str(error),
            f"digipoort-msa: {path}: [logging] level: must be one of "
            "debug, info, warn, error (got 'verbose')",
        )
