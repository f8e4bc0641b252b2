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
in Redis; the limiters that run them are in L{msa.policy.redislimiters},
this module keeps the connection and what lives beyond one call:

  - rates: sliding windows, exact like the memory limiter's.  Per account a
    sorted set of sent messages (score: the time in milliseconds) and one of
    held slots (score: when the hold lapses).  C{RESERVE} drops what left
    the windows, counts sent plus held in the minute and in the day, and
    either refuses with the seconds until a slot frees up or adds the hold,
    all in one step.  C{COMMIT} turns the hold into a sent message (the same
    member, so a repeated commit counts once); a release removes the hold.
  - holds and sessions lapse unless refreshed: their instance re-scores the
    live ones every C{lease / 3} seconds (L{REFRESH}), so the slots of a
    crashed instance come back after C{lease} seconds.
  - sessions: per account a sorted set of live sessions (score: lapse
    time); C{ACQUIRE} refuses past C{maxSessions}.
  - failed logins: C{FAILED} reads and increments both counters and sets
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

from msa.errors import LimitsUnavailable
from msa.policy.authorization import (
    AuthThrottle,
    RateLimiter,
)
from msa.policy.redisclient import RedisAddress, RedisConnection
from msa.policy.redislimiters import (
    RedisAuthThrottle,
    RedisRateLimiter,
    RedisSessionLimiter,
)

log = Logger()

#: KEYS: the sorted sets of live holds and sessions.  ARGV: lapse at (ms),
#: key TTL (s), then the member of each key, in order.
REFRESH = """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[i + 2])
  redis.call('EXPIRE', key, ARGV[2])
end
return #KEYS
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

    def describe(self) -> str:
        """
        Where the limits are kept, for C{/health}.
        """
        return f"Redis at {self.connection.address.describe()}"

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
