# -*- test-case-name: tests.test_commitdelay -*-
"""
The commit delay of L{msa.groupcommit.GroupCommit} (C{commitDelay} and
C{company}), and the spool's use of it: a commit holds its round back for
the messages being received beside it, so that one fsync of C{queue/} and
one fdatasync of the audit log serve them all; a message alone never
waits.

The waits here are deadlines, never measured: a test that holds a round
back sets a long C{commitDelay} so that only the company it expects can
end the wait.
"""

import os
import smtplib
import threading

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from msa.audit import AuditLog
from msa.groupcommit import GroupCommit
from msa.queue.commits import COMMIT_DELAY
from msa.queue.spool import Spool
from tests.e2e import MESSAGE, USERS, AiosmtpdCore, RunningMSA
from tests.relaydata import makeEnvelope
from tests.test_e2e import RECIPIENT, SENDER
from tests.waiting import waitUntilBlocking

#: Long enough that a round held back for company can only be released by
#: it (a test that waited this long has failed anyway).
LONG = 30.0


class CommitDelayTests(unittest.TestCase):
    """
    L{GroupCommit.commitBlocking} with a commit delay.
    """

    def setUp(self):
        self.rounds: list[list[int]] = []
        self.expected = 1

        def runRound(jobs):
            self.rounds.append(list(jobs))
            return jobs

        self.commits: GroupCommit[int, int] = GroupCommit(
            runRound,
            commitDelay=LONG,
            company=lambda joined: joined < self.expected,
        )

    def commitInThread(self, job: int) -> threading.Thread:
        thread = threading.Thread(target=self.commits.commitBlocking, args=(job,))
        thread.start()
        self.addCleanup(thread.join, LONG)
        return thread

    def firstHeldBack(self) -> threading.Thread:
        """
        Start a commit, in a thread, that expects one more and holds its
        round back for it.

        @return: its thread.
        """
        self.expected = 2
        first = self.commitInThread(1)
        waitUntilBlocking(
            lambda: (
                self.commits._pending is not None and self.commits._pending.gathering
            ),
            what="the first commit holding its round back",
        )
        return first

    def test_aloneNeverWaits(self):
        """
        With no company expected the caller runs its round at once.
        """
        self.assertEqual(self.commits.commitBlocking(1), 1)
        self.assertEqual((self.rounds, self.commits.gathers), ([[1]], 0))

    def test_heldBackUntilTheCompanyHasJoined(self):
        """
        A caller that expects another holds its round until the other has
        joined: one round for both.
        """
        first = self.firstHeldBack()
        self.assertEqual(self.rounds, [])
        self.assertEqual(self.commits.commitBlocking(2), 2)
        first.join(LONG)
        self.assertEqual(self.rounds, [[1, 2]])
        self.assertEqual(self.commits.gathers, 1)

    def test_deadline(self):
        """
        Company that never comes holds the round back at most
        C{commitDelay}.
        """
        self.commits.commitDelay = 0.01
        self.expected = 5
        self.assertEqual(self.commits.commitBlocking(1), 1)
        self.assertEqual((self.rounds, self.commits.gathers), ([[1]], 1))

    def test_reactorJobsWaitWithTheRound(self):
        """
        A job from the reactor thread joins a round being held back and is
        carried by it (the drain it schedules does not start the round
        early).
        """
        first = self.firstHeldBack()
        self.commits._drain()
        self.assertEqual(self.rounds, [])
        self.assertEqual(self.commits.commitBlocking(2), 2)
        first.join(LONG)
        self.assertEqual(self.rounds, [[1, 2]])


