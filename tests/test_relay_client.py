# -*- test-case-name: tests.test_relay_client -*-
"""
Tests for the relay's SMTP client to the core MTA: L{msa.relay.protocol}
(the dot-stuffer across chunk boundaries, the client line protocol, replies
mapped to temporary or permanent results) and L{msa.relay.client} (delivery
over a real socket: STARTTLS required, the certificate verified, AUTH,
connection reuse).
"""

import io
import socket

from twisted.internet import defer, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.trial import unittest

from msa.queue.entry import PENDING, SpoolEntry
from msa.queue.spool import Spool
from msa.relay import protocol
from msa.relay.client import SMTPDownstream
from msa.relay.protocol import (
    DotStuffer,
    Reply,
    SMTPClientError,
    SMTPClientProtocol,
    SMTPConnectionLost,
    StaleConnection,
    dotStuff,
)
from msa.relay.results import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
    resultFor,
)
from msa.relay.runner import RelayRunner
from msa.relay.transaction import PROBE_TIMEOUT, MailTransaction
from msa.tls import clientContextFactory
from tests.downstream import DownstreamServer
from tests.relaydata import DOTTY, bigMessage, makeEnvelope
from tests.waiting import waitUntil


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


class DownstreamFixture:
    """
    A spool, a L{DownstreamServer} and an L{SMTPDownstream} to it, for
    delivery tests over a real socket.
    """

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


