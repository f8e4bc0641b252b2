# -*- test-case-name: tests.test_admin -*-
"""
The C{queue} commands of C{digipoort-msa-admin}: list, show, flush, delete,
hold and release queued messages.  Changes go through the running server's
control socket (L{msa.service.controlsocket}), so they never race the queue runner;
with the server stopped, C{list} and C{show} read the spool read-only.
With C{[server] workers}, they cover every worker's spool.
"""

import argparse
import os
import time
from typing import Any

from msa.admin.progress import Progress


class AdminFailure(Exception):
    """
    End the program with a message on stderr and exit code C{code}.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


_Failed = AdminFailure


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _nextAttempt(item: dict, now: float) -> str:
    if item.get("held"):
        return "held"
    if item.get("inFlight"):
        return "in flight"
    value = item.get("nextAttempt")
    if value is None:
        return "-"
    # The runner gives a POSIX time; a small number is a delay.
    delay = value - now if value > 1e9 else value
    return "now" if delay <= 0 else "in " + _duration(delay)


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _queueTable(items: list[dict], now: float) -> list[str]:
    from msa.service.controlsocket import summarizeRecipients

    header = (
        "ID",
        "AGE",
        "SIZE",
        "SENDER",
        "RECIPIENTS",
        "ATTEMPTS",
        "NEXT",
        "HELD",
        "LAST ERROR",
    )
    rows = [header]
    for item in items:
        rows.append(
            (
                item["id"],
                _duration(item.get("age", 0)),
                str(item.get("size", "")),
                "<" + _shorten(item.get("sender", ""), 40) + ">",
                _shorten(summarizeRecipients(item.get("recipients", {})), 60),
                str(item.get("attempts", 0)),
                _nextAttempt(item, now),
                "yes" if item.get("held") else "no",
                _shorten(item.get("heldReason") or item.get("lastError") or "-", 70),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]


def _showLines(shown: dict, now: float) -> list[str]:
    summary, envelope = shown["summary"], shown["envelope"]
    lines = [f"id: {summary['id']}"]
    if "age" in summary:
        lines += [
            f"state: {'held' if summary.get('held') else 'queued'}",
            f"age: {_duration(summary['age'])}",
            f"size: {summary.get('size')} bytes",
            f"attempts: {summary.get('attempts', 0)}",
            f"next attempt: {_nextAttempt(summary, now)}",
            f"last error: {summary.get('lastError') or '-'}",
        ]
        if summary.get("heldReason"):
            lines.append(f"held because: {summary['heldReason']}")

    lines.append(f"sender: <{envelope.get('sender', '')}>")
    statuses = summary.get("recipients") or {}
    for rcpt in envelope.get("recipients", []):
        line = f"recipient: <{rcpt}> {statuses.get(rcpt, '?')}"
        if rcpt in shown.get("errors", {}):
            line += f" ({shown['errors'][rcpt]})"
        lines.append(line)
    params = envelope.get("mailParams") or {}
    if params:
        lines.append(
            "mail parameters: "
            + " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
        )
    lines.append(f"account: {envelope.get('account') or '-'}")
    lines.append(
        f"client: {envelope.get('clientAddress') or '-'} "
        f"(helo {envelope.get('helo') or '-'})"
    )
    received = envelope.get("receivedAt")
    if received:
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(received))
        lines.append(f"received at: {when}")
    lines.append("headers:")
    lines += ["  " + h for h in shown["headers"]]
    if shown.get("headersTruncated"):
        lines.append("  [header section truncated]")
    return lines


_MUTATING = ("flush", "delete", "hold", "release")


def spoolsOf(config: Any) -> list[tuple[str, str]]:
    """
    The (state directory, spool directory) of each worker
    (L{msa.service.workers}): worker 0's, then those of the others that
    have either, in number order.
    """
    from msa.service.workers import DIRECTORY, workerDirectory

    state, spool = config["server"]["state_dir"], config["spool"]["directory"]
    numbers: set[int] = set()
    for base in (state, spool):
        try:
            names = os.listdir(os.path.join(base, DIRECTORY))
        except OSError:
            continue
        numbers.update(int(n) for n in names if n.isdigit() and int(n) > 0)
    return [(state, spool)] + [
        (workerDirectory(state, n), workerDirectory(spool, n)) for n in sorted(numbers)
    ]


def queueCommand(config: Any, args: argparse.Namespace, stdout, stderr) -> int:
    """
    C{queue ...}: through the control socket of the running MSA; C{list}
    and C{show} fall back to reading the spool files when it is not
    running.  The changing commands need the running server: it owns the
    queue, and changing the files behind a running queue runner's back
    would race its deliveries (and a missing socket does not prove that no
    runner is at work).

    With C{[server] workers}, every worker's queue: C{list} and C{flush}
    go to each, a command on one message to the worker whose spool holds
    it.
    """
    from msa.service import controlsocket

    if args.queueCommand == "verify":
        return verifyCommand(config, stdout, stderr)
    # "list" takes no id.
    command, queueId = args.queueCommand, vars(args).get("id")
    try:
        if queueId is not None:
            queueId = controlsocket.checkQueueId(queueId)
    except controlsocket.ControlError as e:
        raise _Failed(str(e), 2)
    now = time.time()
    result: Any = []
    answered = queueId is None
    places = spoolsOf(config)
    offline = []
    unknown = None
    for number, (state, directory) in enumerate(places):
        try:
            found, online = _askWorker(state, directory, command, queueId, now)
        except controlsocket.NoSuchMessage as e:
            # Perhaps another worker's: ask the next.
            unknown = e
            continue
        except controlsocket.ControlError as e:
            raise _Failed(str(e))
        if not online:
            offline.append(number)
        if queueId is not None:
            result, answered = found, True
            break
        result += found or []
    if offline and offline[0] == 0:
        print(
            "digipoort-msa-admin: note: the MSA is not running; "
            "read from the spool files",
            file=stderr,
        )
    elif offline:
        print(
            "digipoort-msa-admin: note: worker(s) "
            f"{', '.join(map(str, offline))} not running; their queue read "
            "from the spool files",
            file=stderr,
        )
    if not answered:
        raise _Failed(str(unknown))
    if command == "list":
        if not result:
            print("queue is empty", file=stdout)
        else:
            for line in _queueTable(result, now):
                print(line, file=stdout)
            print(f"{len(result)} message(s)", file=stdout)
    elif command == "show":
        for line in _showLines(result, now):
            print(line, file=stdout)
    elif command == "flush":
        ids = result or []
        print(
            f"flushed {len(ids)} message(s)" + (": " + " ".join(ids) if ids else ""),
            file=stdout,
        )
    else:
        done = {"delete": "deleted", "hold": "held", "release": "released"}[command]
        print(f"{done} {queueId}", file=stdout)
    return 0


def _askWorker(
    state: str, directory: str, command: str, queueId: str | None, now: float
) -> tuple[Any, bool]:
    """
    C{command} to the worker whose state directory is C{state}: over its
    control socket, or (C{list} and C{show}) read from its spool
    C{directory} when it is not running.

    @return: the result, and whether the worker answered.
    @raise ControlError: as the worker (or its spool) refused.
    """
    from msa.queue.outcomes import outcomesDirectoryIn
    from msa.queue.spool import Spool
    from msa.service import controlsocket

    try:
        return controlsocket.request(
            controlsocket.socketPath(state), command, queueId
        ), True
    except controlsocket.ServerNotRunning as e:
        if command in _MUTATING:
            raise _Failed(
                f"{e}: queue {command} needs the running server, which owns the "
                "queue; start it and try again"
            )
    if not os.path.isdir(os.path.join(directory, "queue")):
        if command == "show":
            raise controlsocket.noSuchMessage(queueId)
        return [], False
    spool = Spool(
        directory, reactor=object(), outcomesDirectory=outcomesDirectoryIn(state)
    )
    if queueId is None:
        return controlsocket.describeSpool(spool, now), False
    return controlsocket.showEntry(spool, queueId), False


def verifyCommand(config: Any, stdout, stderr=None) -> int:
    """
    C{queue verify}: re-hash every queued message (read from the spool
    files, with or without the running server) and compare with the digest
    recorded when it was acknowledged (L{msa.queue.integrity}).  Prints a
    line per message that does not verify and a summary; on a terminal, a
    progress line on C{stderr} meanwhile (L{msa.admin.progress}).

    @return: 1 when any message's bytes are not the acknowledged ones, 0
        otherwise (messages without a recorded digest are listed as
        unverifiable, but do not fail the check).
    """
    from msa.queue.integrity import verifySpool
    from msa.queue.spool import Spool

    spools = [
        Spool(directory, reactor=object())
        for _, directory in spoolsOf(config)
        if os.path.isdir(os.path.join(directory, "queue"))
    ]
    if not spools:
        print("queue is empty", file=stdout)
        return 0
    work = [(spool, queueId) for spool in spools for queueId in spool.pending()]
    progress = Progress("verifying the queue", len(work), stderr)
    verdicts = []
    for spool, queueId in progress.over(work):
        verdicts += verifySpool(spool, [queueId])
    counts = {"ok": 0, "mismatch": 0, "unverifiable": 0}
    for verdict in verdicts:
        counts[verdict.status] += 1
        if verdict.status != "ok":
            print(
                f"{verdict.status.upper()} {verdict.queueId}: {verdict.detail}",
                file=stdout,
            )
    print(
        f"{len(verdicts)} message(s): {counts['ok']} verified, "
        f"{counts['mismatch']} mismatch(es), {counts['unverifiable']} unverifiable",
        file=stdout,
    )
    return 1 if counts["mismatch"] else 0
