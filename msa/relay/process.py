# -*- test-case-name: tests.test_relay_process -*-
"""
The relay to the core MTA in a process of its own (C{[relay] process =
true}): L{ProcessDownstream}, the relay runner's downstream, hands each
delivery to a child process (L{msa.relay.worker}) that holds the
connections to the core and runs L{msa.relay.client.SMTPDownstream}
there: the TLS, the SMTP conversation, the reading, hashing and
dot-stuffing of the message.  The queue, the retries, the results, the
audit records and the notifications stay in the MSA's process; only the
conversation with the core moves, so that it runs on another CPU core
beside the submissions.

The two speak JSON, one object per line.  To the child, on its standard
input: first the settings (the core, its TLS files' contents and the AUTH
password: nothing secret goes on a command line, and the child needs no
file the MSA could only read before it dropped its privileges), then
C{{"deliver": n, "state": ..., "path": ..., "offset": ..., "size": ...}}
per message (the entry as its queue file holds it: the child reads the
message from the queue file itself) and C{{"close": true}} at the end.
From the child, on its standard output: C{{"sent": n}} when the final dot
of delivery C{n} is sent (the connection can carry the next message:
L{msa.interfaces.IDownstream.deliver}'s C{dataSent}) and C{{"result": n,
...}} with its L{DeliveryResult}.  Its log events come on its standard
error, one JSON object per line, and go into the MSA's log with their
level.

What happens to a message when the child fails: every delivery it still
owed fails as a temporary failure ("the relay process ended"), so the
runner tries again later with its backoff, over a new child started for
the next delivery.  A message whose final dot was sent but whose result
the child never reported may have been taken by the core: the one window
SMTP leaves open, as when a connection drops after the dot.  A child that
stops answering (hung) is killed once a delivery has waited longer than
every time-out of its conversation together, twice over
(L{ProcessDownstream.deadlineFor}).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import attrs
from twisted.internet import defer, error, protocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from msa.interfaces import IDownstream
from msa.queue.entry import SpoolEntry
from msa.queue.integrity import Mismatch
from msa.relay.protocol import TEMPORARY, DeliveryResult, RecipientResult

log = Logger()

#: The longest line either side accepts (a result with many long replies).
MAX_LINE = 16 * 1024 * 1024


def encodeResult(result: DeliveryResult) -> dict[str, Any]:
    """
    C{result} as the child sends it.
    """
    return {
        "recipients": {
            r: [res.status, res.code, res.text] for r, res in result.recipients.items()
        },
        "reply": result.reply,
        "dsnOffered": result.dsnOffered,
        "mismatch": None if result.mismatch is None else attrs.asdict(result.mismatch),
    }


def decodeResult(data: dict[str, Any]) -> DeliveryResult:
    """
    The L{DeliveryResult} that L{encodeResult} made C{data} of.
    """
    mismatch = data.get("mismatch")
    return DeliveryResult(
        {
            r: RecipientResult(str(status), int(code), str(text))
            for r, (status, code, text) in data["recipients"].items()
        },
        str(data["reply"]),
        None if mismatch is None else Mismatch(**mismatch),
        bool(data["dsnOffered"]),
    )


def failedResult(entry: SpoolEntry, text: str) -> DeliveryResult:
    """
    A temporary failure of every pending recipient of C{entry}.
    """
    bad = RecipientResult(TEMPORARY, 0, text)
    return DeliveryResult({r: bad for r in entry.pendingRecipients()}, text)


@attrs.define
class _Delivery:
    entry: SpoolEntry
    deferred: defer.Deferred[DeliveryResult]
    dataSent: Callable[[], object] | None
    timer: Any = None


class _Child(protocol.ProcessProtocol):
    """
    One relay process: its requests out, its replies and log lines in.
    """

    def __init__(self, owner: ProcessDownstream) -> None:
        self.owner = owner
        self.buffers = {1: b"", 2: b""}
        self.ended = defer.Deferred[None]()
        self.gone = False

    def send(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(message).encode("utf-8") + b"\n")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self.buffers:
            return
        buffered = self.buffers[childFD] + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LINE:
            log.error("the relay process sent an overlong line; it is stopped")
            self.kill()
            rest = b""
        self.buffers[childFD] = rest
        for line in lines:
            if childFD == 1:
                self.owner._fromChild(self, line)
            else:
                _logFromChild(line)

    def kill(self) -> None:
        if self.gone or self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        self.gone = True
        for fd, rest in self.buffers.items():
            if rest and fd == 2:
                _logFromChild(rest)
        self.owner._ended(self, reason)
        self.ended.callback(None)


def _logFromChild(line: bytes) -> None:
    """
    One line of the child's standard error: a log event (JSON), or text
    (a traceback, say) logged as an error.
    """
    text = line.decode("utf-8", "replace")
    try:
        event = json.loads(text)
        level = LogLevel.levelWithName(event["level"])
        message = str(event["text"])
    except (ValueError, KeyError, TypeError, InvalidLogLevelError):
        if text.strip():
            log.error("relay process: {text}", text=text)
        return
    log.emit(level, "{text}", text=message, event=event.get("event"))


@implementer(IDownstream)
class ProcessDownstream:
    """
    The relay's downstream when C{[relay] process = true}: see the module
    docstring.

    @param settings: what the child builds its
        L{msa.relay.client.SMTPDownstream} from (L{msa.relay.worker}):
        JSON-able, secrets included.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        reactor: Any = None,
        executable: str = sys.executable,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._settings = settings
        self.host: str = settings["host"]
        self.port: int = settings["port"]
        self.tlsMode: str = settings["tlsMode"]
        self._executable = executable
        self._child: _Child | None = None
        self._deliveries: dict[int, _Delivery] = {}
        self._next = 0
        #: How many relay processes were started (the first included).
        self.started = 0

    def __repr__(self) -> str:
        return f"<SMTPDownstream {self.host}:{self.port} tls={self.tlsMode}>"

    @property
    def pid(self) -> int | None:
        """
        The running child's process id, or L{None}.
        """
        child = self._child
        if child is None or child.gone or child.transport is None:
            return None
        return child.transport.pid

    def deadlineFor(self, entry: SpoolEntry) -> float:
        """
        Seconds the delivery of C{entry} may wait for its result before
        the child is taken for hung: every step of the conversation at its
        time-out (connect; greeting, EHLO, STARTTLS, EHLO, AUTH, RSET,
        MAIL, each RCPT, DATA; sending the data and its reply, and the
        reply to the message before, behind whose dot it may wait), twice
        (a parked connection found gone is replaced once).
        """
        s = self._settings
        steps = 8 + len(entry.pendingRecipients())
        return 2 * (
            s["connectTimeout"] + steps * s["commandTimeout"] + 3 * s["dataTimeout"]
        )

    def _start(self) -> _Child:
        child = _Child(self)
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TZ")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._reactor.spawnProcess(
            child,
            self._executable,
            [self._executable, "-m", "msa.relay.worker"],
            env=env,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        child.send({"settings": self._settings})
        self.started += 1
        log.info(
            "relay process {pid} started for {downstream}",
            pid=child.transport.pid if child.transport else None,
            downstream=self,
        )
        return child

    def deliver(
        self,
        entry: SpoolEntry,
        messageFile: BinaryIO,
        dataSent: Callable[[], object] | None = None,
    ) -> defer.Deferred[DeliveryResult]:
        """
        Hand C{entry} to the relay process (started if none runs); the
        child reads the message from the queue file, so C{messageFile} is
        not read here.

        @return: a L{Deferred} firing with the L{DeliveryResult}; never
            fails (a child that cannot start or ends gives a temporary
            failure).
        """
        child = self._child
        if child is None or child.gone:
            try:
                child = self._child = self._start()
            except Exception as e:
                log.failure("cannot start the relay process")
                return defer.succeed(
                    failedResult(entry, f"local error: no relay process: {e}")
                )
        self._next += 1
        number = self._next
        delivery = _Delivery(entry, defer.Deferred(), dataSent)
        deadline = self.deadlineFor(entry)
        delivery.timer = self._reactor.callLater(deadline, self._hung, child, deadline)
        self._deliveries[number] = delivery
        child.send(
            {
                "deliver": number,
                "state": entry.toJSON(),
                "path": entry.messagePath,
                "offset": entry.contentOffset,
                "size": entry.size,
            }
        )
        return delivery.deferred

    def _fromChild(self, child: _Child, line: bytes) -> None:
        try:
            message = json.loads(line)
            if "sent" in message:
                delivery = self._deliveries.get(int(message["sent"]))
                if delivery is not None and delivery.dataSent is not None:
                    callback, delivery.dataSent = delivery.dataSent, None
                    callback()
                return
            number = int(message["result"])
            result = decodeResult(message)
        except Exception:
            log.failure("the relay process said {line!r}; it is stopped", line=line)
            child.kill()
            return
        delivery = self._deliveries.pop(number, None)
        if delivery is None:
            return
        if delivery.timer.active():
            delivery.timer.cancel()
        delivery.deferred.callback(result)

    def _hung(self, child: _Child, deadline: float) -> None:
        log.critical(
            "the relay process to {downstream} gave no result within {deadline:g}s: "
            "it is killed; its messages stay queued and are tried again",
            downstream=self,
            deadline=deadline,
        )
        child.kill()

    def _ended(self, child: _Child, reason: Failure) -> None:
        if self._child is child:
            self._child = None
        owed, self._deliveries = self._deliveries, {}
        if owed or not reason.check(error.ProcessDone):
            log.error(
                "the relay process ended ({why}); {count} message(s) it had stay "
                "queued and are tried again",
                why=reason.getErrorMessage(),
                count=len(owed),
            )
        for delivery in owed.values():
            if delivery.timer.active():
                delivery.timer.cancel()
            delivery.deferred.callback(
                failedResult(delivery.entry, "local error: the relay process ended")
            )

    def close(self) -> defer.Deferred[None]:
        """
        Ask the child to close its idle connections and exit; it is killed
        if it has not within C{[relay] command_timeout}.

        @return: a L{Deferred} firing once it has ended.
        """
        child, self._child = self._child, None
        if child is None or child.gone:
            return defer.succeed(None)
        child.send({"close": True})
        killer = self._reactor.callLater(self._settings["commandTimeout"], child.kill)

        def ended(_: object) -> None:
            if killer.active():
                killer.cancel()

        return child.ended.addCallback(ended)
