# -*- test-case-name: tests.test_limits_redis -*-
"""
The shared limits of L{msa.policy.redislimits} against a real, throwaway
Redis (L{tests.redisserver}): reservation, commit and release of message
slots over the minute and the day, holds and sessions of a crashed instance
lapsing, the failed-login delay growing and being forgotten, and what
happens when Redis cannot be reached (refused, silent, dropped mid-reply).

The limiters' clock is a fake one (the scores in Redis are its
milliseconds), so windows and lapses are shown without waiting.
"""

from twisted.internet import defer, protocol, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa.errors import LimitsUnavailable, SMTPReply
from msa.policy.authorization import AccountRules, AuthThrottle, RateReservation
from msa.policy.redisclient import COMMANDS
from msa.policy.redislimits import RedisAddress, RedisLimits
from tests.e2e import freePort
from tests.redisserver import RedisServer
from tests.test_authorization import FakeTime
from tests.waiting import waitUntil

PER_MINUTE = AccountRules(messagesPerMinute=2)
PER_DAY = AccountRules(messagesPerDay=2)


def startLimits(testCase, url: str, clock, **kwargs) -> RedisLimits:
    """
    A started L{RedisLimits} (one instance's view), stopped in cleanup.
    """
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("lease", 60.0)
    limits = RedisLimits(
        RedisAddress.parse(url), reactor=reactor, clock=clock, **kwargs
    )
    limits.startService()
    testCase.addCleanup(limits.stopService)
    return limits


def events(testCase) -> list[dict]:
    """
    The log events from now to the end of the test.
    """
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    testCase.addCleanup(globalLogPublisher.removeObserver, seen.append)
    return seen


class RedisTestCase(unittest.TestCase):
    #: The limits' deadline per Redis command (L{startLimits}).
    redisTimeout = 5.0

    def setUp(self):
        self.redis = RedisServer(self)
        self.clock = FakeTime()
        self.limits = startLimits(
            self, self.redis.url, self.clock, timeout=self.redisTimeout
        )

    def count(self, kind: str, account: str = "acme") -> int:
        return self.redis.integer("ZCARD", f"digipoort-msa:rate:{kind}:{account}")

    @defer.inlineCallbacks
    def refused(self, rules, limits=None) -> defer.Deferred:
        limits = limits or self.limits
        try:
            yield limits.rates.reserve("acme", rules)
        except SMTPReply as e:
            return e
        self.fail("reserved past the limit")


class CommandTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_onlyTheLimitsCommands(self):
        """
        The connection sends the commands the limits use (L{COMMANDS}) and
        no other: any other name, an attribute of the connection's handler
        included, is a programming error raised at once, not taken for an
        outage of Redis.
        """
        self.assertEqual(sorted(COMMANDS), ["delete", "eval", "ping", "zrem"])
        connection = self.limits.connection
        self.assertEqual((yield connection.call("ping")), "PONG")
        self.assertEqual((yield connection.call("delete", "digipoort-msa:none")), 0)
        for name in ("flushall", "disconnect", "__class__", "factory"):
            self.assertRaises(ValueError, connection.call, name)
        self.assertIsNone(connection.unavailableSince)


class RatesTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_reserveUpToTheLimit(self):
        """
        Two slots per minute: two holds, and the third MAIL is refused with
        the memory limiter's exact reply (held slots count as sent now).
        """
        yield self.limits.rates.reserve("acme", PER_MINUTE)
        yield self.limits.rates.reserve("acme", PER_MINUTE)
        self.assertEqual(self.count("held"), 2)
        error = yield self.refused(PER_MINUTE)
        self.assertEqual(
            str(error),
            "451 4.7.1 Rate limit of 2 messages per minute reached for this "
            "account; try again in 61 seconds",
        )
        self.assertEqual(self.count("held"), 2)
        # Another account has its own slots.
        yield self.limits.rates.reserve("other", PER_MINUTE)

    @defer.inlineCallbacks
    def test_commitAndSlidingMinute(self):
        first = yield self.limits.rates.reserve("acme", PER_MINUTE)
        first.commit()
        yield waitUntil(lambda: self.count("sent") == 1, what="the commit")
        self.assertEqual(self.count("held"), 0)
        self.clock.now += 30
        second = yield self.limits.rates.reserve("acme", PER_MINUTE)
        second.commit()
        yield waitUntil(lambda: self.count("sent") == 2, what="the commit")
        error = yield self.refused(PER_MINUTE)
        self.assertIn(b"try again in 31 seconds", error.line())
        # A committed reservation is settled: a release changes nothing.
        second.release()
        self.clock.now += 30.5
        yield self.limits.rates.reserve("acme", PER_MINUTE)

    @defer.inlineCallbacks
    def test_releaseGivesTheSlotBack(self):
        first = yield self.limits.rates.reserve("acme", PER_MINUTE)
        yield self.limits.rates.reserve("acme", PER_MINUTE)
        first.release()
        first.commit()
        yield waitUntil(lambda: self.count("held") == 1, what="the release")
        self.assertEqual(self.count("sent"), 0)
        yield self.limits.rates.reserve("acme", PER_MINUTE)

    @defer.inlineCallbacks
    def test_dayWindow(self):
        for _ in range(2):
            reservation = yield self.limits.rates.reserve("acme", PER_DAY)
            reservation.commit()
        yield waitUntil(lambda: self.count("sent") == 2, what="the commits")
        self.clock.now += 3600
        error = yield self.refused(PER_DAY)
        self.assertEqual(
            str(error),
            "451 4.7.1 Rate limit of 2 messages per day reached for this account; "
            f"try again in {86400 - 3600 + 1} seconds",
        )
        self.clock.now += 86400 - 3600
        yield self.limits.rates.reserve("acme", PER_DAY)
        # The messages that left the day are gone from Redis too.
        self.assertEqual(self.count("sent"), 0)

    @defer.inlineCallbacks
    def test_noRatesNoRedis(self):
        """
        An account without rates is not counted at all.
        """
        reservation = yield self.limits.rates.reserve("acme", AccountRules())
        reservation.commit()
        self.assertEqual(self.redis.integer("DBSIZE"), 0)

    @defer.inlineCallbacks
    def test_crashedInstanceHoldsLapse(self):
        """
        Instance B holds both slots and dies (its holds are never released
        nor refreshed): A is refused until the lease has passed, then gets
        them back.
        """
        b = startLimits(self, self.redis.url, self.clock)
        yield b.rates.reserve("acme", PER_MINUTE)
        yield b.rates.reserve("acme", PER_MINUTE)
        yield b.stopService()
        yield self.refused(PER_MINUTE)
        self.clock.now += 59.99
        yield self.refused(PER_MINUTE)
        self.clock.now += 0.01
        yield self.limits.rates.reserve("acme", PER_MINUTE)
        yield self.limits.rates.reserve("acme", PER_MINUTE)

    @defer.inlineCallbacks
    def test_liveHoldsRefreshed(self):
        """
        A live instance refreshes its holds: they outlast the lease.
        """
        yield self.limits.rates.reserve("acme", AccountRules(messagesPerMinute=1))
        for _ in range(4):
            self.clock.now += 40
            yield self.limits.refresh()
        self.assertEqual(self.count("held"), 1)
        yield self.refused(AccountRules(messagesPerDay=1))

    @defer.inlineCallbacks
    def test_twoInstancesRace(self):
        """
        20 reservations at once from two instances, 5 allowed a day:
        exactly 5 are held.
        """
        b = startLimits(self, self.redis.url, self.clock)
        rules = AccountRules(messagesPerDay=5)
        results = yield defer.DeferredList(
            [
                (self.limits if i % 2 else b).rates.reserve("acme", rules)
                for i in range(20)
            ],
            consumeErrors=True,
        )
        held = [r for ok, r in results if ok]
        refused = [r.value for ok, r in results if not ok]
        self.assertEqual(len(held), 5)
        self.assertEqual({str(e)[:9] for e in refused}, {"451 4.7.1"})
        self.assertEqual(self.count("held"), 5)


class CommitRetryTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_commitRetriedUntilRedisTakesIt(self):
        """
        A commit sent while Redis is down is not lost: the message was
        queued, so it is counted once Redis is back.
        """
        reservation = yield self.limits.rates.reserve("acme", PER_DAY)
        self.redis.stop()
        reservation.commit()
        yield waitUntil(lambda: reservation.holdId in self.limits._retry)
        self.redis.start()

        @defer.inlineCallbacks
        def counted():
            yield self.limits.refresh()
            return self.count("sent") == 1

        yield waitUntil(counted, what="the retried commit")
        self.assertEqual(self.limits._retry, {})


class ThrottleTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_delayGrowsPerAccountAndAddress(self):
        throttle = self.limits.throttle
        delays = []
        for _ in range(6):
            delay = yield throttle.failedLogin("198.51.100.7", "acme")
            delays.append(delay)
        self.assertEqual(delays, [0, 0.5, 1.0, 2.0, 4.0, 8.0])
        addressKey, pairKey = throttle.keys("198.51.100.7", "acme")
        self.assertEqual(self.redis.integer("GET", pairKey), 6)
        self.assertEqual(self.redis.integer("GET", addressKey), 6)
        # Another address is not slowed down: no lockout.
        delay = yield throttle.failedLogin("192.0.2.10", "acme")
        self.assertEqual(delay, 0)
        # A success forgets the pair, not the address.
        yield throttle.succeededLogin("198.51.100.7", "acme")
        self.assertEqual(self.redis.integer("EXISTS", pairKey), 0)
        delay = yield throttle.failedLogin("198.51.100.7", "acme")
        self.assertEqual(delay, 0.5)  # 6 // 4 failures of the address

    @defer.inlineCallbacks
    def test_addressCountsEveryAccount(self):
        throttle = self.limits.throttle
        for i in range(8):
            yield throttle.failedLogin("198.51.100.7", f"user{i}")
        delay = yield throttle.failedLogin("198.51.100.7", "user99")
        self.assertEqual(delay, 1.0)

    @defer.inlineCallbacks
    def test_forgotten(self):
        """
        The counts expire C{forget} seconds after the last failure (here a
        fraction of a second, on Redis's own clock).
        """
        limits = startLimits(
            self,
            self.redis.url,
            self.clock,
            prefix="short:",
            throttle=AuthThrottle(forget=0.3),
        )
        for _ in range(3):
            yield limits.throttle.failedLogin("198.51.100.7", "acme")
        keys = limits.throttle.keys("198.51.100.7", "acme")
        self.assertEqual(self.redis.integer("GET", keys[1]), 3)
        yield waitUntil(
            lambda: self.redis.integer("EXISTS", *keys) == 0, what="the expiry"
        )
        delay = yield limits.throttle.failedLogin("198.51.100.7", "acme")
        self.assertEqual(delay, 0)

    def test_longNamesHashed(self):
        addressKey, pairKey = self.limits.throttle.keys("192.0.2.1", "x" * 5000)
        self.assertLess(len(pairKey), 120)
        self.assertTrue(pairKey.startswith("digipoort-msa:authfail:account:sha256:"))


