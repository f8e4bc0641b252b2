# -*- test-case-name: tests.test_contentpolicies -*-
"""
The built-in content policies (R12) and L{loadPolicies}, which turns the
C{[[content.policy]]} tables of the configuration into a
L{msa.policy.content.ContentPolicyChain}:

  - C{headers} (L{HeaderPolicy}): a well-formed RFC 5322 header section
    with exactly one From and one Date and a Message-ID (each configurable);
  - C{mime-parts} (L{MimePartsPolicy}): the number, nesting and size of MIME
    parts, counted while the body streams by;
  - C{package.module:Class}: any importable class providing
    L{msa.interfaces.IContentPolicy}, called with the table's other keys.
"""

import email.policy
import email.utils
import importlib
import re

from zope.interface import implementer

from msa.interfaces import IContentPolicy
from msa.policy.content import (
    MAX_HEADER_FIELDS,
    MAX_HEADER_SIZE,
    ContentPolicyChain,
    Headers,
    _NullChecker,
    _refuse,
)
from msa.policy.mimeparts import MimePartsPolicy

#: RFC 5322 3.6: the fields that may occur at most once, canonical spelling.
_AT_MOST_ONCE = (
    "Date",
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Subject",
)

_MSG_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")


def _mailboxCount(value: str) -> int:
    """
    The number of mailboxes in an address-list field body, 0 when it cannot
    be parsed or has defects.
    """
    try:
        header = email.policy.default.header_factory("From", value)
        if header.defects:
            return 0
        return sum(1 for a in header.addresses if a.addr_spec and "@" in a.addr_spec)
    except Exception:
        return 0


@implementer(IContentPolicy)
class HeaderPolicy:
    """
    The header section must be well formed (RFC 5322 2.2) and hold the
    fields RFC 5322 3.6 requires: exactly one From and one Date (a valid
    date-time), a Message-ID (optional with C{requireMessageId=False}), and
    at most one of every field the RFC limits to one (Sender, Reply-To, To,
    Cc, Bcc, Message-ID, In-Reply-To, References, Subject).

    @param requireFrom: a From field is required (at most one is always
        the rule).
    @param requireDate: likewise for Date.
    @param requireMessageId: likewise for Message-ID.
    @param singleFrom: the From field must hold exactly one mailbox.  When
        L{False}, several are allowed, but then a Sender field is required
        (RFC 5322 3.6.2).
    """

    #: configuration key -> (keyword argument, type)
    options = {
        "require_from": ("requireFrom", bool),
        "require_date": ("requireDate", bool),
        "require_message_id": ("requireMessageId", bool),
        "single_from": ("singleFrom", bool),
    }

    def __init__(
        self,
        requireFrom: bool = True,
        requireDate: bool = True,
        requireMessageId: bool = True,
        singleFrom: bool = True,
    ) -> None:
        self.required = {
            "From": requireFrom,
            "Date": requireDate,
            "Message-ID": requireMessageId,
        }
        self.singleFrom = singleFrom

    def startMessage(self, envelope) -> "_HeaderChecker":
        return _HeaderChecker(self)


