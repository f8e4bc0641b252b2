# -*- test-case-name: tests.test_authorization -*-
"""
Authorization and abuse limits (R9, R10): the rule objects on their own,
then each rule through the protocol with its exact reply, at and past its
edge.
"""

import base64

from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.policy.authorization import (
    AccountRules,
    AddressList,
    AuthThrottle,
    RateLimiter,
    ServerRules,
)
from tests.helpers import SENDERS, Harness


class FakeTime:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class RuleObjectTests(unittest.TestCase):
    def test_addressList(self):
        rules = AddressList.parse(["Ik@Acme.nl", "@douane.example"])
        self.assertTrue(rules.matches("ik@acme.nl"))
        self.assertTrue(rules.matches("IK@ACME.NL"))
        self.assertFalse(rules.matches("jij@acme.nl"))
        self.assertTrue(rules.matches("wie@douane.example"))
        self.assertFalse(rules.matches("wie@sub.douane.example"))
        self.assertFalse(rules.matches("douane.example@evil.example"))
        for bad in ["acme.nl", "", 5]:
            self.assertRaises(ValueError, AddressList.parse, [bad])

    def test_fromExtra(self):
        rules = AccountRules.fromExtra(
            {"senders": ["@acme.nl"], "maxRecipients": 5, "requireHeaderFrom": True}
        )
        self.assertEqual(rules.maxRecipients, 5)
        self.assertTrue(rules.requireHeaderFrom)
        self.assertIsNone(rules.recipients)
        for extra, key in [
            ({"maxRecipients": 0}, "maxRecipients"),
            ({"maxRecipients": "5"}, "maxRecipients"),
            ({"messagesPerDay": True}, "messagesPerDay"),
            ({"senders": "@acme.nl"}, "senders"),
            ({"senders": ["acme.nl"]}, "senders"),
            ({"sendres": []}, "sendres"),
        ]:
            error = self.assertRaises(ValueError, AccountRules.fromExtra, extra)
            self.assertIn(key, str(error))

    def test_rateLimiterEdges(self):
        clock = FakeTime()
        limiter = RateLimiter(clock)
        rules = AccountRules(messagesPerMinute=2, messagesPerDay=3)
        limiter.check("acme", rules)
        limiter.record("acme")
        clock.now += 10
        limiter.check("acme", rules)
        limiter.record("acme")
        error = self.assertRaises(SMTPReply, limiter.check, "acme", rules)
        self.assertEqual((error.code, error.status), (451, "4.7.1"))
        self.assertIn("2 messages per minute", error.text)
        self.assertIn("try again in 51 seconds", error.text)
        limiter.check("other", rules)
        clock.now += 51
        limiter.check("acme", rules)
        limiter.record("acme")
        clock.now += 120
        error = self.assertRaises(SMTPReply, limiter.check, "acme", rules)
        self.assertIn("3 messages per day", error.text)
        clock.now += 86400
        limiter.check("acme", rules)

    def test_throttleEscalatesPerAccountAndAddress(self):
        clock = FakeTime()
        throttle = AuthThrottle(base=0.5, maximum=4, forget=900, clock=clock)
        delays = []
        for _ in range(6):
            delays.append(throttle.delay("198.51.100.7", "acme"))
            throttle.failed("198.51.100.7", "acme")
        self.assertEqual(delays, [0, 0.5, 1, 2, 4, 4])
        # The company itself, from its own address, is not slowed down.
        self.assertEqual(throttle.delay("192.0.2.10", "acme"), 0)
        clock.now += 901
        self.assertEqual(throttle.delay("198.51.100.7", "acme"), 0)

    def test_throttlePerAddressAcrossAccounts(self):
        throttle = AuthThrottle(base=0.5, clock=FakeTime())
        for i in range(8):
            throttle.failed("198.51.100.7", f"user{i}")
        self.assertEqual(throttle.delay("198.51.100.7", "user99"), 1.0)

    def test_successForgetsAccountFailures(self):
        throttle = AuthThrottle(base=0.5, clock=FakeTime())
        throttle.failed("192.0.2.10", "acme")
        throttle.failed("192.0.2.10", "acme")
        throttle.succeeded("192.0.2.10", "acme")
        self.assertEqual(throttle.delay("192.0.2.10", "acme"), 0)


def plain(user=b"alice", password=b"wonderland"):
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password)


