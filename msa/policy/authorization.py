# -*- test-case-name: tests.test_authorization,tests.test_headerfrom -*-
"""
Authorization and abuse limits (R9, R10): what an account may do, read from
its entry in the accounts file, and the server-wide rules around it.

Per account (JSON keys in the account's entry, all optional unless said):
  - C{senders}: the envelope senders it may use: C{"ik@acme.nl"} for one
    address, C{"@acme.nl"} for a whole domain.  Without it no MAIL FROM is
    accepted: addresses are issued with the account (R9).
  - C{recipients}: narrows the server-wide recipients for this account.
  - C{requireHeaderFrom}: the header C{From:} and C{Sender:} must name only
    C{senders} too (L{msa.policy.headerfrom}).
  - C{maxMessageSize}, C{maxRecipients}: below the server's own limits.
  - C{messagesPerMinute}, C{messagesPerDay}, C{maxSessions}: rates.

Rates and failed-login counters are kept in memory, per MSA instance, by
the classes here; with C{[limits] backend = "redis"} every instance shares
them (L{msa.policy.redislimits}).
"""

import collections
import time
import unicodedata
from typing import Any

import attrs
from zope.interface import implementer

from msa.errors import SMTPReply
from msa.interfaces import (
    IAuthThrottle,
    IContentPolicy,
    IRateLimiter,
    IRateReservation,
)
from msa.policy.headerfrom import checkAuthorFields
from msa.policy.mailboxes import formatAddrSpec, splitAddrSpec

_INT_KEYS = (
    "maxMessageSize",
    "maxRecipients",
    "messagesPerMinute",
    "messagesPerDay",
    "maxSessions",
)
_LIST_KEYS = ("senders", "recipients")
_BOOL_KEYS = ("requireHeaderFrom",)
#: Keys handled elsewhere (client certificates) but stored beside these.
_OTHER_KEYS = ("requireClientCertificate", "certificates")
KNOWN_KEYS = frozenset(_INT_KEYS + _LIST_KEYS + _BOOL_KEYS + _OTHER_KEYS)


def _normalise(address: str) -> str:
    """
    The canonical form of an addr-spec, in lower case: C{"ik"@Acme.nl} and
    C{ik@acme.nl} are one mailbox (RFC 5322 3.4.1).  A UTF-8 address
    (SMTPUTF8) is compared after NFC normalisation, so that C{jos\u00e9} and
    C{jose\u0301} are one mailbox (RFC 6530 10.1); the address kept in the
    envelope stays as the client wrote it.
    """
    return _nfc(formatAddrSpec(*splitAddrSpec(address)).lower())


def _nfc(text: str) -> str:
    return text if text.isascii() else unicodedata.normalize("NFC", text)


@attrs.frozen
class AddressList:
    """
    Addresses and whole domains (written C{@domain}); matching ignores case.

    An address is split at its I{last} C{@}: a quoted local part may hold
    C{@} (C{"a@evil.nl"@acme.nl} is a mailbox of C{acme.nl}), a domain
    never does.
    """

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries) -> "AddressList":
        addresses, domains = set(), set()
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip() or "@" not in entry:
                raise ValueError(
                    f"{entry!r} is neither an address (user@domain) nor a "
                    "domain (@domain)"
                )
            entry = entry.strip()
            if entry.startswith("@"):
                domains.add(_nfc(entry[1:].lower()))
            else:
                addresses.add(_normalise(entry))
        return cls(frozenset(addresses), frozenset(domains))

    def matches(self, address: str) -> bool:
        """
        Whether the addr-spec C{address} (an envelope path, quoted local
        part as written) is one of these addresses or in one of these
        domains; never for a string without C{@}.
        """
        try:
            localPart, domain = splitAddrSpec(address)
        except ValueError:
            return False
        return self.matchesMailbox(localPart, domain)

    def matchesMailbox(self, localPart: str, domain: str) -> bool:
        """
        Whether the mailbox with this (unquoted) local part and domain is
        one of these addresses or in one of these domains.
        """
        return (
            _nfc(domain.lower()) in self.domains
            or _nfc(formatAddrSpec(localPart, domain).lower()) in self.addresses
        )

    def __bool__(self) -> bool:
        return bool(self.addresses or self.domains)


@attrs.frozen
class AccountRules:
    """
    The authorization fields of one account, validated.
    """

    senders: AddressList = AddressList()
    recipients: AddressList | None = None
    requireHeaderFrom: bool = False
    maxMessageSize: int | None = None
    maxRecipients: int | None = None
    messagesPerMinute: int | None = None
    messagesPerDay: int | None = None
    maxSessions: int | None = None

    @classmethod
    def fromExtra(cls, extra: dict) -> "AccountRules":
        """
        @param extra: the account's fields beyond its secrets.
        @raise ValueError: naming the key at fault.
        """
        values: dict[str, Any] = {}
        for key in _INT_KEYS:
            if key in extra:
                value = extra[key]
                if type(value) is not int or value < 1:
                    raise ValueError(f"key {key!r} must be a positive integer")
                values[key] = value
        for key in _BOOL_KEYS:
            if key in extra:
                if not isinstance(extra[key], bool):
                    raise ValueError(f"key {key!r} must be true or false")
                values[key] = extra[key]
        for key in _LIST_KEYS:
            if key in extra:
                if not isinstance(extra[key], list):
                    raise ValueError(f"key {key!r} must be a list")
                try:
                    values[key] = AddressList.parse(extra[key])
                except ValueError as e:
                    raise ValueError(f"key {key!r}: {e}") from None
        unknown = set(extra) - KNOWN_KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**values)


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


