# -*- test-case-name: tests.test_returnchannel -*-
"""
The return channel's delivery half through the daemon (R16): the service
built from a TOML file (L{tests.e2e.RunningMSA}), the core delivering over
LMTP with Python's C{smtplib.LMTP} over the unix socket, over TCP from an
allowed network and over TLS with a client certificate; what ends up in
the Maildir, the audit log, C{/metrics} and C{/health}.  Postfix's own
C{lmtp} transport is L{tests.test_postfix_lmtp}; kill -9 during DATA is
L{tests.test_lmtp_crash}.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.lmtp import LMTPFactory
from msa.mailbox import newUid
from msa.service.returnchannel import ReturnChannel
from msa.testing import MemoryMailboxStore
from tests.e2e import SENDERS, RunningMSA, fixtureAccount, freePort
from tests.test_clientcert import ClientPKI
from tests.waiting import waitUntil

CORE = "core@digipoort.example"
RETURN = (
    b"From: Digipoort <core@digipoort.example>\r\n"
    b"To: retour@acme.nl\r\n"
    b"Subject: ontvangstbevestiging\r\n"
    b"\r\n"
    b"Uw bericht is ontvangen.\r\n"
    b".begint met een punt\r\n"
    b"\xc3\xa9\xc3\xa9n 8-bit regel\r\n"
)


def mailboxAccount(name: str, mailboxes: list[str], **extra) -> dict:
    """
    An account of the daemon's accounts file with C{mailboxes}.
    """
    account = fixtureAccount(name, f"{name} password")
    return {
        name: attrs.evolve(
            account, extra={"senders": SENDERS, "mailboxes": mailboxes, **extra}
        )
    }


def shortDirectory(testCase) -> str:
    """
    A directory for a unix socket: trial's are too deep for sun_path's 107
    bytes.
    """
    directory = tempfile.mkdtemp(prefix="msa-lmtp-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return directory


def lmtpDeliver(
    client: smtplib.LMTP, recipients: list[str], data: bytes
) -> list[tuple[int, bytes]]:
    """
    One LMTP transaction with an open C{client} (after LHLO): the RCPT
    replies, then one reply per accepted recipient after the final dot
    (C{smtplib.LMTP.data} reads only the first: RFC 2033's others are read
    with C{getreply}).
    """
    assert client.mail(CORE, ["BODY=8BITMIME"])[0] == 250
    replies = [client.rcpt(r) for r in recipients]
    accepted = sum(1 for code, _ in replies if code == 250)
    if not accepted:
        client.rset()
        return replies
    client.putcmd("data")
    code, text = client.getreply()
    assert code == 354, (code, text)
    quoted = smtplib.quotedata(data.decode("latin-1")).encode("latin-1")
    client.send(quoted + (b"" if quoted.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    return replies + [client.getreply() for _ in range(accepted)]


class ReturnChannelMixin:
    """
    The daemon with the accounts acme (retour@acme.nl, @acme.example) and
    bakker (quota: one message).
    """

    def startMSA(self, lmtp: dict, mailbox: dict | None = None, **kwargs) -> RunningMSA:
        accounts = mailboxAccount("acme", ["retour@acme.nl", "@acme.example"])
        accounts |= mailboxAccount("bakker", ["retour@bakker.nl"], mailboxMaxMessages=1)
        self.msa = RunningMSA(
            self, lmtp=lmtp, mailbox=mailbox, extraAccounts=accounts, **kwargs
        )
        self.mailboxes = os.path.join(self.msa.state, "mailboxes")
        return self.msa

    def stored(self, account: str) -> dict[str, bytes]:
        new = os.path.join(self.mailboxes, account, "new")
        out = {}
        for name in sorted(os.listdir(new)) if os.path.isdir(new) else ():
            with open(os.path.join(new, name), "rb") as f:
                out[name] = f.read()
        return out

    def auditRecords(self, event: str) -> list[dict]:
        path = os.path.join(self.msa.state, "audit", "audit.jsonl")
        with open(path, "rb") as f:
            # A line still being written (no line end yet) is not a record.
            records = [json.loads(line) for line in f if line.endswith(b"\n")]
        return [r for r in records if r["event"] == event]


class UnixSocketTests(ReturnChannelMixin, unittest.TestCase):
    def setUp(self):
        self.socket = os.path.join(shortDirectory(self), "lmtp.sock")
        self.startMSA({"listeners": [f"unix:{self.socket}:mode=660"]})

    @defer.inlineCallbacks
    def test_smtplibLMTP(self):
        """
        smtplib.LMTP over the unix socket: 550 5.1.1 at RCPT for an address
        of no account, then one 250 per recipient after the final dot, in
        RCPT order, with the uid; the Maildir file holds exactly the
        message (dot-unstuffed, CRLF), its name the size and SHA-256; one
        C{mailbox-delivered} audit record per mailbox.
        """

        def session():
            client = smtplib.LMTP(self.socket, timeout=10)
            try:
                code, _ = client.ehlo_or_helo_if_needed() or (250, b"")
                self.assertIn(b"PIPELINING", client.ehlo_resp)
                self.assertIn(b"ENHANCEDSTATUSCODES", client.ehlo_resp)
                return lmtpDeliver(
                    client,
                    ["retour@acme.nl", "nobody@acme.nl", "retour@bakker.nl"],
                    RETURN,
                )
            finally:
                client.quit()

        replies = yield threads.deferToThread(session)
        self.assertEqual(replies[0], (250, b"2.1.5 Ok"))
        self.assertEqual(
            replies[1],
            (550, b"5.1.1 <nobody@acme.nl>: no mailbox here for this address"),
        )
        self.assertEqual(replies[2], (250, b"2.1.5 Ok"))
        [(acmeName, acmeData)] = self.stored("acme").items()
        [(bakkerName, bakkerData)] = self.stored("bakker").items()
        acmeUid, bakkerUid = acmeName.split(",")[0], bakkerName.split(",")[0]
        self.assertEqual(
            replies[3:],
            [
                (250, b"2.0.0 Ok: delivered as " + acmeUid.encode()),
                (250, b"2.0.0 Ok: delivered as " + bakkerUid.encode()),
            ],
        )
        digest = hashlib.sha256(RETURN).hexdigest()
        self.assertEqual(acmeData, RETURN)
        self.assertEqual(bakkerData, RETURN)
        self.assertEqual(acmeName, f"{acmeUid},S={len(RETURN)},H={digest}")
        records = self.auditRecords("mailbox-delivered")
        self.assertEqual(
            sorted(
                (
                    r["account"],
                    r["uid"],
                    r["sha256"],
                    r["sender"],
                    tuple(r["recipients"]),
                    r["client"],
                )
                for r in records
            ),
            sorted(
                [
                    ("acme", acmeUid, digest, CORE, ("retour@acme.nl",), "unix"),
                    ("bakker", bakkerUid, digest, CORE, ("retour@bakker.nl",), "unix"),
                ]
            ),
        )

    @defer.inlineCallbacks
    def test_quotaAndLimits(self):
        """
        bakker's mailbox holds one message: the second gets 452 4.2.2 for
        bakker while acme's copy is delivered; EHLO is refused; a message
        over the size limit gets 552 5.3.4 per recipient.
        """

        def session():
            client = smtplib.LMTP(self.socket, timeout=10)
            try:
                self.assertEqual(
                    client.docmd("EHLO", "core.test"),
                    (500, b"5.5.1 This is LMTP (RFC 2033): use LHLO"),
                )
                client.ehlo_or_helo_if_needed()
                first = lmtpDeliver(client, ["retour@bakker.nl"], RETURN)
                second = lmtpDeliver(
                    client, ["retour@bakker.nl", "x@acme.example"], RETURN
                )
                return first, second
            finally:
                client.quit()

        first, second = yield threads.deferToThread(session)
        self.assertEqual(first[-1][0], 250)
        self.assertEqual(second[-2], (452, b"4.2.2 Mailbox full: too many messages"))
        self.assertEqual(second[-1][0], 250)
        self.assertEqual(len(self.stored("bakker")), 1)
        self.assertEqual(list(self.stored("acme").values()), [RETURN])


class TCPTests(ReturnChannelMixin, unittest.TestCase):
    def lhlo(self, port: int, context: ssl.SSLContext | None = None) -> bytes:
        """
        Connect (with TLS if C{context}), LHLO: what the server said, or
        C{b""} when it closed (or reset) the connection without a word.
        """
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            s = context.wrap_socket(raw) if context else raw
            data = b""
            try:
                s.sendall(b"LHLO core.test\r\n")
                while not data.endswith(b"SIZE 52428800\r\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
            return data

    @defer.inlineCallbacks
    def test_allowlist(self):
        """
        A TCP listener answers only the networks of allow_from: from
        127.0.0.1 it greets when 127.0.0.0/8 is allowed, and closes at
        once when only 192.0.2.0/24 is.
        """
        allowed, refused = freePort(), freePort()
        self.startMSA(
            {
                "listeners": [f"tcp:{allowed}:interface=127.0.0.1"],
                "allow_from": ["127.0.0.0/8"],
            }
        )
        greeting = yield threads.deferToThread(self.lhlo, allowed)
        self.assertTrue(greeting.startswith(b"220 localhost LMTP ready\r\n250-"))
        msa = RunningMSA(
            self,
            lmtp={
                "listeners": [f"tcp:{refused}:interface=127.0.0.1"],
                "allow_from": ["192.0.2.0/24"],
            },
        )
        self.assertTrue(msa.service.running)
        self.assertEqual((yield threads.deferToThread(self.lhlo, refused)), b"")

    @defer.inlineCallbacks
    def test_tlsClientCertificate(self):
        """
        A TLS listener delivers for a client with a certificate from
        client_ca; without one the handshake fails.
        """
        port = freePort()
        pki = ClientPKI(os.path.abspath(self.mktemp()))
        _, certFile, keyFile = pki.issue("core", "CORE-1")
        self.startMSA(
            {
                "tls_listeners": [f"tcp:{port}:interface=127.0.0.1"],
                "client_ca": pki.caFile,
            }
        )
        context = ssl.create_default_context(cafile=self.msa.certFile)
        context.check_hostname = False
        withCert = ssl.create_default_context(cafile=self.msa.certFile)
        withCert.check_hostname = False
        withCert.load_cert_chain(certFile, keyFile)

        def deliver():
            # TLS from the first byte: smtplib.LMTP would read the greeting
            # in plaintext, so the socket is made here.
            client = smtplib.LMTP(timeout=10)
            client.sock = withCert.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=10)
            )
            self.assertEqual(client.getreply()[0], 220)
            client.ehlo_or_helo_if_needed()
            try:
                return lmtpDeliver(client, ["retour@acme.nl"], RETURN)
            finally:
                client.quit()

        def refused():
            try:
                return self.lhlo(port, context)
            except (ssl.SSLError, ConnectionError) as e:
                return e

        self.assertIsInstance(
            (yield threads.deferToThread(refused)), ssl.SSLError | ConnectionError
        )
        replies = yield threads.deferToThread(deliver)
        self.assertEqual(replies[-1][0], 250)
        self.assertEqual(list(self.stored("acme").values()), [RETURN])


class OperationsTests(ReturnChannelMixin, unittest.TestCase):
    def get(self, port: int, path: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    @defer.inlineCallbacks
    def test_metricsAndHealth(self):
        """
        /metrics counts the deliveries and shows each mailbox's messages
        and oldest age; /health turns 503 when the store fails a delivery
        (its 451 4.3.0 to the core: kept by the core and retried) and ok
        again once one succeeds.
        """
        metricsPort = freePort()
        sock = os.path.join(shortDirectory(self), "lmtp.sock")
        self.startMSA(
            {"listeners": [f"unix:{sock}"]},
            metrics={"listen": f"tcp:{metricsPort}:interface=127.0.0.1"},
        )

        def deliver(recipient):
            client = smtplib.LMTP(sock, timeout=10)
            client.ehlo_or_helo_if_needed()
            try:
                return lmtpDeliver(client, [recipient], RETURN)[-1]
            finally:
                client.quit()

        self.assertEqual(
            (yield threads.deferToThread(deliver, "retour@acme.nl"))[0], 250
        )
        status, text = yield threads.deferToThread(self.get, metricsPort, "/metrics")
        self.assertIn('msa_mailbox_messages{account="acme"} 1.0', text)
        self.assertIn('msa_mailbox_oldest_seconds{account="acme"}', text)
        self.assertRegex(text, r'msa_mailbox_deliveries_total\{code="250"\} [1-9]')
        # bakker's mailbox cannot be made: a file stands where it would be.
        with open(os.path.join(self.mailboxes, "bakker"), "w") as f:
            f.write("in the way")
        reply = yield threads.deferToThread(deliver, "retour@bakker.nl")
        self.assertEqual(
            reply, (451, b"4.3.0 Cannot store the message, try again later")
        )
        status, text = yield threads.deferToThread(self.get, metricsPort, "/health")
        self.assertEqual(status, 503)
        component = json.loads(text)["components"]["returnchannel"]
        self.assertEqual(component["status"], "failing")
        self.assertIn("mailbox store failing: 451 4.3.0", component["detail"])
        self.assertEqual(
            (yield threads.deferToThread(deliver, "retour@acme.nl"))[0], 250
        )
        status, text = yield threads.deferToThread(self.get, metricsPort, "/health")
        self.assertEqual(status, 200, text)
        component = json.loads(text)["components"]["returnchannel"]
        self.assertEqual(component["status"], "ok")

    @defer.inlineCallbacks
    def test_expiryAtStart(self):
        """
        With expire_after, a message older than that is removed by the sweep
        the daemon runs at start, with a C{mailbox-expired} audit record; a
        younger one stays.
        """
        base = os.path.abspath(self.mktemp())
        new = os.path.join(base, "state", "mailboxes", "acme", "new")
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(os.path.dirname(new), sub))
        # As the store names them (msa.mailbox.names.newUid): two hours ago
        # and now.
        old = f"{int(time.time()) - 7200}.M000000P1Q1R{'0' * 16}"
        young = newUid()
        for uid in (old, young):
            with open(os.path.join(new, f"{uid},S=4,H={'0' * 64}"), "wb") as f:
                f.write(b"x\r\n\r")
        self.startMSA(
            {"listeners": []},
            mailbox={
                "directory": os.path.dirname(os.path.dirname(new)),
                "expire_after": 3600,
            },
        )
        # The record is written after the removal: the sweep is over then.
        yield waitUntil(
            lambda: self.auditRecords("mailbox-expired"), 10, "the expiry sweep"
        )
        self.assertEqual([n.split(",")[0] for n in os.listdir(new)], [young])
        [record] = self.auditRecords("mailbox-expired")
        self.assertEqual((record["account"], record["uid"]), ("acme", old))


class DatabaseDriverTests(unittest.TestCase):
    """
    psycopg (about 10 MB of memory) is loaded only by a daemon whose
    accounts or mailboxes are in PostgreSQL: the daemon's modules do not
    import it (issue 20: 1000 idle sessions and a 50 MB message within
    their memory bounds).
    """

    def test_notImportedByTheDaemon(self):
        code = (
            "import sys, msa.service.tap; "
            "print(sorted(m for m in sys.modules if m.startswith('psycopg')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(out.strip(), "[]")


class ClosingStore(MemoryMailboxStore):
    """
    A store whose close the test finishes by hand.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closing: defer.Deferred[None] | None = None

    def close(self) -> defer.Deferred[None]:
        self.closing = defer.Deferred()
        return self.closing


class StopTests(unittest.TestCase):
    """
    The return channel closes its store when the daemon stops (a database
    store's threads and connections: L{msa.interfaces.IMailboxStore.close}),
    whatever the store, and its stop waits for the close.
    """

    def test_stopClosesTheStore(self):
        store = ClosingStore()
        channel = ReturnChannel(store, LMTPFactory(store, lambda address: None))
        channel.startService()
        stopped = channel.stopService()
        self.assertIsNotNone(store.closing)
        self.assertNoResult(stopped)
        assert store.closing is not None
        store.closing.callback(None)
        self.successResultOf(stopped)
