# -*- test-case-name: tests.test_multiinstance -*-
"""
Shared limits through the assembled daemon (issue 13, item 1): MSA
instances started from TOML files with C{[limits] backend = "redis"} on a
throwaway Redis, behind a real HAProxy (L{tests.multiinstance}), over
STARTTLS and AUTH like any client:

  - 20 concurrent sessions of one account allowed 5 messages a day queue
    exactly 5, with the memory backend (one instance), with Redis (one
    instance) and with Redis across two instances;
  - the day limit holds across both instances: message limit+1 gets 451
    4.7.1 whichever instance takes it;
  - the failed-login delay grows across both (the counters in Redis, and
    the delay each instance logged);
  - C{maxSessions} holds across both;
  - Redis killed: MAIL 451 4.3.0, AUTH 454 4.7.0 (right or wrong
    password), /health 503, one critical log line per instance, and every
    message accepted before is delivered; Redis back: service resumes.
    With C{fallback = "local"} messages are accepted meanwhile, counted per
    instance.
"""

import base64
import http.client
import json
import smtplib
import threading

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import SENDERS, RunningMSA, fixtureAccount
from tests.multiinstance import CLIENT_ADDRESS, Instances
from tests.redisserver import RedisServer
from tests.waiting import waitUntil

SENDER = "ik@mijnbedrijf.nl"
RECIPIENT = "belastingdienst@overheid.nl"
MESSAGE = b"From: ik@mijnbedrijf.nl\r\nSubject: gedeeld\r\n\r\nbody\r\n"
CAROL = ("carol", "carol pass")


def carol(**limits) -> dict:
    """
    The accounts argument for carol, with C{limits} among her fields.
    """
    account = fixtureAccount(*CAROL)
    return {CAROL[0]: attrs.evolve(account, extra={"senders": SENDERS, **limits})}


def auth(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """
    One AUTH PLAIN (smtplib's login() would try another mechanism after a
    failure).
    """
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + token)


def send(client: smtplib.SMTP) -> tuple[int, bytes]:
    """
    One message; the MAIL reply when it is refused, else the reply to the
    final dot.
    """
    reply = client.mail(SENDER)
    if reply[0] != 250:
        return reply
    assert client.rcpt(RECIPIENT)[0] == 250
    return client.data(MESSAGE)


def submit(connect, user=CAROL[0], password=CAROL[1]) -> tuple[int, bytes]:
    """
    Connect, log in and send one message, blocking.
    """
    client = connect()
    try:
        assert auth(client, user, password) == (
            235,
            b"2.7.0 Authentication successful",
        )
        return send(client)
    finally:
        client.close()


def race(connect, sessions: int = 20) -> list:
    """
    C{sessions} clients log in, then all send MAIL at once; those that got
    250 send their message.  Blocking.

    @return: per session, (MAIL reply, reply to the final dot or L{None}),
        or the exception it met.
    """
    atMail = threading.Barrier(sessions, timeout=60)
    results: list = [None] * sessions

    def one(i):
        client = None
        try:
            client = connect()
            code, text = auth(client, *CAROL)
            assert code == 235, (code, text)
            atMail.wait()
            mail = client.mail(SENDER)
            data = None
            if mail[0] == 250:
                client.rcpt(RECIPIENT)
                data = client.data(MESSAGE)
            client.quit()
            results[i] = (mail, data)
        except BaseException as e:
            atMail.abort()
            results[i] = e
        finally:
            if client is not None:
                client.close()

    workers = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def failureCounts(redis: RedisServer, user: str) -> tuple[int, int]:
    """
    The failed logins Redis counts for (C{user}, L{CLIENT_ADDRESS}) and for
    L{CLIENT_ADDRESS}.
    """
    return (
        redis.integer("GET", f"digipoort-msa:authfail:account:{user}:{CLIENT_ADDRESS}"),
        redis.integer("GET", f"digipoort-msa:authfail:address:{CLIENT_ADDRESS}"),
    )


@defer.inlineCallbacks
def dayLimitHolds(testCase, instances: Instances, redis: RedisServer, connectors):
    """
    carol, allowed 4 messages a day, sends 4 through HAProxy (2 on each
    instance); then a fifth through each of C{connectors} gets 451 4.7.1,
    and Redis counts 4.
    """
    for _ in range(4):
        reply = yield threads.deferToThread(submit, instances.client)
        testCase.assertEqual(reply[0], 250, reply)
    yield waitUntil(
        lambda: sum(len(o) for o in instances.outboxes()) == 4,
        what="4 messages in the outboxes",
    )
    testCase.assertEqual([len(o) for o in instances.outboxes()], [2, 2])
    limit = b"4.7.1 Rate limit of 4 messages per day reached for this account"
    for connect in connectors:
        code, text = yield threads.deferToThread(submit, connect)
        testCase.assertEqual(code, 451)
        testCase.assertTrue(text.startswith(limit), text)
    testCase.assertEqual(redis.integer("ZCARD", "digipoort-msa:rate:sent:carol"), 4)
    testCase.assertEqual([len(o) for o in instances.outboxes()], [2, 2])


