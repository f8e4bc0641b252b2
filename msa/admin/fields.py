# -*- test-case-name: tests.test_admin -*-
"""
The authorization fields (R9, R10) as options of C{digipoort-msa-admin
accounts add|set}: C{--sender}, C{--recipient}, C{--certificate},
C{--max-message-size}, ..., the mailbox of return messages (C{--mailbox},
C{--mailbox-max-bytes}, C{--mailbox-max-messages}) and C{--clear FIELD}.
They are validated exactly as the server reads them
(L{msa.policy.authorization.AccountRules}, L{msa.accounts.mailboxes}).
"""

import argparse
from collections.abc import Iterable

import attrs

from msa.accounts.mailboxes import MailboxSettings, mailboxClaims
from msa.accounts.model import Account
from msa.admin.queue import AdminFailure as _Failed
from msa.policy.authorization import AccountRules

#: Authorization fields (R9, R10): option destination -> account key.
FIELDS = {
    "sender": "senders",
    "recipient": "recipients",
    "certificate": "certificates",
    "max_message_size": "maxMessageSize",
    "max_recipients": "maxRecipients",
    "messages_per_minute": "messagesPerMinute",
    "messages_per_day": "messagesPerDay",
    "max_sessions": "maxSessions",
    "require_header_from": "requireHeaderFrom",
    "require_client_certificate": "requireClientCertificate",
    "mailbox": "mailboxes",
    "mailbox_max_bytes": "mailboxMaxBytes",
    "mailbox_max_messages": "mailboxMaxMessages",
}


def _yesNo(text: str) -> bool:
    if text.lower() in ("yes", "true", "on"):
        return True
    if text.lower() in ("no", "false", "off"):
        return False
    raise argparse.ArgumentTypeError("give yes or no")


def fieldOptions(parser: argparse.ArgumentParser) -> None:
    for name, what in [
        ("sender", "envelope sender it may use: user@domain or @domain"),
        ("recipient", "recipient it may send to (narrows the server's list)"),
        ("certificate", "client certificate: sha256:<hex> or serialNumber:<id>"),
        ("mailbox", "return messages to it (LMTP) go to its mailbox: user@domain"),
    ]:
        parser.add_argument(
            "--" + name,
            action="append",
            metavar="VALUE",
            help=f"{what} (repeatable; replaces the list)",
        )
    for name in (
        "max_message_size",
        "max_recipients",
        "messages_per_minute",
        "messages_per_day",
        "max_sessions",
        "mailbox_max_bytes",
        "mailbox_max_messages",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, metavar="N")
    for name in ("require_header_from", "require_client_certificate"):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=_yesNo, metavar="yes|no"
        )


def applyFields(
    args: argparse.Namespace, account: Account, others: Iterable[Account] = ()
) -> Account:
    """
    The account with the authorization fields the options give, validated
    as the server will read them.

    @param others: the other accounts, none of which may have a mailbox
        address (or C{@domain}) this account gets.
    """
    extra = dict(account.extra)
    for key in getattr(args, "clear", []):
        extra.pop(key, None)
    for option, key in FIELDS.items():
        value = getattr(args, option, None)
        if value is not None:
            extra[key] = value
    try:
        AccountRules.fromExtra(extra)
        MailboxSettings.fromExtra(extra)
    except ValueError as e:
        raise _Failed(f"account {account.name}: {e}", 2)
    changed = attrs.evolve(account, extra=extra)
    claimed = mailboxClaims(others, exceptAccount=account.name)
    for entry in sorted(mailboxClaims([changed])):
        if entry in claimed:
            raise _Failed(
                f"account {account.name}: mailbox {entry} belongs to account "
                f"{claimed[entry]} already",
                1,
            )
    return changed
