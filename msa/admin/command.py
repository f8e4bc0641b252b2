# -*- test-case-name: tests.test_admin,tests.test_accounts_e2e -*-
"""
C{digipoort-msa-admin}: manage the accounts file and the mail queue.

    digipoort-msa-admin [--accounts PATH] [--realm REALM]... [--config PATH]
        accounts add USER [--mechanisms PLAIN,LOGIN,...] [--disabled]
        accounts passwd USER
        accounts enable USER | disable USER | remove USER | show USER
        accounts set USER --mechanisms PLAIN,...
        accounts list
        accounts import FILE | export FILE
        accounts init-db
    digipoort-msa-admin [--config PATH]
        queue list | show ID | flush [ID] | delete ID | hold ID | release ID
        queue verify
    digipoort-msa-admin [--config PATH]
        audit verify [--anchor SHA256] [FILE...] | rotate
    digipoort-msa-admin [--config PATH]
        mailbox list | show ACCOUNT | delete ACCOUNT UID... |
        purge ACCOUNT [--older-than DAYS]
    digipoort-msa-admin selftest HOST PORT [--implicit] [--servername NAME]
        [--ca-file PEM] [--min-days N] [--expect-ciphers S] [--expect-groups S]
        [--user U --password-file F --sender S --rcpt R]

Passwords are never taken from the command line (where other users could
see them in the process list): they are asked for twice when standard input
is a terminal, and otherwise read as one line from standard input.

Without C{--accounts}, or with C{--config}, the accounts file and the
DIGEST-MD5 realm come from the server configuration (L{msa.service.config}).
C{--realm} overrides the configured realm; without either it is the host's
fully qualified name.

When the configuration names a database (C{[accounts] store =
"postgresql://..."}, L{msa.accounts.pgstore}) and no C{--accounts} is
given, the same commands manage the accounts there; every running instance
sees the change within C{watch_interval} seconds.  C{import FILE} adds the
accounts of an accounts file to the configured store (replacing those of
the same name), C{export FILE} writes every account of the store to an
accounts file (mode 0600): together they move accounts between the file and
the database without loss.  C{init-db} creates the table (done anyway on
first use).

C{queue} talks to the running server over its control socket,
C{<state_dir>/control.sock} (L{msa.service.controlsocket}); the state directory
comes from the configuration (the built-in defaults without C{--config}).
When the server is not running, C{list} and C{show} read the spool files
(read-only) and say so on stderr; C{flush}, C{delete}, C{hold} and
C{release} fail: the queue belongs to the server's queue runner, and
changing its files behind its back could race a delivery in progress.
With C{[server] workers}, C{queue} covers each worker's spool, through
each worker's control socket (C{<state_dir>/workers/N/control.sock}).
C{verify} always reads the spool files: it re-hashes every queued message
and exits 1 when any is not the message acknowledged
(L{msa.queue.integrity}).

Account changes are recorded in the audit log (L{msa.audit}) when the
configuration is known (C{--config}, or no C{--accounts}); with
C{--accounts} alone there is no configuration, hence no record.

Exit codes: 0 on success, 1 when the command failed (unknown or existing
account, unreadable file, refused password), 2 for usage errors.
"""

import argparse
import sys
from typing import Any

