# -*- test-case-name: tests.test_audit -*-
"""
C{digipoort-msa-admin audit verify [--anchor SHA256] [FILE...]}, and the
account records the admin command appends to the audit log (L{msa.audit}).

Exit codes of C{verify}: 0 the chain is intact and complete; 1 it is broken
(or does not start at the genesis or the given anchor); 3 it is intact but
has gaps the MSA recorded (C{lost} records: events whose records could not
be written, L{msa.audit.lost}); 2 a usage error.

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

from msa.audit import AuditError, AuditLog, chainFiles, verifyFiles


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
    Run C{audit verify}: the first broken link and exit 1, or a summary
    and exit 0, or the summary and every recorded gap and exit
    L{EXIT_GAPS}.
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
    result = verifyFiles(files, anchor=args.anchor)
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
