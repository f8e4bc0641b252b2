# -*- test-case-name: tests.test_accounts_pg -*-
"""
The accounts in PostgreSQL, shared by every instance
(C{[accounts] store = "postgresql://..."}): L{AccountTable} reads and
writes them (the admin tool uses it directly), and L{AccountDatabase} is the
live L{ILiveAccountStore} of a running MSA.

One table, C{msa_accounts}: the account name and its document, the very JSON
object the accounts file holds for it (L{msa.accounts.model.accountToJSON}),
so that import and export between the file and the database are lossless.
A statement trigger counts every change in C{msa_accounts_version}, whoever
makes it (the admin tool or an operator's SQL).

Propagation is by polling, not LISTEN/NOTIFY: every C{watch_interval}
seconds (2 by default) an instance reads the version, one row, and reloads
the table only when it moved.  A notification sent while an instance is
disconnected is lost, so LISTEN would need the same poll behind it anyway;
polling alone reconnects by itself after an outage and bounds the delay
(interval plus one load) without a connection held open per instance.

Logins are served from the copy in memory: no database round trip per
login.  While the database cannot be reached an instance keeps the last
good copy, says so once at critical level and once when it is back.  Each
good copy is also written to C{<state_dir>/accounts-cache.json} (mode
0600), so that an instance restarted during an outage starts from it (with
a warning); with neither database nor copy it refuses to start.

The driver is psycopg 3 (a maintained libpq binding; C{psycopg[binary]}
needs no compiler), synchronous, on a thread pool of one thread of its own:
the queries are few and serial, so adbapi's pool of connections adds
nothing, and the scrypt pool of the checker is not competed with.
"""

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from msa.accounts.model import (
    Account,
    AccountsFileError,
    accountFromJSON,
    accountToJSON,
    readAccounts,
    writeAccounts,
)
from msa.accounts.passwords import unb64
from msa.interfaces import IAccountStore, ILiveAccountStore
from msa.redact import maskParseError, maskSecrets
from msa.threadpool import PrivatePool

#: The URL schemes of C{[accounts] store} that name a PostgreSQL database.
SCHEMES = ("postgresql", "postgres")

#: Seconds to wait for a connection, unless the URL says otherwise.
CONNECT_TIMEOUT = 5
#: Milliseconds any one statement may take.
STATEMENT_TIMEOUT = 10000

#: Serialises schema creation between instances starting together.
_SCHEMA_LOCK = 0x6D73614163

SCHEMA_SQL = [
    """CREATE TABLE IF NOT EXISTS msa_accounts (
        name text PRIMARY KEY,
        account jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS msa_accounts_version (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        version bigint NOT NULL
    )""",
    "INSERT INTO msa_accounts_version VALUES (true, 0) ON CONFLICT DO NOTHING",
    """CREATE OR REPLACE FUNCTION msa_accounts_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE msa_accounts_version SET version = version + 1;
            RETURN NULL;
        END $$""",
    "DROP TRIGGER IF EXISTS msa_accounts_changed ON msa_accounts",
    """CREATE TRIGGER msa_accounts_changed
        AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON msa_accounts
        FOR EACH STATEMENT EXECUTE FUNCTION msa_accounts_changed()""",
]


class AccountStoreError(AccountsFileError):
    """
    The account database cannot be used; the message names it (without a
    password) and why.
    """


def isDatabaseURL(value: str) -> bool:
    """
    Whether C{[accounts] store} names a database rather than C{"file"}.
    """
    return value.split(":", 1)[0].lower() in SCHEMES


def describe(url: str) -> str:
    """
    The URL (or libpq key/value string) without its passwords, for
    messages and logs (L{msa.redact.maskSecrets}).
    """
    return maskSecrets(url)


def checkURL(url: str) -> None:
    """
    @raise ValueError: when C{url} is not a PostgreSQL URL libpq accepts.
    """
    if not isDatabaseURL(url):
        raise ValueError(
            'must be "file" or a postgresql://user@host:port/database URL, '
            f"not {describe(url)!r}"
        )
    from psycopg import conninfo

    try:
        conninfo.conninfo_to_dict(url)
        _checkPorts(url)
    except Exception as e:
        why = maskParseError(_why(e), url)
        raise ValueError(
            f"not a valid PostgreSQL URL ({describe(url)}): {why}"
        ) from None


def _checkPorts(url: str) -> None:
    """
    libpq checks a port only when it connects: check each host's here (a
    URL may list several hosts, C{host1:5432,host2:5432}).
    """
    hosts = url.split("//", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    for host in hosts.rsplit("@", 1)[-1].split(","):
        port = host.rsplit("]", 1)[-1].rpartition(":")[2] if ":" in host else ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"port {port!r} is not a number from 1 to 65535")


