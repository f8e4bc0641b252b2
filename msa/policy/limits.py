# -*- test-case-name: tests.test_limits,tests.test_limits_bounds -*-
"""
The in-memory abuse limits of one MSA instance (R10): messages per minute
and per day of each account (L{RateLimiter}), and the escalating delay
before a failed login's reply (L{AuthThrottle}).  With C{[limits] backend =
"redis"} every instance shares them instead (L{msa.policy.redislimits}),
and these serve as its C{fallback = "local"}.

Both run on the reactor thread at every MAIL and every failed login, and
both are fed by clients: each call costs O(1) amortised, and their memory is
bounded whatever the clients send (issue 18 defect 2, issue 20 item 3).
"""

import collections
import hashlib
import time
from typing import TYPE_CHECKING

from zope.interface import implementer

from msa.errors import SMTPReply
from msa.interfaces import IAuthThrottle, IRateLimiter, IRateReservation

if TYPE_CHECKING:
    from msa.policy.authorization import AccountRules


def rateLimitReply(limit: int, name: str, retry: int) -> SMTPReply:
    """
    The reply at MAIL past a rate: C{name} is C{"minute"} or C{"day"},
    C{retry} the seconds until a slot frees up.
    """
    return SMTPReply(
        451,
        "4.7.1",
        f"Rate limit of {limit} messages per {name} reached for this "
        f"account; try again in {retry} seconds",
    )


MINUTE = 60
DAY = 86400


