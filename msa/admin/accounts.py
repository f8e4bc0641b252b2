# -*- test-case-name: tests.test_admin,tests.test_accounts_pg -*-
"""
The C{accounts} commands of C{digipoort-msa-admin}: add, passwd, enable,
disable, set, remove, list, show, import, export and init-db, on the
accounts file or on the PostgreSQL store the configuration names; each
change is recorded in the audit log when the configuration is known.
"""

import argparse
import getpass
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

import attrs

from msa.accounts.model import (
    KNOWN_MECHANISMS,
    Account,
    AccountsFileError,
    makeAccount,
    readAccounts,
    writeAccounts,
)
from msa.admin.audit import AuditError, recordAccountEvent
from msa.admin.fields import applyFields
from msa.admin.queue import AdminFailure as _Failed

__all__ = ["accountsCommand", "parseMechanisms"]

_COMMANDS: dict[str, Callable[["_Command"], int]] = {}


def _command(name: str):
    def register(f: Callable[["_Command"], int]) -> Callable[["_Command"], int]:
        _COMMANDS[name] = f
        return f

    return register


def parseMechanisms(text: str) -> frozenset[str]:
    """
    The value of C{--mechanisms}: a comma-separated list of known SASL
    mechanisms.
    """
    mechanisms = frozenset(m.strip().upper() for m in text.split(",") if m.strip())
    if not mechanisms:
        raise _Failed("--mechanisms needs at least one mechanism", 2)
    unknown = mechanisms - KNOWN_MECHANISMS
    if unknown:
        raise _Failed(
            "unknown mechanism(s) %s; known: %s"
            % (",".join(sorted(unknown)), ",".join(sorted(KNOWN_MECHANISMS))),
            2,
        )
    return mechanisms


