"""
Tests for L{msa.relay.runner} and L{msa.relay.client}: the dot-stuffer, delivery to a
real downstream over TLS, and the queue runner's retry logic.
"""

import os
import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from msa.envelope import Envelope
from msa.queue.spool import DELIVERED, FAILED, PENDING, Spool
from msa.relay.runner import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    DotStuffer,
    OutboxDownstream,
    RecipientResult,
    RelayRunner,
    SMTPDownstream,
    dotStuff,
)
from msa.tls import clientContextFactory
from tests.downstream import DownstreamServer

DOTTY = (
    b"Subject: dots\r\n\r\n.\r\n..\r\n.a\r\nb.\r\n\r\n...c\r\nd\r\n.e\r\n"
    + b"x" * 7
    + b"\r\n.f\r\nno final newline."
)


def unstuff(wire: bytes) -> bytes:
    """
    What a server makes of stuffed data (up to and without the final dot).
    """
    assert wire.endswith(b"\r\n.\r\n")
    lines = wire[:-3].split(b"\r\n")[:-1]
    return b"".join(
        (line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines
    )


class DotStufferTests(unittest.TestCase):
    def test_simple(self):
        self.assertEqual(dotStuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(dotStuff(b".\r\n"), b"..\r\n.\r\n")
        self.assertEqual(dotStuff(b""), b".\r\n")
        self.assertEqual(dotStuff(b"a"), b"a\r\n.\r\n")
        self.assertEqual(dotStuff(b"a\r\n"), b"a\r\n.\r\n")
        self.assertEqual(dotStuff(b"a.\r\nb\r\n"), b"a.\r\nb\r\n.\r\n")

    def test_everyChunking(self):
        """
        Whatever the chunk size and wherever the boundaries fall (before or
        after the dot, between CR and LF), the result is the same.
        """
        expected = dotStuff(DOTTY)
        self.assertIn(b"\r\n..\r\n...\r\n..a\r\n", expected)
        self.assertIn(b"\r\n....c\r\n", expected)
        self.assertTrue(expected.startswith(b"Subject"))
        self.assertTrue(expected.endswith(b"no final newline.\r\n.\r\n"))
        for size in range(1, 21):
            for offset in range(size):
                stuffer = DotStuffer()
                pieces = [DOTTY[:offset]] + [
                    DOTTY[i : i + size] for i in range(offset, len(DOTTY), size)
                ]
                out = b"".join(stuffer.feed(p) for p in pieces) + stuffer.finish()
                self.assertEqual(out, expected, (size, offset))

    def test_roundTrip(self):
        self.assertEqual(unstuff(dotStuff(DOTTY)), DOTTY + b"\r\n")
        self.assertEqual(unstuff(dotStuff(b".x\r\n")), b".x\r\n")

    def test_leadingDot(self):
        """
        A "." as the very first byte of a chunk that starts a line.
        """
        stuffer = DotStuffer()
        self.assertEqual(stuffer.feed(b"a\r\n"), b"a\r\n")
        self.assertEqual(stuffer.feed(b".b\r"), b"..b\r")
        self.assertEqual(stuffer.feed(b"\n."), b"\n..")
        self.assertEqual(stuffer.feed(b"."), b".")
        self.assertEqual(stuffer.finish(), b"\r\n.\r\n")


def makeEnvelope(recipients=("bob@example.org",)) -> Envelope:
    return Envelope(sender="alice@example.com", recipients=list(recipients))


def bigMessage() -> bytes:
    """
    A message of a few chunks of the file sender, with lines starting with
    "." exactly at its 16 KiB chunk boundaries and elsewhere.
    """
    body = bytearray(b"Subject: big\r\n\r\n")
    for boundary in (16384, 32768, 49152):
        while len(body) < boundary - 80:
            body += b"y" * 60 + b"\r\n"
        pad = boundary - len(body) - 2
        body += b"z" * pad + b"\r\n"
        assert len(body) == boundary
        body += b"..starts a chunk\r\n"
    body += b".\r\n..\r\n.end\r\n"
    return bytes(body)


class SMTPDownstreamTests(unittest.TestCase):
    """
    Delivery over a real socket to L{DownstreamServer}.
    """

    timeout = 15

    def setUp(self):
        self.spool = Spool(self.mktemp())

    def startServer(self, tlsMode="starttls"):
        server = DownstreamServer(self.mktemp(), tlsMode=tlsMode)
        self.port = server.start()
        self.addCleanup(server.stop)
        return server

    def downstream(self, server, hostname="localhost", **kwargs):
        kwargs.setdefault("commandTimeout", 5)
        if "contextFactory" not in kwargs and kwargs.get("tlsMode") != "none":
            kwargs["contextFactory"] = clientContextFactory(
                hostname, caFile=server.caFile
            )
        downstream = SMTPDownstream("127.0.0.1", self.port, **kwargs)
        self.addCleanup(downstream.close)
        return downstream

    @defer.inlineCallbacks
    def queue(self, data=DOTTY, recipients=("bob@example.org",), envelope=None):
        writer = self.spool.newMessage(envelope or makeEnvelope(recipients))
        writer.write(data)
        queueId = yield writer.commit()
        return self.spool.load(queueId)

    @defer.inlineCallbacks
    def deliver(self, downstream, entry):
        with self.spool.openMessage(entry.queueId) as f:
            result = yield downstream.deliver(entry, f)
        return result

    @defer.inlineCallbacks
    def test_startTLSExactBytes(self):
        """
        Over verified STARTTLS, the core receives exactly the spooled bytes,
        lines starting with "." included, and nothing before TLS but EHLO
        and STARTTLS.
        """
        server = self.startServer()
        data = bigMessage()
        entry = yield self.queue(
            data, recipients=("bob@example.org", "carol@example.org")
        )
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.accepted, ["bob@example.org", "carol@example.org"])
        self.assertIn("queued as CORE1", result.reply)
        self.assertTrue(result.reply.startswith("250 "))
        [message] = server.messages
        self.assertEqual(message.data, data)
        self.assertTrue(message.tls)
        self.assertEqual(message.sender, "alice@example.com")
        self.assertEqual(message.recipients, ["bob@example.org", "carol@example.org"])
        self.assertEqual(server.plaintextCommands(), [b"EHLO localhost", b"STARTTLS"])

    @defer.inlineCallbacks
    def test_finalLineWithoutCRLF(self):
        server = self.startServer()
        entry = yield self.queue(DOTTY)
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertEqual(server.messages[0].data, DOTTY + b"\r\n")

    @defer.inlineCallbacks
    def test_noStartTLS(self):
        """
        A core that does not offer STARTTLS: temporary failure, and nothing
        of the message is sent in plaintext.
        """
        server = self.startServer(tlsMode="none")
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.temporary, ["bob@example.org"])
        self.assertIn("STARTTLS", result.recipients["bob@example.org"].text)
        self.assertEqual(server.plaintextCommands(), [b"EHLO localhost"])
        self.assertEqual(server.messages, [])

    @defer.inlineCallbacks
    def test_startTLSRefused(self):
        server = self.startServer()
        server.refuseStartTLS = (454, "4.7.0 TLS not available")
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.temporary, ["bob@example.org"])
        self.assertNotIn(b"MAIL", b" ".join(server.plaintextCommands()))

    @defer.inlineCallbacks
    def test_wrongCertificateName(self):
        """
        A certificate that does not match the configured name: temporary
        failure, nothing sent.
        """
        server = self.startServer()
        entry = yield self.queue()
        result = yield self.deliver(
            self.downstream(server, hostname="core.example"), entry
        )
        self.assertEqual(result.temporary, ["bob@example.org"])
        self.assertEqual(server.messages, [])
        self.assertEqual([c for c in server.commands if c[0]], [])

    @defer.inlineCallbacks
    def test_untrustedCertificate(self):
        server = self.startServer()
        other = DownstreamServer(self.mktemp())
        entry = yield self.queue()
        downstream = self.downstream(
            server,
            contextFactory=clientContextFactory("localhost", caFile=other.caFile),
        )
        result = yield self.deliver(downstream, entry)
        self.assertEqual(result.temporary, ["bob@example.org"])
        self.assertEqual(server.messages, [])

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        server = self.startServer(tlsMode="implicit")
        entry = yield self.queue(bigMessage())
        result = yield self.deliver(self.downstream(server, tlsMode="implicit"), entry)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertEqual(server.messages[0].data, bigMessage())
        self.assertTrue(server.messages[0].tls)

    @defer.inlineCallbacks
    def test_plaintextWhenConfigured(self):
        server = self.startServer(tlsMode="none")
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server, tlsMode="none"), entry)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertFalse(server.messages[0].tls)

    @defer.inlineCallbacks
    def test_auth(self):
        server = self.startServer()
        server.accounts = {"msa": "s3cret"}
        entry = yield self.queue()
        downstream = self.downstream(server, authUsername="msa", authPassword="s3cret")
        result = yield self.deliver(downstream, entry)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertEqual(server.messages[0].authenticated, "msa")

    @defer.inlineCallbacks
    def test_authRefused(self):
        server = self.startServer()
        server.accounts = {"msa": "other"}
        entry = yield self.queue()
        downstream = self.downstream(server, authUsername="msa", authPassword="s3cret")
        result = yield self.deliver(downstream, entry)
        self.assertEqual(result.temporary, ["bob@example.org"])

    @defer.inlineCallbacks
    def test_mailTemporary(self):
        server = self.startServer()
        server.mailReply = (451, "4.3.0 try later")
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(
            result.recipients["bob@example.org"],
            RecipientResult(TEMPORARY, 451, "4.3.0 try later"),
        )

    @defer.inlineCallbacks
    def test_mailPermanent(self):
        server = self.startServer()
        server.mailReply = (550, "5.7.1 sender refused")
        entry = yield self.queue(recipients=("a@example.org", "b@example.org"))
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.permanent, ["a@example.org", "b@example.org"])

    @defer.inlineCallbacks
    def test_rcptMixed(self):
        server = self.startServer()
        server.rcptReplies = {
            "a@example.org": (550, "5.1.1 no such user"),
            "c@example.org": (452, "4.2.2 mailbox full"),
        }
        entry = yield self.queue(
            recipients=("a@example.org", "b@example.org", "c@example.org")
        )
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.permanent, ["a@example.org"])
        self.assertEqual(result.accepted, ["b@example.org"])
        self.assertEqual(result.temporary, ["c@example.org"])
        self.assertEqual(server.messages[0].recipients, ["b@example.org"])

    @defer.inlineCallbacks
    def test_dataTemporary(self):
        """
        Recipients accepted at RCPT, then the data refused with 4xx:
        temporary for them, permanent stays permanent.
        """
        server = self.startServer()
        server.finalReply = (451, "4.3.0 queue full")
        server.rcptReplies = {"a@example.org": (550, "5.1.1 no such user")}
        entry = yield self.queue(recipients=("a@example.org", "b@example.org"))
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.temporary, ["b@example.org"])
        self.assertEqual(result.permanent, ["a@example.org"])

    @defer.inlineCallbacks
    def test_dataPermanent(self):
        server = self.startServer()
        server.dataReply = (554, "5.3.4 no")
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.permanent, ["bob@example.org"])

    @defer.inlineCallbacks
    def test_eightBitAndParams(self):
        server = self.startServer()
        entry = yield self.queue("Subject: é\r\n\r\n".encode())
        yield self.deliver(self.downstream(server), entry)
        self.assertIn("BODY=8BITMIME", server.messages[0].mailParams)
        self.assertIn(f"SIZE={entry.size}", server.messages[0].mailParams)

    @defer.inlineCallbacks
    def test_greetingTimeout(self):
        server = self.startServer()
        server.silent = True
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server, commandTimeout=0.3), entry)
        self.assertEqual(result.temporary, ["bob@example.org"])
        self.assertIn("timed out", result.recipients["bob@example.org"].text)

    @defer.inlineCallbacks
    def test_connectionRefused(self):
        server = self.startServer()
        yield server.stop()
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.temporary, ["bob@example.org"])


class OutboxDownstreamTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_exactBytes(self):
        spool = Spool(self.mktemp())
        outbox = self.mktemp()
        writer = spool.newMessage(makeEnvelope(("a@example.org", "b@example.org")))
        data = bigMessage()
        writer.write(data)
        queueId = yield writer.commit()
        entry = spool.load(queueId)
        with spool.openMessage(queueId) as f:
            result = yield OutboxDownstream(outbox).deliver(entry, f)
        self.assertEqual(result.accepted, ["a@example.org", "b@example.org"])
        self.assertEqual(os.listdir(outbox), [queueId + ".eml"])
        with open(os.path.join(outbox, queueId + ".eml"), "rb") as f:
            self.assertEqual(f.read(), data)


class FakeDownstream:
    """
    A downstream whose results the test decides: each deliver() waits on a
    Deferred the test fires.
    """

    def __init__(self):
        self.calls = []

    def deliver(self, entry, messageFile):
        d = defer.Deferred()
        self.calls.append((entry, messageFile.read(), d))
        return d


def allWith(entry, status, code=0, text=""):
    return DeliveryResult(
        {r: RecipientResult(status, code, text) for r in entry.pendingRecipients()},
        f"{code} {text}",
    )


class RelayRunnerTests(unittest.TestCase):
    """
    Scheduling and state logic with a fake clock and downstream.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), reactor=self.clock)
        self.downstream = FakeDownstream()
        self.runner = RelayRunner(self.spool, self.downstream, reactor=self.clock)
        self.failures = []
        self.runner.onPermanentFailure = lambda e, r, reply: self.failures.append(
            (e.queueId, r, reply)
        )

    def queue(self, recipients=("bob@example.org",)):
        writer = self.spool.newMessage(makeEnvelope(recipients))
        writer.write(DOTTY)
        return self.successResultOf(writer.commit())

    def test_wakeDelivers(self):
        """
        A new message goes out promptly and leaves the spool only after the
        core's 250.
        """
        self.runner.startService()
        queueId = self.queue()
        self.assertEqual(self.downstream.calls, [])
        self.clock.advance(0)
        [(entry, data, d)] = self.downstream.calls
        self.assertEqual(entry.queueId, queueId)
        self.assertEqual(data, DOTTY)
        self.assertEqual(self.spool.pending(), [queueId])
        d.callback(allWith(entry, ACCEPTED, 250, "queued as X"))
        self.assertEqual(self.spool.pending(), [])

    def test_startSchedulesPending(self):
        first = self.queue()
        second = self.queue()
        entry = self.spool.load(second)
        entry.nextAttempt = self.clock.seconds() + 100
        self.spool.update(entry)
        self.runner.startService()
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first])
        self.clock.advance(100)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [first, second])

    def test_temporaryFailureRetried(self):
        """
        451: attempts incremented, lastError and nextAttempt set with
        exponential back-off, delivered again later.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        start = self.clock.seconds()
        for attempt, base in ((1, 60), (2, 120), (3, 240)):
            entry, _, d = self.downstream.calls[-1]
            d.callback(allWith(entry, TEMPORARY, 451, "4.3.0 try later"))
            saved = self.spool.load(queueId)
            self.assertEqual(saved.attempts, attempt)
            self.assertEqual(saved.lastError, "451 4.3.0 try later")
            self.assertEqual(saved.recipients, {"bob@example.org": PENDING})
            delay = saved.nextAttempt - self.clock.seconds()
            self.assertTrue(base * 0.9 <= delay <= base * 1.1, (attempt, delay))
            self.clock.advance(base * 0.9 - 0.001)
            self.assertEqual(len(self.downstream.calls), attempt)
            self.clock.advance(base * 0.2)
            self.assertEqual(len(self.downstream.calls), attempt + 1)
        self.assertGreater(self.clock.seconds(), start)

    def test_retryDelayCapped(self):
        for attempts in (7, 8, 20):
            self.assertLessEqual(self.runner.retryDelay(attempts), 3600 * 1.1)
            self.assertGreaterEqual(self.runner.retryDelay(attempts), 3600 * 0.9)

    def test_partialSuccess(self):
        """
        550 on one of two recipients: the other is delivered, the refused
        one failed, and the entry is removed; a temporary one stays.
        """
        self.runner.startService()
        queueId = self.queue(("a@example.org", "b@example.org", "c@example.org"))
        self.clock.advance(0)
        entry, _, d = self.downstream.calls[0]
        d.callback(
            DeliveryResult(
                {
                    "a@example.org": RecipientResult(PERMANENT, 550, "5.1.1 unknown"),
                    "b@example.org": RecipientResult(ACCEPTED, 250, "ok"),
                    "c@example.org": RecipientResult(TEMPORARY, 452, "4.2.2 full"),
                },
                "250 ok",
            )
        )
        self.assertEqual(self.failures, [(queueId, ["a@example.org"], "250 ok")])
        saved = self.spool.load(queueId)
        self.assertEqual(
            saved.recipients,
            {
                "a@example.org": FAILED,
                "b@example.org": DELIVERED,
                "c@example.org": PENDING,
            },
        )
        self.assertEqual(saved.errors["a@example.org"], "550 5.1.1 unknown")
        self.clock.advance(70)
        entry, _, d = self.downstream.calls[1]
        self.assertEqual(entry.pendingRecipients(), ["c@example.org"])
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual(self.spool.pending(), [])

    def test_permanentOnly(self):
        self.runner.startService()
        queueId = self.queue(("a@example.org", "b@example.org"))
        self.clock.advance(0)
        entry, _, d = self.downstream.calls[0]
        d.callback(
            DeliveryResult(
                {
                    "a@example.org": RecipientResult(PERMANENT, 550, "no"),
                    "b@example.org": RecipientResult(ACCEPTED, 250, "ok"),
                },
                "250 ok",
            )
        )
        self.assertEqual(self.failures, [(queueId, ["a@example.org"], "250 ok")])
        self.assertEqual(self.spool.pending(), [])

    def test_expiry(self):
        self.runner.maxLifetime = 300
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        for _ in range(10):
            if not self.downstream.calls[-1][2].called:
                entry, _, d = self.downstream.calls[-1]
                d.callback(allWith(entry, TEMPORARY, 421, "down"))
            self.clock.advance(3600)
        self.assertEqual(self.spool.pending(), [])
        [(failedId, recipients, reply)] = self.failures
        self.assertEqual((failedId, recipients), (queueId, ["bob@example.org"]))
        self.assertIn("expired", reply)
        self.assertLessEqual(len(self.downstream.calls), 4)

    def test_concurrencyAndOnePerMessage(self):
        self.runner.concurrency = 2
        self.runner.startService()
        ids = [self.queue() for _ in range(3)]
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], ids[:2])
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, ACCEPTED, 250, "ok"))
        self.assertEqual([c[0].queueId for c in self.downstream.calls], ids)

    def test_downstreamError(self):
        """
        A downstream that fails outright is a temporary failure.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.downstream.calls[0][2].errback(RuntimeError("boom"))
        self.assertEqual(self.spool.load(queueId).attempts, 1)
        self.flushLoggedErrors(RuntimeError)

    def test_stopWaitsForInFlight(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        stopped = self.runner.stopService()
        self.assertNoResult(stopped)
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, TEMPORARY, 421, "down"))
        self.successResultOf(stopped)
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.assertEqual(self.spool.pending(), [queueId])
        self.queue()
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 1)

    def test_stopBounded(self):
        self.runner.startService()
        self.queue()
        self.clock.advance(0)
        stopped = self.runner.stopService()
        self.clock.advance(self.runner.stopTimeout)
        self.successResultOf(stopped)


class EndToEndTests(unittest.TestCase):
    """
    Spool, runner and SMTP downstream together, on the real reactor.
    """

    timeout = 15

    @defer.inlineCallbacks
    def test_deliveredThenRemoved(self):
        server = DownstreamServer(self.mktemp())
        port = server.start()
        self.addCleanup(server.stop)
        server.rcptReplies = {"refused@example.org": (550, "5.1.1 unknown")}
        spool = Spool(self.mktemp())
        downstream = SMTPDownstream(
            "127.0.0.1",
            port,
            contextFactory=clientContextFactory("localhost", caFile=server.caFile),
            commandTimeout=5,
        )
        runner = RelayRunner(spool, downstream)
        runner.startService()
        self.addCleanup(runner.stopService)
        writer = spool.newMessage(
            makeEnvelope(("bob@example.org", "refused@example.org"))
        )
        data = bigMessage()
        writer.write(data)
        queueId = yield writer.commit()
        [message] = yield server.waitForMessages(1)
        self.assertEqual(message.data, data)
        self.assertEqual(message.recipients, ["bob@example.org"])
        for _ in range(100):
            if not spool.pending():
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(spool.pending(), [])
        self.assertFalse(
            os.path.exists(os.path.join(spool.queueDirectory, queueId + ".msg"))
        )


class EndToEndFailureTests(unittest.TestCase):
    """
    Temporary failures through the runner on the real reactor: the entry
    stays queued with its retry state.
    """

    timeout = 15

    @defer.inlineCallbacks
    def runOnce(self, server):
        port = server.start()
        self.addCleanup(server.stop)
        spool = Spool(self.mktemp())
        downstream = SMTPDownstream(
            "127.0.0.1",
            port,
            contextFactory=clientContextFactory("localhost", caFile=server.caFile),
            commandTimeout=5,
        )
        runner = RelayRunner(spool, downstream)
        runner.startService()
        self.addCleanup(runner.stopService)
        writer = spool.newMessage(makeEnvelope())
        writer.write(DOTTY)
        queueId = yield writer.commit()
        for _ in range(200):
            entry = spool.load(queueId)
            if entry.attempts:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(spool.pending(), [queueId])
        self.assertEqual(entry.attempts, 1)
        self.assertEqual(entry.recipients, {"bob@example.org": PENDING})
        self.assertTrue(54 <= entry.nextAttempt - reactor.seconds() <= 66)
        self.assertEqual(server.messages, [])
        return entry

    @defer.inlineCallbacks
    def test_mail451(self):
        server = DownstreamServer(self.mktemp())
        server.mailReply = (451, "4.3.0 try again later")
        entry = yield self.runOnce(server)
        self.assertIn("451 4.3.0 try again later", entry.lastError)

    @defer.inlineCallbacks
    def test_noStartTLS(self):
        server = DownstreamServer(self.mktemp(), tlsMode="none")
        entry = yield self.runOnce(server)
        self.assertIn("STARTTLS", entry.lastError)
        self.assertEqual(server.plaintextCommands(), [b"EHLO localhost"])


class AiosmtpdInteropTests(unittest.TestCase):
    """
    The stuffing against an independent server implementation: aiosmtpd in
    a thread, plain TCP (TLS is covered above).
    """

    timeout = 15

    @defer.inlineCallbacks
    def test_exactBytes(self):
        from aiosmtpd.controller import Controller

        received = []

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                received.append(envelope.original_content)
                return "250 2.0.0 Ok: queued as AIO1"

        # aiosmtpd cannot listen on port 0: borrow a free port.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        controller = Controller(Handler(), hostname="127.0.0.1", port=port)
        controller.start()
        self.addCleanup(controller.stop)
        spool = Spool(self.mktemp())
        writer = spool.newMessage(makeEnvelope())
        data = bigMessage()
        writer.write(data)
        queueId = yield writer.commit()
        downstream = SMTPDownstream("127.0.0.1", port, tlsMode="none", commandTimeout=5)
        self.addCleanup(downstream.close)
        with spool.openMessage(queueId) as f:
            result = yield downstream.deliver(spool.load(queueId), f)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertIn("AIO1", result.reply)
        self.assertEqual(received, [data])


class ConnectionReuseTests(unittest.TestCase):
    """
    Several messages over one connection to the core, RSET between.
    """

    timeout = 15

    def setUp(self):
        self.server = DownstreamServer(self.mktemp())
        self.port = self.server.start()
        self.addCleanup(self.server.stop)
        self.spool = Spool(self.mktemp())

    def downstream(self, **kwargs):
        kwargs.setdefault("commandTimeout", 5)
        downstream = SMTPDownstream(
            "127.0.0.1",
            self.port,
            contextFactory=clientContextFactory("localhost", caFile=self.server.caFile),
            **kwargs,
        )
        self.addCleanup(downstream.close)
        return downstream

    @defer.inlineCallbacks
    def queue(self, data, recipients=("bob@example.org",)):
        writer = self.spool.newMessage(makeEnvelope(recipients))
        writer.write(data)
        queueId = yield writer.commit()
        return queueId

    @defer.inlineCallbacks
    def deliver(self, downstream, queueId):
        with self.spool.openMessage(queueId) as f:
            result = yield downstream.deliver(self.spool.load(queueId), f)
        return result

    @defer.inlineCallbacks
    def runQueue(self, count, concurrency):
        """
        Queue C{count} different messages, then start a runner.
        """
        bodies = [
            b"Subject: %d\r\n\r\nbody %d\r\n.dot\r\n" % (i, i) for i in range(count)
        ]
        for body in bodies:
            yield self.queue(body)
        runner = RelayRunner(self.spool, self.downstream(), concurrency=concurrency)
        runner.startService()
        self.addCleanup(runner.stopService)
        yield self.server.waitForMessages(count)
        for _ in range(100):
            if not self.spool.pending():
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.spool.pending(), [])
        self.assertEqual(sorted(m.data for m in self.server.messages), sorted(bodies))
        return bodies

    @defer.inlineCallbacks
    def test_oneConnection(self):
        """
        Five messages queued together, one delivery at a time: one
        connection, an RSET before each message but the first, one TLS
        handshake.
        """
        yield self.runQueue(5, concurrency=1)
        self.assertEqual(self.server.connections, 1)
        verbs = [c.split(b" ")[0] for tls, c in self.server.commands if tls]
        self.assertEqual(verbs.count(b"RSET"), 4)
        self.assertEqual(verbs.count(b"MAIL"), 5)
        self.assertEqual(self.server.plaintextCommands().count(b"STARTTLS"), 1)

    @defer.inlineCallbacks
    def test_concurrentConnections(self):
        yield self.runQueue(8, concurrency=2)
        self.assertLessEqual(self.server.connections, 2)

    @defer.inlineCallbacks
    def test_staleConnection(self):
        """
        A parked connection the core closed meanwhile: a new one, no
        failure.
        """
        downstream = self.downstream()
        first = yield self.queue(DOTTY)
        second = yield self.queue(DOTTY)
        result = yield self.deliver(downstream, first)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertEqual(downstream.idleConnections, 1)
        self.server.dropConnections()
        yield task.deferLater(reactor, 0.05, lambda: None)
        result = yield self.deliver(downstream, second)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertEqual(self.server.connections, 2)

    @defer.inlineCallbacks
    def test_reuseAfterRefusal(self):
        """
        A refused transaction leaves the connection usable.
        """
        downstream = self.downstream()
        self.server.mailReply = (550, "5.7.1 no")
        first = yield self.queue(DOTTY)
        result = yield self.deliver(downstream, first)
        self.assertEqual(result.permanent, ["bob@example.org"])
        self.server.mailReply = None
        second = yield self.queue(DOTTY)
        result = yield self.deliver(downstream, second)
        self.assertEqual(result.accepted, ["bob@example.org"])
        self.assertEqual(self.server.connections, 1)

    @defer.inlineCallbacks
    def test_idleTimeout(self):
        downstream = self.downstream(idleTimeout=0.1)
        queueId = yield self.queue(DOTTY)
        yield self.deliver(downstream, queueId)
        self.assertEqual(downstream.idleConnections, 1)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(downstream.idleConnections, 0)
        self.assertEqual(self.server.commands[-1], (True, b"QUIT"))

    @defer.inlineCallbacks
    def test_maxTransactions(self):
        downstream = self.downstream(maxTransactions=2)
        for _ in range(3):
            queueId = yield self.queue(DOTTY)
            yield self.deliver(downstream, queueId)
        self.assertEqual(self.server.connections, 2)

    @defer.inlineCallbacks
    def test_noReuse(self):
        downstream = self.downstream(idleTimeout=0)
        for _ in range(2):
            queueId = yield self.queue(DOTTY)
            yield self.deliver(downstream, queueId)
        self.assertEqual(self.server.connections, 2)
        self.assertEqual(downstream.idleConnections, 0)

    @defer.inlineCallbacks
    def test_close(self):
        downstream = self.downstream()
        queueId = yield self.queue(DOTTY)
        yield self.deliver(downstream, queueId)
        yield downstream.close()
        self.assertEqual(downstream.idleConnections, 0)
        self.assertEqual(self.server.commands[-1], (True, b"QUIT"))


class QueueControlTests(unittest.TestCase):
    """
    flush, hold, release, delete and describe, with a fake clock.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), reactor=self.clock)
        self.downstream = FakeDownstream()
        self.runner = RelayRunner(self.spool, self.downstream, reactor=self.clock)

    def queue(self, recipients=("bob@example.org",)):
        writer = self.spool.newMessage(makeEnvelope(recipients))
        writer.write(DOTTY)
        return self.successResultOf(writer.commit())

    def fail451(self):
        entry, _, d = self.downstream.calls[-1]
        d.callback(allWith(entry, TEMPORARY, 451, "4.3.0 later"))
        return entry.queueId

    def test_describe(self):
        self.runner.startService()
        first = self.queue(("a@example.org", "b@example.org"))
        self.clock.advance(0)
        entry, _, d = self.downstream.calls[0]
        d.callback(
            DeliveryResult(
                {
                    "a@example.org": RecipientResult(ACCEPTED, 250, "ok"),
                    "b@example.org": RecipientResult(TEMPORARY, 452, "4.2.2 full"),
                },
                "250 ok",
            )
        )
        self.clock.advance(10)
        second = self.queue()
        self.runner.hold(second)
        [a, b] = self.runner.describe()
        self.assertEqual(a["id"], first)
        self.assertEqual(a["age"], 10)
        self.assertEqual(a["size"], len(DOTTY))
        self.assertEqual(a["sender"], "alice@example.com")
        self.assertEqual(
            a["recipients"], {"a@example.org": DELIVERED, "b@example.org": PENDING}
        )
        self.assertEqual(a["errors"], {"b@example.org": "452 4.2.2 full"})
        self.assertEqual(a["attempts"], 1)
        self.assertGreater(a["nextAttempt"], self.clock.seconds())
        self.assertEqual(a["lastError"], "250 ok")
        self.assertFalse(a["held"])
        self.assertFalse(a["inFlight"])
        self.assertEqual((b["id"], b["held"], b["attempts"]), (second, True, 0))

    def test_flush(self):
        self.runner.startService()
        first = self.queue()
        self.clock.advance(0)
        self.fail451()
        second = self.queue()
        self.clock.advance(0)
        self.fail451()
        self.assertEqual(self.runner.flush(first), [first])
        self.assertEqual(self.spool.load(first).nextAttempt, self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual(self.downstream.calls[-1][0].queueId, first)
        self.fail451()
        self.assertEqual(self.runner.flush(), [first, second])
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 5)

    def test_flushInFlight(self):
        """
        Flushing a message in flight: attempted again right after.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.assertEqual(self.runner.flush(), [queueId])
        self.fail451()
        self.assertEqual(self.spool.load(queueId).nextAttempt, self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 2)

    def test_hold(self):
        """
        A held message is not attempted, not by flush either, and stays
        held across a restart; release attempts it at once.
        """
        queueId = self.queue()
        other = self.queue()
        self.runner.hold(queueId)
        self.assertTrue(self.spool.load(queueId).held)
        self.runner.startService()
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.downstream.calls], [other])
        # The other one is in flight: flushed, to be tried again at once.
        self.assertEqual(self.runner.flush(), [other])
        self.assertEqual(self.runner.flush(queueId), [])
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.runner.release(queueId)
        self.assertFalse(self.spool.load(queueId).held)
        self.clock.advance(0)
        self.assertEqual(self.downstream.calls[-1][0].queueId, queueId)

    def test_holdScheduled(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.fail451()
        self.runner.hold(queueId)
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)

    def test_holdInFlight(self):
        """
        Held while in flight: the attempt finishes, its outcome is kept,
        and the message is not retried until released.
        """
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.runner.hold(queueId)
        self.fail451()
        saved = self.spool.load(queueId)
        self.assertTrue(saved.held)
        self.assertEqual(saved.attempts, 1)
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.runner.release(queueId)
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 2)

    def test_releaseInFlight(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.runner.hold(queueId)
        self.runner.release(queueId)
        self.fail451()
        self.assertFalse(self.spool.load(queueId).held)
        self.clock.advance(0)
        self.assertEqual(len(self.downstream.calls), 2)

    def test_delete(self):
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.fail451()
        self.runner.delete(queueId)
        self.assertEqual(self.spool.pending(), [])
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)
        self.assertRaises(KeyError, self.runner.delete, queueId)

    def test_deleteInFlight(self):
        """
        Deleted while in flight: gone at once, and the outcome (here a
        permanent failure) is ignored: no state written back, no DSN.
        """
        failures = []
        self.runner.onPermanentFailure = lambda *a: failures.append(a)
        self.runner.startService()
        queueId = self.queue()
        self.clock.advance(0)
        self.runner.delete(queueId)
        self.assertEqual(self.spool.pending(), [])
        self.assertEqual(self.runner.describe(), [])
        entry, _, d = self.downstream.calls[0]
        d.callback(allWith(entry, PERMANENT, 550, "5.1.1 no"))
        self.assertEqual(failures, [])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])
        self.clock.advance(100000)
        self.assertEqual(len(self.downstream.calls), 1)

    def test_unknown(self):
        self.runner.startService()
        for bad in ("0000000000000ABCDE", "../../etc/passwd", "", None):
            for method in (
                self.runner.flush,
                self.runner.hold,
                self.runner.release,
                self.runner.delete,
            ):
                if bad is None and method == self.runner.flush:
                    continue  # flush(None) is "flush all"
                with self.assertRaises(KeyError) as e:
                    method(bad)
                self.assertEqual(e.exception.args, (bad,))