DAY_LIMIT = (
    b"4.7.1 Rate limit of 5 messages per day reached for this account; try again in "
)


class RaceTests(unittest.TestCase):
    """
    20 concurrent sessions of carol, 5 messages a day: exactly 5 queued.
    """

    def check(self, results: list) -> None:
        for r in results:
            self.assertIsInstance(r, tuple, r)
        accepted = [d for m, d in results if m == (250, b"2.1.0 Ok")]
        refused = [m for m, d in results if m[0] != 250]
        self.assertEqual((len(accepted), len(refused)), (5, 15), results)
        for code, text in refused:
            self.assertEqual(code, 451)
            self.assertTrue(text.startswith(DAY_LIMIT), text)
        for code, text in accepted:
            self.assertEqual(code, 250)
            self.assertTrue(text.startswith(b"2.0.0 Ok: queued as "), text)

    def single(self, limits: dict | None) -> RunningMSA:
        msa = RunningMSA(
            self,
            server={"max_connections_per_client": 50},
            extraAccounts=carol(messagesPerDay=5),
            limits=limits,
        )
        return msa

    def starttls(self, msa: RunningMSA):
        def connect():
            client = smtplib.SMTP("localhost", msa.starttlsPort, timeout=30)
            client.ehlo("mijnbedrijf.nl")
            client.starttls(context=msa.clientContext())
            client.ehlo("mijnbedrijf.nl")
            return client

        return connect

    @defer.inlineCallbacks
    def test_memory(self):
        msa = self.single(None)
        results = yield threads.deferToThread(race, self.starttls(msa))
        self.check(results)
        files = yield msa.waitForOutbox(5)
        self.assertEqual(len(files), 5)

    @defer.inlineCallbacks
    def test_redis(self):
        redis = RedisServer(self)
        msa = self.single({"backend": "redis", "url": redis.url})
        results = yield threads.deferToThread(race, self.starttls(msa))
        self.check(results)
        files = yield msa.waitForOutbox(5)
        self.assertEqual(len(files), 5)
        self.assertEqual(redis.integer("ZCARD", "digipoort-msa:rate:sent:carol"), 5)
        self.assertEqual(redis.integer("ZCARD", "digipoort-msa:rate:held:carol"), 0)

    @defer.inlineCallbacks
    def test_redisTwoInstances(self):
        redis = RedisServer(self)
        instances = Instances(
            self,
            extraAccounts=carol(messagesPerDay=5),
            server={"max_connections_per_client": 50},
            limits={"backend": "redis", "url": redis.url},
        )
        results = yield threads.deferToThread(race, instances.client)
        self.check(results)
        yield waitUntil(
            lambda: sum(len(o) for o in instances.outboxes()) == 5,
            what="5 messages in the outboxes",
        )
        self.assertEqual(sum(len(o) for o in instances.outboxes()), 5)


