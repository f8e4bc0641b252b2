"""
kill -9 of the real server process (C{twistd -n digipoort-msa}) while the
core delivers a return message over LMTP (R16), and what is on disk
afterwards, as L{tests.test_crash} does for submissions:

    a. mid-DATA, part of the message written to the server's temporary
       file: the core never gets a 250, and after the restart no part of
       it is in the mailbox (new/, cur/ and tmp/ are empty);
    b. right after the 250: the message is in new/ after the restart,
       whole, its name carrying the size and SHA-256 the bytes have, with
       its audit record.
"""

import hashlib
import json
import os
import shutil
import smtplib
import tempfile

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.model import writeAccounts
from msa.tls import ensureSelfSignedCertificate
from tests.e2e import fixtureAccount, freePort, rewriteConfig
from tests.test_crash import PASSWORD, USER, MSAProcess, endAfterKill, waitFor

#: More than the server's write buffer (64 KiB): part of it is on disk when
#: the process dies.
LONG_BODY = b"".join(b"regel %06d " % i + b"x" * 60 + b"\r\n" for i in range(2000))
RETURN = b"From: core@digipoort.example\r\nSubject: retour\r\n\r\n"
RECIPIENT = "retour@crash.example"


class LMTPCrashTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # Nothing is submitted, so the relay never connects to this core.
        coreCA, _ = ensureSelfSignedCertificate(os.path.join(directory, "core"), "core")
        self.msa = MSAProcess(self, directory, freePort(), coreCA)
        socketDirectory = tempfile.mkdtemp(prefix="msa-lmtp-crash-")
        self.addCleanup(shutil.rmtree, socketDirectory, True)
        self.socket = os.path.join(socketDirectory, "lmtp.sock")
        with open(self.msa.configFile, encoding="utf-8") as f:
            text = f.read()
        with open(self.msa.configFile, "w", encoding="utf-8") as f:
            f.write(
                rewriteConfig(text, {"lmtp": {"listeners": [f"unix:{self.socket}"]}})
            )
        account = fixtureAccount(USER, PASSWORD)
        account = attrs.evolve(
            account, extra={"senders": ["@mijnbedrijf.nl"], "mailboxes": [RECIPIENT]}
        )
        writeAccounts(os.path.join(directory, "accounts.json"), {USER: account})
        self.mailbox = os.path.join(self.msa.state, "mailboxes", USER)

    def files(self, sub: str) -> list[str]:
        path = os.path.join(self.mailbox, sub)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def openData(self) -> smtplib.LMTP:
        """
        Blocking: an LMTP session after DATA's 354.
        """
        client = smtplib.LMTP(self.socket, timeout=10)
        client.ehlo("core.test")
        assert client.mail("core@digipoort.example")[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text = client.docmd("DATA")
        assert code == 354, (code, text)
        return client

    def partialOnDisk(self) -> int:
        """
        The size of the server's temporary file of the message (an
        anonymous file in the mailboxes directory), or 0.
        """
        mailboxes = os.path.join(self.msa.state, "mailboxes")
        fds = f"/proc/{self.msa.process.pid}/fd"
        for fd in os.listdir(fds):
            try:
                target = os.readlink(os.path.join(fds, fd))
                if (
                    target.startswith(mailboxes + "/")
                    and "/" not in target[len(mailboxes) + 1 :]
                ):
                    return os.stat(os.path.join(fds, fd)).st_size
            except OSError:
                continue
        return 0

    @defer.inlineCallbacks
    def test_a_midData(self):
        yield defer.ensureDeferred(self.msa.start())
        client = yield threads.deferToThread(self.openData)
        yield threads.deferToThread(client.send, RETURN + LONG_BODY)
        yield defer.ensureDeferred(
            waitFor(lambda: self.partialOnDisk() >= 64 * 1024, "a partial message")
        )
        self.msa.kill()

        reply = yield threads.deferToThread(endAfterKill, client, b".\r\n")
        self.assertIsInstance(reply, smtplib.SMTPServerDisconnected | OSError)
        self.assertEqual(self.files("new") + self.files("cur") + self.files("tmp"), [])
        yield defer.ensureDeferred(self.msa.start())
        self.assertEqual(self.files("new") + self.files("cur") + self.files("tmp"), [])
        # Nor anywhere else among the mailboxes: the temporary file had no name.
        mailboxes = os.path.dirname(self.mailbox)
        self.assertEqual([n for n in os.listdir(mailboxes) if n != USER], [])

    @defer.inlineCallbacks
    def test_b_afterTheReply(self):
        yield defer.ensureDeferred(self.msa.start())

        def deliver():
            client = self.openData()
            try:
                client.send(RETURN + LONG_BODY + b".\r\n")
                return client.getreply()
            finally:
                client.close()

        code, text = yield threads.deferToThread(deliver)
        self.msa.kill()
        self.assertEqual(code, 250, text)
        uid = text.split()[-1].decode()
        yield defer.ensureDeferred(self.msa.start())
        data = RETURN + LONG_BODY
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.files("new"), [f"{uid},S={len(data)},H={digest}"])
        with open(os.path.join(self.mailbox, "new", self.files("new")[0]), "rb") as f:
            self.assertEqual(f.read(), data)
        with open(os.path.join(self.msa.state, "audit", "audit.jsonl"), "rb") as f:
            records = [json.loads(line) for line in f]
        [record] = [r for r in records if r["event"] == "mailbox-delivered"]
        self.assertEqual((record["uid"], record["sha256"]), (uid, digest))
