# -*- test-case-name: tests.test_outbox -*-
"""
Tests for L{msa.relay.outbox}: the downstream for a start without a core
MTA, which writes each message to a file in the outbox directory.
"""

import os

from twisted.internet import defer
from twisted.trial import unittest

from msa.queue.spool import Spool
from msa.relay.outbox import OutboxDownstream
from tests.relaydata import bigMessage, makeEnvelope


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
