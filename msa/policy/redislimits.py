# -*- test-case-name: tests.test_limits_redis,tests.test_multiinstance -*-
"""
Limits shared by every MSA instance, in Redis (C{[limits] backend =
"redis"}): the messages per minute and per day of each account, its
concurrent sessions, and the failed-login counts per client address and per
(account, client address).  With the default C{backend = "memory"} each
instance keeps its own (L{msa.policy.authorization}), and two instances let
an account send twice its limit.

The client is txredisapi: Twisted-native (its calls return L{Deferred}s on
the reactor, no thread and no asyncio reactor, which redis-py would need),
maintained, and it keeps one connection open and reconnects with backoff.
One connection, so that Redis executes each instance's commands in the order
they were sent (a commit before the next MAIL's reservation).

Counting is done by Lua scripts (EVAL once, then EVALSHA), each one atomic
in Redis:

  - rates: sliding windows, exact like the memory limiter's.  Per account a
    sorted set of sent messages (score: the time in milliseconds) and one of
    held slots (score: when the hold lapses).  L{RESERVE} drops what left
    the windows, counts sent plus held in the minute and in the day, and
    either refuses with the seconds until a slot frees up or adds the hold,
    all in one step.  L{COMMIT} turns the hold into a sent message (the same
    member, so a repeated commit counts once); a release removes the hold.
  - holds and sessions lapse unless refreshed: their instance re-scores the
    live ones every C{lease / 3} seconds (L{REFRESH}), so the slots of a
    crashed instance come back after C{lease} seconds.
  - sessions: per account a sorted set of live sessions (score: lapse
    time); L{ACQUIRE} refuses past C{maxSessions}.
  - failed logins: L{FAILED} reads and increments both counters and sets
    their expiry to C{forget} (the memory throttle's rule: forgotten that
    long after the last failure).

Times are the instances' clocks (milliseconds), which must agree (NTP), as
for any service spread over hosts.

When Redis cannot be reached (refused, timed out after C{timeout}, the
connection dropped before the reply): nothing is assumed.  MAIL gets C{451
4.3.0} and AUTH C{454 4.7.0}; a hold that Redis may have made is released
as soon as it can be.  A commit that did not get through is retried until
it does (the message was queued and counts), and meanwhile its hold stays
alive.  The log says so once at critical level (and when Redis is back), and
C{/health} answers 503.  With C{fallback = "local"} the instance counts in
memory meanwhile, which is weaker: each instance then allows the whole limit.
"""

import hashlib
import itertools
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
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
from msa.policy.redisclient import RedisAddress, RedisConnection

log = Logger()

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