class SMTPDownstreamTests(DownstreamFixture, unittest.TestCase):
    """
    Delivery over a real socket to L{DownstreamServer}.
    """

    timeout = 15

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

    @defer.inlineCallbacks
    def test_startTLSRefusedExact(self):
        """
        The core refuses STARTTLS: every recipient temporary, with the
        refusal; the connection is not kept.
        """
        server = self.startServer()
        server.refuseStartTLS = (454, "4.7.0 TLS not available")
        entry = yield self.queue(recipients=("a@example.org", "b@example.org"))
        downstream = self.downstream(server)
        result = yield self.deliver(downstream, entry)
        text = "STARTTLS refused: 454 4.7.0 TLS not available"
        bad = RecipientResult(TEMPORARY, 0, text)
        self.assertEqual(
            result, DeliveryResult({"a@example.org": bad, "b@example.org": bad}, text)
        )
        self.assertEqual(server.plaintextCommands(), [b"EHLO localhost", b"STARTTLS"])
        self.assertEqual(downstream.idleConnections, 0)

    @defer.inlineCallbacks
    def test_noStartTLSExact(self):
        server = self.startServer(tlsMode="none")
        entry = yield self.queue()
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(
            result.recipients,
            {
                "bob@example.org": RecipientResult(
                    TEMPORARY, 0, "the core MTA does not offer STARTTLS"
                )
            },
        )

    @defer.inlineCallbacks
    def test_authWithoutTLSRefused(self):
        """
        Configured for plaintext with credentials: the credentials are
        never sent; the message stays queued.
        """
        server = self.startServer(tlsMode="none")
        server.accounts = {"msa": "s3cret"}
        entry = yield self.queue()
        downstream = self.downstream(
            server, tlsMode="none", authUsername="msa", authPassword="s3cret"
        )
        result = yield self.deliver(downstream, entry)
        self.assertEqual(
            result.recipients,
            {
                "bob@example.org": RecipientResult(
                    TEMPORARY, 0, "refusing to send credentials without TLS"
                )
            },
        )
        self.assertEqual(server.plaintextCommands(), [b"EHLO localhost"])

    @defer.inlineCallbacks
    def test_authRefusedExact(self):
        server = self.startServer()
        server.accounts = {"msa": "other"}
        entry = yield self.queue()
        downstream = self.downstream(server, authUsername="msa", authPassword="s3cret")
        result = yield self.deliver(downstream, entry)
        self.assertEqual(
            result.recipients["bob@example.org"],
            RecipientResult(TEMPORARY, 0, "AUTH refused: 535 5.7.8 Bad credentials"),
        )
        self.assertEqual(server.messages, [])

    @defer.inlineCallbacks
    def test_rcpt421(self):
        """
        A 421 to one RCPT ends the transaction: every recipient temporary
        with it (also one accepted before), nothing sent, the connection
        not kept.
        """
        server = self.startServer()
        server.rcptReplies = {"b@example.org": (421, "4.3.2 shutting down")}
        entry = yield self.queue(
            recipients=("a@example.org", "b@example.org", "c@example.org")
        )
        downstream = self.downstream(server)
        result = yield self.deliver(downstream, entry)
        bad = RecipientResult(TEMPORARY, 421, "4.3.2 shutting down")
        self.assertEqual(
            result,
            DeliveryResult(
                {"a@example.org": bad, "b@example.org": bad, "c@example.org": bad},
                "421 4.3.2 shutting down",
            ),
        )
        self.assertEqual(server.messages, [])
        self.assertEqual(downstream.idleConnections, 0)

    @defer.inlineCallbacks
    def test_noRecipientAccepted(self):
        """
        Every RCPT refused: the DATA of the pipelined group is refused and
        no data follows it; the connection stays usable.
        """
        server = self.startServer()
        server.rcptReplies = {"bob@example.org": (550, "5.1.1 no such user")}
        entry = yield self.queue()
        downstream = self.downstream(server)
        result = yield self.deliver(downstream, entry)
        self.assertEqual(
            result,
            DeliveryResult(
                {
                    "bob@example.org": RecipientResult(
                        PERMANENT, 550, "5.1.1 no such user"
                    )
                },
                "no recipient accepted",
            ),
        )
        verbs = [c.split(b" ")[0] for tls, c in server.commands if tls]
        self.assertEqual(verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA"])
        self.assertEqual(downstream.idleConnections, 1)

    @defer.inlineCallbacks
    def test_dsnParametersOnlyWhenOffered(self):
        """
        RET and ENVID go only to a core that offers DSN (this one does
        not); the BODY the client declared is passed on, in upper case.
        """
        server = self.startServer()
        envelope = makeEnvelope()
        envelope.mailParams = {"BODY": "8bitmime", "RET": "HDRS", "ENVID": "x1"}
        entry = yield self.queue(b"Subject: x\r\n\r\nx\r\n", envelope=envelope)
        yield self.deliver(self.downstream(server), entry)
        self.assertEqual(
            server.messages[0].mailParams, f"BODY=8BITMIME SIZE={entry.size}"
        )


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
        yield waitUntil(lambda: not self.spool.pending(), what="an empty queue")
        self.assertEqual(self.spool.pending(), [])
        self.assertEqual(sorted(m.data for m in self.server.messages), sorted(bodies))
        return bodies

    @defer.inlineCallbacks
    def test_oneConnection(self):
        """
        Five messages queued together, one delivery at a time: one
        connection, one TLS handshake, and no RSET (each transaction ended
        at its final dot, which resets the core's state).
        """
        yield self.runQueue(5, concurrency=1)
        self.assertEqual(self.server.connections, 1)
        verbs = [c.split(b" ")[0] for tls, c in self.server.commands if tls]
        self.assertEqual(verbs.count(b"RSET"), 0)
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
        yield waitUntil(
            lambda: self.server.commands[-1] == (True, b"QUIT"),
            what=lambda: f"QUIT after the idle time-out: {self.server.commands[-1:]}",
        )
        self.assertEqual(downstream.idleConnections, 0)

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


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records L{startTLS}.
    """

    def __init__(self):
        super().__init__()
        self.tlsStarted = []

    def startTLS(self, contextFactory):
        self.tlsStarted.append(contextFactory)


class SMTPClientProtocolTests(unittest.TestCase):
    """
    L{SMTPClientProtocol} over a string transport with a fake clock: the
    bytes it sends, the replies it parses, and how it fails.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.proto = SMTPClientProtocol(self.clock)
        self.transport = TLSStringTransport()
        self.proto.makeConnection(self.transport)

    def assertAborted(self):
        self.assertTrue(self.transport.disconnected)
        self.assertTrue(self.proto.lost)

    def assertTimedOut(self, d, message):
        """
        C{d} failed with the time-out C{message}, and the connection is
        aborted.
        """
        failure = self.failureResultOf(d, SMTPClientError)
        self.assertEqual(failure.getErrorMessage(), message)
        self.assertAborted()

    def test_repliesInTheOrderAsked(self):
        """
        Several callers waiting (a transaction's commands after the final
        dot of the one before): the replies go to them in the order they
        asked, a multi-line reply whole, each with its own time-out.
        """
        first = self.proto.readReply(5, "the reply to the data")
        second = self.proto.readReply(5, "'RSET'")
        third = self.proto.readReply(5, "'MAIL'")
        self.assertFalse(self.proto.unsolicited)
        self.proto.dataReceived(b"250 2.0.0 queued\r\n250-reset\r\n250")
        self.assertEqual(self.successResultOf(first), Reply(250, ("2.0.0 queued",)))
        self.assertNoResult(second)
        # A reply half read while someone waits for it is not unsolicited.
        self.assertFalse(self.proto.unsolicited)
        self.proto.dataReceived(b" done\r\n")
        self.assertEqual(self.successResultOf(second), Reply(250, ("reset", "done")))
        self.assertNoResult(third)
        self.clock.advance(5)
        self.assertTimedOut(third, "timed out after 5s waiting for 'MAIL'")

    def test_onlyTheNextReplysClockRuns(self):
        """
        A caller's time-out counts from the reply before its own, not from
        when it asked: the reply to the data may take 600 s while the next
        transaction's MAIL, asked for at once, has 30 s.
        """
        data = self.proto.readReply(600, "the reply to the data")
        mail = self.proto.readReply(30, "'MAIL'")
        self.clock.advance(500)
        self.assertNoResult(mail)
        self.assertFalse(self.proto.lost)
        self.proto.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.successResultOf(data), Reply(250, ("2.0.0 queued",)))
        self.clock.advance(29)
        self.assertNoResult(mail)
        self.clock.advance(1)
        self.assertTimedOut(mail, "timed out after 30s waiting for 'MAIL'")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def probingTransaction(self, probe):
        """
        A transaction over C{self.proto} to a core that offers PIPELINING,
        on a parked connection probed by C{probe}, with the 300 s command
        time-out of the default configuration.

        @return: the L{Deferred} of its outcome (whether the connection
            can carry another), and the L{DeliveryResult} it fills.
        """
        entry = SpoolEntry(
            queueId="Q1",
            envelope=makeEnvelope(),
            recipients={"bob@example.org": PENDING},
        )
        result = DeliveryResult()
        transaction = MailTransaction(
            self.proto,
            {"PIPELINING": ""},
            entry,
            ["bob@example.org"],
            result,
            300,
            600,
            probe=probe,
        )
        return defer.ensureDeferred(transaction.run(io.BytesIO(b"x\r\n"))), result

    def assertProbeTimesOut(self, probe, first):
        """
        The reply that probes a parked connection has PROBE_TIMEOUT (30 s),
        not the command time-out: at 29.9 s it is still awaited, at 30 s the
        connection is stale (the message goes over a new one).
        """
        d, _ = self.probingTransaction(probe)
        group = self.transport.value().split(b"\r\n")
        self.assertEqual(group[0].split(b" ")[0], first)
        self.clock.advance(PROBE_TIMEOUT - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, StaleConnection)
        self.assertEqual(
            failure.getErrorMessage(),
            f"timed out after 30s waiting for '{first.decode()}'",
        )

    def test_mailProbeTimeout(self):
        """
        Behind a final dot, MAIL goes first (no RSET) and its reply is the
        probe: 30 s.
        """
        self.assertProbeTimesOut("MAIL", b"MAIL")

    def test_rsetProbeTimeout(self):
        """
        After a transaction that never reached its dot, RSET goes first and
        its reply is the probe: 30 s.
        """
        self.assertProbeTimesOut("RSET", b"RSET")

    def test_mailProbeAnsweredNotStale(self):
        """
        The MAIL behind a final dot answered with a refusal other than 421
        is the core's answer about this message, not a stale connection:
        the recipient is refused with the core's reply, and the connection
        can carry the next message.
        """
        d, result = self.probingTransaction("MAIL")
        self.proto.dataReceived(
            b"550 5.7.1 sender refused\r\n503 5.5.1 MAIL first\r\n"
            b"503 5.5.1 no recipients\r\n"
        )
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(
            result.recipients,
            {
                "bob@example.org": RecipientResult(
                    PERMANENT, 550, "5.7.1 sender refused"
                )
            },
        )

    def test_lostFailsEveryWaiter(self):
        """
        The connection lost: every caller still waiting fails with it,
        the first first.
        """
        order = []
        waiters = [self.proto.readReply(5), self.proto.readReply(5)]
        for i, d in enumerate(waiters):
            d.addErrback(lambda f, i=i: order.append((i, f.type)))
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(order, [(0, SMTPConnectionLost), (1, SMTPConnectionLost)])

    def test_abandon(self):
        """
        L{SMTPClientProtocol.abandon}: the waiters fail at once, and a
        reply arriving after (in the same read) goes to nobody.
        """
        d = self.proto.readReply(5)
        self.proto.abandon("by the MSA")
        failure = self.failureResultOf(d, SMTPConnectionLost)
        self.assertEqual(failure.getErrorMessage(), "connection closed: by the MSA")
        self.assertTrue(self.proto.lost)
        self.proto.dataReceived(b"250 late\r\n")
        self.failureResultOf(self.proto.readReply(5), SMTPConnectionLost)

    def test_commandAndMultilineReply(self):
        d = self.proto.command(b"EHLO msa.example", 5)
        self.assertEqual(self.transport.value(), b"EHLO msa.example\r\n")
        self.assertNoResult(d)
        self.proto.dataReceived(b"250-core hello\r\n250-SIZE 1000\r\n250 STARTTLS\r\n")
        reply = self.successResultOf(d)
        self.assertEqual(reply, Reply(250, ("core hello", "SIZE 1000", "STARTTLS")))
        self.assertEqual(reply.text, "core hello SIZE 1000 STARTTLS")
        self.assertEqual(str(reply), "250 core hello SIZE 1000 STARTTLS")
        self.assertFalse(self.proto.lost)
        self.assertFalse(self.proto.unsolicited)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_replyInPieces(self):
        """
        A reply split anywhere over TCP segments, and a bare code.
        """
        d = self.proto.readReply(5)
        for piece in (b"2", b"20", b"\r", b"\n"):
            self.proto.dataReceived(piece)
        self.assertEqual(self.successResultOf(d), Reply(220, ("",)))

    def test_unsolicited(self):
        """
        A reply nobody asked for (a 421 on an idle connection) is kept and
        answers the next read.
        """
        self.proto.dataReceived(b"421 4.4.2 idle too long\r\n")
        self.assertTrue(self.proto.unsolicited)
        d = self.proto.command(b"RSET", 5)
        self.assertEqual(self.successResultOf(d), Reply(421, ("4.4.2 idle too long",)))

    def test_malformedReply(self):
        d = self.proto.readReply(5)
        self.proto.dataReceived(b"hello there\r\n")
        failure = self.failureResultOf(d, SMTPClientError)
        self.assertEqual(
            failure.getErrorMessage(), "malformed reply line b'hello there'"
        )
        self.assertAborted()
        later = self.proto.readReply(5)
        self.assertIs(self.failureResultOf(later).value, failure.value)

    def test_badSeparator(self):
        d = self.proto.readReply(5)
        self.proto.dataReceived(b"250+ok\r\n")
        self.failureResultOf(d, SMTPClientError)
        self.assertAborted()

    def test_lineTooLong(self):
        """
        A reply line over 4096 bytes: the conversation is over.
        """
        d = self.proto.readReply(5)
        self.proto.dataReceived(b"250 " + b"x" * 4100 + b"\r\n")
        failure = self.failureResultOf(d, SMTPClientError)
        self.assertEqual(failure.getErrorMessage(), "reply line too long")
        self.assertAborted()

    def test_timeout(self):
        d = self.proto.command(b"MAIL FROM:<a@example.org>", 5)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertTimedOut(d, "timed out after 5s waiting for 'MAIL'")

    def test_connectionLost(self):
        """
        The connection goes away: the pending read fails with
        L{SMTPConnectionLost}, so does every later one, and the waiters of
        L{notifyLost} fire.
        """
        d = self.proto.readReply(5, "the greeting")
        whenLost = self.proto.notifyLost()
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        failure = self.failureResultOf(d, SMTPConnectionLost)
        self.assertEqual(
            failure.getErrorMessage(), "connection lost: Connection was closed cleanly."
        )
        self.assertIsNone(self.successResultOf(whenLost))
        self.assertIsNone(self.successResultOf(self.proto.notifyLost()))
        self.failureResultOf(self.proto.readReply(5), SMTPConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_startTLS(self):
        d = self.proto.command(b"STARTTLS", 5)
        self.proto.dataReceived(b"220 2.0.0 go ahead\r\n")
        self.assertEqual(self.successResultOf(d).code, 220)
        contextFactory = object()
        self.proto.startTLS(contextFactory)
        self.assertEqual(self.transport.tlsStarted, [contextFactory])
        self.assertTrue(self.proto.tlsStarted)

    def test_startTLSInjection(self):
        """
        A whole reply, or part of a line, sent after the 220 to STARTTLS
        and before the handshake: the connection is aborted, TLS is not
        started (RFC 3207 section 6).
        """
        for extra in (b"250 injected\r\n", b"250 inj"):
            self.setUp()
            d = self.proto.command(b"STARTTLS", 5)
            self.proto.dataReceived(b"220 2.0.0 go ahead\r\n" + extra)
            self.assertEqual(self.successResultOf(d).code, 220)
            with self.assertRaises(SMTPClientError) as e:
                self.proto.startTLS(object())
            self.assertEqual(
                str(e.exception), "data after the STARTTLS reply: possible injection"
            )
            self.assertTrue(self.transport.disconnected)
            self.assertEqual(self.transport.tlsStarted, [])
            self.assertFalse(self.proto.tlsStarted)

    def drive(self):
        """
        Pull the file sender's chunks until it unregisters.
        """
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def test_sendFileStuffedAcrossChunks(self):
        """
        A message larger than L{protocol.WHOLE_AT_ONCE} goes out in the
        file sender's 16 KiB chunks (after a first read of that size, made
        one chunk here), with lines starting with "." exactly at the chunk
        boundaries: every one is stuffed, and the data ends with the
        terminator.
        """
        self.assertEqual(FileSender.CHUNK_SIZE, 16384)
        self.patch(protocol, "WHOLE_AT_ONCE", FileSender.CHUNK_SIZE - 1)
        data = bigMessage()
        d = self.proto.sendFile(io.BytesIO(data), 30)
        self.drive()
        self.assertIsNone(self.successResultOf(d))
        wire = self.transport.value()
        self.assertEqual(wire, dotStuff(data))
        self.assertEqual(wire.count(b"\r\n...starts a chunk\r\n"), 3)
        self.assertEqual(unstuff(wire), data)
        self.assertTrue(wire.endswith(b"\r\n..end\r\n.\r\n"))

    def test_sendFileSmallAtOnce(self):
        """
        A message up to L{protocol.WHOLE_AT_ONCE} octets goes in one write
        with its final dot, stuffed, before C{sendFile} returns: no
        producer, whose pulls would each wait for a turn of the reactor.
        """
        data = bigMessage()
        self.assertLessEqual(len(data), protocol.WHOLE_AT_ONCE)
        writes = []
        self.transport.write = writes.append
        d = self.proto.sendFile(io.BytesIO(data), 30)
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.transport.producer)
        self.assertEqual(writes, [dotStuff(data)])

    def test_sendFileLargerStreamed(self):
        """
        One octet more than L{protocol.WHOLE_AT_ONCE} and the message is
        streamed: the first read goes out, the rest through the producer,
        the final dot only when the file is done.
        """
        data = bigMessage()
        self.patch(protocol, "WHOLE_AT_ONCE", len(data) - 1)
        d = self.proto.sendFile(io.BytesIO(data), 30)
        self.assertNoResult(d)
        self.assertEqual(self.transport.value(), DotStuffer().feed(data))
        self.drive()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.transport.value(), dotStuff(data))

    def test_sendFileWithoutFinalCRLF(self):
        d = self.proto.sendFile(io.BytesIO(b"Subject: x\r\n\r\nlast."), 30)
        self.drive()
        self.successResultOf(d)
        self.assertEqual(self.transport.value(), b"Subject: x\r\n\r\nlast.\r\n.\r\n")

    def test_sendFileTimeout(self):
        """
        A core that stops reading: after the data timeout the connection
        is aborted and the send fails.
        """
        self.patch(protocol, "WHOLE_AT_ONCE", FileSender.CHUNK_SIZE)
        d = self.proto.sendFile(io.BytesIO(bigMessage()), 30)
        self.transport.producer.resumeProducing()
        self.clock.advance(30)
        failure = self.failureResultOf(d, SMTPClientError)
        self.assertEqual(
            failure.getErrorMessage(), "timed out after 30s sending the message"
        )
        self.assertTrue(self.transport.disconnected)


