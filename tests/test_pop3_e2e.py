# -*- test-case-name: tests.test_pop3_e2e -*-
"""
The POP3 server of the assembled daemon (R16), built from a TOML file
(L{tests.e2e.RunningMSA}) and reached over real sockets with real TLS: the
messages are delivered over the daemon's LMTP listener
(L{LMTPThenPOP3Tests}) or straight into the real Maildir store
(L{msa.mailbox.MaildirStore}, as LMTP does), fetched with real clients,
deleted at QUIT, and the daemon restarted to see what is on disk.
"""

import hashlib
import io
import json
import os
import poplib
import smtplib
import socket

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.mailbox import MaildirStore
from tests.e2e import USERS, RunningMSA, requireProgram, runProgram
from tests.test_returnchannel import (
    RETURN,
    lmtpDeliver,
    mailboxAccount,
    shortDirectory,
)

MESSAGE = (
    b"From: douane@overheid.nl\r\n"
    b"To: ik@mijnbedrijf.nl\r\n"
    b"Subject: ontvangstbevestiging\r\n"
    b"\r\n"
    b"Uw aangifte is ontvangen.\r\n"
    b".regel met punt\r\n"
    b"..twee punten\r\n"
    b".\r\n"
    b"\xc3\xa9\xc3\xa9n 8-bit regel\r\n"
)


def deliver(msa: RunningMSA, account: str, data: bytes) -> defer.Deferred:
    """
    Deliver C{data} to C{account}'s mailbox through the real store, as
    the LMTP server does.
    """
    store = MaildirStore(msa.mailboxes)
    return store.deliver(
        account, io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest()
    )


def messageFiles(msa: RunningMSA) -> list[str]:
    """
    The message files under the mailboxes, each as account/sub/name.
    """
    found = []
    for top, _, files in os.walk(msa.mailboxes):
        for name in files:
            if not name.startswith(".") and os.path.basename(top) in ("new", "cur"):
                found.append(os.path.join(top, name))
    return sorted(found)


def poplibSession(msa: RunningMSA, implicit: bool, user: str = "alice"):
    """
    A logged-in C{poplib} client, over STLS or port 995-style TLS; blocking.
    """
    context = msa.clientContext()
    if implicit:
        client = poplib.POP3_SSL(
            "localhost", msa.pop3sPort, context=context, timeout=10
        )
    else:
        client = poplib.POP3("localhost", msa.pop3Port, timeout=10)
        client.stls(context)
    client.user(user)
    client.pass_(USERS[user])
    return client


def fetchAll(msa: RunningMSA, implicit: bool, delete: bool, quit: bool = True):
    """
    Blocking: log in with poplib, RETR every message, DELE each if asked,
    then QUIT (or drop the connection).

    @return: (uidl lines, the messages' bytes, the QUIT reply or None).
    """
    client = poplibSession(msa, implicit)
    uids = client.uidl()[1]
    messages = []
    for number in range(1, len(uids) + 1):
        _, lines, _ = client.retr(number)
        messages.append(b"".join(line + b"\r\n" for line in lines))
        if delete:
            client.dele(number)
    if not quit:
        client.sock.close()
        return uids, messages, None
    return uids, messages, client.quit()


def auditEvents(msa: RunningMSA, event: str) -> list[dict]:
    path = os.path.join(msa.state, "audit", "audit.jsonl")
    with open(path, "rb") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("event") == event]


class FetchTests(unittest.TestCase):
    """
    Fetch, DELE and QUIT, then a restart: the message is gone; the same
    with the connection dropped instead of QUIT: it is still there.
    """

    def setUp(self):
        self.msa = RunningMSA(self, pop3={})

    @defer.inlineCallbacks
    def _fetchDeleteRestart(self, implicit: bool):
        uid = yield deliver(self.msa, "alice", MESSAGE)
        yield deliver(self.msa, "bob", b"Subject: bob\r\n\r\nnot alice's\r\n")
        uids, messages, bye = yield threads.deferToThread(
            fetchAll, self.msa, implicit, True
        )
        self.assertEqual(uids, [b"1 " + uid.encode()])
        self.assertEqual(messages, [MESSAGE])
        self.assertEqual(bye, b"+OK Bye, 1 message(s) deleted")
        self.assertEqual(len(messageFiles(self.msa)), 1)  # bob's
        yield self.msa.restart()
        uids, messages, _ = yield threads.deferToThread(
            fetchAll, self.msa, implicit, False
        )
        self.assertEqual((uids, messages), ([], []))
        [retrieved] = auditEvents(self.msa, "mailbox-retrieved")
        self.assertEqual(
            (retrieved["account"], retrieved["uid"], retrieved["size"]),
            ("alice", uid, len(MESSAGE)),
        )
        [deleted] = auditEvents(self.msa, "mailbox-deleted")
        self.assertEqual((deleted["account"], deleted["uid"]), ("alice", uid))

    def test_stls(self):
        return self._fetchDeleteRestart(implicit=False)

    def test_implicitTLS(self):
        return self._fetchDeleteRestart(implicit=True)

    @defer.inlineCallbacks
    def test_droppedConnectionKeepsMessages(self):
        uid = yield deliver(self.msa, "alice", MESSAGE)
        before = messageFiles(self.msa)
        _, messages, _ = yield threads.deferToThread(
            fetchAll, self.msa, False, True, False
        )
        self.assertEqual(messages, [MESSAGE])
        yield self.msa.restart()
        self.assertEqual(messageFiles(self.msa), before)
        uids, messages, _ = yield threads.deferToThread(fetchAll, self.msa, True, False)
        self.assertEqual((uids, messages), ([b"1 " + uid.encode()], [MESSAGE]))
        self.assertEqual(auditEvents(self.msa, "mailbox-deleted"), [])

    @defer.inlineCallbacks
    def test_secondSessionInUse(self):
        yield deliver(self.msa, "alice", MESSAGE)
        first = yield threads.deferToThread(poplibSession, self.msa, False)
        try:
            failure = yield threads.deferToThread(self._secondLogin)
        finally:
            yield threads.deferToThread(first.quit)
        self.assertEqual(failure, b"-ERR [IN-USE] Mailbox in use by another session")
        # The lock went with the first session.
        _, messages, _ = yield threads.deferToThread(fetchAll, self.msa, True, False)
        self.assertEqual(messages, [MESSAGE])

    def _secondLogin(self) -> bytes:
        try:
            poplibSession(self.msa, True)
        except poplib.error_proto as e:
            return e.args[0]
        raise AssertionError("the second session logged in")

    @defer.inlineCallbacks
    def test_gateBeforeTLS(self):
        """
        Over a real socket, before STLS: USER gets C{-ERR} that says
        nothing, CAPA offers STLS and no login.
        """
        lines = yield threads.deferToThread(
            rawExchange, self.msa.pop3Port, [b"CAPA", b"USER alice", b"PASS x", b"QUIT"]
        )
        self.assertEqual(
            lines,
            b"+OK localhost POP3 ready\r\n"
            b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
            b"AUTH-RESP-CODE\r\nPIPELINING\r\nEXPIRE NEVER\r\nSTLS\r\n.\r\n"
            b"-ERR Must issue STLS first\r\n-ERR Must issue STLS first\r\n"
            b"+OK Bye\r\n",
        )