#: KEYS: the sorted sets of live holds and sessions.  ARGV: lapse at (ms),
#: key TTL (s), then the member of each key, in order.
REFRESH = """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[i + 2])
  redis.call('EXPIRE', key, ARGV[2])
end
return #KEYS
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


_ids = itertools.count()


def _key(name: str) -> str:
    """
    A name (an account, a client address) as part of a key: as it is when
    short and printable, else its SHA-256, so that a client cannot make
    long keys.
    """
    if len(name) <= 64 and name.isprintable():
        return name
    return "sha256:" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()


class RedisLimits(service.Service):
    """
    The shared limits of one instance: its connection to Redis, the holds
    and sessions it keeps alive, the updates it retries, and the three
    limiters (L{rates}, L{throttle}, L{sessions}).

    @ivar prefix: the start of every key (C{[limits] key_prefix}), so that
        several MSA deployments may share one Redis.
    @ivar lease: seconds a hold or session lives in Redis without being
        refreshed by its instance.
    @ivar instance: this process's part of hold and session ids.
    @param contextFactory: the TLS client options for a C{rediss://}
        address, or L{None}.
    """

    def __init__(
        self,
        address: RedisAddress,
        prefix: str = "digipoort-msa:",
        timeout: float = 1.0,
        lease: float = 60.0,
        throttle: AuthThrottle | None = None,
        local: bool = False,
        reactor=None,
        clock: Callable[[], float] = time.time,
        contextFactory: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.prefix = prefix
        self.lease = lease
        self.clock = clock
        self.fallback = "local" if local else "refuse"
        self.instance = f"{os.getpid()}-{secrets.token_hex(4)}"
        consequence = (
            "until it answers this instance counts the limits on its own "
            "(fallback = local), so each instance allows the whole of each limit"
            if local
            else "until it answers MAIL gets 451 4.3.0 and AUTH 454 4.7.0 "
            "(fallback = refuse)"
        )
        self.connection = RedisConnection(
            address, timeout, reactor, consequence, contextFactory
        )
        #: key -> member -> True: the holds and sessions kept alive here.
        self._live: dict[tuple[str, str], bool] = {}
        #: id -> update to retry (commits, releases) until Redis takes it.
        self._retry: dict[str, Callable[[], defer.Deferred]] = {}
        self._needed: dict[str, bool] = {}
        #: The updates sent and not yet answered, which a stop waits for.
        self._inFlight: set[defer.Deferred] = set()
        self._loop: task.LoopingCall | None = None
        base = throttle if throttle is not None else AuthThrottle()
        self.rates = RedisRateLimiter(self, RateLimiter(clock) if local else None)
        self.throttle = RedisAuthThrottle(self, base, base if local else None)
        self.sessions = RedisSessionLimiter(self)

    # -- keys and time ------------------------------------------------

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(_key(part) for part in parts)

    def now(self) -> int:
        """
        The time in milliseconds, for scores.
        """
        return int(self.clock() * 1000)

    def newId(self) -> str:
        return f"{self.instance}:{next(_ids)}"

    # -- service ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.connection.connect()
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.lease / 3, now=False).addErrback(
            lambda f: log.failure("limits: refresh stopped", f)
        )

    def stopService(self):
        """
        Stop refreshing, let the updates already sent (the commits of the
        messages accepted last) get their answer, each within its
        deadline, then disconnect.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        pending = defer.DeferredList(list(self._inFlight), consumeErrors=True)
        return pending.addCallback(lambda _: self.connection.disconnect())

    # -- health -------------------------------------------------------

    def healthProblem(self) -> str | None:
        """
        Why C{/health} answers 503, or L{None}.
        """
        since = self.connection.unavailableSince
        if since is None:
            return None
        seconds = int(self.reactor.seconds() - since)
        return (
            f"limits store (Redis at {self.connection.address.describe()}) "
            f"unreachable for {seconds}s: {self.connection.lastError}; "
            f"fallback = {self.fallback}"
        )

    # -- live entries and retries -------------------------------------

    def keepAlive(self, key: str, member: str) -> None:
        self._live[(key, member)] = True

    def forget(self, key: str, member: str) -> None:
        self._live.pop((key, member), None)

    #: Releases waiting for Redis beyond this many are not retried: what
    #: they release lapses after C{lease} seconds anyway.  Commits always are.
    MAX_RETRIES = 10000

    def settle(
        self, ident: str, update: Callable[[], defer.Deferred], needed: bool = False
    ) -> None:
        """
        Send an update (a commit, a release); if Redis does not take it, it
        is retried at each refresh until it does.

        @param needed: the update must get through (a commit: the message
            was queued and counts), however many wait.
        """
        self._retry.pop(ident, None)
        d = update()
        self._inFlight.add(d)

        def answered(result: object) -> object:
            self._inFlight.discard(d)
            return result

        d.addBoth(answered)

        def failed(failure: Failure) -> None:
            failure.trap(LimitsUnavailable)
            if needed or len(self._retry) < self.MAX_RETRIES:
                self._retry[ident] = update
                self._needed[ident] = needed

        d.addErrback(failed)
        d.addErrback(lambda f: log.failure("limits: update failed", f))

    def refresh(self) -> defer.Deferred:
        """
        Every C{lease / 3} seconds: retry the updates Redis has not taken
        yet, then push back the lapse time of this instance's live holds and
        sessions (or ask Redis whether it is back, when there are none).
        """
        retries, self._retry = self._retry, {}
        needed, self._needed = self._needed, {}
        for ident, update in retries.items():
            self.settle(ident, update, needed.get(ident, False))
        live = list(self._live)
        if not live:
            d = self.connection.call("ping")
        else:
            lapse = self.now() + int(self.lease * 1000)
            ttl = int(self.lease * 2) + 1
            calls = []
            for start in range(0, len(live), 500):
                chunk = live[start : start + 500]
                calls.append(
                    self.connection.eval(
                        REFRESH,
                        [key for key, _ in chunk],
                        [lapse, ttl] + [member for _, member in chunk],
                    )
                )
            d = defer.gatherResults(calls, consumeErrors=True)
        # An outage is logged by the connection; the loop goes on.
        return d.addErrback(lambda _: None)


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


@implementer(IRateReservation)
class _Unlimited:
    """
    The reservation of an account without rates: nothing to count.
    """

    def __init__(self, account: str) -> None:
        self.account = account

    def commit(self) -> None:
        pass

    def release(self) -> None:
        pass


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
            return defer.succeed(_Unlimited(account))
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
