# -*- test-case-name: tests.test_controlsocket,tests.test_admin -*-
"""
The queue control socket: how C{digipoort-msa-admin queue ...} talks to the
running MSA.

The running server listens on a UNIX stream socket,
C{<state_dir>/control.sock} (mode 0600, in the 0700 state directory: only
the MSA's own user can connect).  The protocol is one request line and one
reply line per command, so that it can also be driven by hand with
C{socat - UNIX-CONNECT:control.sock}::

    request:  COMMAND [ID] CRLF      (list, show ID, flush [ID], delete ID,
                                      hold ID, release ID, rotate-audit)
    reply:    {"ok": true, "result": ...} LF
         or   {"ok": false, "error": "no message X in the queue"} LF

Each command maps to a method of the queue runner's
L{msa.queue.control.QueueControl} (C{describe}, C{flush}, C{delete},
C{hold}, C{release}); C{show} reads the envelope and the message's header
section (bounded) from the L{msa.queue.spool.Spool}.  The queue runner owns
the queue while the server runs: every change goes through its queue
control, in the reactor thread, so it never races a delivery.  The audit
record of a hold, release or delete is written in the thread pool (its
fdatasync never blocks the reactor); the reply waits for it.
C{rotate-audit} rotates the audit log the daemon holds open
(L{msa.audit.AuditLog.rotateWhenIdle}: in the thread pool, in the log's
own rounds) and replies with the renamed file, its last C{seq} and hash.

L{request} (L{msa.service.controlclient}) is the blocking client.
L{describeSpool} and L{showEntry} read
the spool files directly (read-only): the admin command uses them for
C{list} and C{show} when the server is not running.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from msa.audit import AuditError, AuditLog, Rotation
from msa.queue.control import QueueControl, describeEntry
from msa.queue.queuefile import openContent
from msa.queue.spool import PENDING, Spool, SpoolEntry
from msa.service.controlclient import (
    SOCKET_NAME,
    ControlError,
    NoSuchMessage,
    ServerNotRunning,
    _Address,
    noSuchMessage,
    request,
    socketPath,
)

__all__ = [
    "COMMANDS",
    "SOCKET_NAME",
    "ControlError",
    "ControlProtocol",
    "ControlService",
    "NoSuchMessage",
    "ServerNotRunning",
    "checkQueueId",
    "describeSpool",
    "parseRequest",
    "request",
    "showEntry",
    "noSuchMessage",
    "socketPath",
    "summarizeRecipients",
]

log = Logger()

#: Commands and whether they take an id: True (required), None (optional),
#: False (none).
COMMANDS: dict[str, bool | None] = {
    "list": False,
    "show": True,
    "flush": None,
    "delete": True,
    "hold": True,
    "release": True,
    "rotate-audit": False,
}

#: Queue ids are hex (L{msa.queue.spool.newQueueId}); anything else is refused
#: before it gets near a file name.
_QUEUE_ID = re.compile(r"^[0-9A-Fa-f]{1,64}$")

#: How much of a message's header section L{showEntry} reads at most.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_LINES = 500

#: Longest request line accepted.
MAX_REQUEST = 1024


def checkQueueId(queueId: str) -> str:
    if not _QUEUE_ID.match(queueId or ""):
        raise ControlError(f"not a queue id: {queueId!r}")
    return queueId.upper()


def parseRequest(line: str) -> tuple[str, str | None]:
    """
    @return: the command and its id (or L{None}).
    @raise ControlError: for an unknown command or a wrong argument.
    """
    words = line.split()
    if not words:
        raise ControlError("empty command")
    command, args = words[0].lower(), words[1:]
    if command not in COMMANDS:
        raise ControlError(
            f"unknown command {words[0]!r}; known: {', '.join(COMMANDS)}"
        )
    wantsId = COMMANDS[command]
    if len(args) > 1 or (wantsId is False and args) or (wantsId is True and not args):
        usage = {True: " ID", None: " [ID]", False: ""}[wantsId]
        raise ControlError(f"usage: {command}{usage}")
    return command, checkQueueId(args[0]) if args else None


# Reading the spool directly.


def _readHeaders(entry: SpoolEntry) -> tuple[list[str], bool]:
    """
    The header section of a message file, at most L{MAX_HEADER_BYTES} and
    L{MAX_HEADER_LINES}.

    @return: the header lines (without line ends, folded lines kept as they
        are) and whether the section was cut short.
    """
    with openContent(entry) as f:
        data = f.read(MAX_HEADER_BYTES + 1)
    if data.startswith(b"\r\n"):
        return [], False
    end = data.find(b"\r\n\r\n")
    truncated = False
    if end >= 0:
        data = data[:end]
    elif len(data) > MAX_HEADER_BYTES:
        data, truncated = data[:MAX_HEADER_BYTES], True
    lines = data.decode("utf-8", "replace").split("\r\n") if data else []
    if len(lines) > MAX_HEADER_LINES:
        lines, truncated = lines[:MAX_HEADER_LINES], True
    return lines, truncated


def describeSpool(spool: Spool, now: float | None = None) -> list[dict]:
    """
    What L{msa.queue.control.QueueControl.describe} tells, read from the files: for
    the admin command when the server is not running.
    """
    if now is None:
        now = time.time()
    result = []
    for queueId in spool.pending():
        try:
            entry = spool.load(queueId)
        except (OSError, ValueError):
            continue
        result.append(describeEntry(entry, now))
    return result


def showEntry(spool: Spool, queueId: str, summary: dict | None = None) -> dict:
    """
    One entry: its summary (as in L{describeSpool}), envelope, per-recipient
    errors and header section.

    @raise ControlError: when there is no such entry.
    """
    queueId = checkQueueId(queueId)
    try:
        entry = spool.load(queueId)
        headers, truncated = _readHeaders(entry)
    except (FileNotFoundError, ValueError):
        raise noSuchMessage(queueId)
    if summary is None:
        [summary] = [d for d in describeSpool(spool) if d["id"] == queueId] or [
            {"id": queueId}
        ]
    return {
        "summary": summary,
        "envelope": entry.envelope.toJSON(),
        "errors": dict(entry.errors),
        "eightBit": entry.eightBit,
        "headers": headers,
        "headersTruncated": truncated,
    }


# The server side.


class ControlProtocol(LineOnlyReceiver):
    """
    One admin connection: each request line gets one JSON reply line.
    Requests are answered in order.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def connectionMade(self) -> None:
        self._queue: defer.Deferred = defer.succeed(None)

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        factory: _ControlFactory = self.factory  # type: ignore[assignment]
        self._queue.addCallback(lambda _: factory.service.execute(text))
        self._queue.addCallback(self._send)

    def _send(self, reply: dict) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(reply).encode("utf-8") + b"\n")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._send({"ok": False, "error": "request too long"})
        if self.transport is not None:
            self.transport.loseConnection()


