# -*- test-case-name: tests.test_relayoutcome -*-
"""
What the relay runner logs (L{msa.relay.runner}): one INFO line per relay
outcome, the other per-message lines of the relay, the outbox and the spool
at DEBUG; and a state that cannot be written (the disk's answer, such as a
read-only spool) logged as an error without a traceback, the entry kept
and retried.
"""

import errno

from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from msa.queue.spool import Spool
from msa.relay.outbox import OutboxDownstream
from msa.relay.results import ACCEPTED, TEMPORARY
from msa.relay.runner import RelayRunner
from tests.relaydata import FakeDownstream, allWith, makeEnvelope


class _Events:
    def __init__(self, testCase: unittest.TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def msa(self, level: LogLevel) -> list[dict]:
        """
        The events of the relay, the outbox and the spool at C{level}.
        """
        return [
            e
            for e in self.events
            if e.get("log_level") == level
            and e.get("log_namespace", "").startswith(("msa.relay", "msa.queue"))
        ]


class RelayLogTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), reactor=self.clock)

    def runner(self, downstream) -> RelayRunner:
        runner = RelayRunner(
            self.spool, downstream, reactor=self.clock, retryBase=60, retryMax=3600
        )
        runner.startService()
        self.addCleanup(runner.stopService)
        return runner

    def queue(self) -> str:
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(b"Subject: s\r\n\r\nbody\r\n")
        return self.successResultOf(writer.commit())

    def test_deliveredOneInfoLine(self):
        """
        A message queued and relayed: one INFO line, the relay outcome; the
        spool's line about the commit and the runner's about the removal
        are DEBUG.
        """
        downstream = FakeDownstream()
        self.runner(downstream)
        events = _Events(self)
        queueId = self.queue()
        self.clock.advance(0)
        [(entry, _, d)] = downstream.calls
        d.callback(allWith(entry, ACCEPTED, 250, "2.0.0 ok"))
        self.assertEqual(self.spool.pending(), [])
        [info] = events.msa(LogLevel.info)
        self.assertEqual(
            (info["event"], info["queueId"], info["outcome"]),
            ("relay", queueId, "delivered"),
        )
        self.assertEqual(
            [e["log_format"] for e in events.msa(LogLevel.debug)],
            [
                "queued {queueId}: {size} bytes from <{sender}> for {count} "
                "recipient(s)",
                "{queueId} removed from the queue",
            ],
        )

    @defer.inlineCallbacks
    def test_outboxLineDebug(self):
        """
        The outbox's line about the file it wrote is DEBUG (the runner's
        outcome line names the file).
        """
        spool = Spool(self.mktemp())
        writer = spool.newMessage(makeEnvelope())
        writer.write(b"Subject: s\r\n\r\nbody\r\n")
        queueId = yield writer.commit()
        events = _Events(self)
        with spool.openMessage(queueId) as f:
            result = yield OutboxDownstream(self.mktemp()).deliver(
                spool.load(queueId), f
            )
        self.assertTrue(result.reply.startswith("250 written to "))
        self.assertEqual(events.msa(LogLevel.info), [])
        self.assertEqual(len(events.msa(LogLevel.debug)), 1)

    def test_deferredOneInfoLine(self):
        """
        A temporary failure: one INFO line, the relay outcome "deferred".
        """
        downstream = FakeDownstream()
        self.runner(downstream)
        events = _Events(self)
        queueId = self.queue()
        self.clock.advance(0)
        [(entry, _, d)] = downstream.calls
        d.callback(allWith(entry, TEMPORARY, 451, "4.3.0 later"))
        [info] = events.msa(LogLevel.info)
        self.assertEqual((info["queueId"], info["outcome"]), (queueId, "deferred"))
        self.assertEqual(self.spool.pending(), [queueId])

    def test_stateNotWrittenLoggedRetried(self):
        """
        A deferral whose state cannot be written (EROFS): an error line
        without a traceback; the entry is kept and attempted again
        retryBase later.
        """
        downstream = FakeDownstream()
        self.runner(downstream)
        events = _Events(self)
        queueId = self.queue()
        self.clock.advance(0)

        def readOnly(entry):
            raise OSError(errno.EROFS, "Read-only file system")

        self.spool.update = readOnly
        [(entry, _, d)] = downstream.calls
        d.callback(allWith(entry, TEMPORARY, 451, "4.3.0 later"))
        [error] = events.msa(LogLevel.error)
        self.assertNotIn("log_failure", error)
        self.assertIn("Read-only file system", str(error["error"]))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.spool.pending(), [queueId])
        del self.spool.update
        self.clock.advance(60)
        self.assertEqual(len(downstream.calls), 2)
        [_, (entry, _, d)] = downstream.calls
        d.callback(allWith(entry, ACCEPTED, 250, "2.0.0 ok"))
        self.assertEqual(self.spool.pending(), [])
