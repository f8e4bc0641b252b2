# -*- test-case-name: tests.test_filestore -*-
"""
Tests for L{msa.accounts.filestore}: the live account store.  L{AccountFile}
refuses a file others can read, serves the accounts to the checkers, reloads
the file when it changes (polling) and on SIGHUP, and keeps the last good
accounts when a new version is malformed, missing or has a loose mode.
"""

import base64
import os
import signal

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from msa.accounts.filestore import AccountFile
from msa.accounts.model import AccountsFileError, makeAccount, writeAccounts
from msa.service.services import AccountWatcher
from tests.test_accounts import REALM
from tests.waiting import waitUntil


class AccountFileTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")
        os.makedirs(os.path.dirname(self.path))
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        writeAccounts(self.path, {"alice": self.alice})

    def test_load(self):
        store = AccountFile(self.path)
        self.assertEqual(store.getAccount("alice"), self.alice)
        self.assertIsNone(store.getAccount("bob"))

    def test_refuseLooseMode(self):
        """
        A file readable by others is refused, saying why and how to fix it.
        """
        os.chmod(self.path, 0o644)
        e = self.assertRaises(AccountsFileError, AccountFile, self.path)
        self.assertIn(self.path, str(e))
        self.assertIn("0644", str(e))
        self.assertIn("chmod 600", str(e))

    def test_missingFile(self):
        e = self.assertRaises(AccountsFileError, AccountFile, self.path + ".no")
        self.assertIn(self.path + ".no", str(e))

    def test_reloadKeepsLastGood(self):
        """
        A malformed file or a loose mode on reload is logged and the accounts
        read last stay in use.
        """
        store = AccountFile(self.path)
        with open(self.path, "w") as f:
            f.write("not json")
        with capturedLogs() as events:
            self.assertFalse(store.reload())
        self.assertEqual(store.getAccount("alice"), self.alice)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "error")
        self.assertIn(self.path, events[0]["error"])
        writeAccounts(self.path, {})
        os.chmod(self.path, 0o640)
        self.assertFalse(store.reload())
        self.assertEqual(store.getAccount("alice"), self.alice)
        os.chmod(self.path, 0o600)
        self.assertTrue(store.reload())
        self.assertIsNone(store.getAccount("alice"))

    def test_watching(self):
        """
        L{AccountFile.startWatching} polls the file on the given reactor and
        reloads it when it changes, and only then.
        """
        clock = Clock()
        store = AccountFile(self.path, reactor=clock)
        reloads = []
        original = store.reload
        store.reload = lambda: reloads.append(1) or original()
        d = store.startWatching(2.0)
        clock.advance(2)
        self.assertEqual(reloads, [])
        bob = makeAccount("bob", "pw-bob", [], ["PLAIN"])
        writeAccounts(self.path, {"bob": bob})
        clock.advance(1)
        self.assertIsNone(store.getAccount("bob"))
        clock.advance(1)
        self.assertEqual(store.getAccount("bob"), bob)
        self.assertEqual(reloads, [1])
        # A touch (new mtime, same contents) is noticed too.
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        clock.advance(2)
        self.assertEqual(reloads, [1, 1])
        # A broken file is reported once, not on every poll.
        with open(self.path, "w") as f:
            f.write("{")
        with capturedLogs() as events:
            clock.advance(2)
            clock.advance(2)
        self.assertEqual(len(events), 1)
        self.assertEqual(store.getAccount("bob"), bob)
        store.stopWatching()
        self.assertEqual(clock.getDelayedCalls(), [])
        return d

    def test_scramParameters(self):
        store = AccountFile(self.path)
        salt, iterations = store.scramParameters("alice", "SCRAM-SHA-256")
        keys = self.alice.scram["SCRAM-SHA-256"]
        self.assertEqual(salt, base64.b64decode(keys["salt"]))
        self.assertEqual(iterations, keys["iterations"])
        self.assertEqual(len(salt), 16)
        self.assertIsNone(store.scramParameters("bob", "SCRAM-SHA-256"))
        self.assertIsNone(store.scramParameters("alice", "SCRAM-SHA-1"))


