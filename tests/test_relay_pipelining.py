# -*- test-case-name: tests.test_relay_pipelining -*-
"""
The relay client's pipelining (RFC 2920, L{msa.relay.transaction}): to a
core that offers PIPELINING, MAIL, every RCPT and DATA arrive in one read
(the test core records which commands arrived together), each reply is
still taken on its own, and the body is sent only after a 354 with at
least one recipient accepted.  To a core without PIPELINING, one command
per read, as before.  Over real sockets and verified STARTTLS; the last
tests start the assembled daemon from its TOML file, relaying to the test
core and to a real Postfix (an independent server that offers PIPELINING
and logs a client that pipelines wrongly).
"""

import functools
import os

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from msa.queue import integrity
from msa.relay.results import PERMANENT, TEMPORARY, DeliveryResult, RecipientResult
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, RunningMSA, freePort
from tests.postfixcore import startPostfixCore
from tests.relaydata import DOTTY, bigMessage, makeEnvelope
from tests.test_e2e import SENDER, splitReceived
from tests.test_integrity import submitTo
from tests.test_relay_client import DownstreamFixture
from tests.waiting import waitUntil

A, B, C = "a@example.org", "b@example.org", "c@example.org"
#: The second is the one the cores below refuse.
TWO_RECIPIENTS = ("belastingdienst@overheid.nl", "nobody@overheid.nl")
MAIL = b"MAIL FROM:<alice@example.com>"


def rcpts(*addresses: str) -> list[bytes]:
    return [b"RCPT TO:<" + a.encode() + b">" for a in addresses]


