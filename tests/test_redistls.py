# -*- test-case-name: tests.test_redistls -*-
"""
The shared limits over TLS (C{[limits] url = "rediss://..."}, issue 22
item 4) against a real C{redis-server} serving TLS only (C{--port 0
--tls-port}), with a CA, a server certificate for C{localhost} and a client
CA made in the test; the daemon started from TOML, the clients real
smtplib sessions over STARTTLS.  Redis's certificate is verified (the CA
and the host name): an impostor is told nothing, and AUTH is answered
454 4.7.0 rather than counted on a server the MSA cannot trust.
"""

import json
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import RunningMSA, freePort
from tests.redisserver import tlsRedisServer
from tests.test_e2e import SENDER
from tests.test_health import get
from tests.test_multiinstance import CAROL, carol

#: AUTH while the limits store cannot be trusted (the failed-login counts
#: live there too).
UNCHECKED = (454, b"4.7.0 Temporary authentication failure")


def mailReply(msa: RunningMSA, during=lambda: None) -> tuple[int, bytes]:
    """
    A blocking session: STARTTLS, AUTH as carol (who may send 5 messages a
    day), MAIL, then C{during()} while the transaction is open.

    @return: the reply to AUTH when it failed, else the reply to MAIL.
    """
    client = smtplib.SMTP("localhost", msa.starttlsPort, timeout=10)
    try:
        client.starttls(context=msa.clientContext())
        try:
            client.login(*CAROL)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error
        reply = client.mail(SENDER)
        during()
        return reply
    finally:
        client.close()


class RedisTLSTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.redis = tlsRedisServer(self)
        self.tls = self.redis.tls

    def start(self, url: str | None = None, **tls) -> RunningMSA:
        self.metricsPort = freePort()
        limits = {
            "backend": "redis",
            "url": url or self.redis.url,
            "timeout": 1.0,
            "tls_ca": self.tls.serverCA,
            "tls_certificate": self.tls.clientCertificate,
            "tls_key": self.tls.clientKey,
        }
        limits.update(tls)
        return RunningMSA(
            self,
            extraAccounts=carol(messagesPerDay=5),
            limits={k: v for k, v in limits.items() if v is not None},
            metrics={"listen": f"tcp:{self.metricsPort}:interface=127.0.0.1"},
        )

    def limitsHealth(self):
        return threads.deferToThread(get, self.metricsPort, "/health").addCallback(
            lambda answer: json.loads(answer[1])["components"]["limits"]
        )

    @defer.inlineCallbacks
    def test_verifiedServer(self):
        """
        The right CA, host name and client certificate: MAIL gets 250 and
        its hold is in the TLS Redis while the transaction is open; /health
        says so.
        """
        msa = self.start()
        held = []

        def count():
            held.append(self.redis.integer("ZCARD", "digipoort-msa:rate:held:carol"))

        reply = yield threads.deferToThread(mailReply, msa, count)
        self.assertEqual((reply, held), ((250, b"2.1.0 Ok"), [1]))
        limits = yield self.limitsHealth()
        self.assertEqual(
            limits,
            {
                "status": "ok",
                "detail": f"Redis at localhost:{self.redis.port} db 0 over TLS",
            },
        )

    @defer.inlineCallbacks
    def test_unknownCA(self):
        """
        Redis's certificate is not from the configured CA: nothing is sent
        to it, AUTH gets 454 4.7.0 (as for any limits outage) and /health
        says the limits are failing.
        """
        msa = self.start(tls_ca=self.tls.clientCA)
        reply = yield threads.deferToThread(mailReply, msa)
        self.assertEqual(reply, UNCHECKED)
        self.assertEqual(self.redis.integer("DBSIZE"), 0)
        limits = yield self.limitsHealth()
        self.assertEqual(limits["status"], "failing")

    @defer.inlineCallbacks
    def test_wrongHostName(self):
        """
        The certificate is for C{localhost}; the URL names 127.0.0.1: the
        host name check refuses it.
        """
        url = f"rediss://127.0.0.1:{self.redis.port}/0"
        msa = self.start(url=url)
        reply = yield threads.deferToThread(mailReply, msa)
        self.assertEqual(reply, UNCHECKED)

    @defer.inlineCallbacks
    def test_clientCertificateRequired(self):
        """
        Without the client certificate this Redis wants, no connection.
        """
        msa = self.start(tls_certificate=None, tls_key=None)
        reply = yield threads.deferToThread(mailReply, msa)
        self.assertEqual(reply, UNCHECKED)
