# -*- test-case-name: tests.test_commithandoffs -*-
"""
The thread handoffs of one accepted message in the assembled daemon: the
commit path (L{msa.submission.transaction} to L{msa.submission.avatar} to
L{msa.queue.spool}) hands the message to the reactor's thread pool once,
for the fsync of the message file, the state file, the renames and the
fsync of C{queue/} together (L{msa.queue.writer.SpoolWriter._commitBlocking});
the 250 follows that one handoff.
"""

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.e2e import RunningMSA
from tests.test_e2e import submit


class CommitHandoffTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_oneHandoffPerCommit(self):
        """
        Two messages, each over its own STARTTLS session: each costs the
        MSA one thread handoff for its commit.  The other handoffs of the
        run are the password check of a login, and after the 250 the
        outbox write, its audit record and the removal of the delivered
        message (its unlink, then the fsync of the directory): none on the
        commit path (the acceptance record is written
        within the commit's handoff).  (The order of the fsyncs within the one handoff
        is proven by L{tests.test_spool} and L{tests.test_crash}.)  A
        message larger than the writer's 64 KiB buffer (not these) has one
        more, while it arrives: the creation of its file, kept off the
        reactor thread (L{tests.test_reactorguard}).
        """
        msa = RunningMSA(self)
        pool = reactor.getThreadPool()
        original = pool.callInThreadWithCallback
        handoffs = []

        def counting(onResult, f, *args, **kwargs):
            if getattr(f, "__module__", "").startswith("msa."):
                handoffs.append(f"{f.__module__}.{f.__qualname__}")
            return original(onResult, f, *args, **kwargs)

        self.patch(pool, "callInThreadWithCallback", counting)
        queueIds = []
        for _ in range(2):
            code, text = yield threads.deferToThread(
                submit, port=msa.starttlsPort, context=msa.clientContext()
            )
            self.assertEqual(code, 250)
            queueIds.append(text.split()[-1].decode())
        yield msa.waitForOutbox(2)
        commit = "msa.queue.writer.SpoolWriter._commitBlocking"
        self.assertEqual([h for h in handoffs if h == commit], [commit] * 2)
        self.assertEqual([h for h in handoffs if h.startswith("msa.submission.")], [])
        # After the 250: the outbox write and the removal of the delivered
        # message; before the commit, a login's password check.
        self.assertLessEqual(
            {h for h in handoffs if h != commit and not h.startswith("msa.accounts.")},
            {
                "msa.relay.outbox.OutboxDownstream._write",
                "msa.queue.spool.Spool._removedBlocking",
                # The fsync of queue/ after the removal and the relayed
                # record of the audit log, each when no commit carried it
                # (a round of msa.queue.spool.Spool.commits,
                # msa.audit.AuditLog.submitFact).
                "msa.groupcommit.GroupCommit._drain",
            },
        )
        self.assertEqual(len(set(queueIds)), 2)