class _ControlFactory(protocol.Factory):
    protocol = ControlProtocol

    def __init__(self, service: ControlService) -> None:
        self.service = service


class ControlService(Service):
    """
    Serve the control socket at C{socketPath} for the queue control
    C{control} (a L{msa.queue.control.QueueControl}, the queue runner's),
    its spool C{spool} and the audit log C{audit} (L{None}: off).

    A leftover socket from a crashed server is replaced; if another server
    still answers on it, the start fails.
    """

    name = "control"  # type: ignore[assignment]  # Twisted types it as None

    def __init__(
        self,
        socketPath: str,
        control: QueueControl,
        spool: Spool,
        reactor=None,
        audit: AuditLog | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.socketPath = socketPath
        self.control = control
        self.spool = spool
        self.audit = audit
        self._reactor = reactor
        self._port = None
        self._address: _Address | None = None
        #: The handler of each of L{COMMANDS}.
        self._handlers: dict[str, Callable[[str | None], object]] = {
            "list": self.do_list,
            "show": self.do_show,
            "flush": self.do_flush,
            "delete": self.do_delete,
            "hold": self.do_hold,
            "release": self.do_release,
            "rotate-audit": self.do_rotate_audit,
        }

    def startService(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.socketPath))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if mode & 0o077:
            log.warn(
                "{directory} has mode {mode:04o}: the control socket relies on "
                "its own mode 0600; chmod 700 the directory",
                directory=directory,
                mode=mode,
            )
        self._removeStale()
        factory = _ControlFactory(self)
        self._address = _Address(self.socketPath)
        try:
            self._port = self._reactor.listenUNIX(
                self._address.path, factory, mode=0o600, wantPID=False
            )
        except BaseException:
            self._address.close()
            raise
        # listenUNIX applies the mode after bind; make sure it holds.
        os.chmod(self.socketPath, 0o600)
        super().startService()
        log.info("queue control socket at {path}", path=self.socketPath)

    def _removeStale(self) -> None:
        try:
            st = os.lstat(self.socketPath)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.socketPath} exists and is not a socket")
        address = _Address(self.socketPath)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                try:
                    s.connect(address.path)
                except OSError:
                    os.unlink(self.socketPath)
                    log.info(
                        "removed stale control socket {path}", path=self.socketPath
                    )
                    return
        finally:
            address.close()
        raise OSError(
            f"{self.socketPath}: another MSA answers on it (same state directory?)"
        )

    def stopService(self):
        super().stopService()
        port, self._port = self._port, None
        if port is not None:
            # The port removes the socket through the address: close the
            # directory only afterwards.
            return defer.maybeDeferred(port.stopListening).addBoth(self._stopped)

    def _stopped(self, result):
        if self._address is not None:
            self._address.close()
        return result

    def execute(self, line: str) -> defer.Deferred:
        """
        Run one request line.

        @return: a L{Deferred} of the reply, C{{"ok": True, "result": ...}}
            or C{{"ok": False, "error": message}}; it never fails.
        """
        try:
            command, queueId = parseRequest(line)
        except ControlError as e:
            return defer.succeed({"ok": False, "error": str(e)})
        d = defer.maybeDeferred(self._handlers[command], queueId)

        def ok(result):
            return {"ok": True, "result": result}

        def failed(failure):
            if failure.check(ControlError):
                error = str(failure.value)
            elif failure.check(KeyError):
                error = str(noSuchMessage(queueId))
            else:
                log.failure("control command {line!r} failed", failure, line=line)
                error = f"internal error: {failure.getErrorMessage()}"
            return {"ok": False, "error": error}

        return d.addCallbacks(ok, failed)

    def do_list(self, _):
        return self.control.describe()

    @defer.inlineCallbacks
    def do_show(self, queueId):
        described = yield defer.maybeDeferred(self.control.describe)
        summary = next((d for d in described if d["id"] == queueId), None)
        if summary is None:
            raise KeyError(queueId)
        return showEntry(self.spool, queueId, summary)

    def do_flush(self, queueId):
        return self.control.flush(queueId)

    def do_delete(self, queueId):
        return self.control.delete(queueId)

    def do_hold(self, queueId):
        return self.control.hold(queueId)

    def do_release(self, queueId):
        return self.control.release(queueId)

    def do_rotate_audit(self, _) -> defer.Deferred[dict | None]:
        if self.audit is None:
            raise ControlError("the audit log is off ([audit] enabled = false)")

        def rotated(rotation: Rotation | None) -> dict | None:
            return None if rotation is None else rotation.toJSON()

        def failed(failure):
            failure.trap(AuditError)
            raise ControlError(str(failure.value))

        return self.audit.rotateWhenIdle("admin").addCallbacks(rotated, failed)


def summarizeRecipients(recipients: dict[str, str]) -> str:
    return ", ".join(
        r if status == PENDING else f"{r} ({status})"
        for r, status in recipients.items()
    )