@implementer(IRateLimiter)
class RateLimiter:
    """
    Messages per minute and per day for each account, over sliding windows.

    A slot is reserved at MAIL (L{reserve}: the check and the count in one
    step, so that concurrent sessions of one account cannot all pass the
    check before any of them is counted) and then either committed with the
    message or released when the transaction ends without one.
    """

    WINDOWS = (("messagesPerMinute", 60, "minute"), ("messagesPerDay", 86400, "day"))

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self._sent: dict[str, collections.deque] = {}
        self._held: dict[str, int] = {}

    def check(self, account: str, rules: AccountRules) -> None:
        """
        @raise SMTPReply: 451 4.7.1 saying when to retry, past a limit.
            Reserved slots count as messages sent now.
        """
        now = self.clock()
        sent = self._sent.get(account, ())
        held = self._held.get(account, 0)
        if not sent and not held:
            return
        for key, window, name in self.WINDOWS:
            limit = getattr(rules, key)
            if limit is None:
                continue
            inWindow = [t for t in sent if t > now - window] + [now] * held
            if len(inWindow) >= limit:
                retry = int(inWindow[-limit] + window - now) + 1
                raise rateLimitReply(limit, name, retry)

    def reserve(self, account: str, rules: AccountRules) -> "RateReservation":
        """
        Check and hold one message slot of C{account}, atomically (the
        reactor runs one call at a time).

        @raise SMTPReply: as L{check}; nothing is held then.
        """
        self.check(account, rules)
        self._held[account] = self._held.get(account, 0) + 1
        return RateReservation(self, account)

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

    def record(self, account: str) -> None:
        now = self.clock()
        sent = self._sent.setdefault(account, collections.deque())
        sent.append(now)
        while sent and sent[0] <= now - 86400:
            sent.popleft()


@implementer(IRateReservation)
class RateReservation:
    """
    One message slot held by L{RateLimiter.reserve}: L{commit} counts it as
    a message sent, L{release} gives it back.  Only the first of the two
    calls has an effect, so every path that ends a transaction may call them.
    """

    def __init__(self, limiter: RateLimiter, account: str) -> None:
        self._limiter = limiter
        self.account = account
        self.settled = False

    def commit(self) -> None:
        """
        The message is queued: it counts against the account's rates.
        """
        if not self.settled:
            self.settled = True
            self._limiter._unhold(self.account)
            self._limiter.record(self.account)

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


@implementer(IAuthThrottle)
class AuthThrottle:
    """
    Escalating delay before a failed login's 535, counted per client address
    and per (account, client address).  There is no lockout: a third party
    guessing a company's password slows down only its own address, never the
    company's own logins from elsewhere.

    @ivar base: delay after the first failure; doubles with each further one.
    @ivar maximum: the longest delay.
    @ivar forget: seconds after the last failure when the count is forgotten.
    """

    #: Doublings counted at most: far past any configured maximum, and far
    #: below where the delay would overflow a float.
    MAX_EXPONENT = 64

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
        self._failures: dict[tuple, tuple[int, float]] = {}

    def _count(self, key: tuple) -> int:
        count, last = self._failures.get(key, (0, 0.0))
        if self.clock() - last > self.forget:
            self._failures.pop(key, None)
            return 0
        return count

    def delay(self, clientAddress: str, account: str) -> float:
        """
        How long to wait before answering a failed login now.
        """
        return failedLoginDelay(
            self.base,
            self.maximum,
            self._count(("ip", clientAddress)),
            self._count(("account", account, clientAddress)),
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

    def failed(self, clientAddress: str, account: str) -> None:
        now = self.clock()
        for key in (("ip", clientAddress), ("account", account, clientAddress)):
            self._failures[key] = (self._count(key) + 1, now)
        if len(self._failures) > 100000:
            self._expire()

    def succeeded(self, clientAddress: str, account: str) -> None:
        self._failures.pop(("account", account, clientAddress), None)

    def _expire(self) -> None:
        now = self.clock()
        for key, (_, last) in list(self._failures.items()):
            if now - last > self.forget:
                del self._failures[key]


@implementer(IContentPolicy)
class HeaderFromPolicy:
    """
    For an account with C{requireHeaderFrom}: every mailbox in the header
    C{From:} and C{Sender:} must be one of the account's senders too (R9),
    read unambiguously (L{msa.policy.headerfrom}).
    """

    def __init__(self, senders: AddressList) -> None:
        self.senders = senders

    def startMessage(self, envelope) -> "_HeaderFromChecker":
        utf8 = envelope is not None and "SMTPUTF8" in envelope.mailParams
        return _HeaderFromChecker(self.senders, utf8)


class _HeaderFromChecker:
    def __init__(self, senders: AddressList, utf8: bool = False) -> None:
        self.senders = senders
        #: The message came with SMTPUTF8: UTF-8 addresses are read.
        self.utf8 = utf8

    def headersReceived(self, headers) -> None:
        checkAuthorFields(headers, self.senders, self.utf8)

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> None:
        pass


@attrs.define
class ServerRules:
    """
    The server-wide side of authorization.

    @ivar recipients: the recipients the MSA accepts at all (it is a gateway
        into Digipoort, not a relay); L{None} accepts any.
    """

    recipients: AddressList | None = None
    rates: IRateLimiter = attrs.Factory(RateLimiter)
    throttle: IAuthThrottle = attrs.Factory(AuthThrottle)
