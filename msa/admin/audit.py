# -*- test-case-name: tests.test_audit -*-
"""
C{digipoort-msa-admin audit verify [FILE...]}, and the account records the
admin command appends to the audit log (L{msa.audit}).

The admin command appends its own records (under the log's lock, after
re-reading the chain head), rather than asking the daemon over its control
socket: accounts are managed in the accounts file whether or not the
daemon runs, and a change must not go unrecorded because it is down.
"""

from __future__ import annotations

import argparse
import getpass
import os
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
    verify.add_argument("files", nargs="*", metavar="FILE")


def auditCommand(config: Any, args: argparse.Namespace, stdout, stderr) -> int:
    """
    Run C{audit verify}: the first broken link and exit 1, or a summary
    and exit 0.
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
    result = verifyFiles(files)
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
    print(f"head: seq {result.lastSeq} sha256 {result.head}", file=stdout)
    print(
        "(records removed from the end cannot be seen from the files alone: "
        "compare the head with a copy kept elsewhere)",
        file=stdout,
    )
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
