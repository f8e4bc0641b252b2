# -*- test-case-name: tests.test_limits -*-
"""
Limits under pressure (issue 10, items 2 and 5): the failed-login delay
after any number of failures, and the per-account message rates under
concurrent sessions.

The delay is capped, so that a million failures for one (account, client
address) still get their C{535 5.7.8} (it overflowed a float after about
1,025).  A rate slot is reserved at MAIL, atomically, and kept only by a
queued message: 20 concurrent sessions of an account allowed 5 messages per
minute queue exactly 5, and a slot is given back on RSET, on a refused
message and on a disconnect.
"""

import base64
import re
import smtplib
import threading

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.policy.authorization import (
    AccountRules,
    AuthThrottle,
    RateLimiter,
    ServerRules,
)
from tests.e2e import SENDERS, RunningMSA, fixtureAccount
from tests.helpers import Harness
from tests.test_authorization import FakeTime
from tests.waiting import waitUntil

SENDER = "ik@mijnbedrijf.nl"
RECIPIENT = "belastingdienst@overheid.nl"
MESSAGE = b"From: ik@mijnbedrijf.nl\r\nSubject: rate\r\n\r\nbody\r\n"
RETRY = re.compile(
    rb"4\.7\.1 Rate limit of (\d+) messages per minute reached for this account; "
    rb"try again in (\d+) seconds\Z"
)


def throttleOf(service) -> AuthThrottle:
    """
    The failed-login throttle of a running MSA, found through its listeners.
    """
    for child in service:
        factory = getattr(child, "factory", None)
        while factory is not None:
            if hasattr(factory, "authThrottle"):
                return factory.authThrottle
            factory = getattr(factory, "wrappedFactory", None)
    raise AssertionError("no listener with an authThrottle")


class AuthDelayCapTests(unittest.TestCase):
    """
    L{AuthThrottle.delay} for any number of failures.
    """

    def seeded(self, failures: int, **kwargs) -> AuthThrottle:
        clock = FakeTime()
        throttle = AuthThrottle(clock=clock, **kwargs)
        throttle.failed("198.51.100.7", "acme", failures)
        return throttle

    def test_oneFailure(self):
        throttle = AuthThrottle(base=0.5, maximum=16, clock=FakeTime())
        throttle.failed("198.51.100.7", "acme")
        self.assertEqual(throttle.delay("198.51.100.7", "acme"), 0.5)

    def test_atTheCap(self):
        """
        The exponent stops growing at L{AuthThrottle.MAX_EXPONENT}: visible
        only with a maximum beyond 2 ** 64 times the base.
        """
        cap = AuthThrottle.MAX_EXPONENT
        kwargs = {"base": 1.0, "maximum": float("inf")}
        self.assertEqual(
            self.seeded(cap, **kwargs).delay("198.51.100.7", "acme"), 2.0 ** (cap - 1)
        )
        self.assertEqual(
            self.seeded(cap + 1, **kwargs).delay("198.51.100.7", "acme"), 2.0**cap
        )
        self.assertEqual(
            self.seeded(cap + 2, **kwargs).delay("198.51.100.7", "acme"), 2.0**cap
        )

    def test_1025Failures(self):
        """
        1,025 real failures: 2 ** 1024 would overflow; the delay is the
        configured maximum.
        """
        throttle = AuthThrottle(base=0.5, maximum=16, clock=FakeTime())
        for _ in range(1025):
            throttle.failed("198.51.100.7", "acme")
        self.assertEqual(throttle.delay("198.51.100.7", "acme"), 16)
        throttle.failed("198.51.100.7", "acme")
        self.assertEqual(throttle.delay("198.51.100.7", "acme"), 16)

    def test_millionFailures(self):
        throttle = self.seeded(10**6, base=0.5, maximum=16)
        self.assertEqual(throttle.delay("198.51.100.7", "acme"), 16)
        # Per client address alone (a quarter of the count) too.
        throttle.failed("198.51.100.7", "guesses", 3 * 10**6)
        self.assertEqual(throttle.delay("198.51.100.7", "other"), 16)