class ResultTests(unittest.TestCase):
    """
    How the core's replies become results: L{resultFor},
    L{RecipientResult}, L{DeliveryResult}.
    """

    def test_temporary(self):
        """
        Every 4xx refusal is temporary: the recipient is retried.
        """
        for code in (421, 450, 451, 452, 454):
            self.assertEqual(
                resultFor(Reply(code, ("4.3.0 later", "really"))),
                RecipientResult(TEMPORARY, code, "4.3.0 later really"),
            )

    def test_permanent(self):
        """
        Every 5xx refusal is permanent: the recipient fails (a bounce).
        """
        for code in (500, 501, 550, 552, 553, 554):
            self.assertEqual(
                resultFor(Reply(code, ("5.1.1 no such user",))),
                RecipientResult(PERMANENT, code, "5.1.1 no such user"),
            )

    def test_recipientResultText(self):
        self.assertEqual(str(RecipientResult(TEMPORARY, 451, "4.3.0 x")), "451 4.3.0 x")
        self.assertEqual(
            str(RecipientResult(TEMPORARY, 0, "cannot connect")), "cannot connect"
        )

    def test_deliveryResultByStatus(self):
        result = DeliveryResult(
            {
                "a@x.nl": RecipientResult(ACCEPTED, 250, "ok"),
                "b@x.nl": RecipientResult(PERMANENT, 550, "no"),
                "c@x.nl": RecipientResult(TEMPORARY, 452, "full"),
                "d@x.nl": RecipientResult(ACCEPTED, 250, "ok"),
            },
            "250 ok",
        )
        self.assertEqual(result.accepted, ["a@x.nl", "d@x.nl"])
        self.assertEqual(result.permanent, ["b@x.nl"])
        self.assertEqual(result.temporary, ["c@x.nl"])


class SMTPDownstreamConfigTests(unittest.TestCase):
    def test_tlsModeChecked(self):
        with self.assertRaises(ValueError) as e:
            SMTPDownstream("127.0.0.1", 25, tlsMode="STARTTLS")
        self.assertEqual(
            str(e.exception),
            "tlsMode must be one of ('starttls', 'implicit', 'none'), not 'STARTTLS'",
        )

    def test_repr(self):
        downstream = SMTPDownstream("127.0.0.1", 2525, tlsMode="none")
        self.assertEqual(repr(downstream), "<SMTPDownstream 127.0.0.1:2525 tls=none>")
