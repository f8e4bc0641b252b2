# -*- test-case-name: tests.test_loglevel,tests.test_accounts_e2e,tests.test_audit -*-
"""
The small services the daemon runs beside its listeners (L{msa.service.tap}
puts them in its L{OrderedShutdown}): the log level filter, the JSON log
file, the audit log, the session shutdown on SIGTERM and the accounts
watcher.

SIGHUP (C{systemctl reload}) asks two of them: the accounts watcher reloads
the accounts, the audit log rotates (L{HangupHandler} chains the two).
"""

import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    PredicateResult,
    globalLogPublisher,
)
from zope.interface import implementer

from msa import metrics
from msa._compat import publisherObservers, textLogTimeFormat
from msa.audit import AuditError, AuditLog, Rotation, logHead, recoverRecords
from msa.interfaces import ILiveAccountStore
from msa.queue.outcomes import outcomesDirectoryIn
from msa.queue.spool import Spool
from msa.service import logs
from msa.service.startupchecks import StartupCheckError
from msa.submission.sessions import SessionRegistry

__all__ = [
    "AccountWatcher",
    "AuditLogService",
    "HangupHandler",
    "JSONLogFile",
    "LogLevelFilter",
    "OrderedShutdown",
    "SessionShutdown",
]

log = Logger(namespace="msa.service.tap")


class HangupHandler:
    """
    Run C{action} on the reactor's next turn at each SIGHUP, after the
    handler installed before (several services answer the signal), while
    installed.
    """

    def __init__(self, action: Callable[[], object], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.action = action
        self.reactor = reactor
        self._installed = False
        self._previous: Any = None

    def _hangup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes of the reactor thread:
        # hand the action to the reactor's next turn.  Once uninstalled,
        # a handler another one chained to (it could not be put back in
        # order) only passes the signal on: its service has stopped.
        if self._installed:
            self.reactor.callFromThread(self.action)
        if callable(self._previous):
            self._previous(signum, frame)

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:
            # Not the main thread (an embedder's choice): no signal.
            return
        self._installed = True

    def uninstall(self) -> None:
        """
        Put back the handler installed before (services stop in the
        reverse order of their start, so each finds its own in place).
        """
        if self._installed:
            # None: a handler not set from Python; the default is the
            # nearest that can be put back.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGHUP, previous)
            self._installed = False


class OrderedShutdown(service.MultiService):
    """
    A L{MultiService} that stops its children one at a time, the last added
    first, each once the one before it has finished stopping.

    L{MultiService} stops every child at the same moment.  The MSA's
    children depend on each other while they stop: the sessions still
    finishing a message (up to C{shutdown_grace} seconds) need the limits
    store to count it, the audit log to record it and the logs to say so.
    So the daemon adds them in the order they may start, and this stops
    them in the reverse: listeners, sessions, relay runner, then the limits,
    accounts, audit log and logs.
    """

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stopEach(list(reversed(list(self)))))

    async def _stopEach(self, children: list[service.IService]) -> None:
        for child in children:
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping: {child} failed to stop", child=child)


@implementer(ILogObserver)
class _LevelFilteredStandIn:
    """
    One observer of the publisher behind the C{[logging] level} filter, in
    the publisher in its place, standing in for it: it is equal to it (and
    hashes like it).

    So the publisher's own bookkeeping keeps working while the filter runs:
    C{removeObserver(observer)} (trial removes its error observer after
    each test; a service stops its log file) removes the stand-in, and
    C{addObserver(observer)} does not add the observer a second time.  A
    stand-in that stayed behind once its observer was removed would keep
    calling it: trial counted one logged error twice.

    @ivar observer: the observer behind the filter (possibly another
        filter's stand-in).
    @ivar owner: the L{LogLevelFilter} that put it there.
    """

    def __init__(self, observer: ILogObserver, level: LogLevel, owner: object) -> None:
        self.observer = observer
        self.owner = owner
        self._predicate = logs.LevelPredicate(level)

    def __call__(self, event: dict) -> None:
        if self._predicate(event) is not PredicateResult.no:
            self.observer(event)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.observer or self.observer == other

    def __hash__(self) -> int:
        return hash(self.observer)

    def __repr__(self) -> str:
        return f"<level-filtered {self.observer!r}>"