class AccountFileMoreTests(unittest.TestCase):
    """
    The store's behaviours without a test of their own before the tests
    followed the modules: the listing, the change check, the modes at their
    edge, a vanished file, and the watcher's own errors.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")
        os.makedirs(os.path.dirname(self.path))
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        self.bob = makeAccount("bob", "pw-bob", [], ["PLAIN"])
        writeAccounts(self.path, {"alice": self.alice})

    def test_accounts(self):
        """
        L{AccountFile.accounts} lists every account (for look-ups by another
        key, such as a client certificate), in a new list each time.
        """
        writeAccounts(self.path, {"alice": self.alice, "bob": self.bob})
        store = AccountFile(self.path)
        listed = store.accounts()
        self.assertEqual(sorted(a.name for a in listed), ["alice", "bob"])
        listed.clear()
        self.assertEqual(len(store.accounts()), 2)

    def test_checkForChanges(self):
        """
        L{AccountFile.checkForChanges} reloads only when the file changed
        since the last look, and says whether it loaded new accounts.
        """
        store = AccountFile(self.path)
        with capturedLogs() as events:
            self.assertFalse(store.checkForChanges())
        self.assertEqual(events, [])
        writeAccounts(self.path, {"bob": self.bob})
        self.assertTrue(store.checkForChanges())
        self.assertEqual(store.getAccount("bob"), self.bob)
        self.assertIsNone(store.getAccount("alice"))
        self.assertFalse(store.checkForChanges())

    def test_modeEdge(self):
        """
        Owner-only modes (0600, 0400) are accepted; one bit for group or
        others (read or write) is refused at start.
        """
        for mode in (0o600, 0o400):
            os.chmod(self.path, mode)
            self.assertEqual(AccountFile(self.path).getAccount("alice"), self.alice)
        for mode in (0o604, 0o620, 0o640, 0o602):
            os.chmod(self.path, mode)
            error = self.assertRaises(AccountsFileError, AccountFile, self.path)
            self.assertIn(f"mode {mode:04o}", str(error))
        os.chmod(self.path, 0o600)

    def test_looseModeWhileWatching(self):
        """
        A chmod that opens the file to others is noticed by the poll,
        refused and logged once; the accounts read last stay in use until
        the mode is fixed, when the file is read again.
        """
        clock = Clock()
        store = AccountFile(self.path, reactor=clock)
        d = store.startWatching(1.0)
        writeAccounts(self.path, {"bob": self.bob})
        os.chmod(self.path, 0o644)
        with capturedLogs() as events:
            clock.advance(1)
            clock.advance(1)
        self.assertEqual([e["log_level"].name for e in events], ["error"])
        self.assertIn("0644", events[0]["error"])
        self.assertEqual(store.getAccount("alice"), self.alice)
        self.assertIsNone(store.getAccount("bob"))
        os.chmod(self.path, 0o600)
        clock.advance(1)
        self.assertEqual(store.getAccount("bob"), self.bob)
        store.stopWatching()
        return d

    def test_fileRemoved(self):
        """
        A file that disappears keeps the accounts read last, logged once
        however many polls follow; when it comes back, it is read.
        """
        clock = Clock()
        store = AccountFile(self.path, reactor=clock)
        d = store.startWatching(1.0)
        os.remove(self.path)
        with capturedLogs() as events:
            for _ in range(3):
                clock.advance(1)
        self.assertEqual(len(events), 1)
        self.assertIn("cannot read", events[0]["error"])
        self.assertEqual(store.getAccount("alice"), self.alice)
        self.assertFalse(store.reload())
        writeAccounts(self.path, {"bob": self.bob})
        clock.advance(1)
        self.assertEqual(store.getAccount("bob"), self.bob)
        store.stopWatching()
        return d

    def test_watchingTwice(self):
        """
        Watching is started once; after L{AccountFile.stopWatching} it may
        start again, and stopping a store that is not watching does nothing.
        """
        clock = Clock()
        store = AccountFile(self.path, reactor=clock)
        store.stopWatching()
        d = store.startWatching(1.0)
        self.assertRaises(RuntimeError, store.startWatching, 1.0)
        store.stopWatching()
        self.successResultOf(d)
        store.stopWatching()
        d = store.startWatching(1.0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        store.stopWatching()
        self.assertEqual(clock.getDelayedCalls(), [])
        return d

    def test_checkFailureKeepsWatching(self):
        """
        An unexpected error while checking is logged with the file's path,
        and the polling goes on.
        """
        clock = Clock()
        store = AccountFile(self.path, reactor=clock)
        failures = [ZeroDivisionError()]
        original = store.checkForChanges

        def checkForChanges():
            if failures:
                raise failures.pop()
            return original()

        store.checkForChanges = checkForChanges
        d = store.startWatching(1.0)
        with capturedLogs() as events:
            clock.advance(1)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["path"], self.path)
        self.assertIsInstance(events[0]["log_failure"].value, ZeroDivisionError)
        self.flushLoggedErrors(ZeroDivisionError)
        writeAccounts(self.path, {"bob": self.bob})
        clock.advance(1)
        self.assertEqual(store.getAccount("bob"), self.bob)
        store.stopWatching()
        return d


class HangupTests(unittest.TestCase):
    """
    SIGHUP: the service that watches the store (L{msa.service.tap}) reloads
    it when the signal arrives, and puts the previous handler back when it
    stops.
    """

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")
        os.makedirs(os.path.dirname(self.path))
        writeAccounts(self.path, {"alice": makeAccount("alice", "pw", [], ["PLAIN"])})
        self.store = AccountFile(self.path)
        self.previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.previous)

    @defer.inlineCallbacks
    def test_sighupReloads(self):
        """
        With polling practically off, a SIGHUP alone makes the store read
        the file again; a malformed file then keeps the last good accounts.
        """
        watcher = AccountWatcher(self.store, 3600)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        bob = makeAccount("bob", "pw", [], ["PLAIN"])
        writeAccounts(self.path, {"bob": bob})
        os.kill(os.getpid(), signal.SIGHUP)
        yield waitUntil(
            lambda: self.store.getAccount("bob") is not None, what="bob after SIGHUP"
        )
        self.assertEqual(self.store.getAccount("bob"), bob)
        with open(self.path, "w") as f:
            f.write("{")
        reloads = []
        original = self.store.reload
        self.store.reload = lambda: reloads.append(original())
        with capturedLogs() as events:
            os.kill(os.getpid(), signal.SIGHUP)
            yield waitUntil(lambda: reloads, what="a reload after SIGHUP")
        self.assertEqual(reloads, [False])
        # Only the store's own events: in a full run, services that other
        # tests left stopping may log meanwhile (capturedLogs is global).
        mine = [
            e for e in events if e.get("log_namespace", "").startswith("msa.accounts")
        ]
        self.assertEqual([e["log_level"].name for e in mine], ["error"])
        self.assertEqual(self.store.getAccount("bob"), bob)

    def test_previousHandlerRestored(self):
        """
        Stopping the service stops the polling and puts back the SIGHUP
        handler it replaced.
        """

        def mine(signum, frame):
            pass

        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        signal.signal(signal.SIGHUP, mine)
        watcher = AccountWatcher(self.store, 3600)
        watcher.startService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), mine)
        watcher.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), mine)
        self.assertIsNone(self.store._watcher)