class SpoolCommitDelayTests(unittest.TestCase):
    """
    The spool's commits, in the real reactor's thread pool, through one
    round when their messages are received side by side.
    """

    def setUp(self):
        directory = self.mktemp()
        self.spool = Spool(directory, reactor)
        self.audit = AuditLog(os.path.join(directory, "audit.jsonl"), reactor=reactor)
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.spool.audit = self.audit
        self.fsyncs: list[str] = []
        self.spool.commits.directoryFsync = self.fsyncs.append

    def writer(self):
        writer = self.spool.newMessage(makeEnvelope(("bob@example.org",)))
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        return writer

    def test_delayIsShort(self):
        """
        The default delay is what a client can afford to wait for its 250
        (at 0.05 the 20-messages-per-connection bench was slower).
        """
        self.assertGreater(COMMIT_DELAY, 0)
        self.assertLessEqual(COMMIT_DELAY, 0.03)

    @defer.inlineCallbacks
    def test_sideBySideShareOneRound(self):
        """
        Three messages received side by side: one fsync of C{queue/} and
        one round of the audit log for the three, each record in the file.
        """
        self.spool.commits.commitDelay = LONG
        writers = [self.writer() for _ in range(3)]
        auditRounds = self.audit._commits.rounds
        queueIds = yield defer.gatherResults([w.commit() for w in writers])
        self.assertEqual(self.fsyncs, [self.spool.queueDirectory])
        self.assertEqual(self.audit._commits.rounds, auditRounds + 1)
        self.assertEqual(sorted(self.spool.pending()), sorted(queueIds))
        with open(self.audit.path, encoding="utf-8") as f:
            text = f.read()
        for queueId in queueIds:
            self.assertIn(queueId, text)

    @defer.inlineCallbacks
    def test_aloneNotHeldBack(self):
        """
        A message alone is committed without waiting for company, even
        with a long delay; so is one whose neighbour was aborted.
        """
        self.spool.commits.commitDelay = LONG
        neighbour = self.writer()
        neighbour.abort()
        yield self.writer().commit()
        self.assertEqual(self.spool.commits.gathers, 0)
        self.assertEqual(len(self.fsyncs), 1)


class DaemonCommitDelayTests(unittest.TestCase):
    """
    The assembled daemon (TOML, STARTTLS, AUTH, relay to a core): three
    clients whose messages are received side by side are committed in one
    round, all three renames made durable by one fsync of C{queue/}.
    """

    def sendHoldingTheDot(self, msa: RunningMSA, ready: threading.Barrier):
        """
        A blocking smtplib session (in a thread) that sends its message up
        to the final dot, waits at C{ready} for the others, then sends the
        dot.

        @return: the (code, text) of the reply to the dot.
        """
        client = smtplib.SMTP("localhost", msa.starttlsPort, timeout=LONG)
        try:
            client.ehlo("mijnbedrijf.nl")
            client.starttls(context=msa.clientContext())
            client.ehlo("mijnbedrijf.nl")
            client.login("alice", USERS["alice"])
            client.mail(SENDER)
            client.rcpt(RECIPIENT)
            client.putcmd("data")
            code, _ = client.getreply()
            assert code == 354, code
            client.send(MESSAGE)
            ready.wait(LONG)
            client.send(b".\r\n")
            return client.getreply()
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_sideBySideOverSMTP(self):
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig(), spool={"commit_delay": 1.0})
        spool = msa.service.getServiceNamed("relay").spool
        self.assertEqual(spool.commits.commitDelay, 1.0)
        listings: list[list[str]] = []
        fsync = spool.commits.directoryFsync

        def recordingFsync(path):
            listings.append(sorted(os.listdir(path)))
            fsync(path)

        spool.commits.directoryFsync = recordingFsync
        ready = threading.Barrier(3)
        replies = yield defer.gatherResults(
            [
                threads.deferToThread(self.sendHoldingTheDot, msa, ready)
                for _ in range(3)
            ]
        )
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        queueIds = sorted(text.split()[-1].decode() for _, text in replies)
        # The first fsync after the dots saw the three messages in queue/.
        self.assertEqual(listings[0], queueIds)
        yield core.waitForMessages(3)
