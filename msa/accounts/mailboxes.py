# -*- test-case-name: tests.test_mailboxaddresses -*-
"""
Which account a return message belongs to (R16): account data, set with
C{digipoort-msa-admin accounts set --mailbox}.

Per account (JSON keys in the account's entry, all optional):
  - C{mailboxes}: the recipient addresses whose messages the core delivers
    into the account's mailbox over LMTP: C{"retour@acme.nl"} for one
    address, C{"@acme.nl"} for a whole domain.  Without it the account
    receives nothing.
  - C{mailboxMaxBytes}, C{mailboxMaxMessages}: its quota, instead of the
    server's C{[mailbox] max_bytes} and C{max_messages}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from msa.mailbox import Quota
from msa.policy.authorization import AddressList

__all__ = ["MAILBOX_KEYS", "MailboxDirectory", "MailboxSettings", "mailboxClaims"]

#: The account keys of this module.
MAILBOX_KEYS = ("mailboxes", "mailboxMaxBytes", "mailboxMaxMessages")


@attrs.frozen
class MailboxSettings:
    """
    The mailbox fields of one account, validated.

    @ivar addresses: the recipients delivered into its mailbox.
    @ivar maxBytes: its own byte quota, or L{None} for the server's.
    @ivar maxMessages: its own message quota, or L{None} for the server's.
    """

    addresses: AddressList = AddressList()
    maxBytes: int | None = None
    maxMessages: int | None = None

    @classmethod
    def fromExtra(cls, extra: Mapping[str, Any]) -> MailboxSettings:
        """
        @param extra: the account's fields beyond its secrets.
        @raise ValueError: naming the key at fault.
        """
        values: dict[str, Any] = {}
        if "mailboxes" in extra:
            entries = extra["mailboxes"]
            if not isinstance(entries, list):
                raise ValueError("key 'mailboxes' must be a list")
            try:
                values["addresses"] = AddressList.parse(entries)
            except ValueError as e:
                raise ValueError(f"key 'mailboxes': {e}") from None
        for key, name in (
            ("mailboxMaxBytes", "maxBytes"),
            ("mailboxMaxMessages", "maxMessages"),
        ):
            if key in extra:
                value = extra[key]
                if type(value) is not int or value < 1:
                    raise ValueError(f"key {key!r} must be a positive integer")
                values[name] = value
        return cls(**values)


def _entries(addresses: AddressList) -> Iterable[str]:
    yield from addresses.addresses
    yield from ("@" + domain for domain in addresses.domains)


class MailboxDirectory:
    """
    Recipient address to account, from the accounts' C{mailboxes}, and each
    account's quota; follows the account store as it reloads.

    An exact address wins over a C{@domain}; two accounts claiming the same
    entry are an operator's error that C{accounts set} refuses, and here
    the first account by name wins.
    """

    def __init__(
        self,
        accounts: Callable[[], Iterable[Any]],
        defaultQuota: Quota | None = None,
    ) -> None:
        """
        @param accounts: returns the accounts as they are now
            (L{msa.interfaces.ILiveAccountStore.accounts}).
        @param defaultQuota: the server's quota (C{[mailbox] max_bytes},
            C{max_messages}), for the accounts without their own.
        """
        self.accounts = accounts
        self.defaultQuota = defaultQuota or Quota()
        self._seen: tuple[int, ...] | None = None
        self._addresses: dict[str, str] = {}
        self._domains: dict[str, str] = {}
        self._quotas: dict[str, Quota] = {}

    def _index(self) -> None:
        """
        Rebuild the maps when the store's accounts changed.
        """
        accounts = sorted(self.accounts(), key=lambda a: a.name)
        seen = tuple(map(id, accounts))
        if seen == self._seen:
            return
        addresses: dict[str, str] = {}
        domains: dict[str, str] = {}
        quotas: dict[str, Quota] = {}
        for account in accounts:
            try:
                settings = MailboxSettings.fromExtra(account.extra)
            except ValueError:
                continue
            for address in settings.addresses.addresses:
                addresses.setdefault(address, account.name)
            for domain in settings.addresses.domains:
                domains.setdefault(domain, account.name)
            quotas[account.name] = Quota(
                maxBytes=settings.maxBytes or self.defaultQuota.maxBytes,
                maxMessages=settings.maxMessages or self.defaultQuota.maxMessages,
            )
        self._addresses, self._domains, self._quotas = addresses, domains, quotas
        # Kept with the maps, so that their ids are not reused meanwhile.
        self._accounts = accounts
        self._seen = seen

    def accountFor(self, address: str) -> str | None:
        """
        @return: the name of the account whose mailbox receives C{address},
            or L{None}.
        """
        self._index()
        address = address.lower()
        found = self._addresses.get(address)
        if found is None:
            found = self._domains.get(address.rpartition("@")[2])
        return found

    def quotaFor(self, account: str) -> Quota:
        """
        The quota of C{account}'s mailbox (L{msa.mailbox.Quota}).
        """
        self._index()
        return self._quotas.get(account, self.defaultQuota)


def mailboxClaims(
    accounts: Iterable[Any], exceptAccount: str | None = None
) -> dict[str, str]:
    """
    Every mailbox entry of C{accounts} (L{msa.accounts.model.Account}s) to
    the account that has it, leaving out C{exceptAccount}.
    """
    out: dict[str, str] = {}
    for account in sorted(accounts, key=lambda a: a.name):
        if account.name == exceptAccount:
            continue
        try:
            settings = MailboxSettings.fromExtra(account.extra)
        except ValueError:
            continue
        for entry in _entries(settings.addresses):
            out.setdefault(entry, account.name)
    return out