class TwoInstancesTests(unittest.TestCase):
    """
    Two instances behind HAProxy sharing one Redis.
    """

    def start(self, limits: dict | None = None, **kwargs) -> Instances:
        self.redis = RedisServer(self)
        self.instances = Instances(
            self,
            limits={"backend": "redis", "url": self.redis.url, **(limits or {})},
            **kwargs,
        )
        return self.instances

    @defer.inlineCallbacks
    def test_dayLimitAcrossInstances(self):
        """
        4 messages a day: 4 accepted through HAProxy, spread over both
        instances; the fifth is refused through HAProxy, and by each
        instance directly.
        """
        instances = self.start(extraAccounts=carol(messagesPerDay=4))
        yield dayLimitHolds(
            self,
            instances,
            self.redis,
            [
                instances.client,
                lambda: instances.direct(0),
                lambda: instances.direct(1),
            ],
        )

    @defer.inlineCallbacks
    def test_failedLoginDelayAcrossInstances(self):
        """
        Four wrong passwords for alice, one per connection, to instance 0,
        1, 0, 1: Redis counts all four for (alice, client address), and the
        delays logged double from one failure to the next whichever
        instance took it.
        """
        instances = self.start(server={"auth_delay_base": 0.01, "auth_delay_max": 1})

        def failOnce(index):
            client = instances.direct(index)
            try:
                return auth(client, "alice", "not the password")
            finally:
                client.close()

        for index in (0, 1, 0, 1):
            reply = yield threads.deferToThread(failOnce, index)
            self.assertEqual(reply, (535, b"5.7.8 Authentication credentials invalid"))
        self.assertEqual(failureCounts(self.redis, "alice"), (4, 4))
        delays = yield waitUntil(
            lambda: len(instances.loggedDelays()) == 4 and instances.loggedDelays(),
            what="4 failed logins in the JSON log",
        )
        self.assertEqual(delays, [0, 0.01, 0.02, 0.04])

    @defer.inlineCallbacks
    def test_sessionsAcrossInstances(self):
        """
        One session at a time for carol: a second on the other instance is
        refused until the first has ended.
        """
        instances = self.start(extraAccounts=carol(maxSessions=1))
        first = yield threads.deferToThread(instances.direct, 0)
        reply = yield threads.deferToThread(auth, first, *CAROL)
        self.assertEqual(reply[0], 235)
        second = yield threads.deferToThread(instances.direct, 1)
        reply = yield threads.deferToThread(auth, second, *CAROL)
        self.assertEqual(
            reply,
            (
                454,
                b"4.7.0 Too many concurrent sessions for this account (at most 1); "
                b"try again later",
            ),
        )
        yield threads.deferToThread(first.quit)
        yield waitUntil(
            lambda: self.redis.integer("ZCARD", "digipoort-msa:sessions:carol") == 0,
            what="the first session to be released",
        )
        reply = yield threads.deferToThread(auth, second, *CAROL)
        self.assertEqual(reply, (235, b"2.7.0 Authentication successful"))
        yield threads.deferToThread(second.quit)

    def health(self, index: int) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.instances.metricsPorts[index], timeout=10
        )
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    @defer.inlineCallbacks
    def test_redisKilled(self):
        """
        Two messages accepted, a session logged in on each instance; Redis
        is killed.  MAIL gets 451 4.3.0 on both, AUTH 454 4.7.0 for the
        right and the wrong password alike, /health 503 on both, one
        critical line each.  The two messages are delivered.  Redis comes
        back (empty): both instances serve again.
        """
        instances = self.start(extraAccounts=carol(messagesPerDay=100), metrics=True)
        for _ in range(2):
            reply = yield threads.deferToThread(submit, instances.client)
            self.assertEqual(reply[0], 250, reply)
        sessions = []
        for index in (0, 1):
            client = yield threads.deferToThread(instances.direct, index)
            reply = yield threads.deferToThread(auth, client, *CAROL)
            self.assertEqual(reply[0], 235)
            sessions.append(client)
        self.redis.stop()
        for client in sessions:
            reply = yield threads.deferToThread(client.mail, SENDER)
            self.assertEqual(
                reply,
                (451, b"4.3.0 Rate limits cannot be checked now; try again later"),
            )
            yield threads.deferToThread(client.close)
        for index in (0, 1):
            for password in (CAROL[1], "wrong"):
                client = yield threads.deferToThread(instances.direct, index)
                reply = yield threads.deferToThread(auth, client, CAROL[0], password)
                yield threads.deferToThread(client.close)
                self.assertEqual(
                    reply, (454, b"4.7.0 Temporary authentication failure")
                )
            status, body = yield threads.deferToThread(self.health, index)
            self.assertEqual(status, 503)
            limits = json.loads(body)["components"]["limits"]
            self.assertEqual(limits["status"], "failing", body)
            self.assertTrue(
                limits["detail"].startswith(
                    f"limits store (Redis at 127.0.0.1:{self.redis.port} db 0) "
                    "unreachable for "
                ),
                body,
            )
        # Both instances run in this process, so each JSON log has the
        # events of both: one critical line per instance.
        critical = [line for line in instances.events(0) if line["level"] == "critical"]
        self.assertEqual(
            [line["event"] for line in critical], ["limits-unavailable"] * 2, critical
        )
        yield waitUntil(
            lambda: sum(len(o) for o in instances.outboxes()) == 2,
            what="the 2 accepted messages in the outboxes",
        )
        self.redis.start()

        def served(index):
            def attempt():
                try:
                    return submit(lambda: instances.direct(index))[0] == 250
                except AssertionError:
                    return False

            return threads.deferToThread(attempt)

        for index in (0, 1):
            yield waitUntil(
                lambda index=index: served(index), what=f"instance {index} to serve"
            )
            status, _ = yield threads.deferToThread(self.health, index)
            self.assertEqual(status, 200)
        # The relay writes each accepted message to its outbox after the
        # 250: wait for the last one to land.
        yield waitUntil(
            lambda: sum(len(o) for o in instances.outboxes()) == 4,
            what="the 4 accepted messages in the outboxes",
        )

    @defer.inlineCallbacks
    def test_redisKilledLocalFallback(self):
        """
        With C{fallback = "local"}: while Redis is down each instance counts
        on its own; 2 messages a day means 2 accepted on instance 0, the
        third refused there.
        """
        instances = self.start(
            limits={"fallback": "local"}, extraAccounts=carol(messagesPerDay=2)
        )
        self.redis.stop()
        replies = []
        for _ in range(3):
            reply = yield threads.deferToThread(submit, lambda: instances.direct(0))
            replies.append(reply[0])
        self.assertEqual(replies, [250, 250, 451])
        yield waitUntil(
            lambda: len(instances.outboxes()[0]) == 2, what="2 messages accepted"
        )
