# -*- test-case-name: tests.test_limits_bounds -*-
"""
The memory limiters' bounds (issue 18 defect 2, issue 20 item 3): the
failed-login throttle holds a bounded number of counters whatever names and
addresses the clients send, and random names never lower the delay of the
address that sends them; the rate limiter counts per second, so that a
check costs the same after a million messages as after one.
"""

import base64
import secrets

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.policy.authorization import AccountRules, AuthThrottle, RateLimiter
from msa.policy.limits import failedLoginDelay
from tests.e2e import RunningMSA
from tests.sessionclient import RawSession
from tests.test_authorization import FakeTime
from tests.test_limits import throttleOf

ADDRESS = "198.51.100.7"


def randomName() -> str:
    return secrets.token_hex(8)


class AuthThrottleBoundsTests(unittest.TestCase):
    """
    L{AuthThrottle} at and past each of its bounds.
    """

    def setUp(self):
        self.clock = FakeTime()
        self.throttle = AuthThrottle(base=0.5, maximum=16, clock=self.clock)

    def test_namesPerAddressAtTheCap(self):
        """
        Up to C{MAX_NAMES_PER_ADDRESS} names from one address have a counter
        each (and the address one).
        """
        cap = AuthThrottle.MAX_NAMES_PER_ADDRESS
        for i in range(cap):
            self.throttle.failed(ADDRESS, f"user{i}")
        self.assertEqual(self.throttle.counters(), 1 + cap)
        # The address's sixteen failures count a quarter: four doublings.
        self.assertEqual(self.throttle.delay(ADDRESS, "user0"), 4.0)
        self.assertEqual(self.throttle._pairs[("user0", ADDRESS)][0], 1)

    def test_namesPerAddressPastTheCap(self):
        """
        Past the cap, further names share one counter of the address: ten
        thousand random names from one address hold C{cap + 2} counters.
        """
        cap = AuthThrottle.MAX_NAMES_PER_ADDRESS
        for _ in range(10_000):
            self.throttle.failed(ADDRESS, randomName())
        self.assertEqual(self.throttle.counters(), 1 + cap + 1)
        self.assertEqual(self.throttle._addresses[ADDRESS][0], 10_000)

    def test_randomNamesDoNotResetTheAddressDelay(self):
        """
        An address cycling random names gets the delay of all its failures,
        for any name, old or new: the names never push out its own count.
        """
        self.patch(AuthThrottle, "MAX_PAIRS", 8)
        delays = [self.throttle.failedLogin(ADDRESS, randomName()) for _ in range(200)]
        expected = [failedLoginDelay(0.5, 16, i, 0) for i in range(200)]
        self.assertEqual(delays, expected)
        self.assertEqual(delays[-1], 16)
        self.assertEqual(self.throttle.delay(ADDRESS, randomName()), 16)
        self.assertLessEqual(len(self.throttle._pairs), 8)

    def test_untrackedNameSlowedAtLeastAsMuch(self):
        """
        A name tried after the address used up its own names counts under
        the shared counter: its delay is at least what its own count gives.
        """
        self.throttle = AuthThrottle(base=0.5, maximum=1e9, clock=self.clock)
        cap = AuthThrottle.MAX_NAMES_PER_ADDRESS
        for i in range(cap):
            self.throttle.failed(ADDRESS, f"filler{i}")
        for k in range(1, 30):
            self.throttle.failed(ADDRESS, "acme")
            ownCount = failedLoginDelay(0.5, 1e9, 0, k)
            self.assertGreaterEqual(self.throttle.delay(ADDRESS, "acme"), ownCount)
        self.assertNotIn(("acme", ADDRESS), self.throttle._pairs)

    def test_successKeepsTheSharedCount(self):
        """
        A good login of an untracked name forgets nothing: the shared count
        is also the other names'.
        """
        cap = AuthThrottle.MAX_NAMES_PER_ADDRESS
        for i in range(cap + 3):
            self.throttle.failed(ADDRESS, f"user{i}")
        self.throttle.succeeded(ADDRESS, f"user{cap + 1}")
        self.assertEqual(self.throttle._pairs[(None, ADDRESS)][0], 3)
        self.throttle.succeeded(ADDRESS, "user0")
        self.assertEqual(self.throttle.counters(), 1 + (cap - 1) + 1)
        # The freed place takes the next new name.
        self.throttle.failed(ADDRESS, "newcomer")
        self.assertIn(("newcomer", ADDRESS), self.throttle._pairs)

    def test_addressTableAtAndPastTheCap(self):
        """
        At C{MAX_ADDRESSES} every address is kept; one more pushes out the
        address whose last failure is the oldest, not the busiest.
        """
        self.patch(AuthThrottle, "MAX_ADDRESSES", 4)
        for i in range(4):
            self.throttle.failed(f"192.0.2.{i}", "acme")
            self.clock.now += 1
        self.throttle.failed("192.0.2.0", "acme")
        self.assertEqual(len(self.throttle._addresses), 4)
        self.throttle.failed("192.0.2.99", "acme")
        self.assertEqual(
            list(self.throttle._addresses),
            ["192.0.2.2", "192.0.2.3", "192.0.2.0", "192.0.2.99"],
        )

    def test_pairTableAtAndPastTheCap(self):
        self.patch(AuthThrottle, "MAX_PAIRS", 4)
        for i in range(4):
            self.throttle.failed(f"192.0.2.{i}", "acme")
        self.assertEqual(len(self.throttle._pairs), 4)
        self.throttle.failed("192.0.2.9", "acme")
        self.assertEqual(len(self.throttle._pairs), 4)
        self.assertNotIn(("acme", "192.0.2.0"), self.throttle._pairs)
        # Its address count stays: the address table is separate.
        self.assertEqual(self.throttle._addresses["192.0.2.0"][0], 1)
        self.assertEqual(
            self.throttle._names, {f"192.0.2.{i}": 1 for i in (1, 2, 3, 9)}
        )

    def test_expiryAtTheEdge(self):
        """
        A counter is kept C{forget} seconds after its last failure and
        dropped just after, by the next call, whatever else is in the table.
        """
        self.throttle.failed(ADDRESS, "acme")
        self.clock.now += 450
        self.throttle.failed("192.0.2.1", "acme")
        self.clock.now += 450
        self.assertEqual(self.throttle.delay(ADDRESS, "acme"), 0.5)
        self.assertEqual(self.throttle.counters(), 4)
        self.clock.now += 0.5
        self.assertEqual(self.throttle.delay(ADDRESS, "acme"), 0)
        self.assertEqual(self.throttle.counters(), 2)
        self.assertEqual(self.throttle._names, {"192.0.2.1": 1})

    def test_longNamesKeptAsDigests(self):
        """
        A name longer than 64 characters costs a digest's memory, and still
        counts on its own.
        """
        name = "x" * 10_000
        self.throttle.failed(ADDRESS, name)
        self.throttle.failed(ADDRESS, name)
        [key] = self.throttle._pairs
        self.assertEqual(len(key[0]), len("sha256:") + 64)
        self.assertEqual(self.throttle.delay(ADDRESS, name), 1.0)
        self.throttle.succeeded(ADDRESS, name)
        self.assertEqual(self.throttle.counters(), 1)