class PipeliningTests(DownstreamFixture, unittest.TestCase):
    """
    L{msa.relay.client.SMTPDownstream} to L{DownstreamServer}, which offers
    PIPELINING unless told otherwise.
    """

    timeout = 15

    @defer.inlineCallbacks
    def deliverRefused(self, **misbehaviour):
        """
        Deliver a message for C{A} alone, whom the core refuses (550), the
        core set up with C{misbehaviour} (L{DownstreamServer} attributes).

        @return: the core, the downstream and the L{DeliveryResult}.
        """
        server = self.startServer()
        for name, value in misbehaviour.items():
            setattr(server, name, value)
        server.rcptReplies = {A: (550, "5.1.1 no such user")}
        entry = yield self.queue(recipients=(A,))
        downstream = self.downstream(server)
        result = yield self.deliver(downstream, entry)
        return server, downstream, result

    @defer.inlineCallbacks
    def test_oneWrite(self):
        """
        MAIL, the three RCPTs and DATA arrive in one read; the core gets
        the spooled bytes exactly, dot-stuffing undone.
        """
        server = self.startServer()
        data = bigMessage()
        entry = yield self.queue(data, recipients=(A, B, C))
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.accepted, [A, B, C])
        self.assertEqual(result.reply, "250 2.0.0 Ok: queued as CORE1")
        [message] = server.messages
        self.assertEqual(message.data, data)
        self.assertEqual(message.recipients, [A, B, C])
        mail = MAIL + b" SIZE=%d" % (entry.size,)
        self.assertEqual(
            server.commandGroups,
            [
                [b"EHLO localhost"],
                [b"STARTTLS"],
                [b"EHLO localhost"],
                [mail, *rcpts(A, B, C), b"DATA"],
            ],
        )

    @defer.inlineCallbacks
    def test_noResetBehindTheDot(self):
        """
        The next message over a connection parked at the final dot of the
        one before: no RSET (the reply to the data reset the core's state,
        RFC 5321 4.1.1.4); its MAIL, RCPT and DATA arrive in one read.
        """
        server = self.startServer()
        downstream = self.downstream(server)
        for _ in range(2):
            entry = yield self.queue(recipients=(A,))
            result = yield self.deliver(downstream, entry)
            self.assertEqual(result.accepted, [A])
        mail = MAIL + b" SIZE=%d" % (entry.size,)
        self.assertEqual(server.commandGroups[-1], [mail, *rcpts(A), b"DATA"])
        self.assertNotIn(("C", b"RSET"), server.transcript)
        self.assertEqual(server.connections, 1)
        self.assertEqual(len(server.messages), 2)

    @defer.inlineCallbacks
    def test_parkedConnectionResetInTheGroup(self):
        """
        A connection parked after a transaction that never reached its
        final dot (every recipient refused: the core still has its MAIL):
        the next message's RSET goes first in its group, in the same read
        as MAIL, RCPT and DATA.  Without it the core would answer 503
        (nested MAIL).
        """
        server = self.startServer()
        server.rcptReplies[B] = (550, "5.1.1 no such user")
        downstream = self.downstream(server)
        refused = yield self.queue(recipients=(B,))
        result = yield self.deliver(downstream, refused)
        self.assertEqual(result.recipients[B].status, PERMANENT)
        entry = yield self.queue(recipients=(A,))
        result = yield self.deliver(downstream, entry)
        self.assertEqual(result.accepted, [A])
        mail = MAIL + b" SIZE=%d" % (entry.size,)
        self.assertEqual(server.commandGroups[-1], [b"RSET", mail, *rcpts(A), b"DATA"])
        self.assertEqual(server.connections, 1)
        self.assertEqual(len(server.messages), 1)

    @defer.inlineCallbacks
    def overANewConnection(self, before, breakIt):
        """
        Deliver a message to C{before} (B, whom the core refuses: the
        transaction never reaches its dot; or A), let C{breakIt(server)}
        break the parked connection, then deliver a message to A: it goes
        over a new connection in the same attempt, once.
        """
        server = self.startServer()
        server.rcptReplies[B] = (550, "5.1.1 no such user")
        downstream = self.downstream(server)
        first = yield self.queue(recipients=(before,))
        yield self.deliver(downstream, first)
        breakIt(server)
        second = yield self.queue(recipients=(A,))
        result = yield self.deliver(downstream, second)
        self.assertEqual(result.accepted, [A])
        self.assertEqual(server.connections, 2)
        self.assertEqual(len(server.messages), 1 if before == B else 2)

    def test_staleParkedConnection(self):
        """
        A parked connection the core drops at the RSET (unanswered).
        """

        def closeOnRset(server):
            server.closeOnRset = True

        return self.overANewConnection(B, closeOnRset)

    def test_staleBehindTheDot(self):
        """
        A connection parked at a final dot that the core drops at the next
        MAIL (unanswered; no RSET went first).
        """

        def closeOnMail(server):
            server.closeOnMail = True

        return self.overANewConnection(A, closeOnMail)

    def test_421BehindTheDot(self):
        """
        A 421 to the MAIL behind a final dot (a core closing the idle
        connection just then).
        """

        def idleTooLong(server):
            server.closeOnMail = (421, "4.4.2 idle too long")

        return self.overANewConnection(A, idleTooLong)

    @defer.inlineCallbacks
    def test_oneHashPass(self):
        """
        The message is hashed once, as it is sent: every byte of the spool
        file goes through the digest exactly once, and the check still
        passes before the final dot.
        """
        hashed = []
        update = integrity.Digester.update

        def counting(digester, data):
            hashed.append(len(data))
            update(digester, data)

        self.patch(integrity.Digester, "update", counting)
        server = self.startServer()
        data = bigMessage()
        entry = yield self.queue(data, recipients=(A, B))
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.accepted, [A, B])
        self.assertIsNone(result.mismatch)
        self.assertEqual(sum(hashed), len(data))
        self.assertEqual(server.messages[0].data, data)

    @defer.inlineCallbacks
    def test_withoutPipelining(self):
        """
        A core that does not offer PIPELINING gets one command per read
        (lock-step), and the same bytes.
        """
        server = self.startServer()
        server.offerPipelining = False
        entry = yield self.queue(DOTTY, recipients=(A, B))
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(result.accepted, [A, B])
        self.assertEqual(server.messages[0].data, DOTTY + b"\r\n")
        mail = MAIL + b" SIZE=%d" % (entry.size,)
        self.assertEqual(
            server.commandGroups[3:],
            [[mail], *([r] for r in rcpts(A, B)), [b"DATA"]],
        )

    @defer.inlineCallbacks
    def test_partialAcceptance(self):
        """
        One recipient refused for good, one for now, one accepted, all in
        one group: each gets its own reply, the message goes to the one
        accepted.
        """
        server = self.startServer()
        server.rcptReplies = {
            A: (550, "5.1.1 no such user"),
            C: (452, "4.2.2 mailbox full"),
        }
        entry = yield self.queue(recipients=(A, B, C))
        result = yield self.deliver(self.downstream(server), entry)
        self.assertEqual(
            result.recipients,
            {
                A: RecipientResult(PERMANENT, 550, "5.1.1 no such user"),
                B: RecipientResult("accepted", 250, "2.0.0 Ok: queued as CORE1"),
                C: RecipientResult(TEMPORARY, 452, "4.2.2 mailbox full"),
            },
        )
        self.assertEqual(server.messages[0].recipients, [B])
        self.assertEqual(server.messages[0].data, DOTTY + b"\r\n")
        self.assertEqual(len(server.commandGroups[3]), 5)

    @defer.inlineCallbacks
    def test_mailRefused(self):
        """
        MAIL refused in a pipelined group: every recipient gets the MAIL's
        reply (not the "MAIL first" of its RCPT), no data is sent, and the
        connection carries the next message.
        """
        server = self.startServer()
        server.mailReply = (550, "5.7.1 sender refused")
        entry = yield self.queue(recipients=(A, B))
        downstream = self.downstream(server)
        result = yield self.deliver(downstream, entry)
        refused = RecipientResult(PERMANENT, 550, "5.7.1 sender refused")
        self.assertEqual(
            result, DeliveryResult({A: refused, B: refused}, "550 5.7.1 sender refused")
        )
        self.assertEqual(server.messages, [])
        self.assertEqual(
            server.commandGroups[3][1:], [*rcpts(A, B), b"DATA"], "no data lines"
        )
        self.assertEqual(downstream.idleConnections, 1)
        server.mailReply = None
        result = yield self.deliver(downstream, entry)
        self.assertEqual(result.accepted, [A, B])
        self.assertEqual(server.connections, 1)

    @defer.inlineCallbacks
    def test_mailTemporaryPipelined(self):
        server = self.startServer()
        server.mailReply = (451, "4.3.0 try later")
        entry = yield self.queue(recipients=(A, B))
        result = yield self.deliver(self.downstream(server), entry)
        later = RecipientResult(TEMPORARY, 451, "4.3.0 try later")
        self.assertEqual(result.recipients, {A: later, B: later})

    @defer.inlineCallbacks
    def test_everyRecipientRefused(self):
        """
        Every RCPT of the group refused: the core refuses the DATA (503)
        and the body is never sent (the core sees no line after DATA but
        the next transaction's RSET); the connection carries the next
        message.
        """
        server = self.startServer()
        server.rcptReplies = {A: (550, "5.1.1 no such user"), B: (550, "5.1.1 no")}
        entry = yield self.queue(recipients=(A, B))
        downstream = self.downstream(server)
        result = yield self.deliver(downstream, entry)
        self.assertEqual(
            result,
            DeliveryResult(
                {
                    A: RecipientResult(PERMANENT, 550, "5.1.1 no such user"),
                    B: RecipientResult(PERMANENT, 550, "5.1.1 no"),
                },
                "no recipient accepted",
            ),
        )
        server.rcptReplies = {}
        result = yield self.deliver(downstream, entry)
        self.assertEqual(result.accepted, [A, B])
        verbs = [c.split(b" ")[0] for tls, c in server.commands if tls]
        self.assertEqual(
            verbs,
            [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA"]
            + [b"RSET", b"MAIL", b"RCPT", b"RCPT", b"DATA"],
        )
        self.assertEqual(len(server.messages), 1)
        self.assertEqual(server.connections, 1)

    @defer.inlineCallbacks
    def test_everyRecipientRefusedLockStep(self):
        """
        Without PIPELINING, every RCPT refused: no DATA at all, and the
        connection stays usable.
        """
        server, downstream, result = yield self.deliverRefused(offerPipelining=False)
        self.assertEqual(result.reply, "no recipient accepted")
        self.assertEqual(result.permanent, [A])
        verbs = [c.split(b" ")[0] for tls, c in server.commands if tls]
        self.assertEqual(verbs, [b"EHLO", b"MAIL", b"RCPT"])
        self.assertEqual(downstream.idleConnections, 1)

    @defer.inlineCallbacks
    def test_dataAcceptedWithoutRecipient(self):
        """
        A core that answers the group's DATA with 354 although it refused
        every recipient: the data is ended with a lone dot (RFC 2920
        section 3.1), none of the message is sent, and the connection is
        not used again.
        """
        server, downstream, result = yield self.deliverRefused(
            dataWithoutRecipient=True
        )
        self.assertEqual(
            result.recipients,
            {A: RecipientResult(PERMANENT, 550, "5.1.1 no such user")},
        )
        self.assertEqual([m.data for m in server.messages], [b""])
        self.assertEqual(downstream.idleConnections, 0)

    @defer.inlineCallbacks
    def test_rcpt421Pipelined(self):
        """
        A 421 to the second RCPT of the group: every recipient temporary
        with it, no data sent, the connection not kept.
        """
        server = self.startServer()
        server.rcptReplies = {B: (421, "4.3.2 shutting down")}
        entry = yield self.queue(recipients=(A, B, C))
        downstream = self.downstream(server)
        result = yield self.deliver(downstream, entry)
        down = RecipientResult(TEMPORARY, 421, "4.3.2 shutting down")
        self.assertEqual(result.recipients, {A: down, B: down, C: down})
        self.assertEqual(server.messages, [])
        self.assertEqual(downstream.idleConnections, 0)


class AfterTheDotTests(DownstreamFixture, unittest.TestCase):
    """
    The next message's group right after a final dot, before the core's
    reply to the data (RFC 2920 3.1): the connection is parked at the dot
    (C{dataSent}), and the replies are read in order.
    """

    timeout = 15

    @defer.inlineCallbacks
    def chain(self, downstream, count, **server):
        """
        Queue C{count} messages for C{A} and deliver them one after the
        other, each started when the one before has sent its final dot
        (as the relay runner does with a delivery slot freed at the dot).

        @return: the L{DeliveryResult}s, in order.
        """
        entries = []
        for _ in range(count):
            entries.append((yield self.queue(recipients=(A,))))
        results: list[defer.Deferred] = []

        def start(index: int) -> None:
            entry = entries[index]
            f = self.spool.openMessage(entry.queueId)
            following = None
            if index + 1 < count:
                following = lambda: start(index + 1)  # noqa: E731
            d = downstream.deliver(entry, f, following)
            results.append(d.addBoth(lambda r: (f.close(), r)[1]))

        start(0)
        done = []
        for i in range(count):
            # Started one by one, each by the one before.
            yield waitUntil(functools.partial(lambda i: len(results) > i, i), 10)
            done.append((yield results[i]))
        return done

    def assertDelivered(self, server, results, connections):
        """
        Each of C{results} is the core's 250 for its own message, in order,
        every message reached the core once, over C{connections}
        connections.
        """
        self.assertEqual(
            [r.reply for r in results],
            [f"250 2.0.0 Ok: queued as CORE{i}" for i in range(1, len(results) + 1)],
        )
        self.assertEqual(len(server.messages), len(results))
        self.assertEqual(server.connections, connections)

    @defer.inlineCallbacks
    def test_nextGroupBeforeTheReply(self):
        """
        The core answers the data late: the second message's MAIL, RCPT
        and DATA (no RSET: see test_noResetBehindTheDot) reach it before it
        has answered the first one's final dot, over the same connection;
        each message gets its own reply.
        """
        server = self.startServer()
        server.dataReplyDelay = 0.2
        downstream = self.downstream(server)
        first, second = yield self.chain(downstream, 2)
        self.assertEqual(first.reply, "250 2.0.0 Ok: queued as CORE1")
        self.assertEqual(second.reply, "250 2.0.0 Ok: queued as CORE2")
        self.assertEqual(first.accepted, [A])
        self.assertEqual(second.accepted, [A])
        self.assertEqual(server.connections, 1)
        replied = server.transcript.index(("R", b"250 2.0.0 Ok: queued as CORE1"))
        before = [line for kind, line in server.transcript[:replied] if kind == "C"]
        # The first message's dot, then the second one's whole group.
        dot = before.index(b".")
        self.assertEqual(
            [line.split(b":")[0] for line in before[dot:]],
            [b".", b"MAIL FROM", b"RCPT TO", b"DATA"],
        )
        self.assertEqual(downstream.idleConnections, 1)

    @defer.inlineCallbacks
    def test_refusedDataNextGoesOn(self):
        """
        A 554 to the first message's data does not touch the next
        transaction, already sent: the first refused, the second
        delivered over the same connection.
        """
        server = self.startServer()
        server.dataReplyDelay = 0.1
        server.finalReplies = [(554, "5.6.0 rejected")]
        first, second = yield self.chain(self.downstream(server), 2)
        self.assertEqual(
            first.recipients, {A: RecipientResult(PERMANENT, 554, "5.6.0 rejected")}
        )
        self.assertEqual(second.accepted, [A])
        self.assertEqual(server.connections, 1)
        self.assertEqual(len(server.messages), 1)

    @defer.inlineCallbacks
    def test_421ToTheDataNextOverANewConnection(self):
        """
        A 421 to the first message's data ends its connection, under the
        second message already on it: that one's MAIL goes unanswered and
        it goes over a new connection, in the same attempt (nothing of it
        was taken).
        """
        server = self.startServer()
        server.dataReplyDelay = 0.1
        server.finalReplies = [(421, "4.3.2 shutting down")]
        first, second = yield self.chain(self.downstream(server), 2)
        self.assertEqual(
            first.recipients,
            {A: RecipientResult(TEMPORARY, 421, "4.3.2 shutting down")},
        )
        self.assertEqual(second.accepted, [A])
        self.assertEqual(server.connections, 2)
        self.assertEqual(len(server.messages), 1)

    @defer.inlineCallbacks
    def test_closedAfterTheReplyNextOverANewConnection(self):
        """
        A core that closes the connection right after its 250 to the data:
        the first message delivered, the second (already behind the dot)
        goes over a new connection in the same attempt, delivered once.
        """
        server = self.startServer()
        server.dataReplyDelay = 0.1
        server.closeAfterData = True
        results = yield self.chain(self.downstream(server), 2)
        self.assertDelivered(server, results, connections=2)

    @defer.inlineCallbacks
    def test_droppedBeforeTheReplyNextOverANewConnection(self):
        """
        The connection drops after the final dot, before the core's reply:
        the first message is temporary (the one window SMTP leaves: it is
        tried again), the second goes over a new connection and is
        delivered.
        """
        server = self.startServer()
        server.finalReplies = [(250, "2.0.0 never sent", 3600)]
        downstream = self.downstream(server)
        entries = []
        for _ in range(2):
            entries.append((yield self.queue(recipients=(A,))))
        files = [self.spool.openMessage(e.queueId) for e in entries]
        for f in files:
            self.addCleanup(f.close)
        later: list[defer.Deferred] = []

        def dataSent():
            later.append(downstream.deliver(entries[1], files[1]))
            # The core goes away once the second group is on its way.
            reactor.callLater(0.1, server.dropConnections)

        first = yield downstream.deliver(entries[0], files[0], dataSent)
        self.assertEqual(first.recipients[A].status, TEMPORARY)
        self.assertIn("connection lost", first.reply)
        second = yield later[0]
        self.assertEqual(second.accepted, [A])
        self.assertEqual(server.connections, 2)
        self.assertEqual(len(server.messages), 1)

    @defer.inlineCallbacks
    def test_timeoutOfTheReplyNextOverANewConnection(self):
        """
        The core never answers the first message's data: after the data
        timeout that message is temporary (it may have been taken: the one
        window SMTP leaves), and the second goes over a new connection.
        """
        server = self.startServer()
        server.finalReplies = [(250, "2.0.0 too late", 3600)]
        downstream = self.downstream(server, dataTimeout=0.5)
        first, second = yield self.chain(downstream, 2)
        self.assertEqual(first.recipients[A].status, TEMPORARY)
        self.assertIn("timed out", first.reply)
        self.assertEqual(second.accepted, [A])
        self.assertEqual(server.connections, 2)

    @defer.inlineCallbacks
    def test_slowReplyToTheDataTimesNothingOutBehindIt(self):
        """
        The core takes longer over the first message's data than the
        command timeout (well within the data timeout): the reply is still
        read, and the second message's group, sent behind the dot, is not
        timed out meanwhile (its time starts when the reply before it has
        come).  Timing it out would abort the connection under the first
        message, which the core may have taken: a duplicate.
        """
        server = self.startServer()
        server.dataReplyDelay = 1.0
        downstream = self.downstream(server, commandTimeout=0.3, dataTimeout=5)
        results = yield self.chain(downstream, 2)
        self.assertDelivered(server, results, connections=1)

    @defer.inlineCallbacks
    def test_maxTransactionsCountsTheNext(self):
        """
        C{maxTransactions} holds across the dot: with 2, the first two
        messages share a connection, the third has a new one; the first
        one's reply does not close the connection under the second.
        """
        server = self.startServer()
        server.dataReplyDelay = 0.05
        downstream = self.downstream(server, maxTransactions=2)
        results = yield self.chain(downstream, 3)
        self.assertEqual([r.accepted for r in results], [[A], [A], [A]])
        self.assertEqual(server.connections, 2)
        self.assertEqual(len(server.messages), 3)

    @defer.inlineCallbacks
    def test_closeWhileTheReplyIsOwed(self):
        """
        L{SMTPDownstream.close} while a message waits for the reply to its
        data: the reply is still read (the message delivered), then the
        connection closes, and close() fires only then.
        """
        server = self.startServer()
        server.dataReplyDelay = 0.2
        downstream = self.downstream(server)
        entry = yield self.queue(recipients=(A,))
        closed = []

        def dataSent():
            closed.append(downstream.close())

        with self.spool.openMessage(entry.queueId) as f:
            result = yield downstream.deliver(entry, f, dataSent)
        self.assertEqual(result.accepted, [A])
        yield closed[0]
        self.assertEqual(downstream.idleConnections, 0)
        yield waitUntil(lambda: not any(p.connected for p in server._protocols), 5)
        self.assertIn(("C", b"QUIT"), server.transcript)


class PipeliningDaemonTests(unittest.TestCase):
    """
    The assembled daemon from its TOML file: smtplib submits over STARTTLS,
    the relay pipelines to the core over verified STARTTLS.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_relayPipelines(self):
        """
        Two recipients, the core refuses one: the 250 was given for both,
        the core got MAIL, both RCPTs and DATA in one read, and the
        accepted recipient's message byte for byte (plus the Received
        header).
        """
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.start()
        self.addCleanup(core.stop)
        core.rcptReplies = {"nobody@overheid.nl": (550, "5.1.1 no such user")}
        msa = RunningMSA(self, relay=core.relayConfig())
        yield submitTo(msa, recipients=TWO_RECIPIENTS)
        messages = yield core.waitForMessages(1, timeout=20)
        message = messages[0]
        self.assertEqual(splitReceived(message.data)[1], MESSAGE)
        self.assertEqual(message.recipients, ["belastingdienst@overheid.nl"])
        self.assertTrue(message.tls)
        [group] = [g for g in core.commandGroups if g[0].startswith(b"MAIL")][:1]
        self.assertEqual(
            [line.split(b":")[0] for line in group],
            [b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA"],
        )
        self.assertTrue(group[0].startswith(b"MAIL FROM:<" + SENDER.encode() + b">"))

    @defer.inlineCallbacks
    def test_nextMessageAfterTheDot(self):
        """
        One relay connection (C{[relay] concurrency = 1}) to a core that
        answers the data late: with no message being received, the second
        message goes over the same connection, its commands right after the
        first one's final dot, before the core's reply to it.  Both are
        delivered, and each delivery has one INFO line in the log, naming
        the core and its reply.  (Both are queued while the core is down,
        so that neither is being received when the first is relayed.)
        """
        port = freePort()
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        self.addCleanup(core.stop)
        core.dataReplyDelay = 2.0
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        relay = {
            "host": "127.0.0.1",
            "port": port,
            "tls": "starttls",
            "server_name": "localhost",
            "ca_file": core.caFile,
            "concurrency": 1,
            "retry_base": 0.3,
            "retry_max": 0.5,
        }
        msa = RunningMSA(self, relay=relay)
        ids = yield defer.gatherResults([submitTo(msa), submitTo(msa)])
        core.start(port)
        messages = yield core.waitForMessages(2, timeout=20)
        self.assertEqual([splitReceived(m.data)[1] for m in messages], [MESSAGE] * 2)
        self.assertEqual(core.connections, 1)
        replied = core.transcript.index(("R", b"250 2.0.0 Ok: queued as CORE1"))
        commands = [line for kind, line in core.transcript[:replied] if kind == "C"]
        self.assertEqual(
            [line.split(b":")[0] for line in commands[commands.index(b".") :]],
            [b".", b"MAIL FROM", b"RCPT TO", b"DATA"],
        )

        def delivered() -> list[str]:
            return sorted(
                formatEvent(e)
                for e in events
                if e.get("event") == "relay" and "delivered in" in formatEvent(e)
            )

        yield waitUntil(lambda: len(delivered()) == 2, 10)
        for queueId, line in zip(sorted(ids), delivered(), strict=True):
            self.assertRegex(
                line,
                rf"^relay {queueId}: attempt [0-9]+ delivered in [0-9.]+s \(delivered "
                rf"for belastingdienst@overheid.nl\) to <SMTPDownstream "
                rf"127.0.0.1:{port} tls=starttls>: 250 2.0.0 Ok: queued as CORE[12] "
                r"sha256=[0-9a-f]{64}$",
            )
        self.assertEqual(
            [
                e
                for e in events
                if e.get("log_namespace") == "msa.relay.transaction"
                and e["log_level"] >= LogLevel.info
            ],
            [],
        )

    @defer.inlineCallbacks
    def test_submissionsFirst(self):
        """
        While a message is being received, the relay does not take the
        next message behind a final dot: the second message's commands
        reach the core only after its reply to the first one's data.
        """
        core = DownstreamServer(os.path.abspath(self.mktemp()))
        core.start()
        self.addCleanup(core.stop)
        core.dataReplyDelay = 1.0
        msa = RunningMSA(self, relay=core.relayConfig(concurrency=1))
        runner = msa.service.getServiceNamed("relay")
        # A message being received the whole time.
        writer = runner.spool.newMessage(makeEnvelope(("bob@example.org",)))
        self.addCleanup(writer.abort)
        yield defer.gatherResults([submitTo(msa), submitTo(msa)])
        # Both queued before the core's reply to the first one's data.
        self.assertNotIn(("R", b"250 2.0.0 Ok: queued as CORE1"), core.transcript)
        yield core.waitForMessages(2, timeout=20)
        replied = core.transcript.index(("R", b"250 2.0.0 Ok: queued as CORE1"))
        commands = [line for kind, line in core.transcript[:replied] if kind == "C"]
        self.assertEqual(commands[-1], b".")
        self.assertEqual(core.connections, 1)


class PostfixCoreTests(unittest.TestCase):
    """
    The daemon relays to a throwaway Postfix as its core (STARTTLS with
    the certificate verified, AUTH PLAIN), which relays on to the test
    downstream.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_pipelinedToPostfix(self):
        """
        Postfix refuses one of two recipients (554 5.7.1) inside the
        pipelined group: the other gets the message byte for byte, the
        refused one a bounce to the sender carrying Postfix's reply, and
        Postfix logs no improper pipelining.
        """
        core = yield startPostfixCore(
            self,
            {
                "smtpd_recipient_restrictions": (
                    "check_recipient_access inline:{ nobody@overheid.nl=REJECT }, "
                    "permit_sasl_authenticated, reject"
                ),
            },
        )
        msa = RunningMSA(self, relay=core.relay)
        yield submitTo(msa, recipients=TWO_RECIPIENTS)
        messages = yield core.sink.waitForMessages(2, timeout=60)
        [original] = [m for m in messages if m.sender == SENDER]
        [bounce] = [m for m in messages if m.sender == ""]
        self.assertEqual(original.recipients, ["belastingdienst@overheid.nl"])
        self.assertTrue(original.data.endswith(b"\r\n" + MESSAGE), original.data)
        self.assertEqual(bounce.recipients, [SENDER])
        self.assertIn(b"Final-Recipient: rfc822; nobody@overheid.nl", bounce.data)
        self.assertIn(b"Diagnostic-Code: smtp; 554 5.7.1", bounce.data)
        with open(core.postfix.log, encoding="utf-8", errors="replace") as f:
            log = f.read()
        self.assertIn("sasl_username=msa", log)
        self.assertNotIn("improper command pipelining", log)

    @defer.inlineCallbacks
    def test_afterTheDotToPostfix(self):
        """
        Three messages over one relay connection (C{[relay] concurrency =
        1}): each one's commands follow the final dot of the one before
        when it is queued by then.  Postfix takes all three, each byte for
        byte, and logs no improper pipelining.
        """
        core = yield startPostfixCore(self, {})
        msa = RunningMSA(self, relay=dict(core.relay, concurrency=1))
        yield defer.gatherResults([submitTo(msa) for _ in range(3)])
        messages = yield core.sink.waitForMessages(3, timeout=60)
        for message in messages:
            self.assertTrue(message.data.endswith(b"\r\n" + MESSAGE), message.data)
        with open(core.postfix.log, encoding="utf-8", errors="replace") as f:
            log = f.read()
        self.assertNotIn("improper command pipelining", log)
        self.assertEqual(log.count("sasl_username=msa"), 3)