class _SentMessages:
    """
    The messages one account sent in the last day, as counts per second:
    those of the last minute in L{recent}, older ones in L{older}, each a
    deque of C{[second, count]} oldest first, with running totals.

    A message sent at time M{t} is counted in second M{ceil(t)}: the window
    sees it from M{t} on, and for up to one second longer than M{t + window}
    (never shorter), so the limit is never exceeded over any window.  With
    whole-second times (as in the tests) that is exact.  Memory: at most one
    bucket per second of the day (86,400) for an account that sends every
    second, however many messages per second; and only as far back as the
    account's limits look (L{horizon}).

    @ivar horizon: the longest window with a limit: L{DAY}, or L{MINUTE}
        when the account has only a per-minute limit (then nothing older
        than a minute is kept).
    """

    __slots__ = ("recent", "older", "recentCount", "olderCount", "horizon")

    def __init__(self) -> None:
        self.horizon = DAY
        self.recent: collections.deque[list[int]] = collections.deque()
        self.older: collections.deque[list[int]] = collections.deque()
        self.recentCount = 0
        self.olderCount = 0

    def advance(self, now: float) -> None:
        """
        Move the buckets that left the minute to L{older}, and drop those
        that left the day: each bucket moves once, so O(1) amortised.
        """
        while self.recent and self.recent[0][0] <= now - MINUTE:
            bucket = self.recent.popleft()
            self.recentCount -= bucket[1]
            if self.horizon == DAY:
                self.older.append(bucket)
                self.olderCount += bucket[1]
        while self.older and self.older[0][0] <= now - DAY:
            self.olderCount -= self.older.popleft()[1]

    def add(self, now: float) -> None:
        second = -int(-now // 1)
        if self.recent and self.recent[-1][0] >= second:
            # Same second, or a clock that stepped back: the newest bucket.
            self.recent[-1][1] += 1
        else:
            self.recent.append([second, 1])
        self.recentCount += 1

    def inWindow(self, window: int) -> int:
        return self.recentCount + (self.olderCount if window == DAY else 0)

    def nthOldest(self, n: int, window: int) -> int:
        """
        The second of the M{n}-th oldest message in the window (1-based):
        found from the old end, where the refusal's retry time is, so that
        it costs O(1) when the count is at the limit (M{n} = 1).
        """
        parts = (self.older, self.recent) if window == DAY else (self.recent,)
        for part in parts:
            for second, count in part:
                n -= count
                if n <= 0:
                    return second
        raise IndexError(n)

    def __bool__(self) -> bool:
        return bool(self.recent or self.older)


def horizon(rules: "AccountRules") -> int:
    """
    How far back the limits of C{rules} look, in seconds: a day, a minute,
    or 0 without limits (then nothing needs counting).
    """
    if rules.messagesPerDay is not None:
        return DAY
    if rules.messagesPerMinute is not None:
        return MINUTE
    return 0


@implementer(IRateLimiter)
class RateLimiter:
    """
    Messages per minute and per day for each account, over sliding windows.

    A slot is reserved at MAIL (L{reserve}: the check and the count in one
    step, so that concurrent sessions of one account cannot all pass the
    check before any of them is counted) and then either committed with the
    message or released when the transaction ends without one.

    Each check and each message costs O(1) amortised: the account's sends
    are counted per second (L{_SentMessages}, which says how the windows
    are rounded), with running totals per window.  Only what the account's
    limits need is kept: nothing for an account without limits, a minute
    for one with only C{messagesPerMinute}.  So a limit added to an account
    (the accounts file reloaded) counts the messages from then on, and
    those of the last minute when only a per-minute limit was there before.
    An account idle for a day is forgotten.
    """

    WINDOWS = (("messagesPerMinute", MINUTE, "minute"), ("messagesPerDay", DAY, "day"))

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        #: account -> its sends; oldest activity first (see L{_forgetIdle}).
        self._sent: collections.OrderedDict[str, _SentMessages] = (
            collections.OrderedDict()
        )
        self._held: dict[str, int] = {}

    def check(self, account: str, rules: "AccountRules") -> None:
        """
        @raise SMTPReply: 451 4.7.1 saying when to retry, past a limit.
            Reserved slots count as messages sent now.
        """
        now = self.clock()
        sent = self._sent.get(account)
        held = self._held.get(account, 0)
        if sent is not None:
            sent.advance(now)
        if not sent and not held:
            return
        for key, window, name in self.WINDOWS:
            limit = getattr(rules, key)
            if limit is None:
                continue
            counted = (sent.inWindow(window) if sent else 0) + held
            if counted >= limit:
                # The message whose leaving frees a slot: the oldest one past
                # the limit; held slots count as sent now (the newest).
                excess = counted - limit + 1
                sentCount = counted - held
                at = now
                if sent and excess <= sentCount:
                    at = sent.nthOldest(excess, window)
                retry = int(at + window - now) + 1
                raise rateLimitReply(limit, name, retry)

    def reserve(self, account: str, rules: "AccountRules") -> "RateReservation":
        """
        Check and hold one message slot of C{account}, atomically (the
        reactor runs one call at a time).

        @raise SMTPReply: as L{check}; nothing is held then.
        """
        self.check(account, rules)
        self._held[account] = self._held.get(account, 0) + 1
        return RateReservation(self, account, horizon(rules))

    def held(self, account: str) -> int:
        """
        How many slots of C{account} are reserved and not yet settled.
        """
        return self._held.get(account, 0)

    def _unhold(self, account: str) -> None:
        left = self._held.get(account, 0) - 1
        if left > 0:
            self._held[account] = left
        else:
            self._held.pop(account, None)

    def record(self, account: str, horizon: int = DAY) -> None:
        """
        Count a message of C{account} sent now.

        @param horizon: how far back its limits look (L{horizon}); by
            default a day, for a message whose rules are not known.  With
            C{0} (no limits) it is not counted at all: an account given a
            limit later is counted from then on.
        """
        now = self.clock()
        sent = self._sent.pop(account, None)
        if sent is None:
            if not horizon:
                return
            sent = _SentMessages()
        if horizon:
            sent.horizon = horizon
            if horizon != DAY:
                sent.older.clear()
                sent.olderCount = 0
        # Re-inserted at the end: the table stays ordered by last activity.
        self._sent[account] = sent
        sent.advance(now)
        sent.add(now)
        self._forgetIdle(now)

    def _forgetIdle(self, now: float) -> None:
        """
        Drop the accounts whose last message left the day (from the front:
        the least recently active first).
        """
        while self._sent:
            account, sent = next(iter(self._sent.items()))
            sent.advance(now)
            if sent:
                return
            del self._sent[account]

    def accounts(self) -> int:
        """
        How many accounts have messages counted now.
        """
        return len(self._sent)


@implementer(IRateReservation)
class RateReservation:
    """
    One message slot held by L{RateLimiter.reserve}: L{commit} counts it as
    a message sent, L{release} gives it back.  Only the first of the two
    calls has an effect, so every path that ends a transaction may call them.
    """

    def __init__(self, limiter: RateLimiter, account: str, horizon: int = DAY) -> None:
        self._limiter = limiter
        self.account = account
        self.horizon = horizon
        self.settled = False

    def commit(self) -> None:
        """
        The message is queued: it counts against the account's rates.
        """
        if not self.settled:
            self.settled = True
            self._limiter._unhold(self.account)
            self._limiter.record(self.account, self.horizon)

    def release(self) -> None:
        """
        The transaction ended without a queued message.
        """
        if not self.settled:
            self.settled = True
            self._limiter._unhold(self.account)


def failedLoginDelay(
    base: float, maximum: float, addressFailures: int, accountFailures: int
) -> float:
    """
    The delay before answering a failed login, from the failures counted so
    far for the client address and for (account, client address): it
    doubles with each failure of the account from that address, and with
    every fourth of the address whatever the account.
    """
    count = max(addressFailures // 4, accountFailures)
    if count == 0:
        return 0.0
    # The exponent is capped: 2 ** 1024 no longer fits a float, and the
    # OverflowError would leave that AUTH without any reply.
    exponent = min(count - 1, AuthThrottle.MAX_EXPONENT)
    return min(maximum, base * 2.0**exponent)


def accountKey(account: str) -> str:
    """
    A client-chosen account name as a key: itself when short, else its
    SHA-256, so that no name holds more than 64 characters of memory.
    """
    if len(account) <= 64:
        return account
    return "sha256:" + hashlib.sha256(account.encode("utf-8", "replace")).hexdigest()


#: The key under which an address counts the failures of the names it tried
#: beyond L{AuthThrottle.MAX_NAMES_PER_ADDRESS}.  Not a string: no client
#: can choose it.
OTHER_NAMES = None


@implementer(IAuthThrottle)
class AuthThrottle:
    """
    Escalating delay before a failed login's 535, counted per client address
    and per (account, client address).  There is no lockout: a third party
    guessing a company's password slows down only its own address, never the
    company's own logins from elsewhere.

    Each failure costs O(1) amortised and memory is bounded, because the
    names are the client's choice (issue 18 defect 2):

      - Counters are kept in two tables, per address and per (account,
        address), each ordered by last failure: the forgotten ones are
        dropped from the front at each failure, each once.
      - One address holds at most L{MAX_NAMES_PER_ADDRESS} names of its
        own.  The failures of further names count together under one
        counter of the address (L{OTHER_NAMES}), and that shared count is
        their per-account count.  It is at least what each of those names
        would have counted alone, so random names never lower a delay:
        they raise the address's own count as before, and a name the
        address tries again after many others is slowed down at least as
        much as if it had been tracked.
      - Past L{MAX_ADDRESSES} addresses or L{MAX_PAIRS} (account, address)
        counters, the one with the oldest last failure goes.  The address
        table is separate, and only other addresses make it full: names
        from one address never push out its own count, nor any other
        address's.  Evicting an address needs L{MAX_ADDRESSES} other
        addresses failing after its last failure, within C{forget}; such a
        crowd of addresses gets the same low delays by spreading its
        guesses anyway (each address's first failures cost nothing), so
        eviction gives it nothing it did not have.  An account attacked
        from many addresses has no counter of its own to lose (a count per
        account would be a lockout of the company); each attacking address
        keeps its own per-address count, and one (account, address) pair
        loses its count only after L{MAX_PAIRS} newer pairs, as above.

    Memory: at most L{MAX_ADDRESSES} + L{MAX_PAIRS} counters of bounded size
    (names past 64 characters are kept as their SHA-256): about 50 MB at the
    defaults, whatever the clients send.

    @ivar base: delay after the first failure; doubles with each further one.
    @ivar maximum: the longest delay.
    @ivar forget: seconds after the last failure when the count is forgotten.
    """

    #: Doublings counted at most: far past any configured maximum, and far
    #: below where the delay would overflow a float.
    MAX_EXPONENT = 64
    #: Names of its own per client address (see the class docstring).
    MAX_NAMES_PER_ADDRESS = 16
    #: Client addresses counted at most.
    MAX_ADDRESSES = 100_000
    #: (account, address) counters kept at most.
    MAX_PAIRS = 100_000

    def __init__(
        self,
        base: float = 0.5,
        maximum: float = 16.0,
        forget: float = 900.0,
        clock=time.time,
    ) -> None:
        self.base = base
        self.maximum = maximum
        self.forget = forget
        self.clock = clock
        #: address -> [failures, last failure]; oldest last failure first.
        self._addresses: collections.OrderedDict[str, list] = collections.OrderedDict()
        #: (account key, address) -> [failures, last failure]; likewise.
        self._pairs: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        #: address -> how many names of its own it has in L{_pairs}.
        self._names: dict[str, int] = {}

    def _pairKey(self, clientAddress: str, account: str) -> tuple:
        """
        The key of (account, address) in L{_pairs}: the name's own, or the
        address's shared one when it has too many names already.
        """
        key = (accountKey(account), clientAddress)
        if key in self._pairs:
            return key
        if self._names.get(clientAddress, 0) >= self.MAX_NAMES_PER_ADDRESS:
            return (OTHER_NAMES, clientAddress)
        return key

    def _dropPair(self, key: tuple) -> None:
        del self._pairs[key]
        account, address = key
        if account is not OTHER_NAMES:
            left = self._names[address] - 1
            if left:
                self._names[address] = left
            else:
                del self._names[address]

    def _expire(self, now: float) -> None:
        """
        Drop the counters forgotten by now: each table's front.
        """
        addresses, pairs = self._addresses, self._pairs
        while addresses:
            address, (_, last) = next(iter(addresses.items()))
            if now - last <= self.forget:
                break
            del addresses[address]
        while pairs:
            key, (_, last) = next(iter(pairs.items()))
            if now - last <= self.forget:
                break
            self._dropPair(key)

    def _countIn(self, table, key, now: float) -> int:
        entry = table.get(key)
        if entry is None or now - entry[1] > self.forget:
            return 0
        return entry[0]

    def delay(self, clientAddress: str, account: str) -> float:
        """
        How long to wait before answering a failed login now.
        """
        now = self.clock()
        self._expire(now)
        return failedLoginDelay(
            self.base,
            self.maximum,
            self._countIn(self._addresses, clientAddress, now),
            self._countIn(self._pairs, self._pairKey(clientAddress, account), now),
        )

    def failedLogin(self, clientAddress: str, account: str) -> float:
        """
        L{IAuthThrottle}: the delay, then count the failure.
        """
        delay = self.delay(clientAddress, account)
        self.failed(clientAddress, account)
        return delay

    def succeededLogin(self, clientAddress: str, account: str) -> None:
        self.succeeded(clientAddress, account)

    def failed(self, clientAddress: str, account: str, failures: int = 1) -> None:
        """
        Count C{failures} failed logins of C{account} from C{clientAddress}
        now (more than one only to seed a count, as tests do).
        """
        now = self.clock()
        self._expire(now)
        self._bump(self._addresses, clientAddress, now, failures)
        key = self._pairKey(clientAddress, account)
        if key not in self._pairs and key[0] is not OTHER_NAMES:
            self._names[clientAddress] = self._names.get(clientAddress, 0) + 1
        self._bump(self._pairs, key, now, failures)
        while len(self._addresses) > self.MAX_ADDRESSES:
            self._addresses.popitem(last=False)
        while len(self._pairs) > self.MAX_PAIRS:
            self._dropPair(next(iter(self._pairs)))

    def _bump(
        self, table: collections.OrderedDict, key, now: float, failures: int
    ) -> None:
        """
        Count C{failures} more under C{key}, now its most recent.
        """
        entry = table.pop(key, None)
        if entry is None or now - entry[1] > self.forget:
            entry = [0, now]
        entry[0] += failures
        entry[1] = now
        table[key] = entry

    def succeeded(self, clientAddress: str, account: str) -> None:
        key = (accountKey(account), clientAddress)
        if key in self._pairs:
            self._dropPair(key)

    def counters(self) -> int:
        """
        How many counters are held now (for tests and the benchmark).
        """
        return len(self._addresses) + len(self._pairs)
