# -*- test-case-name: tests.test_redissentinel -*-
"""
The shared limits through Redis Sentinel (C{[limits] url =
"redis+sentinel://host:port/service/db"}, issue 22 item 4), with real
C{redis-server} processes: a master, its replica and one Sentinel.  The MSA
(from TOML) asks the Sentinel for the master, counts there, and after the
master is killed and the Sentinel promotes the replica, counts on the new
master without a restart.
"""

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.policy.redisclient import RedisAddress
from tests.e2e import RunningMSA
from tests.redisserver import RedisSentinel, RedisServer
from tests.test_multiinstance import carol
from tests.test_redistls import mailReply
from tests.waiting import waitUntil

HELD = "digipoort-msa:rate:held:carol"


class SentinelAddressTests(unittest.TestCase):
    def test_parse(self):
        address = RedisAddress.parse(
            "redis+sentinel://:geheim@10.0.0.1:26379,[::1]:26380/msa-limits/2"
        )
        self.assertEqual(
            (address.sentinels, address.service, address.db, address.password),
            ((("10.0.0.1", 26379), ("::1", 26380)), "msa-limits", 2, "geheim"),
        )
        self.assertEqual(
            address.describe(),
            "master msa-limits of Sentinel 10.0.0.1:26379,::1:26380 db 2",
        )

    def test_bad(self):
        for url, error in [
            ("redis+sentinel://h:26379", "the path must be /service or /service/db"),
            ("redis+sentinel://h/m", "'h' is not host:port of a Sentinel"),
            ("redis+sentinel://h:1/m/x", "/x is not a database number"),
        ]:
            with self.assertRaises(ValueError) as raised:
                RedisAddress.parse(url)
            self.assertEqual(str(raised.exception), error)


class SentinelTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_failover(self):
        master = RedisServer(self)
        replica = RedisServer(self, replicaOf=master.port)
        sentinel = RedisSentinel(self, master.port)
        # The Sentinel learns of the replica from the master's INFO.
        yield waitUntil(
            lambda: threads.deferToThread(
                lambda: b"slave0:" in master.command("INFO", "replication")
            ),
            30,
            "the replica to be connected",
            interval=0.2,
        )
        msa = RunningMSA(
            self,
            extraAccounts=carol(messagesPerDay=50),
            limits={"backend": "redis", "url": sentinel.url, "timeout": 1.0},
        )
        counted = []

        def count(server):
            return lambda: counted.append(server.integer("ZCARD", HELD))

        reply = yield threads.deferToThread(mailReply, msa, count(master))
        self.assertEqual((reply, counted), ((250, b"2.1.0 Ok"), [1]))

        master.stop()
        yield waitUntil(
            lambda: threads.deferToThread(sentinel.currentMaster).addCallback(
                lambda port: port == replica.port
            ),
            60,
            "the Sentinel to promote the replica",
            interval=0.2,
        )

        def onNewMaster():
            counted.clear()
            reply = mailReply(msa, count(replica))
            return reply == (250, b"2.1.0 Ok") and counted == [1]

        yield waitUntil(
            lambda: threads.deferToThread(onNewMaster),
            30,
            "MAIL counted on the new master",
            interval=0.5,
        )
