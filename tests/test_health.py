# -*- test-case-name: tests.test_health -*-
"""
C{/health} over a real socket, the daemon started from TOML, with each
engine it depends on stopped in turn (issue 22, item 3): the core MTA
(aiosmtpd), Redis (a throwaway C{redis-server}), PostgreSQL (a throwaway
cluster) and the audit log (on a tmpfs filled up).  A load balancer reads
the status (200 or 503), a person the JSON's components.
"""

import json
import os
import urllib.error
import urllib.request

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from msa import metrics
from msa.accounts.pgstore import AccountTable
from msa.audit import AuditError, AuditLog
from msa.service.health import Health
from tests.e2e import AiosmtpdCore, RunningMSA, freePort
from tests.faultfs import fillFileSystem, mountTmpfs
from tests.pgserver import PostgreSQLServer
from tests.redisserver import RedisServer
from tests.test_accounts_pg import usersAccounts
from tests.test_e2e import submit
from tests.test_integrity import (
    CountingForwarder,
    admin,
    held,
    queuedAndTampered,
    spoolOf,
    unreachable,
)
from tests.waiting import waitUntil

COMPONENTS = {
    "relay",
    "spool",
    "limits",
    "accounts",
    "audit",
    "returnchannel",
    "workers",
}


def get(port: int, path: str) -> tuple[int, str]:
    """
    A blocking GET of C{path} on the metrics endpoint: (status, body).
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class HealthTests(unittest.TestCase):
    timeout = 120

    def start(self, **sections) -> RunningMSA:
        self.port = freePort()
        metricsSection = {"listen": f"tcp:{self.port}:interface=127.0.0.1"}
        metricsSection.update(sections.pop("metrics", {}))
        return RunningMSA(self, metrics=metricsSection, **sections)

    @defer.inlineCallbacks
    def health(self):
        status, body = yield threads.deferToThread(get, self.port, "/health")
        return status, json.loads(body)

    def waitForHealth(self, component: str, state: str, what: str):
        """
        Poll C{/health} until C{component} is in C{state}.

        @return: a L{Deferred} firing with (status, report).
        """

        def look():
            return self.health().addCallback(
                lambda answer: (
                    answer
                    if answer[1]["components"][component]["status"] == state
                    else None
                )
            )

        return waitUntil(look, 30, what, interval=0.2)

    def submitTo(self, msa: RunningMSA):
        return threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )

    @defer.inlineCallbacks
    def test_allWell(self):
        """
        Every engine up: 200, C{"ok"}, one entry per component, each with a
        detail; C{msa_component_status} says the same.
        """
        core = AiosmtpdCore(self)
        msa = self.start(relay=core.relayConfig())
        self.assertEqual((yield self.submitTo(msa))[0], 250)
        yield core.waitForMessages(1)
        status, report = yield self.health()
        self.assertEqual((status, report["status"]), (200, "ok"), report)
        self.assertEqual(set(report["components"]), COMPONENTS)
        for name, component in report["components"].items():
            self.assertEqual(component["status"], "ok", name)
            self.assertTrue(component["detail"], name)
        self.assertIn("core MTA last answered", report["components"]["relay"]["detail"])
        _, text = yield threads.deferToThread(get, self.port, "/metrics")
        for name in COMPONENTS:
            self.assertIn(
                f'msa_component_status{{component="{name}",status="ok"}} 1.0', text
            )

    @defer.inlineCallbacks
    def test_coreStopped(self):
        """
        The core MTA does not answer and a message waits: 503, the relay
        failing with the number queued; the others still ok.
        """
        msa = self.start(
            relay={"host": "127.0.0.1", "port": freePort(), "tls": "none"},
            metrics={"health_window": 0.1},
        )
        self.assertEqual((yield self.submitTo(msa))[0], 250)
        status, report = yield self.waitForHealth("relay", "failing", "relay failing")
        self.assertEqual((status, report["status"]), (503, "unhealthy"))
        self.assertIn(
            "1 message(s) queued", report["components"]["relay"]["detail"], report
        )
        self.assertEqual(report["components"]["limits"]["status"], "ok")

    @defer.inlineCallbacks
    def test_redisStopped(self):
        """
        Redis killed under C{fallback = "refuse"}: 503 with the limits
        failing (MAIL is refused with 451 4.3.0 meanwhile); back when Redis
        is.
        """
        redis = RedisServer(self)
        self.start(
            limits={
                "backend": "redis",
                "url": redis.url,
                "timeout": 0.2,
                "lease": 0.9,
            }
        )
        status, report = yield self.health()
        self.assertEqual(
            (status, report["components"]["limits"]["status"]), (200, "ok")
        )
        redis.stop()
        status, report = yield self.waitForHealth("limits", "failing", "Redis down")
        self.assertEqual((status, report["status"]), (503, "unhealthy"))
        detail = report["components"]["limits"]["detail"]
        self.assertIn(f"Redis at 127.0.0.1:{redis.port}", detail)
        self.assertIn("fallback = refuse", detail)
        yield threads.deferToThread(redis.start)
        status, _ = yield self.waitForHealth("limits", "ok", "Redis back")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_postgresqlStopped(self):
        """
        PostgreSQL stopped: 200 but C{"degraded"}, the accounts entry says
        the last good copy is in use, and a login still succeeds.
        """
        pg = PostgreSQLServer(self)
        table = AccountTable(pg.url)
        table.save(usersAccounts())
        table.close()
        msa = self.start(accounts={"store": pg.url, "watch_interval": 0.2})
        status, report = yield self.health()
        self.assertEqual(report["components"]["accounts"]["status"], "ok", report)
        pg.stop()
        status, report = yield self.waitForHealth(
            "accounts", "degraded", "accounts degraded"
        )
        self.assertEqual((status, report["status"]), (200, "degraded"))
        self.assertIn(
            "logins use the last good copy (2 account(s))",
            report["components"]["accounts"]["detail"],
        )
        self.assertEqual((yield self.submitTo(msa))[0], 250)

    @defer.inlineCallbacks
    def test_auditCannotBeWritten(self):
        """
        The audit log's file system is full: the message whose record fails
        is refused with 451 4.3.0 (never acknowledged), and C{/health} says
        503 with the audit failing; C{msa_audit_write_failures_total} counts
        it.
        """
        directory = mountTmpfs(self, "64k")
        msa = self.start(audit={"path": os.path.join(directory, "audit.jsonl")})
        fillFileSystem(directory)
        before = (
            metrics.REGISTRY.get_sample_value("msa_audit_write_failures_total") or 0
        )
        # The file's last page still has room for a few records.
        for _ in range(60):
            reply = yield self.submitTo(msa)
            if reply[0] != 250:
                break
        self.assertEqual(
            reply, (451, b"4.3.0 Cannot queue the message, try again later")
        )
        status, report = yield self.health()
        self.assertEqual((status, report["status"]), (503, "unhealthy"))
        self.assertIn(
            "audit records cannot be written", report["components"]["audit"]["detail"]
        )
        self.assertEqual(
            metrics.REGISTRY.get_sample_value("msa_audit_write_failures_total"),
            before + 1,
        )

    @defer.inlineCallbacks
    def test_heldForIntegrity(self):
        """
        A queued message changed on disk is held when the relay checks it:
        /health stays 200 but C{"degraded"}, the spool entry names it, and
        C{msa_queue_held_messages{reason="integrity"}} counts it (what the
        critical alert reads).
        """
        core = AiosmtpdCore(self)
        port = freePort()
        msa = self.start(
            relay=unreachable(core.certFile, port), metrics={"health_window": 0.1}
        )
        spool = spoolOf(msa)
        queueId, _ = yield queuedAndTampered(msa, spool)
        forwarder = CountingForwarder("127.0.0.1", core.port)
        listening = reactor.listenTCP(port, forwarder, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        _, _, code = yield admin(msa, "queue", "flush")
        self.assertEqual(code, 0)
        yield held(spool, queueId)
        status, report = yield self.waitForHealth(
            "spool", "degraded", "the spool degraded"
        )
        self.assertEqual((status, report["status"]), (200, "degraded"))
        self.assertIn(
            f"1 message(s) held for integrity (their bytes are not the ones "
            f"acknowledged): {queueId}",
            report["components"]["spool"]["detail"],
        )
        # Held messages wait for an operator, not for the core.
        self.assertEqual(
            report["components"]["relay"],
            {"status": "ok", "detail": "nothing waiting to be relayed"},
        )
        _, text = yield threads.deferToThread(get, self.port, "/metrics")
        self.assertIn('msa_queue_held_messages{reason="integrity"} 1.0', text)
        self.assertIn(
            'msa_component_status{component="spool",status="degraded"} 1.0', text
        )


class AuditRecordsLostTests(unittest.TestCase):
    def test_counted(self):
        """
        A fact whose audit record cannot be made durable (a delivery: it
        has happened either way) counts in C{msa_audit_records_lost_total},
        what the critical alert reads, and in
        C{msa_audit_write_failures_total}; C{/health}'s audit entry says why
        until a round writes again.
        """

        def full(fd):
            raise OSError(28, "No space left on device")

        audit = AuditLog(os.path.abspath(self.mktemp()), fdatasync=full)
        self.addCleanup(audit.close)
        metrics.watchAudit(audit)
        self.addCleanup(metrics.watchAudit, None)
        sample = metrics.REGISTRY.get_sample_value
        self.assertEqual(sample("msa_audit_records_lost_total"), 0)
        self.assertRaises(AuditError, audit.appendFact, "relayed", queueId="A1")
        self.assertRaises(AuditError, audit.append, "accepted", queueId="A2")
        self.assertEqual(sample("msa_audit_records_lost_total"), 1)
        self.assertEqual(sample("msa_audit_records_lost_unrecorded"), 1)
        self.assertEqual(sample("msa_audit_write_failures_total"), 2)
        health = Health(spool=None, relay=None, audit=audit).auditHealth()
        self.assertIn("No space left on device", health.detail)