class RateLimiterBucketTests(unittest.TestCase):
    """
    L{RateLimiter} counts per second: what that costs and how it rounds.
    """

    def setUp(self):
        self.clock = FakeTime()
        self.limiter = RateLimiter(self.clock)

    def test_oneBucketPerSecond(self):
        """
        A thousand messages in one second are one bucket; the next second
        another.
        """
        for _ in range(1000):
            self.limiter.record("acme")
        self.clock.now += 1
        self.limiter.record("acme")
        sent = self.limiter._sent["acme"]
        self.assertEqual(list(sent.recent), [[1000, 1000], [1001, 1]])
        rules = AccountRules(messagesPerDay=1001)
        error = self.assertRaises(SMTPReply, self.limiter.check, "acme", rules)
        # The first thousand (second 1000) leave the day at 87400.
        self.assertIn("try again in 86400 seconds", error.text)

    def test_fractionalTimeCountsFromItsNextSecond(self):
        """
        A message at 10.2 counts until 70 is past (exact: until 70.2), and
        not a moment longer than a second beyond its window.
        """
        self.clock.now = 10.2
        self.limiter.record("acme")
        rules = AccountRules(messagesPerMinute=1)
        self.clock.now = 70.5
        error = self.assertRaises(SMTPReply, self.limiter.check, "acme", rules)
        self.assertIn("try again in 1 seconds", error.text)
        self.clock.now = 71
        self.limiter.check("acme", rules)

    def test_retryAfterALoweredLimit(self):
        """
        Five messages a second apart, then the limit becomes 2 per minute:
        a slot frees up when the fourth oldest leaves the minute, as with
        the exact list of send times.
        """
        for _ in range(5):
            self.limiter.record("acme")
            self.clock.now += 1
        rules = AccountRules(messagesPerMinute=2)
        error = self.assertRaises(SMTPReply, self.limiter.check, "acme", rules)
        # Sent at 1000..1004, now 1005: the fourth (1003) leaves at 1063.
        self.assertIn("try again in 59 seconds", error.text)

    def test_heldSlotsPastTheLimit(self):
        """
        With more slots held than the limit, the retry time is a full window.
        """
        self.limiter.record("acme")
        for _ in range(3):
            self.limiter.reserve("acme", AccountRules())
        rules = AccountRules(messagesPerMinute=2)
        error = self.assertRaises(SMTPReply, self.limiter.check, "acme", rules)
        self.assertIn("try again in 61 seconds", error.text)

    def test_idleAccountsForgotten(self):
        """
        An account whose last message left the day is dropped at the next
        message of any account: the table holds the accounts of one day.
        """
        self.limiter.record("acme")
        self.clock.now += 86399
        self.limiter.record("other")
        self.assertEqual(self.limiter.accounts(), 2)
        self.clock.now += 1
        self.limiter.record("other")
        self.assertEqual(self.limiter.accounts(), 1)
        self.assertNotIn("acme", self.limiter._sent)

    def test_nothingKeptWithoutLimits(self):
        """
        The messages of an account without rates are not kept at all.
        """
        for _ in range(1000):
            self.limiter.reserve("acme", AccountRules()).commit()
            self.clock.now += 0.5
        self.assertEqual(self.limiter.accounts(), 0)

    def test_aMinuteKeptWithAPerMinuteLimit(self):
        """
        With only C{messagesPerMinute}, a minute of sends is kept, not a
        day; a per-day limit added later counts from what is kept.
        """
        rules = AccountRules(messagesPerMinute=1000)
        for _ in range(300):
            self.limiter.reserve("acme", rules).commit()
            self.clock.now += 1
        sent = self.limiter._sent["acme"]
        sent.advance(self.clock())
        self.assertEqual((len(sent.recent), len(sent.older)), (59, 0))
        daily = AccountRules(messagesPerMinute=1000, messagesPerDay=60)
        self.limiter.reserve("acme", daily).commit()
        error = self.assertRaises(SMTPReply, self.limiter.reserve, "acme", daily)
        self.assertIn("60 messages per day", error.text)

    def test_dayOfSendsIsBounded(self):
        """
        A message every second for two days leaves one day of buckets.
        """
        for _ in range(2 * 86400):
            self.limiter.record("acme")
            self.clock.now += 1
        sent = self.limiter._sent["acme"]
        sent.advance(self.clock())
        self.assertEqual(len(sent.recent) + len(sent.older), 86399)
        self.assertEqual(sent.inWindow(86400), 86399)
        self.assertEqual(sent.inWindow(60), 59)