class SessionTests(RedisTestCase):
    @defer.inlineCallbacks
    def test_acquireAndRelease(self):
        sessions = self.limits.sessions
        self.assertTrue((yield sessions.acquire("acme", 2, "s1")))
        self.assertTrue((yield sessions.acquire("acme", 2, "s2")))
        self.assertFalse((yield sessions.acquire("acme", 2, "s3")))
        sessions.release("acme", "s1")
        yield waitUntil(
            lambda: self.redis.integer("ZCARD", "digipoort-msa:sessions:acme") == 1,
            what="the release",
        )
        self.assertTrue((yield sessions.acquire("acme", 2, "s3")))

    @defer.inlineCallbacks
    def test_crashedInstanceSessionsLapse(self):
        b = startLimits(self, self.redis.url, self.clock)
        self.assertTrue((yield b.sessions.acquire("acme", 1, "s1")))
        yield b.stopService()
        self.assertFalse((yield self.limits.sessions.acquire("acme", 1, "s2")))
        self.clock.now += 61
        self.assertTrue((yield self.limits.sessions.acquire("acme", 1, "s2")))


class UnreachableTests(RedisTestCase):
    #: The daemon's default: the first command after Redis is killed waits
    #: this long for the reconnection before it counts as unreachable.
    redisTimeout = 1.0

    @defer.inlineCallbacks
    def test_refusedThenBack(self):
        """
        Redis stops: MAIL's reservation gets 451 4.3.0, a failed login
        L{LimitsUnavailable}; one critical line; the health problem is
        named.  Redis comes back: the limits work again, and the log says
        so.
        """
        seen = events(self)
        self.redis.stop()
        for _ in range(3):
            try:
                yield self.limits.rates.reserve("acme", PER_MINUTE)
            except SMTPReply as e:
                self.assertEqual(
                    str(e),
                    "451 4.3.0 Rate limits cannot be checked now; try again later",
                )
            else:
                self.fail("reserved without Redis")
        yield self.assertFailure(
            self.limits.throttle.failedLogin("192.0.2.1", "acme"), LimitsUnavailable
        )
        yield self.assertFailure(
            self.limits.sessions.acquire("acme", 1, "s1"), LimitsUnavailable
        )
        critical = [e for e in seen if e.get("event") == "limits-unavailable"]
        self.assertEqual(len(critical), 1)
        self.assertEqual(critical[0]["log_level"].name, "critical")
        self.assertIn("MAIL gets 451 4.3.0", critical[0]["consequence"])
        problem = self.limits.healthProblem()
        self.assertTrue(
            problem.startswith(f"limits store (Redis at 127.0.0.1:{self.redis.port}"),
            problem,
        )
        self.redis.start()

        @defer.inlineCallbacks
        def reserved():
            try:
                yield self.limits.rates.reserve("acme", PER_MINUTE)
            except SMTPReply:
                return False
            return True

        yield waitUntil(reserved, what="Redis to be used again")
        self.assertIsNone(self.limits.healthProblem())
        self.assertEqual(
            [e["log_level"].name for e in seen if e.get("event") == "limits-recovered"],
            ["warn"],
        )

    @defer.inlineCallbacks
    def test_localFallback(self):
        """
        With C{fallback = "local"} the instance counts in memory while
        Redis is down.
        """
        limits = startLimits(
            self, self.redis.url, self.clock, local=True, timeout=self.redisTimeout
        )
        self.redis.stop()
        first = yield limits.rates.reserve("acme", PER_MINUTE)
        self.assertIsInstance(first, RateReservation)
        yield limits.rates.reserve("acme", PER_MINUTE)
        error = yield self.refused(PER_MINUTE, limits)
        self.assertTrue(str(error).startswith("451 4.7.1 Rate limit of 2 "), error)
        delays = []
        for _ in range(3):
            delay = yield limits.throttle.failedLogin("192.0.2.1", "acme")
            delays.append(delay)
        self.assertEqual(delays, [0, 0.5, 1.0])


class SilentRedis(protocol.Protocol):
    """
    A server that takes commands and never answers, or drops the
    connection at the first one (C{drop}).
    """

    drop = False

    def dataReceived(self, data):
        if self.factory.drop:
            self.transport.loseConnection()


