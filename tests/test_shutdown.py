# -*- test-case-name: tests.test_shutdown -*-
"""
The order of a stop (SIGTERM): the listeners stop accepting, the sessions
finish their messages (up to C{shutdown_grace}), and only then do the relay
runner, the limits in Redis, the accounts, the audit log and the logs stop,
so that a message accepted during the grace period is counted, recorded and
logged like any other.  With the real C{twistd -n digipoort-msa}; the units
of L{msa.service.services.OrderedShutdown} without processes.
"""

import io
import json
import os
import re
import signal

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from msa.admin import command as admin
from msa.policy.redisclient import RedisAddress
from msa.policy.redislimits import RedisLimits
from msa.service.services import OrderedShutdown
from tests.e2e import freePort
from tests.redisserver import RedisServer
from tests.test_audit import records
from tests.test_crash import USER, Core, MSAProcess, sleep
from tests.waiting import waitUntil


class _Recorded(service.Service):
    """
    A child that notes when it stops, and stops when told to.
    """

    def __init__(self, name: str, stops: list[str]) -> None:
        self.setName(name)
        self.stops = stops
        self.finish: defer.Deferred[None] = defer.Deferred()

    def stopService(self):
        super().stopService()
        self.stops.append(f"{self.name} begins")

        def done(_):
            self.stops.append(f"{self.name} done")

        return self.finish.addCallback(done)


class OrderedShutdownTests(unittest.TestCase):
    def test_lastAddedFirstOneAtATime(self):
        """
        Each child begins to stop only once the one added after it has
        finished; the whole stop fires after the first child.
        """
        stops: list[str] = []
        top = OrderedShutdown()
        children = [_Recorded(name, stops) for name in ("logs", "limits", "sessions")]
        for child in children:
            child.setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        self.assertEqual(stops, ["sessions begins"])
        children[2].finish.callback(None)
        self.assertEqual(stops[1:], ["sessions done", "limits begins"])
        children[1].finish.callback(None)
        self.assertNoResult(stopped)
        children[0].finish.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(stops[3:], ["limits done", "logs begins", "logs done"])

    def test_failureDoesNotStopTheRest(self):
        """
        A child whose stop fails is logged, and the ones before it still
        stop.
        """
        stops: list[str] = []
        top = OrderedShutdown()
        first = _Recorded("first", stops)
        first.setServiceParent(top)
        broken = _Recorded("broken", stops)
        broken.setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        broken.finish.errback(RuntimeError("cannot stop"))
        first.finish.callback(None)
        self.successResultOf(stopped)
        self.assertIn("first done", stops)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class _Disconnects:
    """
    Stands in for L{msa.policy.redisclient.RedisConnection}: counts
    disconnects.
    """

    def __init__(self) -> None:
        self.disconnects = 0

    def disconnect(self) -> defer.Deferred:
        self.disconnects += 1
        return defer.succeed(None)


class RedisLimitsStopTests(unittest.TestCase):
    def test_waitsForUpdatesInFlight(self):
        """
        The limits disconnect only once the updates already sent (the
        commit of a message accepted last) have their answer.
        """
        limits = RedisLimits(
            RedisAddress.parse("redis://127.0.0.1:1/0"), reactor=Clock()
        )
        connection = _Disconnects()
        limits.connection = connection  # type: ignore[assignment]
        answer: defer.Deferred[int] = defer.Deferred()
        limits.settle("commit-1", lambda: answer, needed=True)
        stopped = limits.stopService()
        self.assertEqual(connection.disconnects, 0)
        self.assertNoResult(stopped)
        answer.callback(1)
        self.successResultOf(stopped)
        self.assertEqual(connection.disconnects, 1)


class SigtermDuringDataTests(unittest.TestCase):
    """
    SIGTERM while a client is in DATA, with the Redis limits, the audit log
    and the JSON log: everything the message's acceptance writes is there.
    """

    timeout = 90

    @defer.inlineCallbacks
    def test_acceptedDuringGraceIsCountedRecordedLogged(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        redis = RedisServer(self)
        core = Core(os.path.join(directory, "core"), freePort())
        core.start()
        self.addCleanup(core.stop)
        jsonFile = os.path.join(directory, "msa.jsonl")
        msa = MSAProcess(
            self,
            directory,
            core.portNumber,
            core.caFile,
            grace=20,
            sections={
                "limits": {"backend": "redis", "url": redis.url},
                "logging": {"json_file": jsonFile},
            },
            accountExtra={"messagesPerMinute": 100},
        )
        yield defer.ensureDeferred(msa.start())
        partSent, finish, replied = msa.submitInTwoParts()
        yield waitUntil(partSent.is_set, 10, "the client in DATA")
        msa.kill(signal.SIGTERM)
        yield waitUntil(
            lambda: "stopping: 1 session(s) in progress" in msa.log(),
            10,
            "the drain to begin",
        )
        # Everything else would have stopped by now if it did not wait for
        # the session (a stop without it takes a fraction of a second).
        yield defer.ensureDeferred(sleep(1.0))
        finish.set()
        code, text = yield replied
        self.assertEqual(code, 250, text)
        queueId = text.split()[-1].decode()
        status = yield defer.ensureDeferred(msa.waitForExit(30))
        log = msa.log()
        self.assertIn(status, (0, -signal.SIGTERM), log[-3000:])
        self.assertNotIn("Traceback", log)

        # The audit log verifies, and its stop head comes after the record.
        auditPath = os.path.join(msa.state, "audit", "audit.jsonl")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(
            admin.main(["--config", msa.configFile, "audit", "verify"], out, err),
            0,
            err.getvalue(),
        )
        [accepted] = [
            r
            for r in records(auditPath)
            if r["event"] == "accepted" and r["queueId"] == queueId
        ]
        [stopSeq] = re.findall(r"audit log head \(stop\): seq (\d+)", log)
        self.assertGreaterEqual(int(stopSeq), accepted["seq"])
        self.assertLess(log.index(queueId), log.index("audit log head (stop)"))

        # Redis counted it.
        self.assertEqual(redis.integer("ZCARD", f"digipoort-msa:rate:sent:{USER}"), 1)

        # The JSON log has its line.
        with open(jsonFile, encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
        self.assertIn(
            ("accepted", queueId),
            [(e.get("event"), e.get("queue_id")) for e in events],
        )
