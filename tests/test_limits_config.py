# -*- test-case-name: tests.test_limits_config -*-
"""
C{[limits]} in the configuration file: its defaults, Redis's URL parsed,
and each wrong value stopping the start with the file, the key and what is
wrong.
"""

import os

from twisted.trial import unittest

from msa.policy.redisclient import RedisAddress
from msa.service.config import ConfigError, loadConfig


class LimitsConfigTests(unittest.TestCase):
    def load(self, text: str):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path, lambda: loadConfig(path)

    def assertError(self, text: str, expected: str) -> None:
        path, load = self.load(text)
        error = self.assertRaises(ConfigError, load)
        self.assertEqual(str(error), f"{path}: {expected}")

    def test_defaults(self):
        limits = loadConfig(None)["limits"]
        self.assertEqual(limits["backend"], "memory")
        self.assertEqual(limits["fallback"], "refuse")
        self.assertEqual(limits["key_prefix"], "digipoort-msa:")
        self.assertEqual((limits["timeout"], limits["lease"]), (1.0, 60))
        self.assertEqual(
            limits["address"], RedisAddress(host="127.0.0.1", port=6379, db=0)
        )

    def test_urls(self):
        self.assertEqual(
            RedisAddress.parse("redis://:geheim@redis.example:6380/3"),
            RedisAddress(host="redis.example", port=6380, db=3, password="geheim"),
        )
        self.assertEqual(
            RedisAddress.parse("redis://msa:ge%40heim@10.0.0.5"),
            RedisAddress(host="10.0.0.5", username="msa", password="ge@heim"),
        )
        address = RedisAddress.parse("unix:///run/redis/redis.sock?db=2")
        self.assertEqual(address, RedisAddress(path="/run/redis/redis.sock", db=2))
        self.assertEqual(address.describe(), "unix:/run/redis/redis.sock db 2")
        # The password never appears in the log.
        self.assertEqual(
            RedisAddress.parse("redis://:geheim@h:1/0").describe(), "h:1 db 0"
        )

    def test_errors(self):
        where = "[limits]"
        self.assertError(
            "[limits]\nbackend = 'postgres'\n",
            f"{where} backend: must be memory or redis (got 'postgres')",
        )
        self.assertError(
            "[limits]\nfallback = 'ignore'\n",
            f"{where} fallback: must be refuse or local (got 'ignore')",
        )
        self.assertError(
            "[limits]\nurl = 'http://localhost'\n",
            f"{where} url: must start with redis://, rediss://, redis+sentinel:// "
            "or unix:// (got 'http://localhost')",
        )
        self.assertError(
            "[limits]\nurl = 'redis://localhost/x'\n",
            f"{where} url: /x is not a database number (got 'redis://localhost/x')",
        )
        self.assertError(
            "[limits]\nurl = 'redis://localhost:port/0'\n",
            f"{where} url: the port is not a number (got 'redis://localhost:port/0')",
        )
        self.assertError(
            "[limits]\nurl = 'redis:///0'\n",
            f"{where} url: no host in the URL (got 'redis:///0')",
        )
        self.assertError(
            "[limits]\nurl = 'unix://'\n",
            f"{where} url: a unix: URL needs the socket's path (got 'unix://')",
        )
        self.assertError(
            "[limits]\ntimeout = 0\n",
            f"{where} timeout: must be a number from 0.01 to 60 (got 0)",
        )
        self.assertError(
            "[limits]\nlease = -1\n",
            f"{where} lease: must be a number from 0.1 to 86400 (got -1)",
        )
        self.assertError(
            "[limits]\ntimeout = 5\nlease = 10\n",
            f"{where} lease: must be at least three times timeout (a hold is "
            "refreshed every lease / 3 seconds) (got lease = 10, timeout = 5)",
        )
        self.assertError(
            "[limits]\nkey_prefix = ' '\n",
            f"{where} key_prefix: must be printable ASCII without spaces (got ' ')",
        )
        self.assertError(
            "[limits]\ntimeout = 'soon'\n",
            f"{where} timeout: must be a number from 0.01 to 60 (got 'soon')",
        )
        self.assertError("[limits]\nredis = true\n", f"{where} redis: unknown key")
