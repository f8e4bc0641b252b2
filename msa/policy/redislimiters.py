# -*- test-case-name: tests.test_limits_redis,tests.test_multiinstance -*-
"""
The three shared limiters over one instance's L{RedisLimits} (its
connection, live holds and sessions, retried updates): the rates
(L{RedisRateLimiter} and its L{RedisReservation}s), the failed logins
(L{RedisAuthThrottle}) and the concurrent sessions
(L{RedisSessionLimiter}), each counting with a Lua script of its own.  What
they count and what happens when Redis cannot be reached:
L{msa.policy.redislimits}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from msa.errors import LimitsUnavailable, SMTPReply
from msa.interfaces import (
    IAuthThrottle,
    IRateLimiter,
    IRateReservation,
    ISessionLimiter,
)
from msa.policy.authorization import (
    AccountRules,
    AuthThrottle,
    RateLimiter,
    failedLoginDelay,
    rateLimitReply,
)
from msa.policy.rates import UnlimitedReservation

if TYPE_CHECKING:
    from msa.policy.redislimits import RedisLimits

#: The reply at MAIL when the rates cannot be checked.
RATES_UNAVAILABLE = SMTPReply(
    451, "4.3.0", "Rate limits cannot be checked now; try again later"
)

#: Sent messages are kept for a day; their key a little longer.
SENT_TTL = 86400 + 3600

#: KEYS: sent, held.  ARGV: now (ms), hold id, hold lapses at (ms),
#: messages per minute, per day (0: none), held key TTL (s).
#: Returns {1, 0, 0} when held, {0, window (1 minute, 2 day), retry (s)}.
RESERVE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('ZCARD', KEYS[2])
local windows = {{tonumber(ARGV[4]), 60000}, {tonumber(ARGV[5]), 86400000}}
for i, w in ipairs(windows) do
  local limit, span = w[1], w[2]
  if limit > 0 then
    local since = '(' .. (now - span)
    local sent = redis.call('ZCOUNT', KEYS[1], since, '+inf')
    if sent + held >= limit then
      local t = now
      local index = sent + held - limit
      if index < sent then
        local at = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf',
                              'WITHSCORES', 'LIMIT', index, 1)
        t = tonumber(at[2])
      end
      return {0, i, math.floor((t + span - now) / 1000) + 1}
    end
  end
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, 0, 0}
"""

