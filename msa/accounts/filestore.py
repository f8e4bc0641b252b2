# -*- test-case-name: tests.test_filestore -*-
"""
The live account store: L{AccountFile} serves the accounts of the file
(L{msa.accounts.model}) to the checkers, refuses a file others can read, and
reloads it when it changes or on SIGHUP, keeping the last good accounts when
a new version is malformed.
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from msa.accounts.model import Account, AccountsFileError, fileStamp, readChecked
from msa.accounts.passwords import unb64
from msa.interfaces import IAccountStore, ILiveAccountStore


@implementer(IAccountStore, ILiveAccountStore)
class AccountFile:
    """
    The accounts of a JSON file, reloaded when it changes.

    To reload on SIGHUP, call L{reload} from the reactor thread, e.g. with
    C{signal.signal(SIGHUP, lambda *a: reactor.callFromThread(store.reload))}.

    @raise AccountsFileError: at construction, when the file is missing,
        malformed, or readable or writable by group or others.
    """

    log = Logger()

    def __init__(
        self, path: str | os.PathLike[str], reactor: IReactorTime | None = None
    ) -> None:
        self.path = os.fspath(path)
        #: Where the accounts come from (L{ILiveAccountStore.where}).
        self.where = self.path
        #: A file is never unreachable the way a database is: always L{None}.
        self.outage: str | None = None
        self._reactor = reactor
        self._stamp: tuple | None
        self._accounts, self._stamp = readChecked(self.path, checkMode=True)
        self._watcher: LoopingCall | None = None

    def getAccount(self, name: str) -> Account | None:
        return self._accounts.get(name)

    def accounts(self) -> list[Account]:
        """
        Every account (for look-ups by another key, such as a client
        certificate).
        """
        return list(self._accounts.values())

    def scramParameters(
        self, username: str, mechanism: str
    ) -> tuple[bytes, int] | None:
        """
        @return: the salt and iteration count of C{username}'s C{mechanism}
            secrets, or L{None} (see L{msa.sasl.MechanismContext}).
        """
        account = self._accounts.get(username)
        keys = account.scram.get(mechanism) if account is not None else None
        if keys is None:
            return None
        return unb64(keys["salt"]), keys["iterations"]

    def reload(self) -> bool:
        """
        Re-read the file.  When it is missing, malformed or has a bad mode,
        log why and keep the accounts read last.

        @return: whether new accounts were loaded.
        """
        try:
            accounts, stamp = readChecked(self.path, checkMode=True)
        except AccountsFileError as e:
            self._stamp = self._currentStamp()
            self.log.error("Keeping the previous accounts: {error}", error=str(e))
            return False
        self._accounts, self._stamp = accounts, stamp
        self.log.info(
            "Loaded {count} account(s) from {path}", count=len(accounts), path=self.path
        )
        return True

    def _currentStamp(self) -> tuple | None:
        try:
            return fileStamp(os.stat(self.path))
        except OSError:
            return None

    def checkForChanges(self) -> bool:
        """
        Reload if the file's inode, size, times or mode changed since the
        last look.

        @return: whether new accounts were loaded.
        """
        if self._currentStamp() == self._stamp:
            return False
        return self.reload()

    def startWatching(self, interval: float = 2.0) -> Deferred:
        """
        Look for changes every C{interval} seconds on the reactor given at
        construction (the global one if none).

        @return: the L{Deferred} of the L{LoopingCall}, firing on
            L{stopWatching}.
        """
        if self._watcher is not None:
            raise RuntimeError("already watching")
        self._watcher = LoopingCall(self._safeCheck)
        if self._reactor is not None:
            self._watcher.clock = self._reactor
        return self._watcher.start(interval, now=False)

    def stopWatching(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            watcher.stop()

    def _safeCheck(self) -> None:
        try:
            self.checkForChanges()
        except Exception:
            self.log.failure("Checking {path} for changes failed", path=self.path)
