# -*- test-case-name: tests.test_relay_clientcert -*-
"""
Two-way TLS towards the core MTA (the core may require the MSA's client
certificate): with the certificate configured the message is delivered;
without it the handshake fails, the message stays queued as a temporary
failure, and nothing goes out in plaintext.
"""

import os

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import MESSAGE, AiosmtpdCore, RunningMSA
from tests.test_clientcert import ClientPKI
from tests.test_e2e import splitReceived, submit
from tests.waiting import waitUntil


class RelayClientCertificateTests(unittest.TestCase):
    def setUp(self):
        self.pki = ClientPKI(os.path.abspath(self.mktemp()))
        _, self.certFile, self.keyFile = self.pki.issue("msa-relay", "MSA-1")
        self.core = AiosmtpdCore(self, clientCA=self.pki.caFile)

    @defer.inlineCallbacks
    def test_deliveredWithCertificate(self):
        relay = self.core.relayConfig()
        relay.update(client_certificate=self.certFile, client_key=self.keyFile)
        msa = RunningMSA(self, relay=relay)
        code, _ = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250)
        [(_, _, data, overTLS)] = yield self.core.waitForMessages(1)
        self.assertTrue(overTLS)
        self.assertEqual(splitReceived(data)[1], MESSAGE)

    @defer.inlineCallbacks
    def test_withoutCertificateStaysQueued(self):
        msa = RunningMSA(self, relay=self.core.relayConfig())
        code, text = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250)
        queueId = text.split()[-1].decode()
        runner = msa.service.getServiceNamed("relay")

        def attempted():
            described = {d["id"]: d for d in runner.control.describe()}
            entry = described.get(queueId, {})
            return entry if entry.get("attempts", 0) >= 1 else None

        entry = yield waitUntil(attempted, what=f"a first attempt of {queueId}")
        self.assertEqual(entry["attempts"], 1)
        self.assertEqual(
            entry["recipients"], {"belastingdienst@overheid.nl": "pending"}
        )
        self.assertIn("TLS", entry["lastError"], entry["lastError"])
        self.assertEqual(self.core.messages, [])
        self.flushLoggedErrors()
