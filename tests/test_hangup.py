# -*- test-case-name: tests.test_hangup -*-
"""
The server's last word is final, and one rule for a client that leaves
before its 250 (issue 9, items 3 and 13; the rule is in the docstring of
L{msa.submission.transaction}):

  - after the server's 421 (idle timeout in DATA), whatever the client still
    sends is never read: the open message is dropped with its spool file,
    nothing is queued, nothing reaches the outbox;
  - once the final dot has been taken, the message is committed and
    delivered even if the client closes before the 250;
  - a refused message is logged with its session, queue id and reason.

Over real sockets against the assembled daemon, plus protocol-level tests
of the same rule where the commit or the shutdown is held at a chosen
moment.
"""

import os
import threading

from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from msa.queue.spool import SpoolWriter
from tests.e2e import RunningMSA
from tests.helpers import Harness
from tests.sessionclient import RawSession, sessionRegistry
from tests.waiting import waitUntil

SENDER = b"ik@mijnbedrijf.nl"
RECIPIENT = b"belastingdienst@overheid.nl"
BODY = b"Subject: aangifte\r\nMessage-ID: <2@mijnbedrijf.nl>\r\n\r\nRegel een\r\n"


def observeLog(testCase) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testCase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def named(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e.get("event") == name]


def openTransaction(msa) -> RawSession:
    """
    A session over STARTTLS, logged in, in DATA after 354.
    """
    client = RawSession(msa.starttlsPort, msa.clientContext())
    client.secure()
    assert client.login() == b"235 2.7.0 Authentication successful"
    assert client.command(b"MAIL FROM:<" + SENDER + b">") == b"250 2.1.0 Ok"
    assert client.command(b"RCPT TO:<" + RECIPIENT + b">") == b"250 2.1.5 Ok"
    assert client.command(b"DATA").startswith(b"354 ")
    return client


def sessionsGone(msa, timeout: float = 10.0):
    """
    Wait until the service has no session left (each one's connectionLost
    has run).
    """
    registry = sessionRegistry(msa.service)
    return waitUntil(
        lambda: not registry.sessions,
        timeout,
        lambda: f"no session left (still open: {registry.sessions})",
    )


def spoolFiles(msa) -> dict[str, list[str]]:
    spool = os.path.join(msa.state, "spool")
    return {d: sorted(os.listdir(os.path.join(spool, d))) for d in ("tmp", "queue")}


class InputAfterLastWordTests(unittest.TestCase):
    """
    A client silent in DATA past idle_timeout is told 421 4.4.2; what it
    sends after that (the rest of the message, its final dot) is never
    read, so the message it was not acknowledged for is not queued.
    """

    @defer.inlineCallbacks
    def test_idleTimeoutInDataThenRest(self):
        events = observeLog(self)
        commits = []
        original = SpoolWriter.commit

        def recordingCommit(writer):
            commits.append(writer.queueId)
            return original(writer)

        self.patch(SpoolWriter, "commit", recordingCommit)
        msa = RunningMSA(self, server={"idle_timeout": 1})

        def talk():
            client = openTransaction(msa)
            try:
                client.send(BODY)
                # Silent past the idle timeout: the server's last word.
                code, lines = client.reply()
                # Then the rest of the message arrives, as if it had been
                # under way; the TLS connection is still open (the server
                # waits for the client's close_notify).
                sent = True
                try:
                    client.send(b"Regel twee\r\n.\r\nQUIT\r\n")
                except OSError:
                    sent = False
                return code, lines, sent, client.readUntilClosed()
            finally:
                client.close()

        code, lines, sent, after = yield threads.deferToThread(talk)
        self.assertEqual(
            (code, lines), (421, [b"4.4.2 localhost Error: timeout exceeded"])
        )
        self.assertTrue(sent)
        # No 250 for the message, no 221 for the QUIT: nothing was read.
        self.assertEqual(after, [])
        yield sessionsGone(msa)
        self.assertEqual(commits, [])
        self.assertEqual(spoolFiles(msa), {"tmp": [], "queue": []})
        self.assertEqual(msa.outboxFiles(), [])
        self.assertEqual(named(events, "accepted"), [])
        [abandoned] = named(events, "abandoned")
        self.assertEqual(abandoned["reason"], "the server closed the session")


class LeftBeforeTheReplyTests(unittest.TestCase):
    """
    The client closes right after its final dot, while the message is being
    committed: the commit completes and the message is delivered (the rule
    of L{msa.submission.transaction}).  The commit is held until the client has
    closed, so the order is certain.  (While a commit is pending the server
    does not read, see L{msa.submission.server.MAX_HELD_INPUT}: it learns of the close
    afterwards.)
    """

    @defer.inlineCallbacks
    def test_closedAfterFinalDotIsDelivered(self):
        events = observeLog(self)
        release = threading.Event()
        started = threading.Event()
        original = SpoolWriter._commitBlocking

        def heldCommit(writer, state):
            started.set()
            release.wait(30)
            return original(writer, state)

        self.patch(SpoolWriter, "_commitBlocking", heldCommit)
        msa = RunningMSA(self)

        def talk():
            client = openTransaction(msa)
            client.send(BODY + b".\r\n")
            # Gone at once: no QUIT, no waiting for the reply.
            client.close()
            return started.wait(10)

        # The client has closed, and the commit has begun and is held.
        self.assertTrue((yield threads.deferToThread(talk)))
        self.assertEqual(spoolFiles(msa)["queue"], [])
        release.set()
        [name] = yield msa.waitForOutbox(1)
        yield sessionsGone(msa)
        [accepted] = named(events, "accepted")
        self.assertEqual(name, accepted["queueId"] + ".eml")
        self.assertTrue(msa.readOutbox(name).endswith(BODY))
        self.assertEqual(named(events, "abandoned"), [])
        self.assertEqual(spoolFiles(msa)["tmp"], [])


