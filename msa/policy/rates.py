# -*- test-case-name: tests.test_limits,tests.test_limits_bounds -*-
"""
Messages per minute and per day of each account, in memory (R10): the
L{RateLimiter} of one MSA instance, checked at every MAIL on the reactor
thread, so each check costs O(1) amortised and its memory is bounded by
what the account's limits need (issue 20 item 3, issue 18 defect 15).
Part of L{msa.policy.limits}, which names it.
"""

import collections
import time
from typing import TYPE_CHECKING

from zope.interface import implementer

from msa.errors import SMTPReply
from msa.interfaces import IRateLimiter, IRateReservation

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
        windows = (
            (rules.messagesPerMinute, MINUTE, "minute"),
            (rules.messagesPerDay, DAY, "day"),
        )
        for limit, window, name in windows:
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
class UnlimitedReservation:
    """
    The reservation of an account without rates: nothing to count, and no
    limiter asked (L{RateLimiter.record} would not count it either).
    """

    def __init__(self, account: str) -> None:
        self.account = account

    def commit(self) -> None:
        pass

    def release(self) -> None:
        pass


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