def connect(url: str) -> Any:
    """
    A new connection (not in autocommit: every use ends in commit or
    rollback).

    @raise AccountStoreError: when it cannot be made.
    """
    import psycopg

    # A database host that vanishes without a reset must not hold a poll
    # (and the copy's refresh) for the kernel's TCP timeout.
    defaults = {
        "connect_timeout": CONNECT_TIMEOUT,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 15000,
    }
    options: dict[str, Any] = {k: v for k, v in defaults.items() if k not in url}
    try:
        connection = psycopg.connect(url, **options)
        with connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT}")
        connection.commit()
    except psycopg.ProgrammingError as e:
        # A connection string libpq cannot parse: its message quotes pieces.
        why = maskParseError(_why(e), url)
        raise AccountStoreError(f"{describe(url)}: cannot connect: {why}") from None
    except psycopg.Error as e:
        raise AccountStoreError(f"{describe(url)}: cannot connect: {_why(e)}") from e
    return connection


def _why(e: BaseException | None) -> str:
    """
    The error's message on one line, without passwords.
    """
    return maskSecrets(" ".join(str(e).split())) or e.__class__.__name__


def ensureSchema(connection: Any) -> None:
    """
    Create the table, the version counter and its trigger if missing
    (idempotent; instances starting together take turns).
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        cursor.execute("SELECT to_regclass('msa_accounts_version') IS NOT NULL")
        row = cursor.fetchone()
        if row is None or not row[0]:
            for statement in SCHEMA_SQL:
                cursor.execute(statement)
    connection.commit()


def fetch(
    connection: Any, where: str, known: int | None
) -> tuple[int, dict[str, Account] | None]:
    """
    Read the version and, when it is not C{known}, every account, in one
    snapshot.

    @return: the version and the accounts (L{None} when unchanged).
    @raise AccountsFileError: naming the row at fault when one is malformed.
    """
    import psycopg

    connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT version FROM msa_accounts_version")
            row = cursor.fetchone()
            version = int(row[0]) if row is not None else 0
            if version == known:
                return version, None
            cursor.execute("SELECT name, account FROM msa_accounts")
            rows = cursor.fetchall()
    finally:
        connection.rollback()
    return version, {name: accountFromJSON(where, name, doc) for name, doc in rows}


class AccountTable:
    """
    The accounts of a database, read and written as a whole as the admin
    tool does with the file: L{save} writes only what differs from what
    L{load} read, so that two administrators changing different accounts
    do not undo each other.

    @raise AccountStoreError: at construction, when the database cannot be
        reached (the schema is created if missing).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = describe(url)
        self._connection = connect(url)
        self._loaded: dict[str, Account] = {}
        self._run(lambda: ensureSchema(self._connection))

    def _run(self, f: Callable[[], Any]) -> Any:
        import psycopg

        try:
            return f()
        except psycopg.Error as e:
            raise AccountStoreError(f"{self.where}: {_why(e)}") from e

    def close(self) -> None:
        self._connection.close()

    def load(self) -> dict[str, Account]:
        _, accounts = self._run(lambda: fetch(self._connection, self.where, None))
        assert accounts is not None
        self._loaded = dict(accounts)
        return accounts

    def save(self, accounts: Mapping[str, Account]) -> None:
        """
        Make the table hold C{accounts}: insert or update those that differ
        from what L{load} read, delete those gone, in one transaction.
        """
        changed = [
            (name, json.dumps(accountToJSON(a), sort_keys=True))
            for name, a in accounts.items()
            if self._loaded.get(name) != a
        ]
        gone = [name for name in self._loaded if name not in accounts]
        if not changed and not gone:
            return

        def write() -> None:
            with self._connection.transaction(), self._connection.cursor() as c:
                if changed:
                    c.executemany(
                        "INSERT INTO msa_accounts (name, account) "
                        "VALUES (%s, %s::jsonb) ON CONFLICT (name) DO UPDATE "
                        "SET account = EXCLUDED.account, updated_at = now()",
                        changed,
                    )
                if gone:
                    c.execute("DELETE FROM msa_accounts WHERE name = ANY(%s)", (gone,))

        self._connection.autocommit = True
        try:
            self._run(write)
        finally:
            self._connection.autocommit = False
        self._loaded = dict(accounts)