class AuthDelayCapSocketTests(unittest.TestCase):
    """
    The assembled daemon, after more than 1,025 failures of alice from
    127.0.0.1, still answers a wrong password and keeps the session.
    """

    @defer.inlineCallbacks
    def test_wrongPasswordAnsweredAfterManyFailures(self):
        msa = RunningMSA(
            self, server={"auth_delay_base": 0.001, "auth_delay_max": 0.01}
        )
        throttle = throttleOf(msa.service)
        # Seeded rather than produced by 2,000 logins over the network: what
        # matters is the count the delay is computed from.
        throttle.failed("127.0.0.1", "alice", 2000)

        def session():
            client = smtplib.SMTP_SSL(
                "localhost", msa.implicitPort, context=msa.clientContext(), timeout=10
            )
            try:
                client.ehlo("mijnbedrijf.nl")
                wrong = client.docmd(
                    "AUTH", "PLAIN " + base64.b64encode(b"\0alice\0wrong").decode()
                )
                after = client.noop()
                right = client.docmd(
                    "AUTH", "PLAIN " + base64.b64encode(b"\0alice\0wonderland").decode()
                )
                return wrong, after, right
            finally:
                client.close()

        wrong, after, right = yield threads.deferToThread(session)
        self.assertEqual(wrong[0], 535)
        self.assertTrue(wrong[1].startswith(b"5.7.8 "), wrong)
        self.assertEqual(after, (250, b"2.0.0 Ok"))
        self.assertEqual(right, (235, b"2.7.0 Authentication successful"))


class RateReservationTests(unittest.TestCase):
    """
    L{RateLimiter.reserve} and its L{msa.policy.authorization.RateReservation}.
    """

    def setUp(self):
        self.clock = FakeTime()
        self.limiter = RateLimiter(self.clock)
        self.rules = AccountRules(messagesPerMinute=2, messagesPerDay=3)

    def refused(self) -> SMTPReply:
        error = self.assertRaises(SMTPReply, self.limiter.reserve, "acme", self.rules)
        self.assertEqual((error.code, error.status), (451, "4.7.1"))
        return error

    def test_reserveUpToTheLimit(self):
        """
        Held slots count as messages sent now: the third MAIL is refused
        before either message is committed, with a retry time a full window
        ahead, and nothing more is held.
        """
        self.limiter.reserve("acme", self.rules)
        self.limiter.reserve("acme", self.rules)
        self.assertEqual(self.limiter.held("acme"), 2)
        error = self.refused()
        self.assertEqual(
            error.text,
            "Rate limit of 2 messages per minute reached for this account; "
            "try again in 61 seconds",
        )
        self.assertEqual(self.limiter.held("acme"), 2)
        # Another account is not affected.
        self.limiter.reserve("other", self.rules)

    def test_releaseGivesTheSlotBack(self):
        first = self.limiter.reserve("acme", self.rules)
        self.limiter.reserve("acme", self.rules)
        first.release()
        self.assertEqual(self.limiter.held("acme"), 1)
        self.limiter.reserve("acme", self.rules)
        self.refused()

    def test_commitKeepsTheSlot(self):
        """
        A committed slot is a message sent at commit time: it counts until
        it leaves the window, like L{RateLimiter.record}.
        """
        first = self.limiter.reserve("acme", self.rules)
        self.clock.now += 5
        first.commit()
        self.assertEqual(self.limiter.held("acme"), 0)
        self.clock.now += 10
        self.limiter.reserve("acme", self.rules).commit()
        error = self.refused()
        # The first counts from its commit (5), not its reservation (0).
        self.assertIn("try again in 51 seconds", error.text)
        self.clock.now += 51
        self.limiter.reserve("acme", self.rules).commit()
        self.clock.now += 120
        error = self.refused()
        self.assertIn("3 messages per day", error.text)

    def test_settledOnce(self):
        """
        Only the first of commit and release counts; the held count never
        goes below zero.
        """
        reservation = self.limiter.reserve("acme", self.rules)
        reservation.release()
        reservation.release()
        reservation.commit()
        self.assertEqual(self.limiter.held("acme"), 0)
        self.assertEqual(self.limiter._held, {})
        reservation = self.limiter.reserve("acme", self.rules)
        reservation.commit()
        reservation.commit()
        reservation.release()
        self.assertEqual(self.limiter.held("acme"), 0)
        self.limiter.reserve("acme", self.rules)
        self.refused()

    def test_noLimits(self):
        """
        An account without rates may hold any number of slots.
        """
        for _ in range(100):
            self.limiter.reserve("acme", AccountRules())
        self.assertEqual(self.limiter.held("acme"), 100)


