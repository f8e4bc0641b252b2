# -*- test-case-name: tests.test_relay_process -*-
"""
The relay process (C{python -m msa.relay.worker}), started by
L{msa.relay.process.ProcessDownstream}: it reads the settings and then
one delivery per line on its standard input, delivers each message to
the core MTA with L{msa.relay.client.SMTPDownstream} (its connections
kept and reused as in the MSA's own process), and writes the results on
its standard output and its log events on its standard error, as the
module L{msa.relay.process} describes.  It ends when asked to, or when
its standard input closes (the MSA is gone).
"""

from __future__ import annotations

import json
import sys
from typing import Any, cast

from twisted.internet import defer, stdio
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from msa import tls
from msa.queue import queuefile
from msa.queue.entry import SpoolEntry
from msa.relay.client import SMTPDownstream
from msa.relay.process import MAX_LINE, encodeResult, failedResult

log = Logger()


def downstreamFrom(settings: dict[str, Any], reactor: Any) -> SMTPDownstream:
    """
    The L{SMTPDownstream} the settings describe (L{msa.service.tap} makes
    them from C{[relay]}).
    """

    def pem(key: str) -> bytes | None:
        value = settings.get(key)
        return None if value is None else value.encode("ascii")

    contextFactory = None
    if settings["tlsMode"] != "none":
        contextFactory = tls.clientContextFactory(
            settings["serverName"],
            verify=settings["verifyCertificate"],
            caPEM=pem("caPEM"),
            certPEM=pem("certPEM"),
            keyPEM=pem("keyPEM"),
        )
    return SMTPDownstream(
        settings["host"],
        settings["port"],
        tlsMode=settings["tlsMode"],
        contextFactory=contextFactory,
        heloName=settings["heloName"],
        authUsername=settings["authUsername"],
        authPassword=settings["authPassword"],
        reactor=reactor,
        connectTimeout=settings["connectTimeout"],
        commandTimeout=settings["commandTimeout"],
        dataTimeout=settings["dataTimeout"],
        idleTimeout=settings["idleTimeout"],
        maxTransactions=settings["maxTransactions"],
        verifyCertificate=settings["verifyCertificate"],
    )


class Worker(LineReceiver):
    """
    The relay process's end of the pipe.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.downstream: SMTPDownstream | None = None
        self._stopping = False

    def _send(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(message).encode("utf-8") + b"\n")

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        if "settings" in message:
            settings = message["settings"]
            _startLogging(settings.get("logLevel", "info"))
            self.downstream = downstreamFrom(settings, self._reactor)
        elif "deliver" in message:
            defer.ensureDeferred(self._deliver(message))
        elif "close" in message:
            self._stop()

    async def _deliver(self, message: dict[str, Any]) -> None:
        number = int(message["deliver"])
        entry = SpoolEntry.fromJSON(message["state"], message["path"], message["size"])
        entry.contentOffset = message["offset"]
        assert self.downstream is not None
        try:
            messageFile = queuefile.openContent(entry)
        except OSError as e:
            log.error(
                "cannot open the message of {queueId}: {e}", queueId=entry.queueId, e=e
            )
            text = f"local error: cannot open the queued message: {e}"
            result = failedResult(entry, text)
        else:
            try:
                result = await self.downstream.deliver(
                    entry, messageFile, lambda: self._send({"sent": number})
                )
            finally:
                messageFile.close()
        self._send({"result": number, **encodeResult(result)})

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("overlong request from the MSA; the relay process stops")
        self._stop()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The MSA closed the pipe (or is gone): close and end.
        self._stop()

    def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        d = defer.succeed(None)
        if self.downstream is not None:
            d = defer.maybeDeferred(self.downstream.close)
        d.addBoth(lambda _: self._reactor.stop())


def _startLogging(level: str) -> None:
    def write(event: dict) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        line = {
            "level": event["log_level"].name,
            "text": text,
            "event": None if event.get("event") is None else str(event["event"]),
        }
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()

    predicate = LogLevelFilterPredicate(LogLevel.levelWithName(level))
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(cast(ILogObserver, write), [predicate])],
        redirectStandardIO=False,
    )


def main() -> None:
    from twisted.internet import reactor

    stdio.StandardIO(Worker(reactor), reactor=reactor)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
