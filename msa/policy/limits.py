# -*- test-case-name: tests.test_limits,tests.test_limits_bounds -*-
"""
The in-memory abuse limits of one MSA instance (R10): messages per minute
and per day of each account (L{RateLimiter}, in L{msa.policy.rates}), and
the escalating delay before a failed login's reply (L{AuthThrottle}).  With
C{[limits] backend = "redis"} every instance shares them instead
(L{msa.policy.redislimits}), and these serve as its C{fallback = "local"}.

Both run on the reactor thread at every MAIL and every failed login, and
both are fed by clients: each call costs O(1) amortised, and their memory is
bounded whatever the clients send (issue 18 defect 2, issue 20 item 3).
"""

import collections
import hashlib
import time

from zope.interface import implementer

from msa.interfaces import IAuthThrottle
from msa.policy.rates import DAY as DAY
from msa.policy.rates import MINUTE as MINUTE
from msa.policy.rates import RateLimiter as RateLimiter
from msa.policy.rates import RateReservation as RateReservation
from msa.policy.rates import horizon as horizon
from msa.policy.rates import rateLimitReply as rateLimitReply


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
    (names past 64 characters are kept as their SHA-256): at the defaults
    about 75 MB whatever the clients send (measured: 63 MB traced for the
    200,000 counters of IPv6 addresses and 64-character names, plus the
    names themselves).

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