class RateReservationProtocolTests(unittest.TestCase):
    """
    Through the protocol (string transport): which transaction ends give the
    slot back.  Limit: one message per minute.
    """

    def setUp(self):
        self.limiter = RateLimiter(FakeTime())
        realmArgs = {
            "serverRules": ServerRules(rates=self.limiter),
            "extras": {"alice": {"senders": list(SENDERS), "messagesPerMinute": 1}},
        }
        self.h = Harness(self, realmArgs=realmArgs)
        self.h.login()

    def mail(self) -> list[bytes]:
        return self.h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>")

    def test_reservedAtMail(self):
        self.assertEqual(self.mail(), [b"250 2.1.0 Ok"])
        self.assertEqual(self.limiter.held("alice"), 1)

    def test_rset(self):
        self.mail()
        self.assertEqual(self.h.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.limiter.held("alice"), 0)
        self.assertEqual(self.mail(), [b"250 2.1.0 Ok"])

    def test_ehlo(self):
        self.mail()
        self.h.command(b"EHLO client.example.nl")
        self.assertEqual(self.limiter.held("alice"), 0)

    def test_refusedMessage(self):
        """
        A message refused after the final dot (a bare LF: 550 5.5.2) was
        never queued: its slot is free again for the next MAIL.
        """
        self.h.transaction(sender=b"ik@mijnbedrijf.nl")
        reply = self.h.send(b"bare\nLF\r\n.\r\n")[-1]
        self.assertTrue(reply.startswith(b"550 5.5.2 "), reply)
        self.assertEqual(self.limiter.held("alice"), 0)
        self.assertEqual(self.mail(), [b"250 2.1.0 Ok"])

    def test_policyRefusal(self):
        """
        A content policy refuses the message (the account requires a From:
        of its own): the slot is released.
        """
        self.h.close()
        realmArgs = {
            "serverRules": ServerRules(rates=self.limiter),
            "extras": {
                "alice": {
                    "senders": list(SENDERS),
                    "messagesPerMinute": 1,
                    "requireHeaderFrom": True,
                }
            },
        }
        self.h = Harness(self, realmArgs=realmArgs)
        self.h.login()
        self.h.transaction(sender=b"ik@mijnbedrijf.nl")
        reply = self.h.send(b"From: x@elders.example\r\n\r\nbody\r\n.\r\n")[-1]
        self.assertTrue(reply.startswith(b"550 5.7.1 Message refused: From: "), reply)
        self.assertEqual(self.limiter.held("alice"), 0)
        self.assertEqual(self.mail(), [b"250 2.1.0 Ok"])

    def test_queuedMessageKeepsTheSlot(self):
        self.h.transaction(sender=b"ik@mijnbedrijf.nl")
        reply = self.h.send(b"Subject: x\r\n\r\n.\r\n")[-1]
        self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued as "), reply)
        self.assertEqual(self.limiter.held("alice"), 0)
        [reply] = self.mail()
        self.assertTrue(reply.startswith(b"451 4.7.1 Rate limit of 1 "), reply)

    def test_disconnectInData(self):
        self.h.transaction(sender=b"ik@mijnbedrijf.nl")
        self.h.send(b"Subject: x\r\n\r\npart")
        self.h.server.connectionLost(None)
        self.assertEqual(self.limiter.held("alice"), 0)

    def test_disconnectAfterMail(self):
        self.mail()
        self.h.server.connectionLost(None)
        self.assertEqual(self.limiter.held("alice"), 0)