class HeldCommit:
    """
    Makes the message's commit wait for the test: C{fire()} completes it.
    """

    def __init__(self, harness) -> None:
        self.d = defer.Deferred()
        writer = harness.spool.writers[-1]
        self.writer = writer

        def commit():
            harness.spool.committed.append((writer.envelope, writer.data.getvalue()))
            return self.d

        writer.commit = commit

    def fire(self) -> None:
        self.d.callback(self.writer.queueId)


class RuleAtProtocolLevelTests(unittest.TestCase):
    """
    The same rule where the server, not the client, ends the session while a
    commit is pending: the message's 250 goes first, then the 421.
    """

    def test_graceEndsDuringCommit(self):
        clock = Clock()
        h = Harness(self, clock=clock)
        h.login()
        h.transaction()
        held = HeldCommit(h)
        fired = []
        h.factory.registry.shutdown(30, clock).addCallback(fired.append)
        self.assertEqual(h.send(BODY + b".\r\nNOOP\r\n"), [])
        clock.advance(30)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        held.fire()
        self.assertEqual(
            h.transport.value().split(b"\r\n")[:-1],
            [
                b"250 2.0.0 Ok: queued as Q0001",
                b"421 4.3.2 msa.example.nl Service shutting down",
            ],
        )
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(h.spool.committed), 1)

    def test_idleTimerDuringCommit(self):
        """
        A commit slower than the idle timeout is the server's delay, not the
        client's: no 421 in the meantime, the 250 when it is done.
        """
        clock = Clock()
        h = Harness(self, clock=clock, idleTimeout=10)
        h.login()
        h.transaction()
        held = HeldCommit(h)
        self.assertEqual(h.send(BODY + b".\r\n"), [])
        clock.advance(25)
        self.assertEqual(h.transport.value(), b"")
        held.fire()
        self.assertEqual(h.transport.value(), b"250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertFalse(h.transport.disconnecting)

    def test_timeoutInDataDropsMessageAndInput(self):
        clock = Clock()
        h = Harness(self, clock=clock, idleTimeout=10)
        h.login()
        h.transaction()
        h.send(BODY)
        h.transport.clear()
        clock.advance(11)
        self.assertEqual(
            h.transport.value(), b"421 4.4.2 msa.example.nl Error: timeout exceeded\r\n"
        )
        self.assertTrue(h.spool.writers[-1].aborted)
        self.assertEqual(h.send(b".\r\nQUIT\r\n"), [])
        self.assertEqual(h.spool.committed, [])

    def test_errorLimitDiscardsPipelinedRest(self):
        """
        The 421 for too many errors is the last reply, even for commands
        already received in the same packet.
        """
        h = Harness(self, maxErrors=1)
        h.login()
        replies = h.send(b"BOGUS\r\nBOGUS\r\nNOOP\r\nNOOP\r\n")
        self.assertEqual(
            replies,
            [
                b"500 5.5.2 Error: command not recognized",
                b"421 4.7.0 msa.example.nl Error: too many errors",
            ],
        )


class RefusedLogTests(unittest.TestCase):
    """
    A refused message is logged with its session, the queue id the spool
    gave it at DATA, the account and the reply: no empty field.
    """

    @defer.inlineCallbacks
    def test_refusedEvent(self):
        msa = RunningMSA(self)
        # After the start: the DEBUG "connection" event is seen too.
        events = observeLog(self)

        def talk():
            client = openTransaction(msa)
            try:
                client.send(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n")
                return client.reply()
            finally:
                client.close()

        code, lines = yield threads.deferToThread(talk)
        self.assertEqual(code, 550)
        [refused] = named(events, "refused")
        [connection] = named(events, "connection")
        self.assertEqual(refused["session"], connection["session"])
        self.assertEqual(refused["client"], connection["client"])
        self.assertEqual(refused["account"], "alice")
        self.assertEqual(refused["code"], 550)
        self.assertEqual(refused["status"], "5.5.2")
        self.assertRegex(refused["queueId"], "^[0-9A-F]{18}$")
        self.assertEqual(
            formatEvent(refused),
            f"session {refused['session']}: message {refused['queueId']} from "
            "alice refused: 550 5.5.2 Message refused: bare CR or LF in message "
            "text; lines must end with CRLF",
        )
        self.assertEqual(msa.outboxFiles(), [])

    def test_refusedWithoutQueueId(self):
        """
        A message object without a queue id (another avatar) still gives a
        sentence without a gap.
        """
        events = observeLog(self)
        h = Harness(self)
        h.login()
        h.transaction()
        h.server.transaction.queueId = ""
        h.send(b"x\ny\r\n.\r\n")
        [refused] = named(events, "refused")
        self.assertEqual(
            formatEvent(refused),
            f"session {h.server.session.sessionId}: message from alice refused: "
            "550 5.5.2 Message refused: bare CR or LF in message text; lines "
            "must end with CRLF",
        )
