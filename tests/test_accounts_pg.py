# -*- test-case-name: tests.test_accounts_pg -*-
"""
The shared account store in PostgreSQL (issue 13, item 2), against a real
throwaway server (L{tests.pgserver}): the store itself, the admin tool on
it, import and export, and two MSA instances started from TOML with
C{[accounts] store = "postgresql://..."}: a change made with
C{digipoort-msa-admin} reaches both within 5 seconds, and a database outage
leaves logins working from the last good copy.
"""

import io
import json
import os
import subprocess
import sys

import attrs
import psycopg
from twisted.internet import defer, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from msa.accounts.model import (
    Account,
    makeAccount,
    readAccounts,
    writeAccounts,
)
from msa.accounts.pgstore import (
    AccountDatabase,
    AccountStoreError,
    AccountTable,
    describe,
)
from msa.admin import command as admin
from msa.service.config import ConfigError, loadConfig, writeConfig
from tests.e2e import (
    SENDERS,
    USERS,
    RunningMSA,
    fixtureAccount,
    freePort,
    requireProgram,
)
from tests.haproxyfront import HAProxy, proxiedInstances
from tests.pgserver import PostgreSQLServer
from tests.sessionclient import RawSession
from tests.test_audit import records
from tests.waiting import waitUntil

ACCEPTED = b"235 2.7.0 Authentication successful"
REFUSED = b"535 5.7.8 Authentication credentials invalid"

#: The bound the issue sets on propagation to every instance.
PROPAGATION = 5.0


def usersAccounts() -> dict[str, Account]:
    """
    The accounts L{RunningMSA} writes to its file, for the database.
    """
    return {
        name: attrs.evolve(fixtureAccount(name, password), extra={"senders": SENDERS})
        for name, password in USERS.items()
    }


def richAccounts() -> dict[str, Account]:
    """
    Accounts using every field the file has: DIGEST-MD5 variants of a
    non-ASCII password, SCRAM keys, senders, recipients, limits, client
    certificates, a disabled one.
    """
    jose = makeAccount("josé", "wachtwoörd", ["localhost", "realm.test"])
    jose = attrs.evolve(
        jose,
        extra={
            "senders": ["@mijnbedrijf.nl", "info@example.nl"],
            "recipients": ["@overheid.nl"],
            "maxMessageSize": 1000000,
            "maxRecipients": 5,
            "messagesPerMinute": 10,
            "messagesPerDay": 100,
            "maxSessions": 3,
            "requireHeaderFrom": True,
            "certificates": ["sha256:" + "ab" * 32, "serialNumber:00000001234"],
        },
    )
    cert = makeAccount(
        "certonly", "unused", ["localhost"], mechanisms=["EXTERNAL", "PLAIN"]
    )
    cert = attrs.evolve(
        cert,
        enabled=False,
        extra={
            "senders": ["@example.nl"],
            "certificates": ["serialNumber:99"],
            "requireClientCertificate": True,
        },
    )
    return {"josé": jose, "certonly": cert} | usersAccounts()


