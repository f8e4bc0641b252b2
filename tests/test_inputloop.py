# -*- test-case-name: tests.test_inputloop -*-
"""
L{SubmissionServer}'s one input loop: pipelined commands whose replies
are ready at once (MAIL, RCPT validated synchronously) are taken one after
the other by the same loop, never by re-entering it from C{wait()}, so the
Python stack stays as deep as for one command however many are pipelined
(issue 18, defect 3: at 100 recipients the stack was at 943 of 1000
frames, and 150 recipients over TLS ended in C{RecursionError} and a hung
session).
"""

import sys

from twisted.internet import defer
from twisted.trial import unittest

from msa.submission.server import SubmissionServer
from tests.helpers import Harness


def stackDepth() -> int:
    """
    How many Python frames are on the stack of the caller.
    """
    depth = 0
    frame = sys._getframe(1)
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return depth


def recordDispatchDepth(testCase: unittest.TestCase) -> list[int]:
    """
    Patch L{SubmissionServer._dispatchLine} (for the rest of C{testCase})
    to record the stack depth at which each line is dispatched.

    @return: the list the depths are appended to.
    """
    depths: list[int] = []
    original = SubmissionServer._dispatchLine

    def measured(self, line: bytes, tooLong: bool) -> None:
        depths.append(stackDepth())
        original(self, line, tooLong)

    testCase.patch(SubmissionServer, "_dispatchLine", measured)
    return depths


def pipelinedEnvelope(recipients: int) -> bytes:
    """
    MAIL, C{recipients} RCPT commands and a NOOP, as one write.
    """
    return (
        b"MAIL FROM:<a@example.nl>\r\n"
        + b"".join(b"RCPT TO:<r%d@example.nl>\r\n" % n for n in range(recipients))
        + b"NOOP\r\n"
    )


class InputLoopTests(unittest.TestCase):
    def test_deepPipelineAllReplies(self):
        """
        MAIL + 1000 RCPT + NOOP in one write, each answered at once: 1002
        replies in order, the last the NOOP's (with the recursion, Python's
        limit of 1000 frames was hit near the 110th command).
        """
        h = Harness(self, maxRecipients=1000)
        h.login()
        replies = h.send(pipelinedEnvelope(1000))
        self.assertEqual(len(replies), 1002)
        self.assertEqual(replies[0], b"250 2.1.0 Ok")
        self.assertEqual(replies[1:-1], [b"250 2.1.5 Ok"] * 1000)
        self.assertEqual(replies[-1], b"250 2.0.0 Ok")
        self.assertEqual(len(h.server.transaction.recipients), 1000)

    def test_stackDepthBounded(self):
        """
        The stack depth at which a pipelined command is dispatched does not
        grow with the number of commands before it in the same write.
        """
        depths = recordDispatchDepth(self)
        h = Harness(self, maxRecipients=300)
        h.login()
        del depths[:]
        h.send(pipelinedEnvelope(300))
        self.assertEqual(len(depths), 302)
        self.assertEqual(max(depths) - min(depths), 0, (min(depths), max(depths)))

    def test_asynchronousReplyResumesLoop(self):
        """
        A reply that is not ready at once (a validation that waits) pauses
        the loop and reading; when it fires, the same loop takes the rest of
        the pipelined commands, in order, at the depth of the callback.
        """
        h = Harness(self, maxRecipients=200)
        h.login()
        avatar = h.server.avatar
        pending: list[defer.Deferred[None]] = []
        original = avatar.validateTo

        def slowFirst(session, recipient, params):
            if not pending:
                d: defer.Deferred[None] = defer.Deferred()
                pending.append(d)
                return d
            return original(session, recipient, params)

        self.patch(avatar, "validateTo", slowFirst)
        replies = h.send(pipelinedEnvelope(150))
        self.assertEqual(replies, [b"250 2.1.0 Ok"])
        self.assertTrue(h.transport.producerState == "paused")
        h.transport.clear()
        pending[0].callback(None)
        replies = h.transport.value().split(b"\r\n")[:-1]
        self.assertEqual(replies, [b"250 2.1.5 Ok"] * 150 + [b"250 2.0.0 Ok"])
        self.assertEqual(h.transport.producerState, "producing")
