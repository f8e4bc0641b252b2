# -*- test-case-name: tests.test_sharedengines -*-
"""
Both shared engines at once (issue 13, item 3): two MSA instances, each
started from its own TOML file with its own state directory and spool,
behind a real HAProxy (L{tests.multiinstance.Instances}), sharing ONE
throwaway Redis (C{[limits] backend = "redis"}, L{tests.redisserver}) and
ONE throwaway PostgreSQL (C{[accounts] store = "postgresql://..."},
L{tests.pgserver}).  Every client is smtplib over STARTTLS with AUTH:

  - one account's day limit holds across both: message limit+1 gets 451
    4.7.1 whichever instance takes it;
  - the failed-login delay grows across both;
  - C{digipoort-msa-admin accounts disable} (the real program, on one
    instance's configuration) is refused on both within 5 seconds, and
    C{enable} brings the account back;
  - Redis killed: MAIL 451 4.3.0, AUTH 454 4.7.0, and every message that
    got 250 reaches the core (a real aiosmtpd) once Redis is back;
  - PostgreSQL stopped: logins keep working on both from the last good
    copy.
"""

import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.model import Account
from msa.accounts.pgstore import AccountTable
from tests.e2e import SENDERS, AiosmtpdCore
from tests.multiinstance import Instances
from tests.pgserver import PostgreSQLServer
from tests.redisserver import RedisServer
from tests.test_accounts_pg import PROPAGATION, LogLines, adminProcess, usersAccounts
from tests.test_multiinstance import (
    CAROL,
    RECIPIENT,
    SENDER,
    auth,
    carol,
    dayLimitHolds,
    failureCounts,
    submit,
)
from tests.waiting import waitUntil

ACCEPTED = (235, b"2.7.0 Authentication successful")
REFUSED = (535, b"5.7.8 Authentication credentials invalid")
TEMPORARY = (454, b"4.7.0 Temporary authentication failure")
ALICE = ("alice", "wonderland")
UNCHECKED = (451, b"4.3.0 Rate limits cannot be checked now; try again later")


def message(subject: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\n\r\n"
        "body\r\n".encode()
    )


def subjects(messages: list) -> list[str]:
    """
    The Subject of each message an L{AiosmtpdCore} received, sorted.
    """
    found = []
    for _, _, content, _ in messages:
        for line in content.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found.append(line[len(b"Subject: ") :].decode())
    return sorted(found)