def runAdmin(configFile: str, *args: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = admin.main(["--config", configFile, *args], stdout=out, stderr=err)
    finally:
        sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


def adminProcess(configFile: str, *args: str, stdin: str = ""):
    """
    The real C{digipoort-msa-admin} program, in a process of its own.

    @return: a L{Deferred} of (exit code, stdout, stderr).
    """
    program = os.path.join(os.path.dirname(sys.executable), "digipoort-msa-admin")
    return threads.deferToThread(
        lambda: _completed(
            subprocess.run(
                [program, "--config", configFile, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
    )


def _completed(result: subprocess.CompletedProcess) -> tuple[int, str, str]:
    return result.returncode, result.stdout, result.stderr


class LogLines:
    """
    The text of every log event while a test runs.
    """

    def __init__(self, testCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def matching(self, text: str) -> list[str]:
        return [line for line in (formatEvent(e) for e in self.events) if text in line]

    @defer.inlineCallbacks
    def outage(self, testCase, instances: int):
        """
        Wait (L{PROPAGATION} seconds at most) until each of C{instances}
        has logged the database outage, at critical level.
        """
        yield waitUntil(
            lambda: len(self.matching("unreachable or unusable")) >= instances,
            timeout=PROPAGATION,
            what=f"{instances} instance(s) to log the outage",
        )
        testCase.assertEqual(
            self.levels("unreachable or unusable"), ["critical"] * instances
        )

    def levels(self, text: str) -> list[str]:
        return [
            e["log_level"].name
            for e in self.events
            if "log_level" in e and text in formatEvent(e)
        ]


class StoreTests(unittest.TestCase):
    """
    L{AccountTable} and L{AccountDatabase} against a real server.
    """

    def setUp(self):
        self.pg = PostgreSQLServer(self)

    def table(self) -> AccountTable:
        table = AccountTable(self.pg.url)
        self.addCleanup(table.close)
        return table

    def database(self, **kw) -> AccountDatabase:
        database = AccountDatabase(self.pg.url, **kw)
        self.addCleanup(database.stopWatching)
        return database

    def sql(self, statement: str, *args):
        with psycopg.connect(self.pg.url, autocommit=True) as connection:
            connection.execute(statement, args or None)

    def test_schemaOnFirstUse(self):
        """
        The table, the version counter and its trigger are created by the
        first user of an empty database; a second is fine with them.
        """
        self.assertEqual(self.table().load(), {})
        self.assertEqual(self.table().load(), {})
        with psycopg.connect(self.pg.url) as connection:
            tables = connection.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'msa_%' "
                "ORDER BY tablename"
            ).fetchall()
        self.assertEqual(tables, [("msa_accounts",), ("msa_accounts_version",)])

    def test_everyFieldRoundTrips(self):
        """
        Every field of the file survives the database unchanged, stored as
        the very JSON object the file holds.
        """
        accounts = richAccounts()
        self.table().save(accounts)
        self.assertEqual(self.table().load(), accounts)
        with psycopg.connect(self.pg.url) as connection:
            [(document,)] = connection.execute(
                "SELECT account FROM msa_accounts WHERE name = 'josé'"
            ).fetchall()
        path = self.mktemp()
        writeAccounts(path, {"josé": accounts["josé"]})
        with open(path, encoding="utf-8") as f:
            self.assertEqual(document, json.load(f)["accounts"]["josé"])

    def test_saveWritesOnlyWhatChanged(self):
        """
        Two administrators changing different accounts do not undo each
        other's change.
        """
        self.table().save(usersAccounts())
        first, second = self.table(), self.table()
        a, b = first.load(), second.load()
        a["alice"] = attrs.evolve(a["alice"], enabled=False)
        del b["bob"]
        first.save(a)
        second.save(b)
        final = self.table().load()
        self.assertEqual(sorted(final), ["alice"])
        self.assertFalse(final["alice"].enabled)

    @defer.inlineCallbacks
    def test_changeSeenOnReload(self):
        """
        The running store loads at construction and sees every change on
        its next look, including one made in plain SQL; when nothing
        changed it reads only the version.
        """
        self.table().save(usersAccounts())
        database = self.database()
        self.assertTrue(database.getAccount("alice").enabled)
        self.assertFalse((yield database.reload()))
        self.sql(
            "UPDATE msa_accounts SET account = jsonb_set(account, '{enabled}', "
            "'false') WHERE name = 'alice'"
        )
        self.assertTrue((yield database.reload()))
        self.assertFalse(database.getAccount("alice").enabled)
        self.sql("DELETE FROM msa_accounts WHERE name = 'bob'")
        self.assertTrue((yield database.reload()))
        self.assertIsNone(database.getAccount("bob"))
        self.assertEqual([a.name for a in database.accounts()], ["alice"])

    @defer.inlineCallbacks
    def test_oneLookAtATime(self):
        """
        A look asked for while one is under way (a SIGHUP during a poll)
        shares its answer: both learn that new accounts were loaded.
        """
        self.table().save(usersAccounts())
        database = self.database()
        self.sql("DELETE FROM msa_accounts WHERE name = 'bob'")
        first, second = database.reload(), database.reload()
        self.assertEqual([(yield first), (yield second)], [True, True])
        self.assertFalse((yield database.reload()))
        self.assertIsNone(database.getAccount("bob"))

    @defer.inlineCallbacks
    def test_malformedRowKeepsTheCopy(self):
        """
        A row the file store would refuse (written behind the admin tool's
        back) is refused with its name in the log; the accounts read last
        stay in use.
        """
        log = LogLines(self)
        self.table().save(usersAccounts())
        database = self.database()
        self.sql(
            "INSERT INTO msa_accounts (name, account) VALUES "
            "('broken', '{\"enabled\": \"yes\"}')"
        )
        self.assertFalse((yield database.reload()))
        self.assertEqual(sorted(a.name for a in database.accounts()), ["alice", "bob"])
        [line] = log.matching("unreachable or unusable")
        self.assertIn("account 'broken': missing key 'mechanisms'", line)

    @defer.inlineCallbacks
    def test_outageKeepsTheCopyAndSaysSoOnce(self):
        """
        While the database is down the store keeps its accounts, logs one
        critical line for the outage (however many looks fail) and one
        warning when it is back; changes then flow again.
        """
        log = LogLines(self)
        self.table().save(usersAccounts())
        database = self.database()
        self.pg.stop()
        for _ in range(3):
            self.assertFalse((yield database.reload()))
        self.assertEqual(log.levels("unreachable or unusable"), ["critical"])
        self.assertTrue(database.getAccount("alice").enabled)
        self.pg.start()
        self.sql(
            "UPDATE msa_accounts SET account = jsonb_set(account, '{enabled}', "
            "'false') WHERE name = 'alice'"
        )
        self.assertTrue((yield database.reload()))
        self.assertFalse(database.getAccount("alice").enabled)
        self.assertEqual(log.levels("reachable again"), ["warn"])
        self.assertEqual(log.levels("unreachable or unusable"), ["critical"])

    def test_startWithDatabaseDown(self):
        """
        Started while the database is down, the store serves the local copy
        of the last good accounts (and says so); without a copy it refuses
        to start, saying why.
        """
        log = LogLines(self)
        cache = os.path.join(self.mktemp() + "-cache.json")
        self.table().save(usersAccounts())
        first = self.database(cacheFile=cache)
        self.assertEqual(readAccounts(cache), {a.name: a for a in first.accounts()})
        self.assertEqual(os.stat(cache).st_mode & 0o777, 0o600)
        self.pg.stop()
        second = self.database(cacheFile=cache)
        self.assertEqual(sorted(a.name for a in second.accounts()), ["alice", "bob"])
        self.assertIsNotNone(second.outage)
        self.assertEqual(log.levels("unreachable at start"), ["critical"])
        with self.assertRaises(AccountStoreError) as raised:
            AccountDatabase(self.pg.url)
        self.assertIn(f"{self.pg.url}: cannot connect: ", str(raised.exception))
        self.assertIn(
            "there is no copy of the accounts to start from", str(raised.exception)
        )


class StartTests(unittest.TestCase):
    """
    C{twistd digipoort-msa} with the database down and no copy of the
    accounts: it refuses to start, saying why.
    """

    def test_refusesToStart(self):
        from msa.service import tap

        pg = PostgreSQLServer(self)
        pg.stop()
        config = self.mktemp()
        writeConfig(
            config,
            {
                "server": {
                    "state_dir": os.path.abspath(self.mktemp()),
                    "starttls_listeners": [f"tcp:{freePort()}:interface=127.0.0.1"],
                    "implicit_tls_listeners": [],
                },
                "accounts": {"store": pg.url},
            },
        )
        options = tap.Options()
        options.parseOptions(["--config", config])
        with self.assertRaises(SystemExit) as raised:
            tap.makeService(options)
        message = str(raised.exception)
        self.assertTrue(
            message.startswith(
                f"digipoort-msa: cannot start: {pg.url}: cannot connect: "
            ),
            message,
        )
        self.assertTrue(
            message.endswith(
                "; and there is no copy of the accounts to start from (the MSA "
                "starts only with accounts: start the database, or switch "
                "[accounts] store to the file)"
            ),
            message,
        )


class ConfigTests(unittest.TestCase):
    """
    C{[accounts] store}: C{"file"} (the default) or a PostgreSQL URL.
    """

    def load(self, store: str):
        path = self.mktemp()
        writeConfig(path, {"accounts": {"store": store}})
        return loadConfig(path)

    def test_default(self):
        self.assertEqual(loadConfig(None)["accounts"]["store"], "file")

    def test_url(self):
        for url in [
            "postgresql://msa@127.0.0.1:5432/msa",
            "postgres://msa@[::1]:5432/msa?sslmode=require",
            "postgresql://msa@db1:5432,db2/msa?target_session_attrs=read-write",
        ]:
            self.assertEqual(self.load(url)["accounts"]["store"], url)

    def test_refused(self):
        for value, why in [
            (
                "mysql://msa@db/msa",
                'must be "file" or a postgresql://user@host:port/database URL, '
                "not 'mysql://msa@db/msa'",
            ),
            (
                "postgresql://msa:secret@db:port/msa",
                "not a valid PostgreSQL URL (postgresql://msa:***@db:port/msa): "
                "port 'port' is not a number from 1 to 65535",
            ),
            (
                "postgresql://msa@db1:5432,db2:99999/msa",
                "not a valid PostgreSQL URL (postgresql://msa@db1:5432,db2:99999/msa): "
                "port '99999' is not a number from 1 to 65535",
            ),
            (
                "postgresql://msa@db/msa?pool=5",
                "not a valid PostgreSQL URL (postgresql://msa@db/msa?pool=5): "
                'invalid URI query parameter: "pool"',
            ),
        ]:
            with self.assertRaises(ConfigError) as raised:
                self.load(value)
            self.assertIn(f"[accounts] store: {why}", str(raised.exception))

    def test_describeHidesThePassword(self):
        self.assertEqual(
            describe("postgresql://msa:geheim@db:5432/msa"),
            "postgresql://msa:***@db:5432/msa",
        )


class AdminTests(unittest.TestCase):
    """
    C{digipoort-msa-admin accounts ...} on the database the configuration
    names: the same commands as on the file.
    """

    def setUp(self):
        self.pg = PostgreSQLServer(self)
        self.config = self.mktemp()
        self.state = os.path.abspath(self.mktemp())
        writeConfig(
            self.config,
            {
                "server": {"state_dir": self.state},
                "accounts": {"store": self.pg.url},
            },
        )

    def admin(self, *args: str, stdin: str = "", code: int = 0) -> str:
        got, out, err = runAdmin(self.config, *args, stdin=stdin)
        self.assertEqual(got, code, err)
        return out if code == 0 else err

    def stored(self) -> dict[str, Account]:
        table = AccountTable(self.pg.url)
        self.addCleanup(table.close)
        return table.load()

    def test_commands(self):
        self.assertEqual(
            self.admin("accounts", "init-db"),
            f"the accounts table is ready in {self.pg.url}\n",
        )
        self.assertEqual(
            self.admin(
                "--realm",
                "localhost",
                "accounts",
                "add",
                "alice",
                "--sender",
                "@mijnbedrijf.nl",
                stdin="wonderland\n",
            ),
            "added account alice\n",
        )
        self.assertEqual(
            self.admin("accounts", "list"),
            "alice\tenabled\tDIGEST-MD5,LOGIN,PLAIN,SCRAM-SHA-256\n",
        )
        before = self.stored()["alice"]
        self.admin("--realm", "localhost", "accounts", "passwd", "alice", stdin="x\n")
        after = self.stored()["alice"]
        self.assertNotEqual(after.passwordHash, before.passwordHash)
        self.assertEqual(
            self.admin("accounts", "set", "alice", "--messages-per-day", "5"),
            "changed account alice\n",
        )
        self.assertEqual(self.stored()["alice"].extra["messagesPerDay"], 5)
        self.assertEqual(
            self.admin("accounts", "disable", "alice"), "disabled account alice\n"
        )
        self.assertFalse(self.stored()["alice"].enabled)
        self.assertIn("enabled: no\n", self.admin("accounts", "show", "alice"))
        self.admin("accounts", "enable", "alice")
        self.assertTrue(self.stored()["alice"].enabled)
        self.assertEqual(
            self.admin("accounts", "add", "alice", stdin="y\n", code=1),
            f"digipoort-msa-admin: account 'alice' already exists in {self.pg.url}\n",
        )
        self.assertEqual(
            self.admin("accounts", "remove", "alice"), "removed account alice\n"
        )
        self.assertEqual(self.stored(), {})
        self.assertEqual(
            self.admin("accounts", "show", "alice", code=1),
            f"digipoort-msa-admin: no account 'alice' in {self.pg.url}\n",
        )

    def test_importExportRoundTrip(self):
        """
        An accounts file imported into the database and exported again is
        the same file, byte for byte, and the same accounts.
        """
        accounts = richAccounts()
        original = self.mktemp()
        writeAccounts(original, accounts)
        self.assertEqual(
            self.admin("accounts", "import", original),
            f"imported 4 account(s) from {original} into {self.pg.url}\n",
        )
        self.assertEqual(self.stored(), accounts)
        # The audit log records each account imported, as it does an add.
        audit = os.path.join(self.state, "audit", "audit.jsonl")
        self.assertEqual(
            [(r["action"], r["account"]) for r in records(audit)],
            [("imported", name) for name in sorted(accounts)],
        )
        exported = self.mktemp()
        self.assertEqual(
            self.admin("accounts", "export", exported),
            f"exported 4 account(s) from {self.pg.url} to {exported}\n",
        )
        with open(original, "rb") as a, open(exported, "rb") as b:
            self.assertEqual(a.read(), b.read())
        self.assertEqual(readAccounts(exported), accounts)
        self.assertEqual(os.stat(exported).st_mode & 0o777, 0o600)

    def test_importExportWithTheFile(self):
        """
        With the file store configured, import and export work the same on
        the file: import adds to it (replacing accounts of the same name).
        """
        accountsFile = os.path.abspath(self.mktemp())
        writeAccounts(accountsFile, usersAccounts())
        writeConfig(self.config, {"accounts": {"file": accountsFile}})
        original, rich = self.mktemp(), richAccounts()
        writeAccounts(original, rich)
        self.assertEqual(
            self.admin("accounts", "import", original),
            f"imported 4 account(s) from {original} into {accountsFile}\n",
        )
        self.assertEqual(readAccounts(accountsFile), rich)
        exported = self.mktemp()
        self.admin("accounts", "export", exported)
        with open(original, "rb") as a, open(exported, "rb") as b:
            self.assertEqual(a.read(), b.read())

    def test_databaseDown(self):
        self.pg.stop()
        error = self.admin("accounts", "list", code=1)
        self.assertTrue(
            error.startswith(f"digipoort-msa-admin: {self.pg.url}: cannot connect: "),
            error,
        )

    def test_initDBNeedsADatabase(self):
        path = self.mktemp()
        writeConfig(path, {"accounts": {"file": os.path.abspath(self.mktemp())}})
        code, _, err = runAdmin(path, "accounts", "init-db")
        self.assertEqual(code, 2)
        self.assertEqual(
            err,
            "digipoort-msa-admin: init-db needs [accounts] store = "
            '"postgresql://..." in --config\n',
        )


def login(msa: RunningMSA, user: str, password: str, port: int | None = None) -> bytes:
    """
    One AUTH PLAIN over implicit TLS (blocking: run it in a thread).

    @return: the reply line.
    """
    session = RawSession(port or msa.implicitPort, msa.clientContext(), implicit=True)
    try:
        session.secure(implicit=True)
        return session.login(user.encode(), password.encode())
    finally:
        session.close()


class TwoInstancesTests(unittest.TestCase):
    """
    Two MSA instances, each from its own TOML file with its own state and
    spool, sharing one database.
    """

    def setUp(self):
        self.pg = PostgreSQLServer(self)
        table = AccountTable(self.pg.url)
        table.save(usersAccounts())
        table.close()
        self.log = LogLines(self)
        self.instances = [self.instance() for _ in range(2)]
        self.config = self.instances[0].configFile

    def instance(self, **server) -> RunningMSA:
        return RunningMSA(
            self,
            # No failed-login delay: refused logins are what is awaited.
            server={"auth_delay_base": 0, **server},
            accounts={"store": self.pg.url},
        )

    def logins(self, user: str, password: str):
        return threads.deferToThread(
            lambda: [login(msa, user, password) for msa in self.instances]
        )

    def waitForBoth(self, user: str, password: str, reply: bytes, what: str):
        """
        Within L{PROPAGATION} seconds, both instances give C{reply}.
        """
        return waitUntil(
            lambda: self.logins(user, password).addCallback(
                lambda replies: replies == [reply, reply]
            ),
            timeout=PROPAGATION,
            what=what,
            interval=0.2,
        )

    @defer.inlineCallbacks
    def test_disableAndPasswdReachBoth(self):
        """
        A login works on both; C{digipoort-msa-admin accounts disable} (the
        real program, on the same configuration) is refused on both within
        5 seconds, C{enable} and C{passwd} likewise.
        """
        self.assertEqual((yield self.logins("alice", "wonderland")), [ACCEPTED] * 2)
        code, out, err = yield adminProcess(self.config, "accounts", "disable", "alice")
        self.assertEqual((code, out), (0, "disabled account alice\n"), err)
        yield self.waitForBoth("alice", "wonderland", REFUSED, "alice refused on both")
        code, out, err = yield adminProcess(self.config, "accounts", "enable", "alice")
        self.assertEqual(code, 0, err)
        yield self.waitForBoth("alice", "wonderland", ACCEPTED, "alice back on both")
        code, out, err = yield adminProcess(
            self.config, "accounts", "passwd", "alice", stdin="nieuw geheim\n"
        )
        self.assertEqual((code, out), (0, "new password for account alice\n"), err)
        yield self.waitForBoth(
            "alice", "nieuw geheim", ACCEPTED, "the new password on both"
        )
        self.assertEqual((yield self.logins("alice", "wonderland")), [REFUSED] * 2)
        self.assertEqual((yield self.logins("bob", "builder pass")), [ACCEPTED] * 2)

    @defer.inlineCallbacks
    def test_outage(self):
        """
        With the database stopped, both instances keep accepting logins from
        their last good copy and say so in the log; once it is back, a
        change reaches both again.
        """
        self.pg.stop()
        yield self.log.outage(self, 2)
        self.assertEqual((yield self.logins("alice", "wonderland")), [ACCEPTED] * 2)
        self.assertEqual((yield self.logins("bob", "builder pass")), [ACCEPTED] * 2)
        yield threads.deferToThread(self.pg.start)
        code, _, err = yield adminProcess(self.config, "accounts", "disable", "bob")
        self.assertEqual(code, 0, err)
        yield self.waitForBoth("bob", "builder pass", REFUSED, "bob refused on both")
        self.assertEqual(len(self.log.matching("reachable again")), 2)
        self.assertEqual((yield self.logins("alice", "wonderland")), [ACCEPTED] * 2)

    @defer.inlineCallbacks
    def test_restartDuringOutage(self):
        """
        An instance started while the database is down serves the copy the
        previous run left in its state directory.
        """
        first = self.instances[0]
        yield first.service.stopService()
        self.pg.stop()
        again = RunningMSA.__new__(RunningMSA)
        again.__dict__.update(first.__dict__)
        from msa.service.tap import buildService

        again.service = buildService(loadConfig(first.configFile))
        self.addCleanup(again.service.stopService)
        again.service.startService()
        self.assertEqual(
            (yield threads.deferToThread(login, again, "alice", "wonderland")),
            ACCEPTED,
        )
        self.assertEqual(self.log.levels("unreachable at start"), ["critical"])


class HAProxyTests(unittest.TestCase):
    """
    The two instances behind a real HAProxy: disabling an account with
    the admin tool is refused through the front within 5 seconds, whichever
    instance a connection reaches.
    """

    @defer.inlineCallbacks
    def test_disableThroughTheFront(self):
        requireProgram(self, "haproxy")
        self.pg = PostgreSQLServer(self)
        table = AccountTable(self.pg.url)
        table.save(usersAccounts())
        table.close()
        instances = proxiedInstances(
            self,
            implicit=True,
            server={"auth_delay_base": 0},
            accounts={"store": self.pg.url},
        )
        front = HAProxy(
            self, instances[0][1].directory, [port for port, _ in instances]
        ).port
        msa = instances[0][1]

        def fourLogins() -> list[bytes]:
            return [login(msa, "alice", "wonderland", front) for _ in range(4)]

        self.assertEqual((yield threads.deferToThread(fourLogins)), [ACCEPTED] * 4)
        code, _, err = yield adminProcess(
            msa.configFile, "accounts", "disable", "alice"
        )
        self.assertEqual(code, 0, err)
        yield waitUntil(
            lambda: threads.deferToThread(fourLogins).addCallback(
                lambda replies: replies == [REFUSED] * 4
            ),
            timeout=PROPAGATION,
            what="alice refused through HAProxy (4 logins in a row)",
            interval=0.2,
        )
