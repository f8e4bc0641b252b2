# -*- test-case-name: tests.test_secrets_e2e -*-
"""
No password of a connection string reaches the MSA's output: the real
C{twistd -n digipoort-msa}, configured from TOML with an account store in
a throwaway PostgreSQL and the limits in a throwaway Redis, both URLs
carrying known passwords (userinfo, percent-encoded, query C{password=}
and C{sslpassword=}, Redis's C{:password@}), runs, loses both (an outage)
and stops; then starts with configuration errors; and the admin program
runs on the same configuration with the database up and down.  The text
log and standard error, the JSON log and the admin program's output are
searched for every secret, raw and percent-encoded: none may appear.
"""

import io
import os
import signal
import urllib.parse

from twisted.internet import defer
from twisted.trial import unittest

from msa.admin import command as admin
from msa.service.config import writeConfig
from tests.pgserver import PostgreSQLServer
from tests.redisserver import RedisServer
from tests.test_crash import Core, MSAProcess
from tests.waiting import waitUntil

#: The passwords, as the configuration holds them (decoded).
PG_USERINFO = "Pg!Userinfo@Secret"
PG_QUERY = "PgQuery Secret&1"
PG_SSL = "PgSslKeySecret"
REDIS = "Redis:Secret/2"
CONFIG_ERROR = "CfgErrorSecret"
SECRETS = [PG_USERINFO, PG_QUERY, PG_SSL, REDIS, CONFIG_ERROR]


def quoted(secret: str) -> str:
    return urllib.parse.quote(secret, safe="")


def traces(secret: str) -> list[str]:
    """
    The forms of C{secret} a leak could take: raw, percent-encoded, and
    the distinctive part alone.
    """
    return [secret, quoted(secret), secret.split("!")[-1].split(" ")[-1]]


class SecretsInOutputTests(unittest.TestCase):
    timeout = 120

    def assertNoSecret(self, name: str, text: str) -> None:
        for secret in SECRETS:
            for trace in traces(secret):
                self.assertNotIn(trace, text, f"{trace!r} in {name}:\n{text[-3000:]}")

    @defer.inlineCallbacks
    def test_daemonAdminAndErrors(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pg = PostgreSQLServer(self)
        redis = RedisServer(self)
        redis.command("CONFIG", "SET", "requirepass", REDIS)
        # The server trusts local connections: libpq sends the password only
        # when asked, but reads (and may report) it all the same.
        store = (
            f"postgresql://msa:{quoted(PG_USERINFO)}@127.0.0.1:{pg.port}/msa"
            f"?password={quoted(PG_QUERY)}&sslpassword={quoted(PG_SSL)}"
        )
        redisURL = f"redis://:{quoted(REDIS)}@127.0.0.1:{redis.port}/0"
        core = Core(os.path.join(directory, "core"), 1)
        jsonFile = os.path.join(directory, "msa.jsonl")
        msa = MSAProcess(
            self,
            directory,
            core.portNumber,
            core.caFile,
            grace=1,
            sections={
                "accounts": {"store": store, "watch_interval": 0.2},
                "limits": {
                    "backend": "redis",
                    "url": redisURL,
                    "timeout": 0.3,
                    "lease": 1.5,
                },
                "logging": {"json_file": jsonFile},
            },
        )
        outputs: dict[str, str] = {}

        def runAdmin(name: str, *argv: str) -> int:
            out, err = io.StringIO(), io.StringIO()
            code = admin.main(["--config", msa.configFile, *argv], out, err)
            outputs[f"admin {name} stdout"] = out.getvalue()
            outputs[f"admin {name} stderr"] = err.getvalue()
            return code

        # The admin program on the database, up.
        self.assertEqual(runAdmin("init-db", "accounts", "init-db"), 0)
        self.assertIn("127.0.0.1", outputs["admin init-db stdout"])

        # The daemon: start, both stores lost, stop.
        yield defer.ensureDeferred(msa.start())
        yield waitUntil(lambda: "Loaded 0 account(s) from" in msa.log(), 10, "load")
        pg.stop()
        redis.stop()
        yield waitUntil(
            lambda: (
                "unreachable or unusable" in msa.log()
                and "limits: Redis at" in msa.log()
            ),
            20,
            lambda: f"both outages logged: {msa.log()[-2000:]}",
        )
        msa.kill(signal.SIGTERM)
        yield defer.ensureDeferred(msa.waitForExit(30))
        outputs["twistd log (stdout and stderr)"] = msa.log()
        self.assertIn(":***@127.0.0.1", msa.log())

        # The admin program on the database, down.
        self.assertNotEqual(runAdmin("list", "accounts", "list"), 0)
        self.assertIn("cannot connect", outputs["admin list stderr"])

        # Configuration errors: not a database URL, a bad port.
        for n, badStore in enumerate(
            [
                f"mysql://msa:{CONFIG_ERROR}@db/msa",
                f"postgresql://msa:{CONFIG_ERROR}@db:99999/msa",
                f"postgresql://db/msa?password={CONFIG_ERROR}&bogus=1",
            ]
        ):
            writeConfig(
                msa.configFile,
                {
                    "server": {
                        "state_dir": msa.state,
                        "starttls_listeners": [f"tcp:{msa.port}:interface=127.0.0.1"],
                        "implicit_tls_listeners": [],
                    },
                    "accounts": {"store": badStore},
                    "logging": {"json_file": jsonFile},
                },
            )
            yield defer.ensureDeferred(self.startFails(msa))
            outputs[f"twistd log, configuration error {n}"] = msa.log()
            self.assertIn("[accounts] store", msa.log())
            self.assertNotEqual(runAdmin(f"config {n}", "accounts", "list"), 0)

        with open(jsonFile, encoding="utf-8") as f:
            outputs["JSON log"] = f.read()
        self.assertIn("limits-unavailable", outputs["JSON log"])
        for name, text in outputs.items():
            self.assertNoSecret(name, text)

    async def startFails(self, msa: MSAProcess) -> None:
        """
        Start twistd on a configuration it refuses, and wait for its exit.
        """
        try:
            await msa.start()
        except AssertionError:
            pass
        status = await msa.waitForExit(30)
        self.assertNotEqual(status, 0)
