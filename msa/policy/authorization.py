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
L{msa.policy.limits}; with C{[limits] backend = "redis"} every instance shares
them (L{msa.policy.redislimits}).
"""

import unicodedata
from typing import Any

import attrs
from zope.interface import implementer

from msa.interfaces import IAuthThrottle, IContentPolicy, IRateLimiter
from msa.policy.headerfrom import checkAuthorFields

# The memory limiters live in msa.policy.limits; their names stay importable
# from here, where embedders and the Redis backend found them.
from msa.policy.limits import AuthThrottle as AuthThrottle
from msa.policy.limits import RateLimiter as RateLimiter
from msa.policy.limits import RateReservation as RateReservation
from msa.policy.limits import failedLoginDelay as failedLoginDelay
from msa.policy.limits import rateLimitReply as rateLimitReply
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
#: Keys handled elsewhere (client certificates; the mailbox of return
#: messages, L{msa.accounts.mailboxes}) but stored beside these.
_OTHER_KEYS = (
    "requireClientCertificate",
    "certificates",
    "mailboxes",
    "mailboxMaxBytes",
    "mailboxMaxMessages",
)
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
