# -*- test-case-name: tests.test_sessions -*-
"""
Tests for L{msa.submission.sessions}: the registry of live sessions counts
them by client and by account, and on SIGTERM asks each to end (idle
sessions are told 421 at once, a message in progress may finish, the grace
period bounds the wait, whatever is left is closed), firing when none is
left.  The registry alone with stand-in sessions, then with the real
protocol through the harness.
"""

import attrs
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from msa.submission.sessions import SessionRegistry
from tests.helpers import Harness


@attrs.define
class Info:
    clientAddress: str
    account: str | None = None


class FakeSession:
    """
    A session as the registry sees it: its L{Info}, and the two calls that
    end it.  C{endsAt} says which call makes it leave the registry at once.
    """

    def __init__(self, registry, clientAddress, account=None, endsAt=None):
        self.registry = registry
        self.session = Info(clientAddress, account)
        self.endsAt = endsAt
        self.calls = []
        registry.add(self)

    def _call(self, name):
        self.calls.append(name)
        if self.endsAt == name:
            self.registry.remove(self)

    def beginShutdown(self):
        self._call("begin")

    def forceShutdown(self):
        self._call("force")


def fired(d):
    result = []
    d.addCallback(result.append)
    return result


class CountTests(unittest.TestCase):
    """
    The counts behind the per-client and per-account connection limits.
    """

    def test_counts(self):
        """
        Sessions are counted by client address and by account (L{None}
        before AUTH); a removed session no longer counts.
        """
        registry = SessionRegistry()
        a = FakeSession(registry, "192.0.2.1", "alice")
        FakeSession(registry, "192.0.2.1")
        FakeSession(registry, "192.0.2.2", "alice")
        self.assertEqual(registry.sessionsFrom("192.0.2.1"), 2)
        self.assertEqual(registry.sessionsFrom("192.0.2.2"), 1)
        self.assertEqual(registry.sessionsFrom("192.0.2.3"), 0)
        self.assertEqual(registry.sessionsOf("alice"), 2)
        self.assertEqual(registry.sessionsOf("bob"), 0)
        registry.remove(a)
        self.assertEqual(registry.sessionsFrom("192.0.2.1"), 1)
        self.assertEqual(registry.sessionsOf("alice"), 1)

    def test_countsFollowLogin(self):
        """
        The account is read at the time of counting: a session that logs
        in counts for its account from then on.
        """
        registry = SessionRegistry()
        session = FakeSession(registry, "192.0.2.1")
        self.assertEqual(registry.sessionsOf("alice"), 0)
        session.session.account = "alice"
        self.assertEqual(registry.sessionsOf("alice"), 1)

    def test_removeTwice(self):
        """
        Removing a session that is not there does nothing, nor does adding
        one twice: the count per client stays exact.
        """
        registry = SessionRegistry()
        session = FakeSession(registry, "192.0.2.1")
        registry.add(session)
        registry.remove(session)
        registry.remove(session)
        self.assertEqual(registry.sessions, set())
        self.assertEqual(registry.sessionsFrom("192.0.2.1"), 0)
        FakeSession(registry, "192.0.2.1")
        self.assertEqual(registry.sessionsFrom("192.0.2.1"), 1)