def rawExchange(port: int, commands: list[bytes]) -> bytes:
    """
    Blocking: send the commands pipelined, read until the server closes.
    """
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(b"".join(c + b"\r\n" for c in commands))
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return received
            received += chunk


class CurlTests(unittest.TestCase):
    """
    curl (C{pop3://} with C{--ssl-reqd}, and C{pop3s://}) fetches the
    message, byte for byte.
    """

    @defer.inlineCallbacks
    def _fetch(self, url: str, extra: list[str]):
        curl = requireProgram(self, "curl")
        msa = RunningMSA(self, pop3={})
        yield deliver(msa, "alice", MESSAGE)
        out, err, code = yield runProgram(
            curl,
            [
                "--silent",
                "--show-error",
                "--verbose",
                "--max-time",
                "20",
                "--cacert",
                msa.certFile,
                "--user",
                f"alice:{USERS['alice']}",
                *extra,
                url.format(port=msa.pop3Port, sport=msa.pop3sPort),
            ],
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, MESSAGE)
        return err

    def test_stls(self):
        return self._fetch("pop3://localhost:{port}/1", ["--ssl-reqd"])

    def test_implicit(self):
        return self._fetch("pop3s://localhost:{sport}/1", [])

    @defer.inlineCallbacks
    def _sasl(self, mechanism: str, url: str, extra: list[str]):
        transcript = yield self._fetch(
            url, [*extra, "--login-options", f"AUTH={mechanism}"]
        )
        self.assertIn(f"> AUTH {mechanism}".encode(), transcript)
        self.assertIn(b"< +OK Logged in, mailbox locked", transcript)

    def test_saslPlain(self):
        return self._sasl("PLAIN", "pop3s://localhost:{sport}/1", [])

    def test_saslDigestMD5(self):
        return self._sasl("DIGEST-MD5", "pop3://localhost:{port}/1", ["--ssl-reqd"])

    def test_saslLogin(self):
        return self._sasl("LOGIN", "pop3s://localhost:{sport}/1", [])


class LMTPThenPOP3Tests(unittest.TestCase):
    """
    The whole return channel in one daemon: the core delivers over LMTP
    (a unix socket), the company fetches over POP3 and deletes; after a
    restart the message is gone.
    """

    @defer.inlineCallbacks
    def test_deliverFetchDelete(self):
        lmtpSocket = os.path.join(shortDirectory(self), "lmtp.sock")
        msa = RunningMSA(
            self,
            lmtp={"listeners": [f"unix:{lmtpSocket}:mode=660"]},
            extraAccounts=mailboxAccount("acme", ["retour@acme.nl"]),
            pop3={},
        )

        def lmtp():
            client = smtplib.LMTP(lmtpSocket, timeout=10)
            try:
                client.ehlo_or_helo_if_needed()
                return lmtpDeliver(client, ["retour@acme.nl"], RETURN)
            finally:
                client.quit()

        def pop3(delete: bool):
            client = poplib.POP3_SSL(
                "localhost", msa.pop3sPort, context=msa.clientContext(), timeout=10
            )
            client.user("acme")
            client.pass_("acme password")
            uids = client.uidl()[1]
            got = [
                b"".join(line + b"\r\n" for line in client.retr(n)[1])
                for n in range(1, len(uids) + 1)
            ]
            if delete:
                for n in range(1, len(uids) + 1):
                    client.dele(n)
            client.quit()
            return uids, got

        replies = yield threads.deferToThread(lmtp)
        self.assertEqual(replies[-1][0], 250)
        uid = replies[-1][1].decode().rsplit(" ", 1)[1]
        uids, got = yield threads.deferToThread(pop3, True)
        self.assertEqual((uids, got), ([b"1 " + uid.encode()], [RETURN]))
        yield msa.restart()
        self.assertEqual((yield threads.deferToThread(pop3, False)), ([], []))
