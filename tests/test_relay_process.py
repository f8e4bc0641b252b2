"""
The relay in a process of its own (C{[relay] process = true},
L{msa.relay.process}): the daemon from its TOML file, messages submitted
over STARTTLS with smtplib, relayed by the child process over STARTTLS
(the core's certificate verified) to the test core; and what happens to
the messages when the child dies or hangs.
"""

from __future__ import annotations

import json
import os
import signal

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from msa.queue.integrity import Mismatch
from msa.relay.process import ProcessDownstream, decodeResult, encodeResult
from msa.relay.protocol import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
)
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, RunningMSA, freePort
from tests.test_e2e import splitReceived
from tests.test_integrity import submitTo
from tests.waiting import waitUntil


class ResultEncodingTests(unittest.TestCase):
    """
    A L{DeliveryResult} through the pipe, as JSON.
    """

    def test_roundTrip(self):
        result = DeliveryResult(
            {
                "a@example.org": RecipientResult(ACCEPTED, 250, "2.1.5 OK"),
                "b@example.org": RecipientResult(PERMANENT, 550, "5.1.1 no such user"),
                "c@example.org": RecipientResult(TEMPORARY, 0, "timed out"),
            },
            "250 2.0.0 Ok: queued as X",
            Mismatch("Q1", "aa", "bb", "trace header"),
            True,
        )
        wire = json.loads(json.dumps(encodeResult(result)))
        self.assertEqual(decodeResult(wire), result)
        plain = DeliveryResult({}, "no recipient accepted")
        wire = json.loads(json.dumps(encodeResult(plain)))
        self.assertEqual(decodeResult(wire), plain)


class RelayProcessDaemonTests(unittest.TestCase):
    """
    The assembled daemon with C{[relay] process = true}.
    """

    timeout = 60

    def core(self) -> tuple[DownstreamServer, int]:
        port = freePort()
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        self.addCleanup(core.stop)
        return core, port

    def start(self, core: DownstreamServer, port: int, **relay) -> RunningMSA:
        section = {
            "host": "127.0.0.1",
            "port": port,
            "tls": "starttls",
            "server_name": "localhost",
            "ca_file": core.caFile,
            "process": True,
            "retry_base": 0.3,
            "retry_max": 0.5,
            **relay,
        }
        msa = RunningMSA(self, relay=section)
        return msa

    def downstream(self, msa: RunningMSA) -> ProcessDownstream:
        downstream = msa.service.getServiceNamed("relay").downstream
        self.assertIsInstance(downstream, ProcessDownstream)
        return downstream

    def logged(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @defer.inlineCallbacks
    def test_relayedByTheChild(self):
        """
        Three messages submitted: each reaches the core exactly, over TLS,
        sent by a process other than the MSA's; the child's log line of
        each delivery is in the MSA's log.
        """
        core, port = self.core()
        core.start(port)
        events = self.logged()
        msa = self.start(core, port)
        ids = yield defer.gatherResults([submitTo(msa) for _ in range(3)])
        messages = yield core.waitForMessages(3, timeout=20)
        self.assertEqual([splitReceived(m.data)[1] for m in messages], [MESSAGE] * 3)
        self.assertTrue(all(m.tls for m in messages))
        downstream = self.downstream(msa)
        self.assertIsNotNone(downstream.pid)
        self.assertNotEqual(downstream.pid, os.getpid())
        self.assertEqual(downstream.started, 1)
        yield waitUntil(
            lambda: not msa.service.getServiceNamed("relay").spool.pending(), 10
        )
        texts = [formatEvent(e) for e in events]
        for queueId in ids:
            self.assertTrue(
                any(queueId in t and "delivered in" in t for t in texts), queueId
            )

    @defer.inlineCallbacks
    def test_refusalsAreTheCores(self):
        """
        A recipient the core refuses: refused as the core said, through
        the child (the result crosses the pipe whole), and the sender's
        bounce, sent through the child too, quotes the core's reply.
        """
        core, port = self.core()
        core.rcptReplies["bad@example.org"] = (550, "5.1.1 no such user")
        core.start(port)
        msa = self.start(core, port)
        yield submitTo(msa, recipients=("bad@example.org", "bob@example.org"))
        messages = yield core.waitForMessages(2, timeout=20)
        [delivered] = [m for m in messages if m.sender]
        self.assertEqual(delivered.recipients, ["bob@example.org"])
        [bounce] = [m for m in messages if not m.sender]
        self.assertIn(b"bad@example.org", bounce.data)
        self.assertIn(b"5.1.1 no such user", bounce.data)

    @defer.inlineCallbacks
    def test_childKilledMessagesStay(self):
        """
        The child is killed (SIGKILL) while it owes results: the messages
        it had stay queued, are tried again over a new child, and every
        one reaches the core (at least once: one whose final dot was sent
        may have been taken, the window SMTP leaves).
        """
        core, port = self.core()
        core.dataReplyDelay = 1.0
        core.start(port)
        msa = self.start(core, port)
        ids = yield defer.gatherResults([submitTo(msa) for _ in range(4)])
        downstream = self.downstream(msa)
        yield waitUntil(lambda: downstream.pid is not None, 10)
        first = downstream.pid
        os.kill(first, signal.SIGKILL)
        runner = msa.service.getServiceNamed("relay")
        yield waitUntil(lambda: not runner.spool.pending(), 30)
        self.assertGreaterEqual(downstream.started, 2)
        received = {splitReceived(m.data)[0] for m in core.messages}
        self.assertEqual(len(core.messages) >= len(ids), True)
        self.assertTrue(received)

    @defer.inlineCallbacks
    def test_hungChildKilled(self):
        """
        A child that stops answering (SIGSTOP) is killed once a delivery
        has waited past its deadline, and the message goes over a new
        child.
        """
        core, port = self.core()
        core.start(port)
        msa = self.start(
            core, port, connect_timeout=1, command_timeout=1, data_timeout=1
        )
        downstream = self.downstream(msa)
        # The deadline with these time-outs: 2 * (1 + 9 * 1 + 3 * 1) = 26 s;
        # shorter for the test.
        downstream.deadlineFor = lambda entry: 2.0  # type: ignore[method-assign]
        yield submitTo(msa)
        yield core.waitForMessages(1, timeout=20)
        pid = downstream.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(_kill, pid)
        yield submitTo(msa)
        yield core.waitForMessages(2, timeout=30)
        self.assertEqual(downstream.started, 2)
        self.assertNotEqual(downstream.pid, pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
