# -*- test-case-name: tests.test_mailbox_pg_daemon -*-
"""
The PostgreSQL mailbox store through the daemon (issue 19).

L{TwoInstancesTests} is the issue's proof: two daemons built from TOML
files (L{tests.e2e.RunningMSA}), their accounts and mailboxes in one
PostgreSQL database (C{[accounts] store} and C{[mailbox] store}), their
POP3 listeners behind a real HAProxy (L{tests.haproxyfront.HAProxy}, round
robin, PROXY protocol v2).  The core delivers over LMTP into instance A;
the company fetches and deletes over POP3 with STLS through the front,
where it reaches instance B; a second session meanwhile, which the front
sends to A, gets C{-ERR [IN-USE]}.  Which instance a connection reached is
read from its greeting (each instance has its own C{[server] hostname}).

L{OneInstanceTests}: the quota and a database outage as the core and the
company see them over LMTP and POP3, the gauges of C{/metrics}, and
C{digipoort-msa-admin mailbox} on the database.
"""

from __future__ import annotations

import hashlib
import io
import os
import poplib
import smtplib
import ssl

import psycopg
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa import metrics
from msa.accounts.pgstore import AccountTable, describe
from msa.admin import command as admin
from msa.mailbox.pgstore import MailboxDatabaseError
from msa.tls import ensureSelfSignedCertificate
from tests.e2e import RunningMSA, freePort, requireProgram
from tests.haproxyfront import HAProxy
from tests.pgserver import PostgreSQLServer
from tests.test_pop3_e2e import MESSAGE, auditEvents
from tests.test_returnchannel import lmtpDeliver, mailboxAccount
from tests.waiting import waitUntil

PASSWORD = "acme password"

#: A return message of about 2.5 MB: three chunks of the database store,
#: lines that start with a dot (dot-stuffed on both protocols), 8-bit.
LARGE = b"Subject: beoordeling\r\n\r\n" + b"".join(
    (b"." if n % 7 == 0 else b"") + b"regel %06d \xc3\xa9 " % n + b"x" * 60 + b"\r\n"
    for n in range(32000)
)


class TwoInstancesTests(unittest.TestCase):
    def setUp(self):
        requireProgram(self, "haproxy")
        self.pg = PostgreSQLServer(self)
        table = AccountTable(self.pg.url)
        table.save(mailboxAccount("acme", ["retour@acme.nl"]))
        table.close()
        certFile, keyFile = ensureSelfSignedCertificate(
            os.path.abspath(self.mktemp()), "localhost"
        )
        self.lmtpPort = freePort()
        self.pop3Ports = [freePort(), freePort()]
        self.a, self.b = (
            RunningMSA(
                self,
                server={"hostname": hostname},
                tls={"certificate": certFile, "key": keyFile},
                accounts={"store": self.pg.url},
                mailbox={"store": self.pg.url},
                lmtp=lmtp,
                pop3={
                    "starttls_listeners": [f"haproxy:tcp:{port}:interface=127.0.0.1"],
                    "implicit_tls_listeners": [],
                },
            )
            for hostname, port, lmtp in zip(
                ("a.msa.test", "b.msa.test"),
                self.pop3Ports,
                [
                    {
                        "listeners": [f"tcp:{self.lmtpPort}:interface=127.0.0.1"],
                        "allow_from": ["127.0.0.1"],
                    },
                    None,
                ],
                strict=True,
            )
        )
        self.certFile = certFile
        self.front = HAProxy(self, self.a.directory, self.pop3Ports).port

    def deliverToA(self) -> list[tuple[int, bytes]]:
        client = smtplib.LMTP("127.0.0.1", self.lmtpPort, timeout=30)
        try:
            client.ehlo("core.digipoort.example")
            return [
                lmtpDeliver(client, ["retour@acme.nl"], data)[-1]
                for data in (MESSAGE, LARGE)
            ]
        finally:
            client.quit()

    def twoSessions(self) -> dict[bytes, poplib.POP3]:
        """
        Two connections through the front, after STLS, by the hostname of
        the instance each reached (round robin: one each); blocking.
        """
        sessions = {}
        for _ in range(2):
            client = poplib.POP3("127.0.0.1", self.front, timeout=30)
            sessions[client.getwelcome().split()[1]] = client
            client.stls(ssl.create_default_context(cafile=self.certFile))
        self.assertEqual(sorted(sessions), [b"a.msa.test", b"b.msa.test"])
        return sessions

    def fetchOnBWhileAIsRefused(self):
        """
        The session on B logs in, lists and reads both messages; the one on
        A is meanwhile refused at login; then B deletes both and quits.
        Blocking.
        """
        sessions = self.twoSessions()
        first, second = sessions[b"b.msa.test"], sessions[b"a.msa.test"]
        first.user("acme")
        first.pass_(PASSWORD)
        uids = [line.split()[1].decode() for line in first.uidl()[1]]
        fetched = []
        for number in range(1, len(uids) + 1):
            _, lines, _ = first.retr(number)
            fetched.append(b"".join(line + b"\r\n" for line in lines))
        second.user("acme")
        try:
            second.pass_(PASSWORD)
        except poplib.error_proto as e:
            refusal = e.args[0]
        else:
            refusal = b"(logged in)"
        second.close()
        for number in range(1, len(uids) + 1):
            first.dele(number)
        bye = first.quit()
        return uids, fetched, refusal, bye

    def stored(self) -> list[tuple]:
        with psycopg.connect(self.pg.url) as connection:
            return connection.execute(
                "SELECT account, uid FROM msa_mailbox_messages ORDER BY id"
            ).fetchall()

    @defer.inlineCallbacks
    def test_deliverOnAFetchAndDeleteOnB(self):
        replies = yield threads.deferToThread(self.deliverToA)
        delivered = [text.split()[-1].decode() for _, text in replies]
        self.assertEqual([code for code, _ in replies], [250, 250])
        self.assertEqual(self.stored(), [("acme", uid) for uid in delivered])

        uids, fetched, refusal, bye = yield threads.deferToThread(
            self.fetchOnBWhileAIsRefused
        )
        self.assertEqual(uids, delivered)
        self.assertEqual(fetched, [MESSAGE, LARGE])
        self.assertTrue(refusal.startswith(b"-ERR [IN-USE]"), refusal)
        self.assertTrue(bye.startswith(b"+OK"), bye)
        self.assertEqual(self.stored(), [])

        # Each instance recorded what it did: A the deliveries, B the
        # retrievals and deletions.
        digests = [hashlib.sha256(m).hexdigest() for m in (MESSAGE, LARGE)]
        self.assertEqual(
            [(r["uid"], r["sha256"]) for r in auditEvents(self.a, "mailbox-delivered")],
            list(zip(delivered, digests, strict=True)),
        )
        self.assertEqual(
            [r["uid"] for r in auditEvents(self.b, "mailbox-retrieved")], delivered
        )
        self.assertEqual(
            sorted(r["uid"] for r in auditEvents(self.b, "mailbox-deleted")),
            sorted(delivered),
        )
        self.assertEqual(auditEvents(self.a, "mailbox-retrieved"), [])
        self.assertEqual(auditEvents(self.b, "mailbox-delivered"), [])