class LogLevelFilter(service.Service):
    """
    The C{[logging] level}: while running, every observer of the global log
    publisher (twistd's text log, and any other present at the start) sits
    behind a filter (L{msa.service.logs.LevelPredicate}), so that the
    events below C{level} are neither formatted nor written.  On stop, the
    observers still there are put back as they were.

    The filter stands in for each observer in the publisher
    (L{_LevelFilteredStandIn}): an observer removed while it runs is gone,
    filter and all, and is not put back on stop; one added while it runs
    is not filtered.  Two filters may run at once (two daemons in one
    process) and stop in any order.

    The text log twistd writes (C{textFileLogObserver}) is also given
    L{msa.service.logs.ClassicText}, the same lines made faster, while it
    runs.
    """

    def __init__(self, level: LogLevel, publisher: LogPublisher | None = None) -> None:
        self.level = level
        self.publisher = globalLogPublisher if publisher is None else publisher

    def startService(self) -> None:
        super().startService()
        self._formatters: list[tuple[FileLogObserver, Any]] = []
        for observer in publisherObservers(self.publisher):
            try:
                timeFormat = textLogTimeFormat(observer)
            except LookupError:
                pass
            else:
                assert isinstance(observer, FileLogObserver)
                self._formatters.append((observer, observer.formatEvent))
                observer.formatEvent = logs.ClassicText(timeFormat)
            standIn = _LevelFilteredStandIn(observer, self.level, self)
            self.publisher.removeObserver(observer)
            self.publisher.addObserver(standIn)

    def stopService(self):
        for present in publisherObservers(self.publisher):
            if isinstance(present, _LevelFilteredStandIn) and present.owner is self:
                # The list meets the stand-in itself before anything else
                # equal to it (the publisher holds each observer once).
                self.publisher.removeObserver(present)
                self.publisher.addObserver(present.observer)
                continue
            # Another filter's stand-in around one of ours: take ours out
            # of the chain.
            outer = present
            while isinstance(outer, _LevelFilteredStandIn):
                inner = outer.observer
                if isinstance(inner, _LevelFilteredStandIn) and inner.owner is self:
                    outer.observer = inner.observer
                    break
                outer = inner
        for observer, formatter in self._formatters:
            observer.formatEvent = formatter
        self._formatters.clear()
        return super().stopService()


class JSONLogFile(service.Service):
    """
    The MSA's log events (and errors) also as flat JSON objects, one per
    line, in a file, for log shippers (the same as C{twistd --logger
    msa.service.logs.jsonLogger}; fields in L{msa.service.logs}).
    """

    def __init__(self, path: str, level: LogLevel = LogLevel.info) -> None:
        self.path = path
        self.level = level
        self._observer: ILogObserver | None = None

    def startService(self) -> None:
        super().startService()
        self._file = open(self.path, "a", encoding="utf-8")
        observer = logs.levelFilter(logs.FlatJSONObserver(self._file), self.level)
        globalLogPublisher.addObserver(observer)
        self._observer = observer

    def stopService(self):
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._file.close()
            self._observer = None
        return super().stopService()


def openSpool(config: Any, directory: str, stateDirectory: str, reactor: Any) -> Spool:
    """
    The spool in C{directory} of the server whose state directory is
    C{stateDirectory} (its ledger of unrecorded outcomes is there), with
    the configured commit delay; not yet recovered.
    """
    spool = Spool(
        directory, reactor, outcomesDirectory=outcomesDirectoryIn(stateDirectory)
    )
    spool.commits.commitDelay = config["spool"]["commit_delay"]
    return spool


def recordRecovered(audit: AuditLog, spool: Spool) -> None:
    """
    L{recoverRecords} for C{spool}, each message recorded logged.
    """
    for queueId in recoverRecords(audit, spool):
        log.warn(
            "audit: {queueId} was queued without its acceptance record "
            "(a crash during its commit): recorded as recovered",
            queueId=queueId,
        )