class BrokenRedisTests(unittest.TestCase):
    """
    No answer within the timeout, or the connection dropped before the
    reply: the reservation is refused with 451 4.3.0, never assumed.
    """

    @defer.inlineCallbacks
    def check(self, drop: bool):
        factory = protocol.Factory.forProtocol(SilentRedis)
        factory.drop = drop
        port = reactor.listenTCP(freePort(), factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        limits = startLimits(
            self,
            f"redis://127.0.0.1:{port.getHost().port}/0",
            FakeTime(),
            timeout=0.5,
            lease=3,
        )
        try:
            yield limits.rates.reserve("acme", PER_MINUTE)
        except SMTPReply as e:
            self.assertEqual(e.code, 451)
            self.assertEqual(e.status, "4.3.0")
        else:
            self.fail("reserved without an answer")
        return limits.connection.lastError

    @defer.inlineCallbacks
    def test_noAnswer(self):
        error = yield self.check(drop=False)
        self.assertIn("0.5", error)

    @defer.inlineCallbacks
    def test_droppedBeforeTheReply(self):
        error = yield self.check(drop=True)
        self.assertIn("ConnectionError", error)


class UnavailableThrottle:
    """
    A shared throttle whose store cannot be reached.
    """

    base, maximum = 0.5, 16.0

    def failedLogin(self, clientAddress, account):
        return defer.fail(LimitsUnavailable("down"))

    def succeededLogin(self, clientAddress, account):
        return defer.fail(LimitsUnavailable("down"))


class SlowRates:
    """
    A shared rate limiter whose answers the test gives.
    """

    def __init__(self):
        self.pending: list[defer.Deferred] = []

    def reserve(self, account, rules):
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def record(self, account):
        pass


class Reservation:
    account = "alice"
    released = committed = False

    def release(self):
        self.released = True

    def commit(self):
        self.committed = True


class ProtocolTests(unittest.TestCase):
    """
    Through the protocol (string transport, fake clock), the replies while
    the shared limits cannot be asked, and a reservation answered after the
    session ended.
    """

    def test_authUnavailableSameForAnyPassword(self):
        """
        A right and a wrong password both get 454 4.7.0, and both count
        towards max_auth_failures, so that an outage tells a guesser
        nothing.
        """
        from tests.helpers import Harness

        h = Harness(self)
        h.factory.authThrottle = UnavailableThrottle()
        h.startTLS()
        temporary = b"454 4.7.0 Temporary authentication failure"
        self.assertEqual(h.login(), [temporary])
        self.assertEqual(h.login(password=b"wrong"), [temporary])
        self.assertEqual(
            h.login(),
            [temporary, b"421 4.7.0 msa.example.nl Error: too many failed logins"],
        )
        self.assertIsNone(h.server.avatar)

    def slowRates(self):
        """
        A session logged in as alice, whose rate limiter the test answers.
        """
        from msa.policy.authorization import ServerRules
        from tests.helpers import Harness

        rates = SlowRates()
        h = Harness(
            self,
            realmArgs={
                "serverRules": ServerRules(rates=rates),
                "extras": {"alice": {"senders": ["@example.nl"]}},
            },
        )
        h.login()
        return rates, h

    def test_mailWaitsForTheReservation(self):
        rates, h = self.slowRates()
        self.assertEqual(h.command(b"MAIL FROM:<a@example.nl>"), [])
        reservation = Reservation()
        h.transport.clear()
        rates.pending[0].callback(reservation)
        self.assertEqual(h.transport.value(), b"250 2.1.0 Ok\r\n")
        h.command(b"RSET")
        self.assertTrue(reservation.released)

    def test_reservationAfterTheSessionEnded(self):
        """
        The client left while the reservation was made: the slot it
        brings is released at once.
        """
        rates, h = self.slowRates()
        h.command(b"MAIL FROM:<a@example.nl>")
        h.close()
        reservation = Reservation()
        rates.pending[0].callback(reservation)
        self.assertTrue(reservation.released)
        self.assertFalse(reservation.committed)
