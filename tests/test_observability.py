# -*- test-case-name: tests.test_observability -*-
"""
What an operator sees: the log events of a submission and its relay (with
the session id and queue id, the SHA-256 of the accepted bytes, and never a
password or SASL response), the JSON lines file, the Prometheus metrics and
the health check, over real sockets.
"""

import base64
import hashlib
import json
import os
import urllib.request

from twisted.internet import defer, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from msa import metrics
from msa.service.health import Health
from tests.e2e import MESSAGE, AiosmtpdCore, RunningMSA, freePort
from tests.test_e2e import submit

PASSWORD = "wonderland"


class LogEventTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_eventsOfOneSubmission(self):
        core = AiosmtpdCore(self)
        jsonFile = os.path.join(os.path.abspath(self.mktemp()) + "-events.json")
        msa = RunningMSA(
            self, relay=core.relayConfig(), logging={"json_file": jsonFile}
        )
        # Added after the start, so not behind the daemon's level filter
        # (info): it sees the DEBUG events too.
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for mechanism in ("PLAIN", "LOGIN"):
            code, text = yield threads.deferToThread(
                submit,
                port=msa.starttlsPort,
                context=msa.clientContext(),
                mechanism=mechanism,
                password=PASSWORD,
            )
            self.assertEqual(code, 250)
        queueId = text.split()[-1].decode()
        yield core.waitForMessages(2)
        for _ in range(100):
            if any(
                e.get("event") == "relay" and e.get("queueId") == queueId
                for e in events
            ):
                break
            yield threads.deferToThread(__import__("time").sleep, 0.05)

        byEvent = {}
        for e in events:
            if "event" in e and "session" in e or e.get("event") == "relay":
                byEvent.setdefault(e["event"], []).append(e)
        [connection, _] = byEvent["connection"]
        session = connection["session"]
        self.assertEqual(connection["client"], "127.0.0.1")
        tls = [e for e in byEvent["tls"] if e["session"] == session]
        self.assertEqual(tls[0]["version"], "TLSv1.3")
        [auth] = [e for e in byEvent["auth"] if e["session"] == session]
        self.assertEqual(
            (auth["outcome"], auth["account"], auth["mechanism"]),
            ("success", "alice", "PLAIN"),
        )
        disconnected = [e for e in byEvent["disconnected"] if e["session"] == session]
        # The session's own events are DEBUG: the accepted one is its INFO line.
        for e in (connection, tls[0], auth, disconnected[0]):
            self.assertEqual(e["log_level"], LogLevel.debug, e)
        accepted = [e for e in byEvent["accepted"] if e["queueId"] == queueId]
        self.assertEqual(len(accepted), 1)
        self.assertEqual(accepted[0]["log_level"], LogLevel.info)
        self.assertEqual(
            (accepted[0]["client"], accepted[0]["tls"], accepted[0]["account"]),
            ("127.0.0.1", "TLSv1.3", "alice"),
        )
        self.assertIsInstance(accepted[0]["duration"], float)
        self.assertEqual(accepted[0]["size"], len(MESSAGE))
        self.assertEqual(accepted[0]["recipients"], 1)
        self.assertEqual(accepted[0]["sha256"], hashlib.sha256(MESSAGE).hexdigest())
        relay = [e for e in byEvent["relay"] if e["queueId"] == queueId]
        self.assertEqual(relay[0]["outcome"], "delivered")
        self.assertIn("CORE", relay[0]["reply"])

        # Never a password or SASL response, in any event, formatted or not.
        secrets = [
            PASSWORD,
            base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode(),
            base64.b64encode(PASSWORD.encode()).decode(),
            "scrypt$",
        ]
        from twisted.logger import formatEvent

        for e in events:
            text = repr(e) + formatEvent(e)
            for secret in secrets:
                self.assertNotIn(secret, text)

        with open(jsonFile) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        self.assertTrue(
            any(
                e.get("event") == "accepted" and e.get("queue_id") == queueId
                for e in lines
            )
        )
        for line in lines:
            self.assertNotIn(PASSWORD, json.dumps(line))

    @defer.inlineCallbacks
    def test_failedLoginLogged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        msa = RunningMSA(self)
        yield self.assertFailure(
            threads.deferToThread(
                submit,
                port=msa.implicitPort,
                implicit=True,
                context=msa.clientContext(),
                password="Guess-Me-123",
            ),
            Exception,
        )
        [failure] = [e for e in events if e.get("event") == "auth"]
        self.assertEqual(
            (
                failure["outcome"],
                failure["user"],
                failure["mechanism"],
                failure["code"],
            ),
            ("failure", "alice", "PLAIN", 535),
        )
        self.assertEqual(
            (failure["log_level"], failure["client"]), (LogLevel.info, "127.0.0.1")
        )
        for e in events:
            self.assertNotIn("Guess-Me-123", repr(e))


class MetricsTests(unittest.TestCase):
    def sample(self, name, labels=None):
        return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0

    @defer.inlineCallbacks
    def test_metricsAndHealth(self):
        port = freePort()
        msa = RunningMSA(self, metrics={"listen": f"tcp:{port}:interface=127.0.0.1"})
        before = self.sample("msa_messages_total", {"code": "250"})
        code, _ = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250)
        self.assertEqual(self.sample("msa_messages_total", {"code": "250"}), before + 1)
        self.assertGreaterEqual(self.sample("msa_accepted_bytes_total"), len(MESSAGE))
        self.assertGreaterEqual(
            self.sample("msa_auth_total", {"mechanism": "PLAIN", "outcome": "success"}),
            1,
        )

        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, body = yield threads.deferToThread(get, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn('msa_messages_total{code="250"}', body)
        self.assertIn("msa_queue_messages", body)
        self.assertIn("msa_tls_handshakes_total", body)
        self.assertIn("msa_tls_certificate_expiry_timestamp", body)
        status, body = yield threads.deferToThread(get, "/health")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))

    def test_healthUnreachableCore(self):
        class Spool:
            queueDirectory = None

            def pending(self):
                return ["A1"]

            def load(self, queueId):
                raise KeyError(queueId)

        health = Health(Spool(), None, window=60, clock=lambda: 1e10)
        relay = health.relayHealth()
        self.assertEqual(relay.status, "failing")
        self.assertIn("1 message(s) queued", relay.detail)
