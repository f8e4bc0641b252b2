# -*- test-case-name: tests.test_admin_mailbox -*-
"""
C{digipoort-msa-admin mailbox}: the return messages waiting for the
companies (R16), in the store C{[mailbox] store} names: the mailboxes of
C{[mailbox] directory}, or the PostgreSQL database.

    mailbox list                      every mailbox: messages, octets, oldest
    mailbox show ACCOUNT              each message: uid, size, delivered, sha256
    mailbox delete ACCOUNT UID...     remove messages
    mailbox purge ACCOUNT [--older-than DAYS]   remove all (or the old ones)

The commands read and change the Maildir files or the database directly
(the store's own code, L{msa.mailbox.MaildirStore} or
L{msa.mailbox.pgstore.PostgresMailboxStore}), so they work whether or not
the server runs.  A removal takes the mailbox's lock first: while a
company's POP3 session (of any instance) holds it, C{delete} and C{purge}
fail and change nothing.  Each
removed message gets a C{mailbox-deleted} audit record naming the operator.
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

from msa.admin.audit import operator
from msa.admin.queue import AdminFailure
from msa.audit import AuditError, AuditLog
from msa.errors import MailboxInUse
from msa.mailbox import MaildirStore
from msa.mailbox.pgstore import PostgresMailboxStore
from msa.service.returnchannel import mailboxStore

__all__ = ["mailboxCommand", "mailboxParser"]

#: The stores the commands work on.
Store = MaildirStore | PostgresMailboxStore


def mailboxParser(topics: Any) -> None:
    """
    Add C{mailbox} and its commands to the program's topics.
    """
    mailbox = topics.add_parser("mailbox", help="return messages in the mailboxes")
    commands = mailbox.add_subparsers(dest="mailboxCommand", required=True)
    commands.add_parser("list", help="every mailbox: messages, octets, oldest")
    commands.add_parser("show", help="the messages of one mailbox").add_argument(
        "account"
    )
    delete = commands.add_parser("delete", help="remove messages (by uid)")
    delete.add_argument("account")
    delete.add_argument("uids", nargs="+", metavar="uid")
    purge = commands.add_parser("purge", help="remove every message of a mailbox")
    purge.add_argument("account")
    purge.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="only the messages delivered more than DAYS days ago",
    )


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def mailboxCommand(
    config: Any, args: argparse.Namespace, stdout: Any, stderr: Any
) -> int:
    """
    Run C{mailbox} C{args.mailboxCommand}.

    @return: the exit code.
    """
    audit = None
    if config["audit"]["enabled"]:
        audit = AuditLog(config["audit"]["path"], config["audit"]["max_bytes"])
    store = mailboxStore(config, audit)
    try:
        return _COMMANDS[args.mailboxCommand](store, args, stdout)
    except MailboxInUse:
        raise AdminFailure(
            f"the mailbox of {args.account} is in use by a POP3 session; "
            "nothing removed, try again when it ends"
        )
    except (OSError, AuditError) as e:
        raise AdminFailure(str(e))
    finally:
        if isinstance(store, PostgresMailboxStore):
            store.close()
        if audit is not None:
            audit.close()


def _list(store: Store, args: argparse.Namespace, stdout: Any) -> int:
    now = time.time()
    print(f"{'ACCOUNT':<24} {'MESSAGES':>8} {'OCTETS':>12}  OLDEST", file=stdout)
    for account, entries in store.mailboxSummary():
        oldest = f"{int(now - entries[0].deliveredAt)}s ago" if entries else "-"
        size = sum(e.size for e in entries)
        print(f"{account:<24} {len(entries):>8} {size:>12}  {oldest}", file=stdout)
    return 0


def _show(store: Store, args: argparse.Namespace, stdout: Any) -> int:
    for entry in store.listMessages(args.account):
        print(
            f"{entry.uid} {entry.size} {_when(entry.deliveredAt)} {entry.sha256}",
            file=stdout,
        )
    return 0


def _removed(removed: list, account: str, stdout: Any) -> None:
    for entry in removed:
        print(f"removed {entry.uid} from the mailbox of {account}", file=stdout)


def _delete(store: Store, args: argparse.Namespace, stdout: Any) -> int:
    wanted = set(args.uids)
    removed = store.removeMessages(
        args.account, lambda e: e.uid in wanted, "admin", {"by": operator()}
    )
    _removed(removed, args.account, stdout)
    missing = wanted - {e.uid for e in removed}
    if missing:
        raise AdminFailure(
            f"no message {', '.join(sorted(missing))} in the mailbox of {args.account}"
        )
    return 0


def _purge(store: Store, args: argparse.Namespace, stdout: Any) -> int:
    cutoff = float("inf")
    if args.older_than is not None:
        cutoff = time.time() - args.older_than * 86400
    removed = store.removeMessages(
        args.account, lambda e: e.deliveredAt < cutoff, "admin", {"by": operator()}
    )
    _removed(removed, args.account, stdout)
    print(f"{len(removed)} message(s) removed", file=stdout)
    return 0


_COMMANDS = {"list": _list, "show": _show, "delete": _delete, "purge": _purge}
