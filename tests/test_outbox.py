# -*- test-case-name: tests.test_outbox -*-
"""
Tests for L{msa.relay.outbox}: the downstream for a start without a core
MTA, which writes each message to a file in the outbox directory.
"""

import errno
import os
import stat

from twisted.internet import defer
from twisted.trial import unittest

from msa.queue.spool import DELIVERED, FAILED, Spool
from msa.relay.outbox import OutboxDownstream
from msa.relay.results import ACCEPTED, TEMPORARY, DeliveryResult, RecipientResult
from tests.relaydata import DOTTY, bigMessage, makeEnvelope


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


class FailingFile:
    """
    A message file whose second read fails, as a disk error would.
    """

    def __init__(self, first: bytes):
        self.reads = [first]

    def read(self, size=-1):
        if self.reads:
            return self.reads.pop()
        raise OSError(errno.EIO, "Input/output error")


class OutboxUnitTests(unittest.TestCase):
    """
    L{OutboxDownstream.deliver}: the file it writes, its result for every
    pending recipient, and what a failure leaves behind.
    """

    def setUp(self):
        self.spool = Spool(self.mktemp())
        self.directory = os.path.join(self.mktemp(), "outbox")

    @defer.inlineCallbacks
    def queue(self, data, recipients=("bob@example.org",)):
        writer = self.spool.newMessage(makeEnvelope(recipients))
        writer.write(data)
        queueId = yield writer.commit()
        return self.spool.load(queueId)

    @defer.inlineCallbacks
    def deliver(self, outbox, entry):
        with self.spool.openMessage(entry.queueId) as f:
            result = yield outbox.deliver(entry, f)
        return result

    def read(self, queueId):
        with open(os.path.join(self.directory, queueId + ".eml"), "rb") as f:
            return f.read()

    def test_directoryCreated(self):
        """
        A missing outbox directory is created, private to the MSA's user.
        """
        outbox = OutboxDownstream(self.directory)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual(repr(outbox), f"<OutboxDownstream {self.directory}>")

    @defer.inlineCallbacks
    def test_exactResult(self):
        """
        Every pending recipient is accepted with a 250 naming the file;
        the file holds the message unchanged (not dot-stuffed).
        """
        entry = yield self.queue(b"Subject: x\r\n\r\n.dot\r\n", ("a@x.nl", "b@x.nl"))
        result = yield self.deliver(OutboxDownstream(self.directory), entry)
        path = os.path.join(self.directory, entry.queueId + ".eml")
        ok = RecipientResult(ACCEPTED, 250, f"written to {path}")
        self.assertEqual(
            result,
            DeliveryResult({"a@x.nl": ok, "b@x.nl": ok}, f"250 written to {path}"),
        )
        self.assertEqual(self.read(entry.queueId), b"Subject: x\r\n\r\n.dot\r\n")

    @defer.inlineCallbacks
    def test_onlyPendingRecipients(self):
        """
        Recipients already delivered or failed are not in the result.
        """
        entry = yield self.queue(DOTTY, ("a@x.nl", "b@x.nl", "c@x.nl"))
        entry.recipients["a@x.nl"] = DELIVERED
        entry.recipients["c@x.nl"] = FAILED
        result = yield self.deliver(OutboxDownstream(self.directory), entry)
        self.assertEqual(list(result.recipients), ["b@x.nl"])

    @defer.inlineCallbacks
    def test_finalLineEnded(self):
        """
        A message whose last line has no CRLF gets one, as it would going
        to the core; an empty message stays empty.
        """
        outbox = OutboxDownstream(self.directory)
        entry = yield self.queue(b"Subject: x\r\n\r\nno end")
        yield self.deliver(outbox, entry)
        self.assertEqual(self.read(entry.queueId), b"Subject: x\r\n\r\nno end\r\n")
        entry = yield self.queue(b"")
        yield self.deliver(outbox, entry)
        self.assertEqual(self.read(entry.queueId), b"")

    @defer.inlineCallbacks
    def test_crAtChunkEnd(self):
        """
        The end-of-line check spans the read chunks: a CR that ends one
        chunk and the LF that starts the next are one CRLF.
        """
        data = b"x" * 65535 + b"\r\n"
        entry = yield self.queue(data)
        yield self.deliver(OutboxDownstream(self.directory), entry)
        self.assertEqual(self.read(entry.queueId), data)

    @defer.inlineCallbacks
    def test_replacesEarlierCopy(self):
        """
        A second delivery of the same entry (after a crash before the
        spool recorded the first) replaces the file: one copy, complete.
        """
        outbox = OutboxDownstream(self.directory)
        entry = yield self.queue(DOTTY)
        yield self.deliver(outbox, entry)
        yield self.deliver(outbox, entry)
        self.assertEqual(os.listdir(self.directory), [entry.queueId + ".eml"])
        self.assertEqual(self.read(entry.queueId), DOTTY + b"\r\n")

    @defer.inlineCallbacks
    def test_directoryGone(self):
        """
        The file cannot be written: every pending recipient is temporary
        (the message stays queued), with the error; nothing is left behind.
        """
        outbox = OutboxDownstream(self.directory)
        os.rmdir(self.directory)
        entry = yield self.queue(DOTTY, ("a@x.nl", "b@x.nl"))
        result = yield self.deliver(outbox, entry)
        text = result.reply
        # The rest names the (temporary) file in the outbox directory.
        prefix = "outbox: [Errno 2] No such file or directory: '"
        self.assertTrue(text.startswith(prefix + self.directory + "/"), text)
        bad = RecipientResult(TEMPORARY, 0, text)
        self.assertEqual(result, DeliveryResult({"a@x.nl": bad, "b@x.nl": bad}, text))
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)
        self.assertFalse(os.path.exists(self.directory))

    @defer.inlineCallbacks
    def test_readFailsMidway(self):
        """
        The message cannot be read to its end: temporary, and the partial
        temporary file is removed (no .eml appears).
        """
        outbox = OutboxDownstream(self.directory)
        entry = yield self.queue(DOTTY)
        result = yield outbox.deliver(entry, FailingFile(b"Subject: part"))
        text = "outbox: [Errno 5] Input/output error"
        self.assertEqual(
            result,
            DeliveryResult(
                {"bob@example.org": RecipientResult(TEMPORARY, 0, text)}, text
            ),
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(os.listdir(self.directory), [])