class SharedEnginesTests(unittest.TestCase):
    """
    Two instances behind HAProxy, one Redis and one PostgreSQL for both.
    """

    def start(
        self,
        accounts: dict[str, Account] | None = None,
        limits: dict | None = None,
        **kwargs,
    ) -> Instances:
        """
        Start Redis, PostgreSQL (with alice, bob and C{accounts} in it) and
        two instances on them behind HAProxy.

        @param limits: more C{[limits]} keys.
        @param kwargs: more L{Instances} arguments.
        """
        self.redis = RedisServer(self)
        self.pg = PostgreSQLServer(self)
        table = AccountTable(self.pg.url)
        table.save(usersAccounts() | (accounts or {}))
        table.close()
        self.log = LogLines(self)
        self.instances = Instances(
            self,
            accounts={"store": self.pg.url},
            limits={"backend": "redis", "url": self.redis.url, **(limits or {})},
            **kwargs,
        )
        return self.instances

    def admin(self, *args: str, stdin: str = ""):
        """
        The real C{digipoort-msa-admin} on the first instance's
        configuration.
        """
        return adminProcess(self.instances.msas[0].configFile, *args, stdin=stdin)

    def connectors(self) -> list:
        """
        Ways to reach an instance: through HAProxy twice (round robin: one
        connection to each), and each instance directly.
        """
        instances = self.instances
        return [
            instances.client,
            instances.client,
            lambda: instances.direct(0),
            lambda: instances.direct(1),
        ]

    def logins(self, user: str, password: str, connectors: list | None = None):
        """
        One AUTH PLAIN per connector, in a thread.

        @return: a L{Deferred} of the list of (code, text) replies.
        """

        def run():
            replies = []
            for connect in connectors or self.connectors():
                client = connect()
                try:
                    replies.append(auth(client, user, password))
                finally:
                    client.close()
            return replies

        return threads.deferToThread(run)

    def waitForLogins(self, user: str, password: str, reply: tuple, what: str):
        """
        Within L{PROPAGATION} seconds, AUTH gets C{reply} through HAProxy on
        both instances and from each instance directly.
        """
        return waitUntil(
            lambda: self.logins(user, password).addCallback(
                lambda replies: replies == [reply] * 4
            ),
            timeout=PROPAGATION,
            what=what,
            interval=0.2,
        )

    @defer.inlineCallbacks
    def test_dayLimitAcrossInstances(self):
        """
        carol, added with the real admin program with 4 messages a day,
        sends 4 through HAProxy (2 on each instance); the fifth is refused
        with 451 4.7.1 through HAProxy on both instances and by each
        instance directly, and Redis counts 4.
        """
        instances = self.start(server={"auth_delay_base": 0})
        code, out, err = yield self.admin(
            "--realm",
            "localhost",
            "accounts",
            "add",
            CAROL[0],
            "--sender",
            SENDERS[0],
            "--messages-per-day",
            "4",
            stdin=CAROL[1] + "\n",
        )
        self.assertEqual((code, out), (0, "added account carol\n"), err)
        yield self.waitForLogins(*CAROL, ACCEPTED, "carol to log in on both instances")
        yield dayLimitHolds(self, instances, self.redis, self.connectors())

    @defer.inlineCallbacks
    def test_failedLoginDelayAcrossInstances(self):
        """
        Six wrong passwords for alice, one per connection: through HAProxy
        (instance 0, 1, 0, 1), then to each instance directly.  Redis counts
        all six for (alice, client address) and for the address, and the
        delays logged double from one failure to the next whichever
        instance took it.
        """
        instances = self.start(server={"auth_delay_base": 0.01, "auth_delay_max": 1})
        connectors = self.connectors() + self.connectors()[:2]
        replies = yield self.logins("alice", "not the password", connectors)
        self.assertEqual(replies, [REFUSED] * 6)
        self.assertEqual(failureCounts(self.redis, "alice"), (6, 6))
        logged = yield waitUntil(
            lambda: len(instances.loggedDelays()) == 6 and instances.loggedDelays(),
            what="6 failed logins in the JSON log",
        )
        self.assertEqual(logged, [0, 0.01, 0.02, 0.04, 0.08, 0.16])

    @defer.inlineCallbacks
    def test_disableReachesBoth(self):
        """
        C{digipoort-msa-admin accounts disable alice} on the first
        instance's configuration: within 5 seconds AUTH for alice is
        refused on both instances (through HAProxy and directly), bob
        still logs in; C{enable} brings her back on both within 5 seconds.
        """
        self.start(server={"auth_delay_base": 0})
        self.assertEqual((yield self.logins("alice", "wonderland")), [ACCEPTED] * 4)
        code, out, err = yield self.admin("accounts", "disable", "alice")
        self.assertEqual((code, out), (0, "disabled account alice\n"), err)
        yield self.waitForLogins(*ALICE, REFUSED, "alice refused on both instances")
        self.assertEqual((yield self.logins("bob", "builder pass")), [ACCEPTED] * 4)
        code, out, err = yield self.admin("accounts", "enable", "alice")
        self.assertEqual((code, out), (0, "enabled account alice\n"), err)
        yield self.waitForLogins(*ALICE, ACCEPTED, "alice back on both instances")

    @defer.inlineCallbacks
    def test_redisKilledLosesNoAcceptedMessage(self):
        """
        Four messages accepted through HAProxy, and one more under way on
        each instance (MAIL and RCPT accepted) when Redis is killed.  Then
        MAIL gets 451 4.3.0 and AUTH 454 4.7.0 on both instances; the
        messages under way are finished.  Once Redis is back, both
        instances serve again, and the core has received exactly the
        messages that got 250: none lost, none twice.
        """
        core = AiosmtpdCore(self)
        instances = self.start(
            accounts=carol(messagesPerDay=100),
            relay=core.relayConfig(),
            # Updates Redis missed are retried every lease / 3 seconds.
            limits={"lease": 3, "timeout": 1},
        )
        accepted = []

        def submitOne(connect, subject: str) -> tuple[int, bytes]:
            client = connect()
            try:
                self.assertEqual(auth(client, *CAROL), ACCEPTED)
                self.assertEqual(client.mail(SENDER)[0], 250)
                self.assertEqual(client.rcpt(RECIPIENT)[0], 250)
                return client.data(message(subject))
            finally:
                client.close()

        for i in range(4):
            reply = yield threads.deferToThread(
                submitOne, instances.client, f"before {i}"
            )
            self.assertEqual(reply[0], 250, reply)
            accepted.append(f"before {i}")
        underway: list[smtplib.SMTP] = []
        for index in (0, 1):
            client = yield threads.deferToThread(instances.direct, index)
            self.assertEqual(
                (yield threads.deferToThread(auth, client, *CAROL)), ACCEPTED
            )
            reply = yield threads.deferToThread(client.mail, SENDER)
            self.assertEqual(reply[0], 250, reply)
            reply = yield threads.deferToThread(client.rcpt, RECIPIENT)
            self.assertEqual(reply[0], 250, reply)
            underway.append(client)
        loggedIn = []
        for index in (0, 1):
            client = yield threads.deferToThread(instances.direct, index)
            self.assertEqual(
                (yield threads.deferToThread(auth, client, *CAROL)), ACCEPTED
            )
            loggedIn.append(client)

        self.redis.stop()
        for index, client in enumerate(underway):
            subject = f"under way on {index}"
            reply = yield threads.deferToThread(client.data, message(subject))
            yield threads.deferToThread(client.close)
            # The message was queued: it counts, and Redis gets the commit
            # once it is back.
            self.assertEqual(reply[0], 250, reply)
            accepted.append(subject)
        for client in loggedIn:
            reply = yield threads.deferToThread(client.mail, SENDER)
            yield threads.deferToThread(client.close)
            self.assertEqual(reply, UNCHECKED)
        for password in (CAROL[1], "wrong"):
            replies = yield self.logins(CAROL[0], password)
            self.assertEqual(replies, [TEMPORARY] * 4)

        self.redis.start()

        def served(connect, subject):
            def attempt():
                try:
                    return submitOne(connect, subject)[0] == 250
                except (AssertionError, smtplib.SMTPException):
                    return False

            return threads.deferToThread(attempt)

        for index in (0, 1):
            subject = f"after on {index}"
            yield waitUntil(
                lambda index=index, subject=subject: served(
                    lambda: instances.direct(index), subject
                ),
                what=f"instance {index} to serve again",
            )
            accepted.append(subject)
        received = yield core.waitForMessages(len(accepted))
        self.assertEqual(subjects(core.messages), sorted(accepted))
        self.assertEqual(subjects(received), sorted(accepted))
        # Redis came back empty: it holds the two messages committed while
        # it was down (retried until it took them) and the two since.
        yield waitUntil(
            lambda: self.redis.integer("ZCARD", "digipoort-msa:rate:sent:carol") == 4,
            what="Redis to count the 4 messages since the kill",
        )

    @defer.inlineCallbacks
    def test_postgresqlStopped(self):
        """
        PostgreSQL stopped: both instances say so in the log, and logins
        keep working on both (through HAProxy and directly) from the last
        good copy, wrong passwords still refused; messages are still
        accepted on both.
        """
        instances = self.start(server={"auth_delay_base": 0})
        self.assertEqual((yield self.logins("alice", "wonderland")), [ACCEPTED] * 4)
        yield threads.deferToThread(self.pg.stop)
        yield self.log.outage(self, 2)
        self.assertEqual((yield self.logins("alice", "wonderland")), [ACCEPTED] * 4)
        self.assertEqual((yield self.logins("bob", "builder pass")), [ACCEPTED] * 4)
        self.assertEqual((yield self.logins("bob", "wonderland")), [REFUSED] * 4)
        for index in (0, 1):
            reply = yield threads.deferToThread(
                submit, lambda index=index: instances.direct(index), *ALICE
            )
            self.assertEqual(reply[0], 250, reply)
        yield waitUntil(
            lambda: [len(o) for o in instances.outboxes()] == [1, 1],
            what="one message in each outbox",
        )
