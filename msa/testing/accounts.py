# -*- test-case-name: tests.test_testing -*-
"""
Accounts with plain-text passwords for AUTH PLAIN and LOGIN, behind the
real realm and avatar.  Part of L{msa.testing}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from zope.interface import implementer

from msa.accounts.checkers import SubmissionRealm
from msa.accounts.model import FAILURE_TEXT, Account
from msa.accounts.passwords import unb64
from msa.interfaces import IAccountStore, ISpool
from msa.policy.authorization import ServerRules
from msa.policy.content import ContentPolicyChain
from msa.submission.avatar import submissionFactory

#: The sender addresses a test account may use unless told otherwise.
SENDERS = ["@example.nl", "@mijnbedrijf.nl", "@mijn-bedrijf.nl"]


def testAccount(name: str, extra: Mapping[str, Any] | None = None) -> Account:
    """
    An enabled L{Account} without secrets (L{MemoryChecker} holds the
    passwords).

    @param extra: the account's other fields, as in the accounts file (its
        senders, limits, ...); by default it may send as L{SENDERS}.
    """
    if extra is None:
        extra = {"senders": list(SENDERS)}
    return Account(name=name, extra=dict(extra))


@implementer(IAccountStore)
class MemoryAccountStore:
    """
    An L{IAccountStore} over a L{dict}: add, change or remove accounts in
    C{accounts} at will.

    @ivar accounts: account name to L{Account}.
    """

    def __init__(self, accounts: Iterable[Account] = ()) -> None:
        self.accounts: dict[str, Account] = {a.name: a for a in accounts}

    def getAccount(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def scramParameters(
        self, username: str, mechanism: str
    ) -> tuple[bytes, int] | None:
        """
        The salt and iterations of a SCRAM secret, for
        L{msa.sasl.MechanismContext} (as the account file gives them).
        """
        account = self.accounts.get(username)
        keys = account.scram.get(mechanism) if account is not None else None
        return None if keys is None else (unb64(keys["salt"]), keys["iterations"])


@implementer(ICredentialsChecker)
class MemoryChecker:
    """
    Checks the user name and password of AUTH PLAIN and LOGIN against
    plain-text passwords, without the cost of a password hash.  Every
    refusal is the same L{UnauthorizedLogin}, as from the real
    L{msa.accounts.checkers.AccountChecker}.

    @ivar users: account name to password.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        """
        @return: a L{Deferred} firing with the account name (L{str}), or
            failing with L{UnauthorizedLogin}.
        """
        password = self.users.get(credentials.username)
        if password is not None and credentials.checkPassword(password):
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin(FAILURE_TEXT))


def memoryRealm(
    spool: ISpool,
    hostname: str = "msa.example.nl",
    users: Iterable[str] = ("alice",),
    serverRules: ServerRules | None = None,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
    contentPolicy: ContentPolicyChain | None = None,
) -> SubmissionRealm:
    """
    The real L{SubmissionRealm} and avatar over a L{MemoryAccountStore}.

    @param users: the account names.
    @param extras: account name to its other fields (see L{testAccount}).
    @param serverRules: passed to L{submissionFactory}, as is
        C{contentPolicy}.
    """
    extras = extras or {}
    store = MemoryAccountStore(testAccount(name, extras.get(name)) for name in users)
    return SubmissionRealm(
        store, submissionFactory(spool, hostname, serverRules, contentPolicy)
    )


def memoryPortal(
    spool: ISpool,
    hostname: str = "msa.example.nl",
    users: Mapping[str, str] | None = None,
    **realmArgs: Any,
) -> Portal:
    """
    A L{Portal} for a L{SubmissionFactory}: L{memoryRealm} with a
    L{MemoryChecker}.

    @param users: account name to password; by default C{alice} with the
        password C{wonderland}.
    @param realmArgs: C{serverRules}, C{extras} and C{contentPolicy} for
        L{memoryRealm}.
    """
    users = users or {"alice": "wonderland"}
    realm = memoryRealm(spool, hostname, list(users), **realmArgs)
    return Portal(realm, [MemoryChecker(users)])


# -- the protocol harness ------------------------------------------------