class RegistryShutdownTests(unittest.TestCase):
    """
    L{SessionRegistry.shutdown} with stand-in sessions.
    """

    def setUp(self):
        self.clock = Clock()
        self.registry = SessionRegistry()

    def test_noSessions(self):
        """
        Without sessions the shutdown is over at once, and new sessions
        are refused from then on (C{closing}).
        """
        self.assertFalse(self.registry.closing)
        self.assertEqual(fired(self.registry.shutdown(30, self.clock)), [None])
        self.assertTrue(self.registry.closing)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_allEndAtOnce(self):
        """
        When every session ends as it is asked to, the shutdown is over at
        once and no timer is left.
        """
        sessions = [
            FakeSession(self.registry, f"192.0.2.{i}", endsAt="begin") for i in range(3)
        ]
        self.assertEqual(fired(self.registry.shutdown(30, self.clock)), [None])
        self.assertEqual([s.calls for s in sessions], [["begin"]] * 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waitsForTheLast(self):
        """
        The shutdown is over when the last session leaves, within the grace
        period; the timer is cancelled and no session is forced.
        """
        idle = FakeSession(self.registry, "192.0.2.1", endsAt="begin")
        busy = FakeSession(self.registry, "192.0.2.2")
        with capturedLogs() as events:
            result = fired(self.registry.shutdown(30, self.clock))
        self.assertEqual(
            [(e["log_level"].name, e["count"], e["grace"]) for e in events],
            [("info", 2, 30)],
        )
        self.assertEqual(result, [])
        self.assertEqual((idle.calls, busy.calls), (["begin"], ["begin"]))
        self.clock.advance(29)
        self.registry.remove(busy)
        self.assertEqual(result, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(busy.calls, ["begin"])

    def test_graceEdge(self):
        """
        A session still there when the grace period ends is forced to end,
        not a moment before; the forcing is logged with the count.
        """
        slow = FakeSession(self.registry, "192.0.2.1", endsAt="force")
        result = fired(self.registry.shutdown(30, self.clock))
        self.clock.advance(29.999)
        self.assertEqual(slow.calls, ["begin"])
        with capturedLogs() as events:
            self.clock.advance(0.001)
        self.assertEqual(slow.calls, ["begin", "force"])
        self.assertEqual(
            [(e["log_level"].name, e["count"]) for e in events], [("warn", 1)]
        )
        self.assertEqual(result, [None])

    def test_severalWaiters(self):
        """
        Every caller of L{SessionRegistry.shutdown} is told when the last
        session has left.
        """
        session = FakeSession(self.registry, "192.0.2.1")
        first = fired(self.registry.shutdown(30, self.clock))
        second = fired(self.registry.shutdown(10, self.clock))
        self.assertEqual(session.calls, ["begin", "begin"])
        self.registry.remove(session)
        self.assertEqual((first, second), ([None], [None]))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ShutdownTests(unittest.TestCase):
    """
    SIGTERM: idle sessions end at once with 421, a message in progress may
    finish, the grace period bounds the wait.
    """

    def shutdown(self, h, clock, grace=30):
        d = h.factory.registry.shutdown(grace, clock)
        fired = []
        d.addCallback(fired.append)
        return fired

    def test_idleSessionTold421(self):
        clock = Clock()
        h = Harness(self)
        h.login()
        h.transport.clear()
        fired = self.shutdown(h, clock)
        self.assertEqual(
            h.transport.value(), b"421 4.3.2 msa.example.nl Service shutting down\r\n"
        )
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(fired, [])
        h.server.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_messageInProgressFinishes(self):
        clock = Clock()
        h = Harness(self)
        h.login()
        h.command(b"MAIL FROM:<a@example.nl>")
        fired = self.shutdown(h, clock)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.command(b"RCPT TO:<b@example.nl>"), [b"250 2.1.5 Ok"])
        h.command(b"DATA")
        self.assertEqual(
            h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n"),
            [
                b"250 2.0.0 Ok: queued as Q0001",
                b"421 4.3.2 msa.example.nl Service shutting down",
            ],
        )
        self.assertEqual(len(h.spool.committed), 1)
        h.server.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_graceExpires(self):
        clock = Clock()
        h = Harness(self)
        h.login()
        h.transaction()
        h.send(b"Subject: x\r\n\r\nslow client")
        fired = self.shutdown(h, clock, grace=30)
        clock.advance(29)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        clock.advance(1)
        self.assertEqual(
            h.transport.value(), b"421 4.3.2 msa.example.nl Service shutting down\r\n"
        )
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(h.spool.committed, [])
        h.server.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_newConnectionWhileClosing(self):
        h = Harness(self)
        h.factory.registry.closing = True
        late = h.factory.buildProtocol(None)
        transport = type(h.transport)()
        late.makeConnection(transport)
        self.assertEqual(
            transport.value(), b"421 4.3.2 msa.example.nl Service shutting down\r\n"
        )
        late.connectionLost(None)

    def test_noSessions(self):
        h = Harness(self)
        h.server.connectionLost(None)
        self.assertEqual(self.shutdown(h, Clock()), [None])