class ProtocolTests(unittest.TestCase):
    def harness(self, extra=None, serverRules=None, **policy):
        realmArgs = {"serverRules": serverRules}
        if extra is not None:
            realmArgs["extras"] = {"alice": {"senders": list(SENDERS), **extra}}
        h = Harness(self, realmArgs=realmArgs, **policy)
        h.login()
        return h

    def test_senderNotOwned(self):
        h = self.harness()
        self.assertEqual(
            h.command(b"MAIL FROM:<ik@concurrent.example>"),
            [
                b"553 5.7.1 Sender address <ik@concurrent.example> is not owned by "
                b"the authenticated account"
            ],
        )
        self.assertEqual(h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>"), [b"250 2.1.0 Ok"])

    def test_noSendersIssued(self):
        h = Harness(self, realmArgs={"extras": {"alice": {}}})
        h.login()
        [reply] = h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>")
        self.assertTrue(reply.startswith(b"553 5.7.1 "))

    def test_nullSender(self):
        h = self.harness()
        self.assertEqual(
            h.command(b"MAIL FROM:<>"),
            [b"553 5.7.1 The null sender <> is not accepted for submissions"],
        )

    def test_serverRecipients(self):
        rules = ServerRules(recipients=AddressList.parse(["@overheid.nl"]))
        h = self.harness(serverRules=rules)
        h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>")
        self.assertEqual(h.command(b"RCPT TO:<douane@overheid.nl>"), [b"250 2.1.5 Ok"])
        self.assertEqual(
            h.command(b"RCPT TO:<vriend@gmail.example>"),
            [
                b"550 5.7.1 Recipient <vriend@gmail.example> is not served by this "
                b"gateway for this account"
            ],
        )

    def test_accountNarrowsRecipients(self):
        rules = ServerRules(recipients=AddressList.parse(["@overheid.nl"]))
        h = self.harness({"recipients": ["douane@overheid.nl"]}, serverRules=rules)
        h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>")
        self.assertEqual(h.command(b"RCPT TO:<douane@overheid.nl>"), [b"250 2.1.5 Ok"])
        [reply] = h.command(b"RCPT TO:<belasting@overheid.nl>")
        self.assertTrue(reply.startswith(b"550 5.7.1 "))

    def test_accountMessageSize(self):
        h = self.harness({"maxMessageSize": 20})
        self.assertIn(b"250-SIZE 52428800", h.command(b"EHLO c.example.nl"))
        h.login()
        self.assertEqual(
            h.command(b"MAIL FROM:<ik@mijnbedrijf.nl> SIZE=21"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(
            h.command(b"MAIL FROM:<ik@mijnbedrijf.nl> SIZE=20"), [b"250 2.1.0 Ok"]
        )
        h.command(b"RCPT TO:<b@example.nl>")
        h.command(b"DATA")
        self.assertEqual(
            h.send(b"x" * 18 + b"\r\nx\r\n.\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size (20)"],
        )
        h.transaction()
        self.assertEqual(h.send(b"x" * 18 + b"\r\n.\r\n")[0][:3], b"250")

    def test_accountRecipients(self):
        h = self.harness({"maxRecipients": 2})
        h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>")
        h.command(b"RCPT TO:<a@example.nl>")
        self.assertEqual(h.command(b"RCPT TO:<b@example.nl>"), [b"250 2.1.5 Ok"])
        self.assertEqual(
            h.command(b"RCPT TO:<c@example.nl>"),
            [b"452 4.5.3 Error: too many recipients"],
        )

    def test_rate(self):
        rules = ServerRules(rates=RateLimiter(FakeTime()))
        h = self.harness({"messagesPerMinute": 2}, serverRules=rules)
        for _ in range(2):
            h.transaction()
            self.assertEqual(h.send(b"Subject: x\r\n\r\n.\r\n")[0][:3], b"250")
        [reply] = h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>")
        self.assertTrue(
            reply.startswith(b"451 4.7.1 Rate limit of 2 messages per minute"), reply
        )

    def test_refusedMessageDoesNotCount(self):
        rules = ServerRules(rates=RateLimiter(FakeTime()))
        h = self.harness({"messagesPerMinute": 1}, serverRules=rules)
        h.transaction()
        h.send(b"bare\nLF\r\n.\r\n")
        self.assertEqual(h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>"), [b"250 2.1.0 Ok"])

    def test_maxSessions(self):
        first = self.harness({"maxSessions": 1})
        second = Harness(
            self,
            factory=first.factory,
            realmArgs={"extras": {"alice": {"senders": SENDERS, "maxSessions": 1}}},
        )
        second.spool = first.spool
        second.startTLS()
        self.assertEqual(
            second.command(plain()),
            [
                b"454 4.7.0 Too many concurrent sessions for this account (at most 1); "
                b"try again later"
            ],
        )
        first.server.connectionLost(None)
        self.assertEqual(
            second.command(plain()), [b"235 2.7.0 Authentication successful"]
        )


class ConnectionLimitTests(unittest.TestCase):
    def test_perClient(self):
        first = Harness(self, maxConnectionsPerClient=2)
        Harness(self, factory=first.factory)
        third = Harness(self, factory=first.factory)
        # RFC 5321 3.1: 421 instead of the 220 greeting.
        self.assertEqual(
            third.transport.value(),
            b"421 4.7.0 msa.example.nl Error: too many connections\r\n",
        )
        self.assertTrue(third.transport.disconnecting)
        other = Harness(self, factory=first.factory, peer="192.0.2.99")
        self.assertFalse(other.transport.disconnecting)

    def test_total(self):
        first = Harness(self, maxConnections=1)
        second = Harness(self, factory=first.factory, peer="192.0.2.50")
        self.assertTrue(second.transport.value().endswith(b"too many connections\r\n"))


class AuthThrottleProtocolTests(unittest.TestCase):
    def test_escalatingDelayAndNoLockout(self):
        """
        A guesser's failures are answered later and later; the company
        logging in from its own address meanwhile is not delayed at all.
        """
        attacker = Harness(self, maxAuthFailures=10, peer="198.51.100.7")
        attacker.startTLS()
        waited = []
        for _ in range(4):
            self.assertEqual(
                attacker.command(plain(password=b"guess")),
                [b"535 5.7.8 Authentication credentials invalid"],
            )
            waited.append(attacker.waited)
        self.assertEqual(waited, [0.0, 0.5, 1.0, 2.0])
        company = Harness(self, factory=attacker.factory, peer="192.0.2.10")
        company.startTLS()
        self.assertEqual(
            company.command(plain()), [b"235 2.7.0 Authentication successful"]
        )
        self.assertEqual(company.waited, 0.0)
        # The right password from the attacker's address still works too, after
        # the delay for that address: no lockout.
        self.assertEqual(
            attacker.command(plain()), [b"235 2.7.0 Authentication successful"]
        )


class ContentThroughProtocolTests(unittest.TestCase):
    """
    Content checks (R12) and the per-account From: rule, through the
    protocol: refused after the final dot with the policy's reply, nothing
    queued, the session goes on.
    """

    def harness(self, extra=None, policies=()):
        from msa.policy.contentpolicies import loadPolicies

        realmArgs = {"contentPolicy": loadPolicies(list(policies))}
        if extra is not None:
            realmArgs["extras"] = {"alice": {"senders": list(SENDERS), **extra}}
        h = Harness(self, realmArgs=realmArgs)
        h.login()
        return h

    def test_headerFromRequired(self):
        h = self.harness({"requireHeaderFrom": True})
        h.transaction(sender=b"ik@mijnbedrijf.nl")
        self.assertEqual(
            h.send(b"From: boss@elsewhere.example\r\nSubject: x\r\n\r\nbody\r\n.\r\n"),
            [
                b"550 5.7.1 Message refused: From: <boss@elsewhere.example> is not an "
                b"address of the authenticated account"
            ],
        )
        self.assertEqual(h.spool.committed, [])
        self.assertTrue(h.spool.writers[0].aborted)
        h.transaction(sender=b"ik@mijnbedrijf.nl")
        reply = h.send(b"From: Ik <ik@mijnbedrijf.nl>\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(reply[0][:3], b"250")

    def test_headerFromNotRequiredByDefault(self):
        h = self.harness({})
        h.transaction()
        self.assertEqual(
            h.send(b"From: boss@elsewhere.example\r\n\r\n.\r\n")[0][:3], b"250"
        )

    def test_headersPolicy(self):
        h = self.harness(policies=[{"name": "headers"}])
        h.transaction()
        [reply] = h.send(
            b"Date: Sat, 28 Nov 2026 17:00:00 +0100\r\nSubject: no from\r\n\r\n.\r\n"
        )
        self.assertTrue(reply.startswith(b"550 5.6.0 Message refused:"), reply)
        self.assertIn(b"From:", reply)
        self.assertEqual(h.spool.committed, [])
        h.transaction()
        good = (
            b"From: ik@mijnbedrijf.nl\r\nDate: Sat, 28 Nov 2026 17:00:00 +0100\r\n"
            b"Message-ID: <1@mijnbedrijf.nl>\r\n\r\nbody\r\n.\r\n"
        )
        self.assertEqual(h.send(good)[0][:3], b"250")

    def test_customPolicy(self):
        h = self.harness(
            policies=[
                {
                    "name": "tests.example_policy:RequireHeader",
                    "header": "X-Berichttype",
                }
            ]
        )
        h.transaction()
        [reply] = h.send(b"Subject: x\r\n\r\n.\r\n")
        self.assertTrue(reply.startswith(b"550 5.6.0"), reply)
        h.transaction()
        self.assertEqual(h.send(b"X-Berichttype: aangifte\r\n\r\n.\r\n")[0][:3], b"250")