class OneInstanceTests(unittest.TestCase):
    """
    One daemon on the shared store, with acme and bakker (whose mailbox
    holds one message).
    """

    def setUp(self):
        self.pg = PostgreSQLServer(self)
        table = AccountTable(self.pg.url)
        table.save(
            mailboxAccount("acme", ["retour@acme.nl"])
            | mailboxAccount("bakker", ["retour@bakker.nl"], mailboxMaxMessages=1)
        )
        table.close()
        self.lmtpPort = freePort()
        self.msa = RunningMSA(
            self,
            accounts={"store": self.pg.url},
            mailbox={"store": self.pg.url},
            lmtp={
                "listeners": [f"tcp:{self.lmtpPort}:interface=127.0.0.1"],
                "allow_from": ["127.0.0.1"],
            },
            pop3={},
        )

    def deliver(self, recipients: list[str]) -> list[tuple[int, bytes]]:
        """
        One LMTP transaction of L{MESSAGE}: the replies after the dot.
        """
        client = smtplib.LMTP("127.0.0.1", self.lmtpPort, timeout=30)
        try:
            client.ehlo("core.digipoort.example")
            return lmtpDeliver(client, recipients, MESSAGE)[len(recipients) :]
        finally:
            client.quit()

    def runAdmin(self, *argv: str) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = admin.main(["--config", self.msa.configFile, *argv], stdout, stderr)
        return code, stdout.getvalue(), stderr.getvalue()

    def waiting(self) -> dict[str, float]:
        """
        The C{msa_mailbox_messages} gauges, as C{/metrics} would show them.
        """
        [gauge, _] = metrics.MAILBOXES.collect()
        return {s.labels["account"]: s.value for s in gauge.samples}

    def stored(self) -> list[str]:
        with psycopg.connect(self.pg.url) as connection:
            return [
                uid
                for (uid,) in connection.execute(
                    "SELECT uid FROM msa_mailbox_messages ORDER BY id"
                )
            ]

    def fetch(self, user: str) -> list[bytes]:
        """
        Log in over STLS and read every message (or the login's -ERR).
        """
        client = poplib.POP3("127.0.0.1", self.msa.pop3Port, timeout=30)
        try:
            client.stls(self.msa.clientContext())
            client.user(user)
            try:
                client.pass_(PASSWORD if user == "acme" else "bakker password")
            except poplib.error_proto as e:
                return [e.args[0]]
            count = len(client.list()[1])
            return [
                b"".join(line + b"\r\n" for line in client.retr(n)[1])
                for n in range(1, count + 1)
            ]
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_quotaPerRecipient(self):
        """
        bakker's mailbox is full after one message: the next gets
        452 4.2.2 for bakker only, and acme's copy of it is delivered.
        """
        [first] = yield threads.deferToThread(self.deliver, ["retour@bakker.nl"])
        self.assertEqual(first[0], 250)
        replies = yield threads.deferToThread(
            self.deliver, ["retour@bakker.nl", "retour@acme.nl"]
        )
        self.assertEqual(replies[0], (452, b"4.2.2 Mailbox full: too many messages"))
        self.assertEqual(replies[1][0], 250)
        self.assertEqual((yield threads.deferToThread(self.fetch, "bakker")), [MESSAGE])

    @defer.inlineCallbacks
    def test_databaseOutage(self):
        """
        While the database is down, the core's delivery gets 451 4.3.0 (it
        keeps the message and tries again) and the company's login
        -ERR [SYS/TEMP]; once it is back, both work, on new connections.
        """
        self.pg.stop()
        # /metrics still answers, without the mailbox gauges.
        self.assertEqual(self.waiting(), {})
        code, _, err = self.runAdmin("mailbox", "list")
        self.assertEqual(code, 1)
        self.assertIn(f"{describe(self.pg.url)}: cannot connect", err)
        replies = yield threads.deferToThread(self.deliver, ["retour@acme.nl"])
        self.assertEqual(
            replies, [(451, b"4.3.0 Cannot store the message, try again later")]
        )
        [refusal] = yield threads.deferToThread(self.fetch, "acme")
        self.assertTrue(refusal.startswith(b"-ERR [SYS/TEMP]"), refusal)
        # The POP3 server logs why the login failed, with the database named.
        [logged] = self.flushLoggedErrors(MailboxDatabaseError)
        self.assertIn(describe(self.pg.url), str(logged.value))
        self.pg.start()
        [reply] = yield threads.deferToThread(self.deliver, ["retour@acme.nl"])
        self.assertEqual(reply[0], 250)
        self.assertEqual((yield threads.deferToThread(self.fetch, "acme")), [MESSAGE])

    @defer.inlineCallbacks
    def test_adminAndMetrics(self):
        """
        The admin tool lists, shows and removes the database's messages
        (one audit record each, naming the operator), and refuses to
        remove while a POP3 session holds the mailbox; the gauges count
        what waits.
        """
        for _ in range(3):
            yield threads.deferToThread(self.deliver, ["retour@acme.nl"])
        uids = self.stored()
        self.assertEqual(self.waiting(), {"acme": 3.0})
        code, out, err = self.runAdmin("mailbox", "list")
        self.assertEqual(code, 0, err)
        self.assertEqual(
            out.splitlines()[1].split()[:3], ["acme", "3", str(3 * len(MESSAGE))]
        )
        code, out, err = self.runAdmin("mailbox", "show", "acme")
        digest = hashlib.sha256(MESSAGE).hexdigest()
        self.assertEqual(
            [(line.split()[0], line.split()[3]) for line in out.splitlines()],
            [(uid, digest) for uid in uids],
        )

        def logIn():
            client = poplib.POP3("127.0.0.1", self.msa.pop3Port, timeout=30)
            client.stls(self.msa.clientContext())
            client.user("acme")
            client.pass_(PASSWORD)
            return client

        client = yield threads.deferToThread(logIn)
        code, out, err = self.runAdmin("mailbox", "delete", "acme", uids[0])
        self.assertEqual(code, 1)
        self.assertIn("in use by a POP3 session; nothing removed", err)
        self.assertEqual(self.stored(), uids)
        yield threads.deferToThread(client.quit)

        deleted = yield waitUntil(
            lambda: self.runAdmin("mailbox", "delete", "acme", uids[0])[0] == 0,
            what="the delete once the POP3 session is over",
        )
        self.assertTrue(deleted)
        self.assertEqual(self.stored(), uids[1:])
        code, out, err = self.runAdmin("mailbox", "purge", "acme")
        self.assertEqual((code, out.splitlines()[-1]), (0, "2 message(s) removed"))
        self.assertEqual(self.stored(), [])
        records = auditEvents(self.msa, "mailbox-deleted")
        self.assertEqual(sorted(r["uid"] for r in records), sorted(uids))
        self.assertEqual({r["reason"] for r in records}, {"admin"})
        self.assertTrue(all(r["by"] for r in records), records)
        self.assertEqual(self.waiting(), {})
