# -*- test-case-name: tests.test_audit -*-
"""
C{digipoort-msa-admin audit verify [--anchor SHA256] [FILE...]}, C{audit
rotate}, and the account records the admin command appends to the audit
log (L{msa.audit}).

Exit codes of C{verify}: 0 the chain is intact and complete; 1 it is broken
(or does not start at the genesis or the given anchor); 3 it is intact but
has gaps the MSA recorded (C{lost} records: events whose records could not
be written, L{msa.audit.lost}); 2 a usage error.  On a terminal C{verify}
shows a progress line per file on standard error (L{msa.admin.progress}).

C{rotate} asks the running daemon, which holds the log open, over its
control socket (C{rotate-audit}): the daemon rotates in its own rounds, so
that no record is lost or lands between the files.  When the daemon is not
running, the command rotates the file itself, under the log's lock (as it
appends the account records).  Exit codes: 0 rotated (or nothing to
rotate: the file holds no record), 1 it failed.

The admin command appends its own records (under the log's lock, after
re-reading the chain head), rather than asking the daemon over its control
socket: accounts are managed in the accounts file whether or not the
daemon runs, and a change must not go unrecorded because it is down.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
from typing import Any

from msa.admin.progress import Progress
from msa.admin.queue import AdminFailure
from msa.audit import AuditError, AuditLog, Rotation, chainFiles, verifyFiles


def auditParser(topics: Any) -> None:
    """
    Add the C{audit} topic to the admin command's parser.
    """
    audit = topics.add_parser("audit", help="check the audit log")
    commands = audit.add_subparsers(dest="auditCommand", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the hash chain of the audit log (default: the configured "
        "log and its rotated predecessors)",
    )
    verify.add_argument(
        "--anchor",
        type=_anchor,
        metavar="SHA256",
        help="the chain starts after the record with this hash (the last "
        "record of the newest file archived; verify prints it per file and "
        "the daemon logs it at each rotation); without it the chain must "
        "start at the genesis",
    )
    verify.add_argument("files", nargs="*", metavar="FILE")
    commands.add_parser(
        "rotate",
        help="start a new audit file now, chained to the old one (the running "
        "daemon rotates it; the next free <path>.NNNNNN, as rotation by size)",
    )


#: Exit code of C{audit verify} for an intact chain with recorded gaps.
EXIT_GAPS = 3


def _anchor(text: str) -> str:
    """
    An C{--anchor}: a SHA-256 in hex, as the records' C{prev}.
    """
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"not a SHA-256 (64 hex digits): {text!r}")
    return text.lower()


def auditCommand(config: Any, args: argparse.Namespace, stdout, stderr) -> int:
    """
    Run C{audit verify} (L{verifyCommand}) or C{audit rotate}
    (L{rotateCommand}).
    """
    if args.auditCommand == "rotate":
        return rotateCommand(config, stdout, stderr)
    return verifyCommand(config, args, stdout, stderr)


def rotateCommand(config: Any, stdout, stderr) -> int:
    """
    C{audit rotate}: see the module docstring.  Prints the file the log
    was renamed to and the hash it ends with (the C{--anchor} of C{verify}
    once it is archived).
    """
    from msa.service import controlsocket

    if config is None:
        raise AdminFailure("audit rotate needs the configuration (--config)", 2)
    if not config["audit"]["enabled"]:
        raise AdminFailure("the audit log is off ([audit] enabled = false)")
    path = controlsocket.socketPath(config["server"]["state_dir"])
    try:
        reply: Any = controlsocket.request(path, "rotate-audit")
        rotation = None if reply is None else Rotation(**_rotationFields(reply))
    except controlsocket.ServerNotRunning:
        print(
            "digipoort-msa-admin: note: the MSA is not running; rotating the "
            "file under its lock",
            file=stderr,
        )
        log = AuditLog(config["audit"]["path"], config["audit"]["max_bytes"])
        try:
            rotation = log.rotate("admin")
        except AuditError as e:
            raise AdminFailure(str(e))
        finally:
            log.close()
    except controlsocket.ControlError as e:
        raise AdminFailure(f"audit rotate: {e}")
    if rotation is None:
        print(
            f"nothing to rotate: {config['audit']['path']} holds no record yet",
            file=stdout,
        )
        return 0
    print(
        f"rotated: {rotation.file} ends at seq {rotation.seq} sha256 "
        f"{rotation.head} (the --anchor of audit verify once it is archived)",
        file=stdout,
    )
    return 0


def _rotationFields(reply: dict[str, Any]) -> dict[str, Any]:
    """
    The L{Rotation} in the daemon's C{rotate-audit} reply.
    """
    return {
        "file": reply["file"],
        "seq": reply["seq"],
        "head": reply["sha256"],
        "reason": reply["reason"],
    }


def verifyCommand(config: Any, args: argparse.Namespace, stdout, stderr) -> int:
    """
    C{audit verify}: the first broken link and exit 1, or a summary and
    exit 0, or the summary and every recorded gap and exit L{EXIT_GAPS}.
    """
    files = list(args.files)
    if not files:
        if config is None:
            print("digipoort-msa-admin: give the audit log FILE(s)", file=stderr)
            return 2
        files = chainFiles(config["audit"]["path"])
        if not files:
            print(
                f"digipoort-msa-admin: no audit log at {config['audit']['path']}",
                file=stderr,
            )
            return 1
    progress = Progress("verifying the audit log", len(files), stderr)
    try:
        result = verifyFiles(
            files, anchor=args.anchor, fileVerified=lambda _: progress.step()
        )
    finally:
        progress.finish()
    for note in result.notes:
        print(f"note: {note}", file=stdout)
    if result.error is not None:
        print(f"BROKEN: {result.error}", file=stdout)
        print(
            f"verified up to seq {result.lastSeq} ({result.records} record(s) "
            "before the break)",
            file=stdout,
        )
        return 1
    print(
        f"OK: {result.records} record(s) in {len(files)} file(s), seq "
        f"{result.firstSeq}..{result.lastSeq}, {result.firstTime or '-'} .. "
        f"{result.lastTime or '-'}",
        file=stdout,
    )
    for path, seq, end in result.ends[:-1]:
        print(
            f"file {path} ends at seq {seq} sha256 {end} (the --anchor once "
            "it is archived)",
            file=stdout,
        )
    print(f"head: seq {result.lastSeq} sha256 {result.head}", file=stdout)
    print(
        "(records removed from the end cannot be seen from the files alone: "
        "compare the head with a copy kept elsewhere)",
        file=stdout,
    )
    if result.gaps:
        for gap in result.gaps:
            print(f"GAP: {gap}", file=stdout)
        print(
            f"INCOMPLETE: {result.lost} record(s) the MSA could not write, in "
            f"{len(result.gaps)} gap(s)",
            file=stdout,
        )
        return EXIT_GAPS
    return 0


def operator() -> str:
    """
    Who runs the admin command, for the account records.
    """
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def recordAccountEvent(config: Any, action: str, account: str, **fields: Any) -> None:
    """
    Append an C{account} record (C{action}: added, password-changed,
    enabled, disabled, changed, removed, imported) to the configured audit log, if
    the configuration is known and the log enabled.  Never passwords or
    secrets: callers pass only names and settings.

    @raise AuditError: when it cannot be written.
    """
    if config is None or not config["audit"]["enabled"]:
        return
    log = AuditLog(config["audit"]["path"], config["audit"]["max_bytes"])
    try:
        log.append("account", action=action, account=account, by=operator(), **fields)
    finally:
        log.close()


__all__ = ["AuditError", "auditCommand", "auditParser", "recordAccountEvent"]
