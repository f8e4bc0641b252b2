# -*- test-case-name: tests.test_relay_failures -*-
"""
The failure matrix: the relay runner against a real downstream SMTP server
over real sockets, the server misbehaving in each way the core MTA or the
network can.  For each case: what the queue holds afterwards, what is
retried (after L{RelayRunner.flush}, once the server behaves), and which
delivery status notification (DSN) is produced.
"""

import email
import socket

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa.envelope import Envelope
from msa.queue.spool import PENDING, Spool
from msa.relay.client import SMTPDownstream
from msa.relay.runner import RelayRunner
from msa.tls import clientContextFactory
from tests.downstream import DownstreamServer
from tests.waiting import waitUntil

SENDER = "alice@example.com"
BOB = "bob@example.org"
CAROL = "carol@example.org"
MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: the declaration\r\n"
    b"Message-ID: <decl-1@example.com>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n" + b".dotted line\r\n" + b"x" * 70 + b"\r\n"
)
BIG = MESSAGE + (b"y" * 76 + b"\r\n") * 2000


def closedPort() -> int:
    """
    A port on 127.0.0.1 where nothing listens.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parseDSN(data: bytes):
    """
    @return: the DSN message, its per-message fields and its per-recipient
        field blocks.
    """
    message = email.message_from_bytes(data)
    report = message.get_payload()[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    return message, blocks[0], blocks[1:]


class FailureMatrixTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.server = DownstreamServer(self.mktemp())
        self.port = self.server.start()
        self.addCleanup(self.server.stop)
        self.spool = Spool(self.mktemp())
        self.dsns = []
        self.spool.addListener(self.captureDSN)
        self.critical = []

        def observe(event):
            if event.get("log_level") is not None and (
                event["log_level"].name == "critical"
            ):
                self.critical.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def captureDSN(self, queueId):
        """
        Every message with the null sender, read as it is committed.
        """
        entry = self.spool.load(queueId)
        if entry.envelope.sender == "":
            with self.spool.openMessage(queueId) as f:
                self.dsns.append((entry, f.read()))

    def startRunner(self, hostname="localhost", port=None, timeout=2, **kwargs):
        self.downstream = SMTPDownstream(
            "127.0.0.1",
            port or self.port,
            contextFactory=clientContextFactory(hostname, caFile=self.server.caFile),
            connectTimeout=timeout,
            commandTimeout=timeout,
            dataTimeout=timeout,
        )
        kwargs.setdefault("dsnHostname", "msa.example.nl")
        self.runner = RelayRunner(self.spool, self.downstream, reactor, **kwargs)
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        return self.runner

    @defer.inlineCallbacks
    def queue(self, sender=SENDER, recipients=(BOB,), data=MESSAGE):
        writer = self.spool.newMessage(Envelope(sender=sender, recipients=recipients))
        writer.write(data)
        queueId = yield writer.commit()
        return queueId

    def waitFor(self, predicate, timeout=5.0, what="the condition"):
        return waitUntil(predicate, timeout, what)

    def entry(self, queueId):
        try:
            return self.spool.load(queueId)
        except FileNotFoundError:
            return None

    @defer.inlineCallbacks
    def attempted(self, queueId, attempts=1):
        """
        Wait until the entry has had C{attempts} failed attempts (or is
        gone) and no delivery of it is in flight.
        """

        def done():
            entry = self.entry(queueId)
            return not self.runner.isInFlight(queueId) and (
                entry is None or entry.attempts >= attempts
            )

        yield self.waitFor(done, what=f"attempt {attempts} of {queueId}")
        return self.entry(queueId)

    def assertDeferred(self, entry, errorText, attempts=1):
        """
        The entry is still queued for a retry in about a minute.
        """
        self.assertIsNotNone(entry)
        self.assertEqual(entry.recipients, {BOB: PENDING})
        self.assertEqual(entry.attempts, attempts)
        delay = entry.nextAttempt - reactor.seconds()
        self.assertTrue(50 <= delay <= 66, delay)
        self.assertIn(errorText, entry.lastError)
        self.assertIn(errorText, entry.errors[BOB])

    @defer.inlineCallbacks
    def retryDelivers(self, queueId, data=MESSAGE):
        """
        Once the server behaves, a flush delivers the message exactly once
        and empties the queue; no DSN.
        """
        self.assertEqual(self.runner.control.flush(), [queueId])
        yield self.waitFor(lambda: not self.spool.pending(), what="an empty queue")
        [message] = self.server.messages
        self.assertEqual(message.data, data)
        self.assertEqual(message.sender, SENDER)
        self.assertEqual(message.recipients, [BOB])
        self.assertTrue(message.tls)
        self.assertEqual(self.dsns, [])

    def assertFailedDSN(self, rcpt, status, diagnostic=None, queueId=None):
        [(entry, data)] = self.dsns
        self.assertEqual(entry.envelope.sender, "")
        self.assertEqual(entry.envelope.recipients, [SENDER])
        self.assertTrue(entry.isBounce)
        message, perMessage, [perRcpt] = parseDSN(data)
        self.assertEqual(message["To"], f"<{SENDER}>")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(perMessage["Reporting-MTA"], "dns; msa.example.nl")
        self.assertEqual(perRcpt["Final-Recipient"], f"rfc822; {rcpt}")
        self.assertEqual(perRcpt["Action"], "failed")
        self.assertEqual(perRcpt["Status"], status)
        if diagnostic is None:
            self.assertIsNone(perRcpt["Diagnostic-Code"])
        else:
            self.assertEqual(perRcpt["Diagnostic-Code"], f"smtp; {diagnostic}")
            self.assertEqual(perRcpt["Remote-MTA"], "dns; 127.0.0.1")
        headers = message.get_payload()[2].get_payload()
        self.assertIn("Subject: the declaration", headers)
        self.assertNotIn(b"SECRET BODY", data)
        return message

    # Temporary failures: queued, retried, no DSN.

    @defer.inlineCallbacks
    def test_connectionRefused(self):
        self.startRunner(port=closedPort())
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "cannot connect")
        self.assertEqual(self.server.connections, 0)
        self.downstream.port = self.port
        yield self.retryDelivers(queueId)

    @defer.inlineCallbacks
    def test_greeting421(self):
        self.server.greeting = (421, "4.3.2 Service not available")
        self.startRunner()
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "421 4.3.2 Service not available")
        self.server.greeting = (220, "localhost ESMTP")
        yield self.retryDelivers(queueId)

    @defer.inlineCallbacks
    def test_mail451(self):
        self.server.mailReply = (451, "4.3.0 Try again later")
        self.startRunner()
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "451 4.3.0 Try again later")
        self.server.mailReply = None
        yield self.retryDelivers(queueId)

    @defer.inlineCallbacks
    def test_tlsHandshakeFailure(self):
        """
        The server answers STARTTLS but does not speak TLS: temporary,
        logged as critical, and nothing but EHLO and STARTTLS is sent.
        """
        self.server.breakTLS = True
        self.startRunner()
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "TLS handshake")
        self.assertEqual(
            self.server.plaintextCommands()[:2], [b"EHLO localhost", b"STARTTLS"]
        )
        self.assertFalse(
            any(c.startswith((b"MAIL", b"RCPT")) for _, c in self.server.commands)
        )
        self.assertTrue(self.critical)
        self.server.breakTLS = False
        yield self.retryDelivers(queueId)

    @defer.inlineCallbacks
    def test_wrongCertificateName(self):
        """
        The core's certificate is not for the configured name: temporary,
        logged as critical, never a plaintext fallback.
        """
        self.startRunner(hostname="core.example")
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "TLS handshake")
        self.assertEqual(
            self.server.plaintextCommands(), [b"EHLO localhost", b"STARTTLS"]
        )
        self.assertEqual([c for tls, c in self.server.commands if tls], [])
        [event] = self.critical
        self.assertIn(queueId, event["queueId"])
        self.downstream.contextFactory = clientContextFactory(
            "localhost", caFile=self.server.caFile
        )
        yield self.retryDelivers(queueId)

    @defer.inlineCallbacks
    def test_implicitTLSWrongCertificateName(self):
        server = DownstreamServer(self.mktemp(), tlsMode="implicit")
        port = server.start()
        self.addCleanup(server.stop)
        self.startRunner(port=port)
        self.downstream.tlsMode = "implicit"
        self.downstream.contextFactory = clientContextFactory(
            "core.example", caFile=server.caFile
        )
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "TLS handshake")
        self.assertEqual(server.commands, [])
        self.assertTrue(self.critical)
        self.downstream.contextFactory = clientContextFactory(
            "localhost", caFile=server.caFile
        )
        self.assertEqual(self.runner.control.flush(), [queueId])
        yield self.waitFor(lambda: not self.spool.pending(), what="an empty queue")
        self.assertEqual([m.data for m in server.messages], [MESSAGE])

    @defer.inlineCallbacks
    def test_serverHangs(self):
        """
        No reply to MAIL: the command time-out (0.5 s here) ends the attempt.
        """
        self.server.hangOn = b"MAIL"
        self.startRunner(timeout=0.5)
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "timed out after 0.5s waiting for 'MAIL'")
        self.server.hangOn, self.server.hung = None, False
        yield self.retryDelivers(queueId)

    @defer.inlineCallbacks
    def test_silentGreeting(self):
        self.server.silent = True
        self.startRunner(timeout=0.5)
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "waiting for the greeting")
        self.server.silent = False
        yield self.retryDelivers(queueId)

    @defer.inlineCallbacks
    def test_droppedMidData(self):
        self.server.dropMidData = True
        self.startRunner()
        queueId = yield self.queue(data=BIG)
        entry = yield self.attempted(queueId)
        self.assertDeferred(entry, "connection lost")
        self.assertEqual(self.server.messages, [])
        self.server.dropMidData = False
        yield self.retryDelivers(queueId, BIG)

    @defer.inlineCallbacks
    def test_slowServer(self):
        """
        Every reply 0.2 s late, within the 1 s time-out: delivered at the
        first attempt.
        """
        self.server.replyDelay = 0.2
        self.startRunner(timeout=1)
        queueId = yield self.queue()
        yield self.waitFor(lambda: not self.spool.pending(), what="delivery")
        self.assertIsNone(self.entry(queueId))
        [message] = self.server.messages
        self.assertEqual(message.data, MESSAGE)
        self.assertEqual(self.server.connections, 1)
        self.assertEqual(self.dsns, [])

    # Permanent failures: per recipient, with a DSN.

    @defer.inlineCallbacks
    def test_rcpt550OneOfTwo(self):
        """
        The core refuses one of two recipients: the other is delivered
        once and never again, the refused one fails with a DSN, which is
        relayed to the sender like any message.
        """
        self.server.rcptReplies = {
            CAROL: (550, "5.1.1 <carol@example.org>: no such user")
        }
        self.startRunner()
        queueId = yield self.queue(recipients=[BOB, CAROL])
        yield self.waitFor(lambda: len(self.server.messages) == 2, what="the DSN")
        yield self.waitFor(lambda: not self.spool.pending(), what="an empty queue")
        original, bounce = self.server.messages
        self.assertEqual((original.sender, original.recipients), (SENDER, [BOB]))
        self.assertEqual(original.data, MESSAGE)
        self.assertEqual((bounce.sender, bounce.recipients), ("", [SENDER]))
        self.assertIsNone(self.entry(queueId))
        message = self.assertFailedDSN(
            CAROL, "5.1.1", "550 5.1.1 <carol@example.org>: no such user"
        )
        self.assertEqual(bounce.data, self.dsns[0][1])
        self.assertIn("queue id " + queueId, message.get_payload()[0].get_payload())
        # Nothing left to retry: Bob gets the message once.
        self.assertEqual(self.runner.control.flush(), [])
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(self.server.messages), 2)

    @defer.inlineCallbacks
    def test_data552(self):
        """
        552 after the data: failed with a DSN.  The core refuses the DSN
        too; a DSN about a DSN is never made, so the queue ends empty.
        """
        self.server.finalReply = (552, "5.3.4 Message too big for system")
        self.startRunner()
        queueId = yield self.queue(recipients=[BOB, CAROL])
        yield self.waitFor(lambda: self.dsns, what="the DSN")
        yield self.waitFor(lambda: not self.spool.pending(), what="an empty queue")
        self.assertIsNone(self.entry(queueId))
        self.assertEqual(self.server.messages, [])
        [(entry, data)] = self.dsns
        _, _, perRcpt = parseDSN(data)
        self.assertEqual(
            [b["Final-Recipient"] for b in perRcpt],
            [f"rfc822; {BOB}", f"rfc822; {CAROL}"],
        )
        self.assertEqual({b["Status"] for b in perRcpt}, {"5.3.4"})
        self.assertEqual(
            {b["Diagnostic-Code"] for b in perRcpt},
            {"smtp; 552 5.3.4 Message too big for system"},
        )
        # The DSN itself was attempted (and refused) by the core.
        mails = [c for _, c in self.server.commands if c.startswith(b"MAIL")]
        self.assertEqual(mails[-1].split(b" ")[1], b"FROM:<>")

    @defer.inlineCallbacks
    def test_nullSenderNoDSN(self):
        self.server.rcptReplies = {BOB: (550, "5.1.1 no such user")}
        self.startRunner()
        queueId = yield self.queue(sender="")
        self.assertEqual(len(self.dsns), 1)  # captured: the message itself
        self.dsns.clear()
        yield self.waitFor(lambda: not self.spool.pending(), what="an empty queue")
        self.assertIsNone(self.entry(queueId))
        self.assertEqual(self.dsns, [])

    @defer.inlineCallbacks
    def test_noDSNWithoutHostname(self):
        self.server.rcptReplies = {BOB: (550, "5.1.1 no such user")}
        self.startRunner(dsnHostname=None)
        yield self.queue()
        yield self.waitFor(lambda: not self.spool.pending(), what="an empty queue")
        self.assertEqual(self.dsns, [])

    # Expiry and delay.

    @defer.inlineCallbacks
    def test_expiry(self):
        """
        451 until the maximum lifetime has passed: the next attempt is
        at the end of the lifetime, then the message fails with a DSN that
        carries the last reply.
        """
        self.server.mailReply = (451, "4.3.0 Try again later")
        self.startRunner(maxLifetime=0.5)
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertEqual(entry.attempts, 1)
        self.assertLessEqual(entry.nextAttempt, entry.createdAt + 0.5)
        self.assertEqual(self.dsns, [])
        yield self.waitFor(lambda: self.dsns, what="the DSN")
        self.assertIsNone(self.entry(queueId))
        self.assertFailedDSN(BOB, "4.3.0", "451 4.3.0 Try again later")

    @defer.inlineCallbacks
    def test_expiryWithoutReply(self):
        self.startRunner(port=closedPort(), maxLifetime=0.3)
        queueId = yield self.queue()
        yield self.waitFor(lambda: self.dsns, what="the DSN")
        self.assertIsNone(self.entry(queueId))
        message = self.assertFailedDSN(BOB, "4.4.7")
        self.assertIn("cannot connect", message.get_payload()[0].get_payload())

    @defer.inlineCallbacks
    def test_delayedOnce(self):
        """
        With delayWarningAfter, one "delayed" DSN after the first failed
        attempt past that age, never a second; then the message and the
        DSN are both delivered.
        """
        self.server.mailReply = (451, "4.3.0 Try again later")
        self.startRunner(delayWarningAfter=0)
        queueId = yield self.queue()
        entry = yield self.attempted(queueId)
        self.assertTrue(entry.delayWarned)
        self.assertEqual(entry.recipients, {BOB: PENDING})
        [(dsnEntry, data)] = self.dsns
        message, _, [perRcpt] = parseDSN(data)
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(perRcpt["Action"], "delayed")
        self.assertEqual(perRcpt["Status"], "4.3.0")
        self.assertEqual(perRcpt["Diagnostic-Code"], "smtp; 451 4.3.0 Try again later")
        self.assertIsNotNone(perRcpt["Will-Retry-Until"])
        self.assertIn(queueId, self.runner.control.flush())
        entry = yield self.attempted(queueId, 2)
        self.assertEqual(len(self.dsns), 1)
        self.server.mailReply = None
        self.assertEqual(
            sorted(self.runner.control.flush()), sorted([queueId, dsnEntry.queueId])
        )
        yield self.waitFor(lambda: not self.spool.pending(), what="an empty queue")
        self.assertEqual(
            sorted((m.sender, tuple(m.recipients)) for m in self.server.messages),
            [("", (SENDER,)), (SENDER, (BOB,))],
        )
        self.assertEqual(len(self.dsns), 1)
