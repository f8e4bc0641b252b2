# -*- test-case-name: tests.test_relay_client -*-
"""
Tests for the relay's SMTP client to the core MTA: L{msa.relay.protocol}
(the dot-stuffer across chunk boundaries, the client line protocol, replies
mapped to temporary or permanent results) and L{msa.relay.client} (delivery
over a real socket: STARTTLS required, the certificate verified, AUTH,
connection reuse).
"""

import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from msa.queue.spool import Spool
from msa.relay.client import SMTPDownstream
from msa.relay.protocol import (
    TEMPORARY,
    DotStuffer,
    RecipientResult,
    dotStuff,
)
from msa.relay.runner import RelayRunner
from msa.tls import clientContextFactory
from tests.downstream import DownstreamServer
from tests.relaydata import DOTTY, bigMessage, makeEnvelope


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
