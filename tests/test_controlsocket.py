# -*- test-case-name: tests.test_controlsocket -*-
"""
Tests for L{msa.service.controlsocket}: the control socket of the running MSA, its
line protocol and blocking client, against a fake queue runner; and the
read-only view of the spool files.
"""

import json
import os
import socket
import stat
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from msa.envelope import Envelope
from msa.queue.spool import Spool
from msa.service import controlsocket
from msa.service.controlsocket import ControlError, ControlService, ServerNotRunning

MESSAGE = (
    b"From: a@example.org\r\n"
    b"To: b@example.org\r\n"
    b"Subject: hello\r\n"
    b"  folded\r\n"
    b"\r\n"
    b"Body: not a header\r\n"
)


class FakeRunner:
    """
    The methods of the queue runner's L{msa.queue.control.QueueControl},
    recording calls.
    """

    def __init__(self, ids):
        self.ids = list(ids)
        self.held = set()
        self.calls = []

    def _known(self, queueId):
        if queueId not in self.ids:
            raise KeyError(queueId)

    def describe(self):
        return [
            {
                "id": i,
                "age": 5.0,
                "size": 10,
                "sender": "a@example.org",
                "recipients": {"b@example.org": "pending"},
                "attempts": 1,
                "nextAttempt": 0.0,
                "lastError": "451 try later",
                "held": i in self.held,
            }
            for i in self.ids
        ]

    def flush(self, queueId=None):
        self.calls.append(("flush", queueId))
        if queueId is not None:
            self._known(queueId)
            return [queueId]
        return [i for i in self.ids if i not in self.held]

    def hold(self, queueId):
        self.calls.append(("hold", queueId))
        self._known(queueId)
        self.held.add(queueId)

    def release(self, queueId):
        self.calls.append(("release", queueId))
        self._known(queueId)
        self.held.discard(queueId)

    def delete(self, queueId):
        self.calls.append(("delete", queueId))
        self._known(queueId)
        self.ids.remove(queueId)
        return defer.succeed(None)


def addEntry(spool, message=MESSAGE, sender="a@example.org"):
    """
    Commit a message to C{spool} synchronously (through a twin spool on a
    clock, which does its fsyncs in this thread).

    @return: its queue id.
    """
    clock = Clock()
    clock.advance(time.time())
    writer = Spool(spool.directory, clock).newMessage(
        Envelope(sender, ["b@example.org"], account="alice")
    )
    writer.write(message)
    results = []
    writer.commit().addBoth(results.append)
    [queueId] = results
    return queueId


class ParseTests(unittest.TestCase):
    def test_commands(self):
        parse = controlsocket.parseRequest
        self.assertEqual(parse("list"), ("list", None))
        self.assertEqual(parse("FLUSH"), ("flush", None))
        self.assertEqual(parse("flush 0abc"), ("flush", "0ABC"))
        self.assertEqual(parse("show ABC\r"), ("show", "ABC"))
        for bad, error in [
            ("", "empty command"),
            ("frobnicate", "unknown command"),
            ("show", "usage: show ID"),
            ("list X", "usage: list"),
            ("flush A B", "usage: flush [ID]"),
            ("show ../../etc/passwd", "not a queue id"),
            ("delete A.json", "not a queue id"),
        ]:
            e = self.assertRaises(ControlError, parse, bad)
            self.assertIn(error, str(e), bad)


