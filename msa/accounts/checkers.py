# -*- test-case-name: tests.test_checkers -*-
"""
The cred side of the account store: L{AccountChecker} checks the
credentials of every SASL mechanism against an L{IAccountStore} (the same
refusal whatever the reason, the same cost for unknown users), and
L{SubmissionRealm} turns the account name into its L{ISubmission} avatar.
"""

from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from zope.interface import implementer

from msa.accounts.model import FAILURE_TEXT, Account
from msa.accounts.passwords import DUMMY_HASH, PasswordVerifier, unb64, verifyHash
from msa.interfaces import (
    IAccountStore,
    IDigestMD5Credentials,
    IMechanismCredentials,
    IScramCredentials,
    ISubmission,
)


def _globalReactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _refused(*ignored: object) -> str:
    raise UnauthorizedLogin(FAILURE_TEXT)


@implementer(ICredentialsChecker)
class AccountChecker:
    """
    Checks SASL credentials against an L{IAccountStore}.  Every refusal is the
    same L{UnauthorizedLogin}, whatever the reason, and unknown users cost a
    scrypt computation like known ones.

    @param threaded: verify scrypt hashes in a thread pool (default) rather
        than blocking the reactor for tens of milliseconds.
    @param verifier: the L{PasswordVerifier} (thread pool, cache of recent
        successes); by default one with a 5-minute cache.
    """

    credentialInterfaces = (IUsernamePassword, IDigestMD5Credentials, IScramCredentials)

    def __init__(
        self,
        store: IAccountStore,
        threaded: bool = True,
        verifier: PasswordVerifier | None = None,
    ) -> None:
        self._store = store
        if verifier is None:
            verifier = PasswordVerifier(
                verifyHash, reactor=_globalReactor() if threaded else None
            )
        self._verifier = verifier

    def requestAvatarId(
        self,
        credentials: IUsernamePassword | IDigestMD5Credentials | IScramCredentials,
    ) -> Deferred:
        """
        @return: a L{Deferred} firing with the account name, or failing with
            L{UnauthorizedLogin}.
        """
        # Each of credentialInterfaces declares the user name; other
        # credentials (a portal never hands them over) name no one.
        username = None
        if any(i.providedBy(credentials) for i in self.credentialInterfaces):
            username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(username, str):
            d = maybeDeferred(self._store.getAccount, username)
        else:
            d = succeed(None)
        return d.addCallback(self._check, credentials)

    def _check(self, account: Account | None, credentials: Any) -> Any:
        declared = IMechanismCredentials(credentials, None)
        mechanism = declared.mechanism if declared is not None else None
        allowed = (
            account is not None and account.enabled and mechanism in account.mechanisms
        )
        if IScramCredentials.providedBy(credentials):
            keys = account.scram.get(mechanism or "") if account is not None else None
            if keys is None:
                allowed, storedKey, serverKey = False, bytes(32), bytes(32)
            else:
                storedKey, serverKey = (
                    unb64(keys["storedKey"]),
                    unb64(keys["serverKey"]),
                )
            return self._decide(
                credentials.checkKeys(storedKey, serverKey), allowed, account
            )
        if IDigestMD5Credentials.providedBy(credentials):
            variants = (
                account.digestHA1.get(credentials.realm)
                if account is not None
                else None
            )
            if not variants:
                allowed, variants = False, ("00" * 16,)
            # Each variant is the same password as some real client hashes
            # it (msa.sasl.digest_md5.ha1Variants); all are checked.
            matches = [credentials.checkHA1(bytes.fromhex(h)) for h in variants]
            return self._decide(any(matches), allowed, account)
        if IUsernamePassword.providedBy(credentials):
            password = credentials.password
            if isinstance(password, str):
                password = password.encode("utf-8")
            passwordHash = account.passwordHash if account is not None else DUMMY_HASH
            name = account.name if account is not None else None
            d = self._verifier.check(name, passwordHash, password)
            return d.addCallback(self._decide, allowed, account)
        return _refused()

    @staticmethod
    def _decide(verified: bool, allowed: bool, account: Account | None) -> str:
        if verified is True and allowed and account is not None:
            return account.name
        return _refused()


@implementer(IRealm)
class SubmissionRealm:
    """
    Turns an authenticated account name into an L{ISubmission} avatar.

    @param avatarFactory: makes the L{ISubmission} avatar of an
        L{Account}; its C{logout} is called on logout.
    """

    def __init__(
        self, store: IAccountStore, avatarFactory: Callable[[Account], ISubmission]
    ) -> None:
        self._store = store
        self._avatarFactory = avatarFactory

    def requestAvatar(
        self, avatarId: str | bytes | tuple[()], mind: object, *interfaces: Any
    ):
        if ISubmission not in interfaces:
            raise NotImplementedError("SubmissionRealm only provides ISubmission")
        if isinstance(avatarId, tuple):
            # Anonymous: there is no anonymous submission (R4).
            raise UnauthorizedLogin(FAILURE_TEXT)
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        account = self._store.getAccount(avatarId)
        if isinstance(account, Deferred):
            return account.addCallback(self._avatar)
        return self._avatar(account)

    def _avatar(self, account: Account | None):
        if account is None or not account.enabled:
            # Removed or disabled between the checker and here.
            raise UnauthorizedLogin(FAILURE_TEXT)
        avatar = self._avatarFactory(account)
        return ISubmission, avatar, avatar.logout
