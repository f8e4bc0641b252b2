# -*- test-case-name: tests.test_reactorguard -*-
"""
No blocking disk work on the reactor thread (issue 18, item 11): the guard
of the end-to-end tests (L{tests.reactorguard}) itself, and the daemon's
paths that used to do such work: a deferred attempt's state rewrite, the
verification of a message under 1 MiB before it is relayed, and the
re-hash of the original for a bounce.
"""

import io
import os
import types
from functools import partial

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from msa import durable
from msa.queue import integrity
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, AiosmtpdCore, RunningMSA
from tests.reactorguard import HASH_LIMIT, ReactorThreadGuard
from tests.test_e2e import RECIPIENT, submit
from tests.waiting import waitUntil

#: A message the relay used to verify on the reactor thread (under 1 MiB).
LARGE = MESSAGE + b"".join(
    b"regel %06d " % i + b"y" * 80 + b"\r\n" for i in range(6000)
)


class GuardTests(unittest.TestCase):
    """
    What the guard records: the MSA's code doing blocking work on the
    reactor thread by itself, not in a thread and not the test's own.
    """

    def setUp(self):
        self.guard = ReactorThreadGuard(reactor)
        self.guard.install()
        self.addCleanup(self.guard.uninstall)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def later(self, f, *args):
        """
        Call C{f(*args)} from the reactor, as it calls the daemon.
        """
        return task.deferLater(reactor, 0, partial(f, *args))

    @defer.inlineCallbacks
    def test_fsyncOnTheReactor(self):
        yield self.later(durable.fsyncDirectory, self.directory)
        [(what, stack)] = self.guard.violations
        self.assertEqual(what, "os.fsync")
        self.assertIn("fsyncDirectory", self.guard.report())
        self.assertIn(durable.__file__, [f.filename for f in stack])

    @defer.inlineCallbacks
    def test_fileCreationOnTheReactor(self):
        path = os.path.join(self.directory, "new")
        yield self.later(durable.writeSynced, path, b"data")
        self.assertEqual(
            [what for what, _ in self.guard.violations],
            [f"os.open({path!r}, O_CREAT)", "os.fsync"],
        )

    @defer.inlineCallbacks
    def test_hashingOnTheReactor(self):
        """
        Hashing more than L{HASH_LIMIT} bytes in one reactor iteration (the
        re-hash of a queued message) is recorded; a small message is not.
        """
        data = b"x" * (HASH_LIMIT + 1)
        entry = types.SimpleNamespace(
            queueId="Q", sha256="0" * 64, traceLength=0, traceSha256=""
        )
        yield self.later(integrity.verifyFile, entry, io.BytesIO(data[:1000]))
        self.assertEqual(self.guard.violations, [])
        yield self.later(integrity.verifyFile, entry, io.BytesIO(data))
        [(what, _)] = self.guard.violations
        self.assertEqual(
            what, f"hashing of {HASH_LIMIT + 1} bytes in one reactor iteration"
        )

    @defer.inlineCallbacks
    def test_notInAThreadNorByTheTest(self):
        yield threads.deferToThread(durable.fsyncDirectory, self.directory)
        durable.fsyncDirectory(self.directory)
        with self.guard.allowed():
            yield self.later(durable.fsyncDirectory, self.directory)
        self.assertEqual(self.guard.violations, [])

    @defer.inlineCallbacks
    def test_checkFails(self):
        yield self.later(durable.fsyncDirectory, self.directory)
        error = self.assertRaises(self.failureException, self.guard.check, self)
        self.assertIn("1 blocking call(s) on the reactor thread", str(error))
        self.assertIn("os.fsync on the reactor thread", str(error))


class DaemonTests(unittest.TestCase):
    """
    The assembled daemon, with the guard of L{RunningMSA}: each path below
    did blocking work on the reactor thread before issue 18.
    """

    timeout = 60

    def submit(self, msa, message=MESSAGE):
        return threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext(), message=message
        )

    def coreRelay(self, core, **more):
        return {
            "host": "127.0.0.1",
            "port": core.port,
            "tls": "starttls",
            "server_name": "localhost",
            "ca_file": core.caFile,
            **more,
        }

    @defer.inlineCallbacks
    def test_largeMessageVerifiedInAThread(self):
        """
        A message of about 550 KB is checked against its digest before
        DATA, in a thread, and relayed byte for byte.
        """
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        code, _ = yield self.submit(msa, LARGE)
        self.assertEqual(code, 250)
        [(_, _, data, _)] = yield core.waitForMessages(1)
        self.assertTrue(data.endswith(LARGE))
        self.assertEqual(msa.guard.violations, [])

    @defer.inlineCallbacks
    def test_deferralAndBounceOffTheReactor(self):
        """
        The core defers the recipient (its state is rewritten for the
        retry, in a thread), then refuses it for good: the original (about
        550 KB) is re-hashed for the bounce in a thread, and the bounce is
        relayed.
        """
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.rcptReplies = {RECIPIENT: (450, "4.2.0 not now")}
        port = core.start()
        self.addCleanup(core.stop)
        core.port = port
        msa = RunningMSA(
            self, relay=self.coreRelay(core, retry_base=0.2, retry_max=0.5)
        )
        spool = msa.service.getServiceNamed("relay").spool
        code, text = yield self.submit(msa, LARGE)
        self.assertEqual(code, 250)
        queueId = text.split()[-1].decode()
        yield waitUntil(
            lambda: spool.load(queueId).attempts >= 1, 10, "the deferred attempt"
        )
        core.rcptReplies = {RECIPIENT: (550, "5.1.1 no such user")}
        bounces = lambda: [m for m in core.messages if m.sender == ""]  # noqa: E731
        yield waitUntil(bounces, 20, "the bounce relayed")
        [bounce] = bounces()
        self.assertIn(b"Action: failed", bounce.data)
        self.assertIn(b"Status: 5.1.1", bounce.data)
        yield waitUntil(lambda: not spool.pending(), 10, "an empty queue")
        self.assertEqual(msa.guard.violations, [])