class ServiceTests(unittest.TestCase):
    """
    L{ControlService} on a real UNIX socket; the blocking client runs in a
    thread.
    """

    def setUp(self):
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state, mode=0o700)
        self.spool = Spool(os.path.join(self.state, "spool"), reactor)
        self.queueId = addEntry(self.spool)
        self.runner = FakeRunner([self.queueId])
        self.path = controlsocket.socketPath(self.state)
        self.service = ControlService(self.path, self.runner, self.spool)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def call(self, command, queueId=None):
        return threads.deferToThread(
            controlsocket.request, self.path, command, queueId, 5
        )

    def test_socketMode(self):
        self.assertEqual(self.path, os.path.join(self.state, "control.sock"))
        mode = os.stat(self.path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    @defer.inlineCallbacks
    def test_commandsMapToRunner(self):
        listed = yield self.call("list")
        self.assertEqual([d["id"] for d in listed], [self.queueId])
        self.assertEqual(listed[0]["recipients"], {"b@example.org": "pending"})
        yield self.call("hold", self.queueId)
        flushed = yield self.call("flush")
        self.assertEqual(flushed, [])
        yield self.call("release", self.queueId)
        flushed = yield self.call("flush", self.queueId)
        self.assertEqual(flushed, [self.queueId])
        yield self.call("delete", self.queueId)
        self.assertEqual(
            self.runner.calls,
            [
                ("hold", self.queueId),
                ("flush", None),
                ("release", self.queueId),
                ("flush", self.queueId),
                ("delete", self.queueId),
            ],
        )
        self.assertEqual((yield self.call("list")), [])

    @defer.inlineCallbacks
    def test_unknownId(self):
        for command in ("show", "hold", "release", "delete", "flush"):
            e = yield self.assertFailure(self.call(command, "ABCDEF"), ControlError)
            self.assertEqual(str(e), "no message ABCDEF in the queue", command)
        e = yield self.assertFailure(self.call("frob"), ControlError)
        self.assertIn("unknown command", str(e))

    @defer.inlineCallbacks
    def test_show(self):
        shown = yield self.call("show", self.queueId)
        self.assertEqual(shown["summary"]["id"], self.queueId)
        self.assertEqual(shown["envelope"]["sender"], "a@example.org")
        self.assertEqual(shown["envelope"]["recipients"], ["b@example.org"])
        self.assertEqual(shown["envelope"]["account"], "alice")
        self.assertEqual(
            shown["headers"],
            ["From: a@example.org", "To: b@example.org", "Subject: hello", "  folded"],
        )
        self.assertFalse(shown["headersTruncated"])

    @defer.inlineCallbacks
    def test_showBounded(self):
        """
        A header section without end is read only up to the bound.
        """
        message = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 200) for i in range(2000))
        queueId = addEntry(self.spool, message)
        self.runner.ids.append(queueId)
        shown = yield self.call("show", queueId)
        self.assertTrue(shown["headersTruncated"])
        self.assertLessEqual(len(shown["headers"]), controlsocket.MAX_HEADER_LINES)
        self.assertLessEqual(
            len("\r\n".join(shown["headers"])), controlsocket.MAX_HEADER_BYTES
        )

    @defer.inlineCallbacks
    def test_severalRequestsOneConnection(self):
        def talk():
            # The trial directory is too deep for a socket address.
            address = controlsocket._Address(self.path)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(address.path)
                address.close()
                s.sendall(b"list\nbogus\nflush\n")
                data = b""
                while data.count(b"\n") < 3:
                    data += s.recv(65536)
                return [json.loads(line) for line in data.splitlines()]

        replies = yield threads.deferToThread(talk)
        self.assertEqual([r["ok"] for r in replies], [True, False, True])
        self.assertEqual(replies[2]["result"], [self.queueId])

    @defer.inlineCallbacks
    def test_stop(self):
        """
        Stopping removes the socket; the client then says the server is not
        running.  A stale socket left by a crash is replaced at start.
        """
        yield self.service.stopService()
        self.assertFalse(os.path.exists(self.path))
        e = yield self.assertFailure(self.call("list"), ServerNotRunning)
        self.assertIn("not running", str(e))
        # Bound through the directory's /proc/self/fd name, as the server
        # does: under trial -j (_trial_temp/N/) the path is too long for a
        # socket address.
        address = controlsocket._Address(self.path)
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(address.path)
        address.close()
        self.assertTrue(os.path.exists(self.path))
        self.service.startService()
        listed = yield self.call("list")
        self.assertEqual(len(listed), 1)

    def test_refusesSecondServer(self):
        """
        If another server answers on the socket, the start fails instead of
        stealing it.
        """
        other = ControlService(self.path, self.runner, self.spool)
        self.assertRaises(OSError, other.startService)
        self.assertTrue(os.path.exists(self.path))

    @defer.inlineCallbacks
    def test_internalError(self):
        def broken(queueId):
            raise RuntimeError("disk on fire")

        self.runner.hold = broken
        e = yield self.assertFailure(self.call("hold", self.queueId), ControlError)
        self.assertEqual(str(e), "internal error: disk on fire")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SpoolViewTests(unittest.TestCase):
    """
    The read-only view for the admin command when the server is down.
    """

    def test_describeSpool(self):
        spool = Spool(os.path.abspath(self.mktemp()), reactor)
        queueId = addEntry(spool)
        entry = spool.load(queueId)
        entry.attempts, entry.lastError = 2, "451 4.3.0 later"
        spool.update(entry)
        [item] = controlsocket.describeSpool(spool, now=entry.createdAt + 7)
        self.assertEqual(
            item,
            {
                "id": queueId,
                "age": 7.0,
                "size": len(MESSAGE),
                "sender": "a@example.org",
                "recipients": {"b@example.org": "pending"},
                "errors": {},
                "attempts": 2,
                "nextAttempt": entry.nextAttempt,
                "lastError": "451 4.3.0 later",
                "held": False,
                "inFlight": False,
                "isBounce": False,
            },
        )
        shown = controlsocket.showEntry(spool, queueId)
        self.assertEqual(shown["summary"]["id"], queueId)
        self.assertEqual(shown["summary"]["attempts"], 2)
        self.assertEqual(shown["headers"][2], "Subject: hello")
        e = self.assertRaises(ControlError, controlsocket.showEntry, spool, "ABC")
        self.assertEqual(str(e), "no message ABC in the queue")