def _realms(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return []


@attrs.define
class _Command:
    """
    One run of the program: its arguments and streams.
    """

    args: argparse.Namespace
    path: str
    realms: list[str]
    stdin: Any
    stdout: Any
    stderr: Any
    #: The server configuration, when known: its audit log gets a record
    #: of each change (L{msa.admin.audit}).
    config: Any = None
    #: The database store (L{msa.accounts.pgstore.AccountTable}), or
    #: L{None} for the file at C{path}.
    table: Any = None

    def say(self, text: str) -> None:
        print(text, file=self.stdout)

    def warn(self, text: str) -> None:
        print(f"digipoort-msa-admin: warning: {text}", file=self.stderr)

    def load(self, missingOK: bool = False) -> dict[str, Account]:
        if self.table is not None:
            return _inDatabase(self.table.load)
        if missingOK and not os.path.exists(self.path):
            return {}
        try:
            accounts = readAccounts(self.path)
        except AccountsFileError as e:
            raise _Failed(str(e))
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        if mode & 0o077:
            self.warn(f"{self.path} has mode {mode:04o}; fix it with: chmod 600")
        return accounts

    def save(self, accounts: dict[str, Account]) -> None:
        if self.table is not None:
            return _inDatabase(self.table.save, accounts)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            writeAccounts(self.path, accounts)
        except OSError as e:
            raise _Failed(f"{self.path}: cannot write: {e.strerror or e}")

    def account(self, accounts: dict[str, Account]) -> Account:
        account = accounts.get(self.args.user)
        if account is None:
            raise _Failed(f"no account {self.args.user!r} in {self.path}")
        return account

    def password(self) -> str:
        if self.stdin.isatty():
            first = getpass.getpass("Password: ")
            if first != getpass.getpass("Password again: "):
                raise _Failed("the passwords differ; nothing changed")
        else:
            first = self.stdin.readline().rstrip("\r\n")
        if not first:
            raise _Failed("empty password refused; nothing changed")
        return first

    def update(self, change: Callable[[Account], Account], done: str) -> int:
        accounts = self.load()
        account = change(self.account(accounts))
        accounts[account.name] = account
        self.save(accounts)
        self.say(f"{done} account {account.name}")
        return self.record(_ACTIONS.get(done, "changed"), account)

    def record(self, action: str, account: Account | None, name: str = "") -> int:
        """
        The audit record of a change just saved: names and settings, never
        a password or a secret.

        @return: 0, or 1 when the record could not be written (the change
            is made; the error says it is unrecorded).
        """
        fields: dict[str, Any] = {}
        if account is not None:
            name = account.name
            fields = {
                "enabled": account.enabled,
                "mechanisms": sorted(account.mechanisms),
                "settings": dict(account.extra),
            }
        try:
            recordAccountEvent(self.config, action, name, **fields)
        except AuditError as e:
            print(
                f"digipoort-msa-admin: the change is made, but its audit record "
                f"could not be written: {e}",
                file=self.stderr,
            )
            return 1
        return 0


#: L{_Command.update}'s messages to the audit record's action.
_ACTIONS = {
    "new password for": "password-changed",
    "enabled": "enabled",
    "disabled": "disabled",
    "changed": "changed",
}


@_command("add")
def _add(c: _Command) -> int:
    accounts = c.load(missingOK=True)
    if c.args.user in accounts:
        raise _Failed(f"account {c.args.user!r} already exists in {c.path}")
    mechanisms = parseMechanisms(c.args.mechanisms)
    password = c.password()
    try:
        account = makeAccount(c.args.user, password, c.realms, mechanisms)
    except ValueError as e:
        raise _Failed(str(e))
    if c.args.disabled:
        account = attrs.evolve(account, enabled=False)
    account = applyFields(c.args, account, accounts.values())
    if "senders" not in account.extra:
        c.warn(
            f"{account.name} has no senders yet: every MAIL FROM is refused until "
            f"accounts set {account.name} --sender ADDRESS"
        )
    accounts[account.name] = account
    c.save(accounts)
    c.say(f"added account {account.name}")
    return c.record("added", account)


@_command("passwd")
def _passwd(c: _Command) -> int:
    c.account(c.load())
    password = c.password()

    def change(account: Account) -> Account:
        try:
            return account.withPassword(password, c.realms)
        except ValueError as e:
            raise _Failed(str(e))

    return c.update(change, "new password for")


@_command("enable")
def _enable(c: _Command) -> int:
    return c.update(lambda a: attrs.evolve(a, enabled=True), "enabled")


@_command("disable")
def _disable(c: _Command) -> int:
    return c.update(lambda a: attrs.evolve(a, enabled=False), "disabled")


@_command("set")
def _set(c: _Command) -> int:
    mechanisms = None
    if c.args.mechanisms is not None:
        mechanisms = parseMechanisms(c.args.mechanisms)

    others = c.load().values()

    def change(account: Account) -> Account:
        changed = applyFields(c.args, account, others)
        if mechanisms is None:
            return changed
        changed = changed.withMechanisms(mechanisms)
        for missing in _missingSecrets(changed):
            c.warn(
                f"{missing} has no secret for {account.name} yet; it will work "
                f"after: accounts passwd {account.name}"
            )
        return changed

    return c.update(change, "changed")


@_command("remove")
def _remove(c: _Command) -> int:
    accounts = c.load()
    del accounts[c.account(accounts).name]
    c.save(accounts)
    c.say(f"removed account {c.args.user}")
    return c.record("removed", None, c.args.user)


@_command("list")
def _list(c: _Command) -> int:
    for name, account in sorted(c.load(missingOK=True).items()):
        state = "enabled" if account.enabled else "disabled"
        c.say(f"{name}\t{state}\t{','.join(sorted(account.mechanisms))}")
    return 0


@_command("import")
def _import(c: _Command) -> int:
    try:
        imported = readAccounts(c.args.file)
    except AccountsFileError as e:
        raise _Failed(str(e))
    accounts = c.load(missingOK=True)
    accounts.update(imported)
    c.save(accounts)
    c.say(f"imported {len(imported)} account(s) from {c.args.file} into {c.path}")
    status = 0
    for name in sorted(imported):
        status |= c.record("imported", imported[name])
    return status


@_command("export")
def _export(c: _Command) -> int:
    accounts = c.load()
    try:
        writeAccounts(c.args.file, accounts)
    except OSError as e:
        raise _Failed(f"{c.args.file}: cannot write: {e.strerror or e}")
    c.say(f"exported {len(accounts)} account(s) from {c.path} to {c.args.file}")
    return 0


@_command("init-db")
def _initDB(c: _Command) -> int:
    if c.table is None:
        raise _Failed(
            'init-db needs [accounts] store = "postgresql://..." in --config', 2
        )
    c.say(f"the accounts table is ready in {c.path}")
    return 0


def _inDatabase(f: Callable[..., Any], *args: Any) -> Any:
    from msa.accounts.pgstore import AccountStoreError

    try:
        return f(*args)
    except AccountStoreError as e:
        raise _Failed(str(e))


def _openTable(url: str) -> Any:
    from msa.accounts.pgstore import AccountTable

    return _inDatabase(AccountTable, url)


def _missingSecrets(account: Account) -> list[str]:
    missing = []
    if "DIGEST-MD5" in account.mechanisms and not account.digestHA1:
        missing.append("DIGEST-MD5")
    for mechanism in sorted(account.mechanisms):
        if mechanism.startswith("SCRAM-") and mechanism not in account.scram:
            missing.append(mechanism)
    return missing


@_command("show")
def _show(c: _Command) -> int:
    account = c.account(c.load())
    c.say(f"name: {account.name}")
    c.say(f"enabled: {'yes' if account.enabled else 'no'}")
    c.say(f"mechanisms: {','.join(sorted(account.mechanisms))}")
    c.say(f"password hash: {'set' if account.passwordHash else 'not set'}")
    if account.digestHA1:
        realms = ", ".join(sorted(account.digestHA1))
        c.say(f"DIGEST-MD5 secret: set for realm(s) {realms}")
    else:
        c.say("DIGEST-MD5 secret: not set")
    for mechanism in sorted(set(account.scram) | {"SCRAM-SHA-256"}):
        keys = account.scram.get(mechanism)
        state = f"set ({keys['iterations']} iterations)" if keys else "not set"
        c.say(f"{mechanism} keys: {state}")
    for key, value in sorted(account.extra.items()):
        c.say(f"{key}: {json.dumps(value, sort_keys=True)}")
    return 0


def accountsCommand(
    config: Any, args: argparse.Namespace, stdout: Any, stderr: Any
) -> int:
    """
    Run C{digipoort-msa-admin accounts ...} on the file given by
    C{--accounts}, or the store of C{config}.

    @return: the exit code.
    @raise AdminFailure: when the command fails.
    """
    path = args.accounts or getattr(config, "accountsFile", None)
    table = None
    if args.accounts is None and config is not None:
        url = config["accounts"]["store"]
        if url != "file":
            table = _openTable(url)
            from msa.accounts.pgstore import describe

            path = describe(url)
    if not path:
        raise _Failed("no accounts file configured: give --accounts PATH", 2)
    realms = args.realm or _realms(getattr(config, "realm", None))
    command = _Command(
        args=args,
        path=os.fspath(path),
        realms=realms or [socket.getfqdn()],
        stdin=sys.stdin,
        stdout=stdout,
        stderr=stderr,
        config=config,
        table=table,
    )
    try:
        return _COMMANDS[args.command](command)
    finally:
        if table is not None:
            table.close()
