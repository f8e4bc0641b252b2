# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 side of the cred portal: L{MailboxRealm} turns an authenticated
account name into its locked mailbox (L{IMailbox}), the avatar of a POP3
session.  The checkers are the submission's (L{msa.accounts.checkers}),
so an account logs in to POP3 exactly as it does to submit.
"""

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import implementer

from msa.accounts.model import FAILURE_TEXT, Account
from msa.interfaces import IAccountStore, IMailbox, IMailboxStore


@implementer(IRealm)
class MailboxRealm:
    """
    Gives the L{IMailbox} of the account that logged in: its mailbox, opened
    (locked) through the L{IMailboxStore}; logging out releases the lock.
    A removed or disabled account is refused as a wrong password is; a
    mailbox another session holds fails the login with
    L{msa.errors.MailboxInUse}.
    """

    def __init__(self, accounts: IAccountStore, mailboxes: IMailboxStore) -> None:
        self._accounts = accounts
        self._mailboxes = mailboxes

    def requestAvatar(
        self, avatarId: str | bytes | tuple[()], mind: object, *interfaces: Any
    ) -> defer.Deferred:
        if IMailbox not in interfaces:
            raise NotImplementedError("MailboxRealm only provides IMailbox")
        if isinstance(avatarId, tuple):
            # Anonymous: there is no anonymous mailbox.
            raise UnauthorizedLogin(FAILURE_TEXT)
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        d = defer.maybeDeferred(self._accounts.getAccount, avatarId)
        return d.addCallback(self._open)

    def _open(self, account: Account | None) -> defer.Deferred:
        if account is None or not account.enabled:
            # Removed or disabled between the checker and here.
            raise UnauthorizedLogin(FAILURE_TEXT)
        d = self._mailboxes.open(account.name)
        return d.addCallback(lambda mailbox: (IMailbox, mailbox, mailbox.release))