from msa.accounts.model import (
    DEFAULT_MECHANISMS,
)
from msa.admin.accounts import accountsCommand
from msa.admin.audit import (
    auditCommand,
    auditParser,
)
from msa.admin.fields import FIELDS, fieldOptions
from msa.admin.mailbox import mailboxCommand, mailboxParser
from msa.admin.queue import AdminFailure as _Failed
from msa.admin.queue import queueCommand
from msa.admin.selftest import addParser as addSelftestParser
from msa.admin.selftest import selftestCommand


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digipoort-msa-admin",
        description="Manage the accounts of the Digipoort MSA.",
        allow_abbrev=False,
    )
    parser.add_argument("--accounts", metavar="PATH", help="the accounts file")
    parser.add_argument(
        "--realm",
        action="append",
        metavar="REALM",
        help="DIGEST-MD5 realm to store a secret for (repeatable)",
    )
    parser.add_argument("--config", metavar="PATH", help="the server configuration")
    topics = parser.add_subparsers(
        dest="topic", required=True, metavar="accounts|queue|audit|mailbox|selftest"
    )
    accounts = topics.add_parser("accounts", help="manage accounts")
    commands = accounts.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add an account (password from stdin)")
    add.add_argument("user")
    add.add_argument(
        "--mechanisms",
        type=str,
        default=",".join(sorted(DEFAULT_MECHANISMS)),
        help="comma-separated SASL mechanisms (default: %(default)s)",
    )
    add.add_argument("--disabled", action="store_true", help="add it disabled")
    fieldOptions(add)
    for name, text in [
        ("passwd", "set a new password (from stdin)"),
        ("disable", "refuse logins"),
        ("enable", "allow logins again"),
        ("remove", "delete the account"),
        ("show", "show an account, without secrets"),
    ]:
        commands.add_parser(name, help=text).add_argument("user")
    commands.add_parser("list", help="list the accounts")
    commands.add_parser(
        "import", help="add the accounts of an accounts file to the store"
    ).add_argument("file")
    commands.add_parser(
        "export", help="write every account of the store to an accounts file"
    ).add_argument("file")
    commands.add_parser("init-db", help="create the database table")
    setter = commands.add_parser("set", help="change an account's settings")
    setter.add_argument("user")
    setter.add_argument("--mechanisms", help="comma-separated")
    fieldOptions(setter)
    setter.add_argument(
        "--clear",
        action="append",
        default=[],
        metavar="FIELD",
        choices=sorted(FIELDS.values()),
        help="remove a field (repeatable): " + ", ".join(sorted(FIELDS.values())),
    )

    queue = topics.add_parser("queue", help="inspect and manage the mail queue")
    queueCommands = queue.add_subparsers(dest="queueCommand", required=True)
    queueCommands.add_parser("list", help="list the queued messages")
    queueCommands.add_parser(
        "verify", help="re-hash every queued message against its recorded digest"
    )
    for name, text in [
        ("show", "show a message's envelope, state and headers"),
        ("delete", "remove a message from the queue (never delivered)"),
        ("hold", "keep a message from being delivered"),
        ("release", "let a held message be delivered again"),
    ]:
        queueCommands.add_parser(name, help=text).add_argument("id")
    flush = queueCommands.add_parser("flush", help="try delivery now")
    flush.add_argument("id", nargs="?", help="only this message")
    auditParser(topics)
    mailboxParser(topics)
    addSelftestParser(topics)
    return parser


def _loadConfig(path: str | None) -> Any:
    """
    @return: the configuration from L{msa.service.config.loadConfig}, or L{None} if
        that module is not available and no C{path} was asked for.
    """
    try:
        from msa.service.config import loadConfig
    except ImportError:
        if path is not None:
            raise _Failed(
                "--config needs msa.service.config, which is not available", 2
            )
        return None
    try:
        return loadConfig(path)
    except Exception as e:
        raise _Failed(f"cannot load the configuration: {e}; or give --accounts", 2)


def main(argv: list[str] | None = None, stdout: Any = None, stderr: Any = None) -> int:
    """
    Run the program.

    @param argv: the arguments without the program name; C{sys.argv[1:]} if
        L{None}.
    @param stdout: where output goes; C{sys.stdout} if L{None}.
    @param stderr: where errors go; C{sys.stderr} if L{None}.
    @return: the exit code.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.topic == "selftest":
            return selftestCommand(args, stdout, stderr)
        if args.topic == "queue":
            config = _loadConfig(args.config)
            if config is None:
                raise _Failed(
                    "queue needs msa.service.config, which is not available", 2
                )
            return queueCommand(config, args, stdout, stderr)
        if args.topic == "mailbox":
            return mailboxCommand(_loadConfig(args.config), args, stdout, stderr)
        if args.topic == "audit":
            config = None
            if args.config is not None or not vars(args).get("files"):
                config = _loadConfig(args.config)
            return auditCommand(config, args, stdout, stderr)
        config = None
        if args.config is not None or args.accounts is None:
            config = _loadConfig(args.config)
        return accountsCommand(config, args, stdout, stderr)
    except _Failed as e:
        print(f"digipoort-msa-admin: {e}", file=stderr)
        return e.code
