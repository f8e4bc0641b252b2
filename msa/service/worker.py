# -*- test-case-name: tests.test_workers -*-
"""
C{python -m msa.service.worker}: one of the workers worker 0 starts
(L{msa.service.workers}), not a program to run by hand.  A worker forked
from worker 0 (L{msa.service.forked}) runs the same L{main}.

It builds its service (L{msa.service.tap.buildService}) from worker 0's
configuration file made its own (L{msa.service.workers.workerConfig}), on
the listening sockets it was given (C{--listener KEY=FD}), and runs it
until SIGTERM or SIGINT (the first of them; a second, from worker 0
after the process group's, is not an error) or until its standard input
closes (worker 0 has gone).  Its
log events go to its standard error, one JSON object per line
(L{toWorkerZero}), for worker 0 to put into its log; a
configuration or start-up error is logged there and ends it with status
1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import IO, Any, cast

from twisted.internet import protocol, stdio
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    globalLogBeginner,
)
from twisted.python.failure import Failure

from msa.service.forked import processName
from msa.service.logs import eventText, jsonValue
from msa.service.supervisor import TRACEBACK

log = Logger()


class LifeLine(protocol.Protocol):
    """
    The worker's standard input, kept open by worker 0: when it closes,
    worker 0 has gone (stopped, or killed), and the worker stops as on
    SIGTERM.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.reactor.running:
            log.info("worker 0 has gone: stopping")
            self.reactor.stop()


def toWorkerZero(event: dict, out: IO[str] | None = None) -> None:
    """
    Write C{event} for worker 0 (L{msa.service.supervisor.Workers.logFrom}):
    one JSON object on a line, each of its own fields as the JSON log writes
    it (L{msa.service.logs.jsonValue}: an object that JSON cannot carry as
    its text), its level by name and its failure as its traceback's text,
    so that worker 0's logs show what this worker's would.  Its text is
    formatted here (L{msa.service.logs.eventText}) and sent as its format,
    braces doubled, which formats to itself in worker 0.  The logger and
    source objects stay here.
    """
    text = eventText(event)
    line = {
        key: jsonValue(value) for key, value in event.items() if key not in _KEPT_HERE
    }
    line["log_format"] = text.replace("{", "{{").replace("}", "}}")
    line["log_level"] = event.get("log_level", LogLevel.info).name
    failure = event.get("log_failure")
    if failure is not None:
        line[TRACEBACK] = failure.getTraceback()
    out = sys.stderr if out is None else out
    out.write(json.dumps(line) + "\n")
    out.flush()


#: What of an event a worker does not send (L{toWorkerZero}).
_KEPT_HERE = frozenset(
    ("log_logger", "log_source", "log_failure", "log_level", "log_flattened")
)


def stopOnSignals(reactor: Any) -> None:
    """
    SIGTERM and SIGINT stop the reactor, once: a worker may get both from
    worker 0 and from its terminal or process group, and Twisted's own
    handlers would log a second one as an error (ReactorNotRunning).
    """
    stopping: list[bool] = []

    def stop() -> None:
        if not stopping and reactor.running:
            stopping.append(True)
            log.info("worker stopping on a signal")
            reactor.stop()

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: reactor.callFromThread(stop))


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m msa.service.worker")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--listener", action="append", default=[])
    parser.add_argument("--limits", type=int, default=None)
    return parser.parse_args(argv)


def listenersFrom(arguments: list[str]) -> dict[str, int]:
    """
    C{KEY=FD} arguments as a mapping.
    """
    listeners = {}
    for argument in arguments:
        key, _, fd = argument.rpartition("=")
        listeners[key] = int(fd)
    return listeners


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor

    from msa.accounts.passwords import limitScryptMemory
    from msa.redact import maskSecrets
    from msa.service.config import loadConfig
    from msa.service.tap import STARTUP_ERRORS, buildService
    from msa.service.workers import workerConfig
    from msa.tls import ensureSelfSignedCertificate

    options = parseArguments(sys.argv[1:] if argv is None else argv)
    processName(f"msa-worker-{options.worker}")
    globalLogBeginner.beginLoggingTo(
        [cast(ILogObserver, toWorkerZero)], redirectStandardIO=False
    )
    limitScryptMemory()
    try:
        config = loadConfig(options.config)
        tls = config["tls"]
        certificate = (tls["certificate"], tls["key"])
        if certificate[0] is None:
            certificate = ensureSelfSignedCertificate(
                config["server"]["state_dir"], config["server"]["hostname"]
            )
        top = buildService(
            workerConfig(config, options.worker, certificate),
            reactor,
            listeners=listenersFrom(options.listener),
            limitsChannel=options.limits,
        )
    except STARTUP_ERRORS as e:
        log.critical(
            "worker {number} cannot start: {e}",
            number=options.worker,
            e=maskSecrets(str(e)),
        )
        raise SystemExit(1) from None
    stdio.StandardIO(LifeLine(reactor), reactor=reactor)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    stopOnSignals(reactor)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
