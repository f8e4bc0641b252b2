"""
Tests for L{msa.policy.keptlimits} and L{msa.policy.workerlimits}: worker 0
keeping the limits for the
other workers, over a real socket pair on the reactor (the daemon with two
workers and no Redis is in L{tests.test_workers}).
"""

from __future__ import annotations

import json
import os
import socket

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from msa.errors import LimitsUnavailable, SMTPReply
from msa.policy.keptlimits import LimitsKeeper, _Rules
from msa.policy.limits import AuthThrottle
from msa.policy.rates import RateLimiter
from msa.policy.workerlimits import WorkerLimits
from msa.submission.sessions import MemorySessionLimiter
from tests.waiting import waitUntil


class Registry:
    """
    Worker 0's own sessions, by account.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def sessionsOf(self, account: str) -> int:
        return self.counts.get(account, 0)


class WorkerLimitsTests(unittest.TestCase):
    def setUp(self):
        self.registry = Registry()
        self.keeper = LimitsKeeper(RateLimiter(), AuthThrottle(), self.registry)
        ours, theirs = socket.socketpair()
        self.keeper.channel(1, ours, reactor)
        self.limits = WorkerLimits(os.dup(theirs.fileno()), reactor, AuthThrottle())
        theirs.close()
        self.limits.startService()
        self.addCleanup(self.closeWorkersEnd)

    def closeWorkersEnd(self) -> defer.Deferred:
        protocol = self.limits.protocol
        if protocol is None:
            return defer.succeed(None)
        protocol.transport.loseConnection()
        return waitUntil(lambda: self.limits.protocol is None, 5, "closed")

    @defer.inlineCallbacks
    def test_ratesCountedTogether(self):
        """
        The worker's messages and worker 0's count against one limit: with
        2 a minute, one from each, and the worker's next MAIL gets worker
        0's 451 4.7.1.
        """
        rules = _Rules(messagesPerMinute=2, messagesPerDay=None)
        held = yield self.limits.rates.reserve("acme", rules)
        self.assertEqual(held.account, "acme")
        held.commit()
        self.keeper.rates.reserve("acme", rules).commit()
        with self.assertRaises(SMTPReply) as caught:
            yield self.limits.rates.reserve("acme", rules)
        self.assertEqual(
            (caught.exception.code, caught.exception.status), (451, "4.7.1")
        )
        self.assertIn("2 messages per minute", caught.exception.text)

    @defer.inlineCallbacks
    def test_heldSlotsFreedWhenTheWorkerGoes(self):
        """
        A slot the worker holds counts until it settles it; when the
        worker's end closes (it ended, even killed), its slots are free.
        """
        rules = _Rules(messagesPerMinute=1, messagesPerDay=None)
        yield self.limits.rates.reserve("acme", rules)
        self.assertRaises(SMTPReply, self.keeper.rates.reserve, "acme", rules)
        yield self.closeWorkersEnd()
        yield waitUntil(lambda: not self.keeper.rates.held("acme"), 5, "released")
        self.keeper.rates.reserve("acme", rules).release()

    @defer.inlineCallbacks
    def test_releasedSlotFree(self):
        rules = _Rules(messagesPerMinute=1, messagesPerDay=None)
        held = yield self.limits.rates.reserve("acme", rules)
        held.release()
        held.release()  # only the first counts
        again = yield self.limits.rates.reserve("acme", rules)
        again.release()

    @defer.inlineCallbacks
    def test_sessionsCountedTogether(self):
        """
        An account's sessions in every worker count against its limit;
        one the worker releases, or all of its own when it goes, no longer
        count.
        """
        self.registry.counts["acme"] = 1  # one session in worker 0
        admitted = yield self.limits.sessions.acquire("acme", 2, "s1")
        self.assertTrue(admitted)
        # Worker 0's own session limiter counts the worker's session too.
        self.assertFalse(MemorySessionLimiter(self.keeper).acquire("acme", 2, "local"))
        refused = yield self.limits.sessions.acquire("acme", 2, "s2")
        self.assertFalse(refused)
        self.limits.sessions.release("acme", "s1")
        admitted = yield self.limits.sessions.acquire("acme", 2, "s3")
        self.assertTrue(admitted)
        yield self.closeWorkersEnd()
        yield waitUntil(lambda: self.keeper.sessionsOf("acme") == 1, 5, "dropped")

    @defer.inlineCallbacks
    def test_failedLoginsCountedTogether(self):
        """
        A client's failed logins at any worker raise the same delay.
        """
        alone = AuthThrottle()
        expected = [alone.failedLogin("192.0.2.1", "acme") for _ in range(3)]
        first = yield self.limits.throttle.failedLogin("192.0.2.1", "acme")
        second = self.keeper.throttle.failedLogin("192.0.2.1", "acme")
        third = yield self.limits.throttle.failedLogin("192.0.2.1", "acme")
        self.assertEqual([first, second, third], expected)
        self.limits.throttle.succeededLogin("192.0.2.1", "acme")
        # Told: in worker 0 once the next question has its answer.
        yield self.limits.sessions.acquire("acme", 5, "s1")
        fresh = AuthThrottle()
        fresh.failedLogin("192.0.2.1", "other")
        self.assertEqual(
            self.keeper.throttle.failedLogin("192.0.2.1", "acme"),
            fresh.failedLogin("192.0.2.1", "acme"),
        )

    @defer.inlineCallbacks
    def test_workerZeroGone(self):
        """
        Without worker 0 nothing can be counted: MAIL gets 451 4.3.0, a
        login's limits fail with L{LimitsUnavailable} (454 4.7.0), and
        C{/health} says why.
        """
        self.assertIsNone(self.limits.healthProblem())
        yield self.closeWorkersEnd()
        rules = _Rules(messagesPerMinute=1, messagesPerDay=None)
        with self.assertRaises(SMTPReply) as caught:
            yield self.limits.rates.reserve("acme", rules)
        self.assertEqual(
            (caught.exception.code, caught.exception.status), (451, "4.3.0")
        )
        with self.assertRaises(LimitsUnavailable):
            yield self.limits.sessions.acquire("acme", 2, "s1")
        with self.assertRaises(LimitsUnavailable):
            yield self.limits.throttle.failedLogin("192.0.2.1", "acme")
        self.assertIn("worker 0", self.limits.healthProblem())


class TimeoutTests(unittest.TestCase):
    """
    A worker 0 that does not answer (busy, stopped): the question fails
    after C{timeout} as if worker 0 were gone, and what worker 0 grants
    after that is given back.
    """

    def setUp(self):
        self.keeperEnd, theirs = socket.socketpair()
        self.addCleanup(self.keeperEnd.close)
        self.limits = WorkerLimits(
            os.dup(theirs.fileno()), reactor, AuthThrottle(), timeout=0.2
        )
        theirs.close()
        self.limits.startService()

        def close():
            if self.limits.protocol is not None:
                self.limits.protocol.transport.loseConnection()
                return waitUntil(lambda: self.limits.protocol is None, 5, "closed")

        self.addCleanup(close)

    def answer(self, answer: dict) -> None:
        self.keeperEnd.sendall(json.dumps(answer).encode() + b"\n")

    def received(self) -> list[dict]:
        self.keeperEnd.settimeout(5)
        data = b""
        while not data.endswith(b"\n"):
            data += self.keeperEnd.recv(65536)
        return [json.loads(line) for line in data.splitlines()]

    @defer.inlineCallbacks
    def test_lateHoldReleased(self):
        rules = _Rules(messagesPerMinute=1, messagesPerDay=None)
        with self.assertRaises(SMTPReply) as caught:
            yield self.limits.rates.reserve("acme", rules)
        self.assertEqual(
            (caught.exception.code, caught.exception.status), (451, "4.3.0")
        )
        [request] = yield threads.deferToThread(self.received)
        self.assertEqual(request["op"], "reserve")
        self.keeperEnd.sendall(
            json.dumps({"id": request["id"], "hold": 7}).encode() + b"\n"
        )
        [undo] = yield threads.deferToThread(self.received)
        self.assertEqual(undo, {"op": "release", "hold": 7})

    @defer.inlineCallbacks
    def test_lateSessionLeft(self):
        with self.assertRaises(LimitsUnavailable):
            yield self.limits.sessions.acquire("acme", 2, "s1")
        [request] = yield threads.deferToThread(self.received)
        self.keeperEnd.sendall(
            json.dumps({"id": request["id"], "admit": True}).encode() + b"\n"
        )
        [undo] = yield threads.deferToThread(self.received)
        self.assertEqual(undo, {"op": "leave", "account": "acme", "session": "s1"})


class AtOnceTests(unittest.TestCase):
    """
    A question and its answer are in the socket when they are made, not a
    turn of the reactor later (each side writes its line in one write,
    which L{msa._compat.writeEagerly} sends at once): the asking session
    waits for worker 0's reactor once, not three times.
    """

    def setUp(self):
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.theirs.close)

    def waiting(self) -> bytes:
        """
        What the raw end can read now, without waiting.
        """
        return self.theirs.recv(65536, socket.MSG_DONTWAIT)

    def test_questionSentAtOnce(self):
        limits = WorkerLimits(os.dup(self.ours.fileno()), reactor, AuthThrottle())
        self.ours.close()
        limits.startService()
        self.addCleanup(
            lambda: limits.protocol and limits.protocol.transport.abortConnection()
        )
        asked = limits.rates.reserve(
            "acme", _Rules(messagesPerMinute=1, messagesPerDay=None)
        )
        asked.addErrback(lambda failure: None)
        self.assertEqual(
            json.loads(self.waiting()),
            {
                "op": "reserve",
                "account": "acme",
                "perMinute": 1,
                "perDay": None,
                "id": 1,
            },
        )

    def test_answerSentAtOnce(self):
        keeper = LimitsKeeper(RateLimiter(), AuthThrottle(), Registry())
        keeper.channel(1, self.ours, reactor)
        [channel] = keeper.channels
        self.addCleanup(channel.transport.abortConnection)
        question = {"id": 7, "op": "reserve", "account": "acme", "perMinute": 1}
        channel.lineReceived(json.dumps({**question, "perDay": None}).encode())
        self.assertEqual(json.loads(self.waiting()), {"hold": 1, "id": 7})

    def test_unlimitedAsksNothing(self):
        """
        An account without rates costs no question (as with Redis): the
        reservation is there at once, and settling it tells nothing.
        """
        limits = WorkerLimits(os.dup(self.ours.fileno()), reactor, AuthThrottle())
        self.ours.close()
        limits.startService()
        self.addCleanup(
            lambda: limits.protocol and limits.protocol.transport.abortConnection()
        )
        unlimited = _Rules(messagesPerMinute=None, messagesPerDay=None)
        held = self.successResultOf(limits.rates.reserve("acme", unlimited))
        self.assertEqual(held.account, "acme")
        held.commit()
        limits.rates.reserve("acme", unlimited).addCallback(lambda r: r.release())
        self.assertRaises(BlockingIOError, self.waiting)
        # A limited account's question is the first thing sent.
        limits.rates.reserve(
            "acme", _Rules(messagesPerMinute=5, messagesPerDay=None)
        ).addErrback(lambda failure: None)
        self.assertEqual(json.loads(self.waiting())["op"], "reserve")