#: KEYS: sent, held.  ARGV: sent at (ms), hold id, sent key TTL (s).
COMMIT = """
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: KEYS: the account's sessions.  ARGV: now (ms), member, lapse at (ms),
#: maximum, key TTL (s).  Returns 1 when counted, 0 when full.
ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

#: KEYS: the address's failures, the (account, address)'s failures.
#: ARGV: forget (ms).  Returns both counts before this failure.
FAILED = """
local before = {}
for i, key in ipairs(KEYS) do
  before[i] = tonumber(redis.call('GET', key) or '0')
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, ARGV[1])
end
return before
"""


@implementer(IRateReservation)
class RedisReservation:
    """
    A slot held in Redis by L{RedisRateLimiter.reserve}.
    """

    def __init__(self, limits: RedisLimits, account: str, holdId: str) -> None:
        self._limits = limits
        self.account = account
        self.holdId = holdId
        self.settled = False

    def _keys(self) -> list[str]:
        return [
            self._limits.key("rate", "sent", self.account),
            self._limits.key("rate", "held", self.account),
        ]

    def commit(self) -> None:
        if self.settled:
            return
        self.settled = True
        limits, keys, sentAt = self._limits, self._keys(), self._limits.now()

        def update() -> defer.Deferred:
            # Until Redis has taken the commit, the hold stays alive.
            limits.forget(keys[1], self.holdId)
            d = limits.connection.eval(COMMIT, keys, [sentAt, self.holdId, SENT_TTL])

            def failed(failure: Failure) -> Failure:
                limits.keepAlive(keys[1], self.holdId)
                return failure

            return d.addErrback(failed)

        limits.settle(self.holdId, update, needed=True)

    def release(self) -> None:
        if self.settled:
            return
        self.settled = True
        self._limits.rates.dropHold(self.account, self.holdId)


@implementer(IRateLimiter)
class RedisRateLimiter:
    """
    Messages per minute and per day, shared through Redis (see the module
    docstring).  An account without C{messagesPerMinute} or
    C{messagesPerDay} costs no Redis call.

    @ivar local: the memory limiter used while Redis is unreachable
        (C{fallback = "local"}), or L{None} to refuse then.
    """

    WINDOWS = {1: "minute", 2: "day"}

    def __init__(self, limits: RedisLimits, local: RateLimiter | None) -> None:
        self.limits = limits
        self.local = local

    def reserve(self, account: str, rules: AccountRules) -> defer.Deferred:
        perMinute = rules.messagesPerMinute or 0
        perDay = rules.messagesPerDay or 0
        if not (perMinute or perDay):
            return defer.succeed(UnlimitedReservation(account))
        limits = self.limits
        holdId = limits.newId()
        now = limits.now()
        keys = [
            limits.key("rate", "sent", account),
            limits.key("rate", "held", account),
        ]
        d = limits.connection.eval(
            RESERVE,
            keys,
            [
                now,
                holdId,
                now + int(limits.lease * 1000),
                perMinute,
                perDay,
                int(limits.lease * 2) + 1,
            ],
        )

        def answered(result: list) -> RedisReservation:
            held, window, retry = (int(x) for x in result)
            if not held:
                name = self.WINDOWS[window]
                limit = perMinute if window == 1 else perDay
                raise rateLimitReply(limit, name, retry)
            limits.keepAlive(keys[1], holdId)
            return RedisReservation(limits, account, holdId)

        def unavailable(failure: Failure):
            failure.trap(LimitsUnavailable)
            # Redis may have made the hold before the reply was lost.
            self.dropHold(account, holdId)
            if self.local is not None:
                return self.local.reserve(account, rules)
            raise RATES_UNAVAILABLE

        return d.addCallbacks(answered, unavailable)

    def dropHold(self, account: str, holdId: str) -> None:
        limits = self.limits
        key = limits.key("rate", "held", account)
        limits.forget(key, holdId)
        limits.settle(holdId, lambda: limits.connection.call("zrem", key, holdId))

    def record(self, account: str) -> None:
        # Only for MAIL judged by an embedder's protocol, which knows no
        # reservation: counted as a commit of a hold that was never made.
        RedisReservation(self.limits, account, self.limits.newId()).commit()


@implementer(IAuthThrottle)
class RedisAuthThrottle:
    """
    The failed-login delay, counted in Redis per client address and per
    (account, client address), with the delays of C{throttle}.

    @ivar local: the memory throttle used while Redis is unreachable
        (C{fallback = "local"}), or L{None}: then L{LimitsUnavailable}.
    """

    def __init__(
        self, limits: RedisLimits, throttle: AuthThrottle, local: AuthThrottle | None
    ) -> None:
        self.limits = limits
        self.base = throttle.base
        self.maximum = throttle.maximum
        self.forget = throttle.forget
        self.local = local

    def keys(self, clientAddress: str, account: str) -> list[str]:
        """
        The counters of the address and of (account, address).
        """
        return [
            self.limits.key("authfail", "address", clientAddress),
            self.limits.key("authfail", "account", account, clientAddress),
        ]

    def failedLogin(self, clientAddress: str, account: str) -> defer.Deferred:
        d = self.limits.connection.eval(
            FAILED, self.keys(clientAddress, account), [int(self.forget * 1000)]
        )

        def answered(counts: list) -> float:
            address, pair = (int(c) for c in counts)
            return failedLoginDelay(self.base, self.maximum, address, pair)

        def unavailable(failure: Failure) -> float | Failure:
            failure.trap(LimitsUnavailable)
            if self.local is None:
                return failure
            return self.local.failedLogin(clientAddress, account)

        return d.addCallbacks(answered, unavailable)

    def succeededLogin(self, clientAddress: str, account: str) -> defer.Deferred:
        d = self.limits.connection.call("delete", self.keys(clientAddress, account)[1])

        def unavailable(failure: Failure) -> Failure | None:
            failure.trap(LimitsUnavailable)
            if self.local is None:
                return failure
            self.local.succeededLogin(clientAddress, account)
            return None

        return d.addCallbacks(lambda _: None, unavailable)


@implementer(ISessionLimiter)
class RedisSessionLimiter:
    """
    Concurrent sessions per account, counted in Redis.

    @ivar local: the instance's own count (an L{ISessionLimiter} on the
        session registry) used while Redis is unreachable with C{fallback
        = "local"}; set by the service that has the registry.
    """

    local: ISessionLimiter | None = None

    def __init__(self, limits: RedisLimits) -> None:
        self.limits = limits
        self._members: dict[tuple[str, str], str] = {}

    def acquire(self, account: str, maximum: int, sessionId: str) -> defer.Deferred:
        limits = self.limits
        key = limits.key("sessions", account)
        member = f"{limits.instance}:{sessionId}"
        now = limits.now()
        d = limits.connection.eval(
            ACQUIRE,
            [key],
            [
                now,
                member,
                now + int(limits.lease * 1000),
                maximum,
                int(limits.lease * 2) + 1,
            ],
        )

        def answered(result: object) -> bool:
            if int(result):  # type: ignore[call-overload]
                limits.keepAlive(key, member)
                self._members[(account, sessionId)] = member
                return True
            return False

        def unavailable(failure: Failure):
            failure.trap(LimitsUnavailable)
            # Redis may have counted the session before the reply was lost.
            limits.settle(member, lambda: limits.connection.call("zrem", key, member))
            if self.local is None:
                return failure
            return self.local.acquire(account, maximum, sessionId)

        return d.addCallbacks(answered, unavailable)

    def release(self, account: str, sessionId: str) -> None:
        member = self._members.pop((account, sessionId), None)
        if member is None:
            if self.local is not None:
                self.local.release(account, sessionId)
            return
        limits = self.limits
        key = limits.key("sessions", account)
        limits.forget(key, member)
        limits.settle(member, lambda: limits.connection.call("zrem", key, member))