@implementer(IAccountStore, ILiveAccountStore)
class AccountDatabase:
    """
    The accounts of a PostgreSQL database, served from memory and refreshed
    by polling (see the module docstring).

    @param cacheFile: where each good copy is written (mode 0600), and read
        from at construction when the database cannot be reached; L{None}
        for no copy on disk.
    @raise AccountStoreError: at construction, when neither the database
        nor C{cacheFile} gives accounts.
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        reactor: IReactorTime | None = None,
        cacheFile: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default  # type: ignore[assignment]
        self.url = url
        self.where = describe(url)
        self.cacheFile = cacheFile
        self._reactor = reactor
        self._connection: Any = None
        self._version: int | None = None
        self._accounts: dict[str, Account] = {}
        self._pool: ThreadPool | None = None
        self._watcher: LoopingCall | None = None
        #: Those waiting for the look under way (L{None}: none under way).
        self._waiting: list[Deferred] | None = None
        #: The reason the database was last unreachable; L{None} while fine.
        self.outage: str | None = None
        try:
            self._store(self._fetch(None))
        except AccountsFileError as e:
            self._disconnect()
            self._startFromCache(str(e))

    def _startFromCache(self, why: str) -> None:
        if self.cacheFile is None or not os.path.exists(self.cacheFile):
            raise AccountStoreError(
                f"{why}; and there is no copy of the accounts to start from "
                "(the MSA starts only with accounts: start the database, or "
                "switch [accounts] store to the file)"
            )
        try:
            self._accounts = readAccounts(self.cacheFile)
        except AccountsFileError as e:
            raise AccountStoreError(f"{why}; and the copy is unusable: {e}")
        self.outage = why
        self.log.critical(
            "Account database unreachable at start ({why}); serving the "
            "{count} account(s) of the last good copy {path} until it is back",
            why=why,
            count=len(self._accounts),
            path=self.cacheFile,
        )

    def getAccount(self, name: str) -> Account | None:
        return self._accounts.get(name)

    def accounts(self) -> list[Account]:
        return list(self._accounts.values())

    def scramParameters(
        self, username: str, mechanism: str
    ) -> tuple[bytes, int] | None:
        account = self._accounts.get(username)
        keys = account.scram.get(mechanism) if account is not None else None
        if keys is None:
            return None
        return unb64(keys["salt"]), keys["iterations"]

    # In the database thread.

    def _fetch(self, known: int | None) -> tuple[int, dict[str, Account] | None]:
        import psycopg

        try:
            if self._connection is None:
                self._connection = connect(self.url)
                ensureSchema(self._connection)
            version, accounts = fetch(self._connection, self.where, known)
        except psycopg.Error as e:
            self._disconnect()
            raise AccountStoreError(f"{self.where}: {_why(e)}") from e
        except AccountStoreError:
            self._disconnect()
            raise
        if accounts is not None and self.cacheFile is not None:
            try:
                writeAccounts(self.cacheFile, accounts)
            except OSError as e:
                self.log.warn(
                    "Cannot write the copy of the accounts {path}: {why}",
                    path=self.cacheFile,
                    why=e,
                )
        return version, accounts

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass

    # In the reactor thread.

    def _store(self, result: tuple[int, dict[str, Account] | None]) -> bool:
        version, accounts = result
        if self.outage is not None:
            self.log.warn(
                "Account database {where} reachable again (was: {why})",
                where=self.where,
                why=self.outage,
            )
            self.outage = None
        self._version = version
        if accounts is None:
            return False
        self._accounts = accounts
        self.log.info(
            "Loaded {count} account(s) from {where} (version {version})",
            count=len(accounts),
            where=self.where,
            version=version,
        )
        return True

    def _failed(self, why: str) -> bool:
        if self.outage is None:
            self.log.critical(
                "Account database {where} unreachable or unusable ({why}); "
                "serving the {count} account(s) of the last good copy until "
                "it is back",
                where=self.where,
                why=why,
                count=len(self._accounts),
            )
        self.outage = why
        return False

    def reload(self) -> Deferred:
        """
        Look for changes now (SIGHUP, and each tick of L{startWatching}).

        @return: a L{Deferred} firing with whether new accounts were loaded;
            it never fails (a failure is logged, the copy kept).
        """
        mine: Deferred = Deferred()
        if self._waiting is not None:
            # One look at a time: a SIGHUP during a poll shares its answer.
            self._waiting.append(mine)
            return mine
        self._waiting = [mine]
        if self._pool is None:
            self._pool = PrivatePool(minthreads=0, maxthreads=1, name="accounts-db")
            self._pool.start()
        d: Deferred[Any] = threads.deferToThreadPool(
            self._reactor,  # type: ignore[arg-type]
            self._pool,
            self._fetch,
            self._version,
        )
        d.addCallback(self._store)

        def failed(failure: Failure) -> bool:
            return self._failed(_why(failure.value))

        d.addErrback(failed)

        def done(result: bool) -> None:
            waiting, self._waiting = self._waiting or [], None
            for waiter in waiting:
                waiter.callback(result)

        d.addCallback(done)
        return mine

    def startWatching(self, interval: float = 2.0) -> Deferred:
        """
        Poll every C{interval} seconds.

        @return: the L{Deferred} of the L{LoopingCall}, firing on
            L{stopWatching}.
        """
        if self._watcher is not None:
            raise RuntimeError("already watching")
        self._watcher = LoopingCall(self.reload)
        self._watcher.clock = self._reactor
        return self._watcher.start(interval, now=False)

    def stopWatching(self) -> Deferred | None:
        """
        Stop polling, let a poll under way end, and close the connection.
        """
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            watcher.stop()
        pool, self._pool = self._pool, None
        if pool is None:
            self._disconnect()
            return None
        pool.callInThread(self._disconnect)
        return threads.deferToThread(pool.stop)