class RateRaceTests(unittest.TestCase):
    """
    The assembled daemon over real TLS sockets: account carol may send 5
    messages per minute.
    """

    def setUp(self):
        carol = attrs.evolve(
            fixtureAccount("carol", "carol pass"),
            extra={"senders": list(SENDERS), "messagesPerMinute": 5},
        )
        self.msa = RunningMSA(
            self,
            server={"max_connections_per_client": 50},
            extraAccounts={"carol": carol},
        )

    def connect(self) -> smtplib.SMTP_SSL:
        client = smtplib.SMTP_SSL(
            "localhost",
            self.msa.implicitPort,
            context=self.msa.clientContext(),
            timeout=30,
        )
        client.ehlo("mijnbedrijf.nl")
        client.esmtp_features["auth"] = "PLAIN"
        client.login("carol", "carol pass")
        return client

    @defer.inlineCallbacks
    def test_twentyConcurrentSessions(self):
        """
        20 sessions log in, then all send MAIL at once, then all that got a
        250 send their message: exactly 5 are queued, the other 15 get
        C{451 4.7.1} at MAIL saying when to retry.  Before the reservation,
        all 20 passed the check at MAIL and all 20 were queued.
        """
        sessions = 20
        atMail = threading.Barrier(sessions, timeout=60)
        atData = threading.Barrier(sessions, timeout=60)
        results: list = [None] * sessions

        def one(i):
            client = None
            try:
                client = self.connect()
                atMail.wait()
                mail = client.mail(SENDER)
                atData.wait()
                data = None
                if mail[0] == 250:
                    client.rcpt(RECIPIENT)
                    data = client.data(MESSAGE)
                client.quit()
                results[i] = (mail, data)
            except BaseException as e:
                atMail.abort()
                atData.abort()
                results[i] = e
            finally:
                if client is not None:
                    client.close()

        def runAll():
            workers = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        yield threads.deferToThread(runAll)
        for r in results:
            self.assertIsInstance(r, tuple, r)
        accepted = [m for m, d in results if m == (250, b"2.1.0 Ok")]
        refused = [m for m, d in results if m[0] == 451]
        self.assertEqual((len(accepted), len(refused)), (5, 15), results)
        for _, text in refused:
            match = RETRY.match(text)
            self.assertIsNotNone(match, text)
            self.assertEqual(match.group(1), b"5")
            self.assertTrue(1 <= int(match.group(2)) <= 61, text)
        queued = [d for m, d in results if d is not None]
        self.assertEqual(len(queued), 5)
        for code, text in queued:
            self.assertEqual(code, 250)
            self.assertTrue(text.startswith(b"2.0.0 Ok: queued as "), text)
        files = yield self.msa.waitForOutbox(5)
        self.assertEqual(len(files), 5)

    def fillButOne(self):
        """
        Queue 4 of carol's 5 messages.
        """
        client = self.connect()
        try:
            for _ in range(4):
                client.mail(SENDER)
                client.rcpt(RECIPIENT)
                code, text = client.data(MESSAGE)
                assert code == 250, (code, text)
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_rsetFreesTheSlot(self):
        def scenario():
            self.fillButOne()
            first, second = self.connect(), self.connect()
            try:
                replies = [first.mail(SENDER), second.mail(SENDER)]
                replies.append(first.rset())
                replies.append(second.mail(SENDER))
                second.rcpt(RECIPIENT)
                replies.append(second.data(MESSAGE))
                replies.append(first.mail(SENDER))
                return replies
            finally:
                first.close()
                second.close()

        replies = yield threads.deferToThread(scenario)
        self.assertEqual(replies[0], (250, b"2.1.0 Ok"))
        self.assertEqual(replies[1][0], 451)
        self.assertIsNotNone(RETRY.match(replies[1][1]), replies[1])
        self.assertEqual(replies[2], (250, b"2.0.0 Ok"))
        self.assertEqual(replies[3], (250, b"2.1.0 Ok"))
        self.assertEqual(replies[4][0], 250)
        # The fifth message is queued: the limit holds again.
        self.assertEqual(replies[5][0], 451)
        files = yield self.msa.waitForOutbox(5)
        self.assertEqual(len(files), 5)

    @defer.inlineCallbacks
    def test_disconnectFreesTheSlot(self):
        """
        A session that reserved the last slot and then drops its connection
        (no QUIT) frees it: a following session is accepted once the server
        has seen the disconnect.
        """

        def reserveAndDrop():
            self.fillButOne()
            first = self.connect()
            mail = first.mail(SENDER)
            refused = self.tryMail()
            first.sock.close()
            first.close()
            return mail, refused

        mail, refused = yield threads.deferToThread(reserveAndDrop)
        self.assertEqual(mail, (250, b"2.1.0 Ok"))
        self.assertEqual(refused[0], 451)
        # The server learns of the disconnect a moment later: ask again
        # until it has, and fail loudly if it never does.
        replies = []

        def freed():
            d = threads.deferToThread(self.tryMail, send=True)
            d.addCallback(lambda reply: replies.append(reply) or reply[0] == 250)
            return d

        yield waitUntil(
            freed,
            what=lambda: f"the dropped session's slot to be freed: {replies[-1:]}",
            interval=0.1,
        )
        self.assertEqual(replies[-1], (250, b"2.0.0 queued"))
        files = yield self.msa.waitForOutbox(5)
        self.assertEqual(len(files), 5)

    def tryMail(self, send=False):
        client = self.connect()
        try:
            reply = client.mail(SENDER)
            if reply[0] != 250 or not send:
                return reply
            client.rcpt(RECIPIENT)
            code, text = client.data(MESSAGE)
            if text.startswith(b"2.0.0 Ok: queued as "):
                text = b"2.0.0 queued"
            return code, text
        finally:
            client.close()