class _HeaderChecker(_NullChecker):
    def __init__(self, policy: HeaderPolicy) -> None:
        self.policy = policy

    def headersReceived(self, headers: Headers) -> None:
        if headers.error is not None:
            raise _refuse(f"malformed header section: {headers.error} (RFC 5322 2.2)")
        for name in _AT_MOST_ONCE:
            count = headers.count(name)
            if self.policy.required.get(name) and count != 1:
                raise _refuse(
                    f"exactly one {name}: header field is required (RFC 5322 3.6)"
                )
            if count > 1:
                raise _refuse(
                    f"at most one {name}: header field is allowed (RFC 5322 3.6)"
                )
        date = headers.get("Date")
        if date is not None:
            try:
                email.utils.parsedate_to_datetime(date)
            except Exception:
                raise _refuse(
                    "the Date: header field is not a valid date-time (RFC 5322 3.3)"
                )
        messageId = headers.get("Message-ID")
        if messageId is not None and not _MSG_ID.fullmatch(messageId):
            raise _refuse(
                "the Message-ID: header field is not a valid msg-id (RFC 5322 3.6.4)"
            )
        sender = headers.get("From")
        if sender is not None:
            mailboxes = _mailboxCount(sender)
            if self.policy.singleFrom and mailboxes != 1:
                raise _refuse("the From: header field must hold exactly one mailbox")
            if mailboxes == 0:
                raise _refuse(
                    "the From: header field is not a valid mailbox list "
                    "(RFC 5322 3.6.2)"
                )
            if mailboxes > 1 and "Sender" not in headers:
                raise _refuse(
                    "a Sender: header field is required when From: holds more "
                    "than one mailbox (RFC 5322 3.6.2)"
                )


#: The policies the configuration names without a module.
BUILTIN = {
    "headers": HeaderPolicy,
    "mime-parts": MimePartsPolicy,
}


def _import(name: str):
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(
            f"unknown content policy {name!r}: give a built-in name "
            f"({', '.join(BUILTIN)}) or module:Class"
        )
    try:
        obj = importlib.import_module(module)
    except Exception as e:
        raise ValueError(f"content policy {name!r}: cannot import {module}: {e}")
    try:
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"content policy {name!r}: {module} has no {attribute}")
    return obj


_TYPE_NAMES = {bool: "a boolean", int: "an integer", str: "a string"}


def _builtin(name: str, cls, options: dict):
    kwargs = {}
    for key, value in options.items():
        if key not in cls.options:
            known = ", ".join(cls.options)
            raise ValueError(
                f"content policy {name!r}: unknown option {key!r} (known: {known})"
            )
        argument, types = cls.options[key]
        if not isinstance(types, tuple):
            types = (types,)
        if isinstance(value, bool) is not (bool in types) or not isinstance(
            value, types
        ):
            # None is only a default (TOML has no null): name the others.
            expected = " or ".join(_TYPE_NAMES[t] for t in types if t in _TYPE_NAMES)
            raise ValueError(f"content policy {name!r}: {key} must be {expected}")
        kwargs[argument] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"content policy {name!r}: {e}")


def loadPolicy(spec: dict) -> tuple[str, object]:
    """
    Build one policy from its configuration table.

    @param spec: a L{dict} with C{name} (a built-in name, or C{module:Class}
        for a policy from another package) and the policy's options.  A
        built-in takes its documented snake_case options; an imported class
        is called with the options as keyword arguments, unchanged.
    @return: C{(name, policy)}.
    @raise ValueError: naming the policy at fault.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"content policy {spec!r}: must be a table")
    options = dict(spec)
    name = options.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"content policy {spec!r}: needs a name")
    if name in BUILTIN:
        return name, _builtin(name, BUILTIN[name], options)
    factory = _import(name)
    try:
        policy = factory(**options)
    except Exception as e:
        raise ValueError(f"content policy {name!r}: cannot create it: {e}")
    if not IContentPolicy.providedBy(policy):
        raise ValueError(
            f"content policy {name!r}: {policy!r} does not provide IContentPolicy"
        )
    return name, policy


def loadPolicies(
    specs: list[dict],
    maxHeaderSize: int = MAX_HEADER_SIZE,
    maxHeaderFields: int = MAX_HEADER_FIELDS,
) -> ContentPolicyChain:
    """
    Build the chain of policies the configuration names, in order.

    @param specs: the C{[[content.policy]]} tables (see L{loadPolicy}).
    @raise ValueError: naming the policy at fault.
    """
    if not isinstance(specs, list):
        raise ValueError("content policies must be a list of tables")
    return ContentPolicyChain(
        [loadPolicy(spec) for spec in specs], maxHeaderSize, maxHeaderFields
    )