class ThrottleBoundsSocketTests(unittest.TestCase):
    """
    The assembled daemon, from its TOML file, over STARTTLS: one address
    sending failed logins with random names holds a bounded number of
    counters, every failure still gets its C{535 5.7.8}, its delay is that
    of all its failures, and the company's good login still passes.
    """

    @defer.inlineCallbacks
    def test_randomNamesOverStarttls(self):
        self.patch(AuthThrottle, "MAX_NAMES_PER_ADDRESS", 3)
        self.patch(AuthThrottle, "MAX_PAIRS", 5)
        msa = RunningMSA(
            self,
            server={
                "auth_delay_base": 0.001,
                "auth_delay_max": 0.01,
                "max_auth_failures": 2,
            },
        )
        throttle = throttleOf(msa.service)

        def sessions():
            replies = []
            for _ in range(10):
                client = RawSession(msa.starttlsPort, msa.clientContext())
                try:
                    client.secure()
                    for _ in range(2):
                        token = base64.b64encode(
                            b"\0" + randomName().encode() + b"\0wrong"
                        )
                        replies.append(client.command(b"AUTH PLAIN " + token))
                finally:
                    client.close()
            client = RawSession(msa.starttlsPort, msa.clientContext())
            try:
                client.secure()
                replies.append(client.login())
            finally:
                client.close()
            return replies

        replies = yield threads.deferToThread(sessions)
        self.assertEqual(
            replies[:20], [b"535 5.7.8 Authentication credentials invalid"] * 20
        )
        self.assertEqual(replies[20], b"235 2.7.0 Authentication successful")
        # One address, its three names of its own and the shared counter.
        self.assertEqual(throttle.counters(), 1 + 3 + 1)
        self.assertEqual(throttle._addresses["127.0.0.1"][0], 20)
        self.assertEqual(throttle.delay("127.0.0.1", randomName()), 0.01)