class AuditLogService(service.Service):
    """
    The audit log (L{msa.audit}): opened (a torn tail cut off) when built,
    so that a log that cannot be continued stops the start; the spool's
    commits append to it.  Its head is logged at start and stop, for an
    anchor outside the file.

    While records are counted as lost (L{msa.audit.lost}: the log could
    not write them), it tries every L{LOST_RETRY} seconds to write the
    C{lost} record, so that the gap is in the chain as soon as the disk
    takes it, even when no other record comes.  Its stop waits, without
    blocking the reactor, for the round in progress and closes the files
    in the thread pool.

    SIGHUP rotates the log (L{rotateOnHangup}), as C{digipoort-msa-admin
    audit rotate} does through the control socket.
    """

    #: Seconds between two tries to write an owed C{lost} record.
    LOST_RETRY = 5.0

    def __init__(self, spool: Spool, audit: AuditLog, reactor: Any = None) -> None:
        try:
            audit.open()
            recordRecovered(audit, spool)
        except AuditError as e:
            raise StartupCheckError(f"audit log: {e}") from e
        self.audit = audit
        spool.audit = audit
        metrics.watchAudit(audit)
        self._retry = task.LoopingCall(self._writeLost)
        if reactor is not None:
            self._retry.clock = reactor
        self._hangup = HangupHandler(self.rotateOnHangup, reactor)

    def startService(self) -> None:
        super().startService()
        logHead(self.audit, "start")
        self._retry.start(self.LOST_RETRY, now=False)
        self._hangup.install()

    def rotateOnHangup(self) -> defer.Deferred[None]:
        """
        Rotate the log in the thread pool, in its rounds (SIGHUP); the
        rotation is logged with its anchor, a failure as an error (the
        records go on into the file at the path, chained).
        """

        def rotated(rotation: Rotation | None) -> None:
            if rotation is None:
                log.info(
                    "audit log: SIGHUP: nothing to rotate, {path} holds no record",
                    path=self.audit.path,
                )

        def failed(failure: Any) -> None:
            log.error(
                "audit log: SIGHUP: the rotation failed: {error}; the records "
                "go on in {path}",
                error=failure.getErrorMessage(),
                path=self.audit.path,
            )

        d = self.audit.rotateWhenIdle("SIGHUP")
        return d.addCallbacks(rotated, failed)

    def _writeLost(self) -> defer.Deferred[None] | None:
        if self.audit.lostPending:
            return self.audit.flushLost()
        return None

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._hangup.uninstall()
        if self._retry.running:
            self._retry.stop()
        return self.audit.closeWhenIdle().addCallback(self._closed)

    def _closed(self, _: None) -> None:
        logHead(self.audit, "stop")
        if self.audit.lostPending:
            log.critical(
                "audit: {count} record(s) could not be written and their lost "
                "record neither: the count is only in this log line",
                count=self.audit.lostPending,
            )


class SessionShutdown(service.Service):
    """
    On stop (SIGTERM), let sessions in progress finish their message, up to
    C{grace} seconds, then tell the rest 421.  Under L{OrderedShutdown} the
    listeners have stopped accepting before, and the limits, the audit log
    and the logs stop only after, so that the messages finished meanwhile
    are counted, recorded and logged.
    """

    def __init__(self, registry: SessionRegistry, grace: float) -> None:
        self.registry = registry
        self.grace = grace

    def stopService(self):
        super().stopService()
        return self.registry.shutdown(self.grace)


#: The shortest time between two looks at the accounts ([accounts]
#: watch_interval): a LoopingCall with 0 would run as fast as the reactor
#: turns, at 100% CPU.
MINIMUM_WATCH_INTERVAL = 0.1


class AccountWatcher(service.Service):
    """
    Reload the accounts file (or database) when it changes, and on SIGHUP.

    @ivar interval: seconds between looks, never less than
        L{MINIMUM_WATCH_INTERVAL} whatever an embedder passes.
    """

    def __init__(self, store: ILiveAccountStore, interval: float) -> None:
        self.store = store
        self.interval = max(interval, MINIMUM_WATCH_INTERVAL)
        # Looked up at each signal: the store's reload as it is then.
        self._hangup = HangupHandler(lambda: self.store.reload())

    def startService(self) -> None:
        super().startService()
        self.store.startWatching(self.interval)
        # Not in the main thread (an embedder's choice): polling only.
        self._hangup.install()

    def stopService(self):
        stopped = self.store.stopWatching()
        self._hangup.uninstall()
        super().stopService()
        return stopped
