"""
The real core side of the return channel (R16): Postfix delivers through
its C{lmtp} transport to the daemon's LMTP listener (TCP from an allowed
address), built from TOML (L{tests.e2e.RunningMSA}).  A throwaway Postfix
(L{tests.postfixserver}) takes the message over SMTP and delivers it; what
Postfix logs for each recipient is what the MSA answered, and the Maildir
file holds exactly the bytes Postfix sent.
"""

import hashlib
import os
import re
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.tls import ensureSelfSignedCertificate
from tests.e2e import RunningMSA, freePort
from tests.postfixserver import ThrowawayPostfix, postfixDirectory
from tests.test_returnchannel import RETURN, lmtpDeliver, mailboxAccount, shortDirectory
from tests.waiting import waitUntil

CORE_SENDER = "core@digipoort.example"


class PostfixLMTPTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        directory = postfixDirectory(self)
        self.lmtpPort, self.smtpPort = freePort(), freePort()
        self.socket = os.path.join(shortDirectory(self), "lmtp.sock")
        accounts = mailboxAccount("acme", ["retour@acme.nl"])
        accounts |= mailboxAccount("bakker", ["retour@bakker.nl"], mailboxMaxMessages=1)
        self.msa = RunningMSA(
            self,
            lmtp={
                "listeners": [
                    f"tcp:{self.lmtpPort}:interface=127.0.0.1",
                    f"unix:{self.socket}",
                ],
                "allow_from": ["127.0.0.1"],
            },
            extraAccounts=accounts,
        )
        self.mailboxes = os.path.join(self.msa.state, "mailboxes")
        certFile, keyFile = ensureSelfSignedCertificate(
            os.path.join(directory, "cert"), "localhost"
        )
        transport = f"lmtp:inet:127.0.0.1:{self.lmtpPort}"
        self.postfix = ThrowawayPostfix(
            directory,
            self.smtpPort,
            certFile,
            keyFile,
            settings={
                "smtpd_tls_security_level": "may",
                "smtpd_tls_auth_only": "no",
                "smtpd_sasl_auth_enable": "no",
                "mynetworks": "127.0.0.0/8",
                "smtpd_relay_restrictions": "permit_mynetworks, reject",
                "smtpd_recipient_restrictions": "permit_mynetworks, reject",
                "default_transport": transport,
                "relay_transport": transport,
                "lmtp_host_lookup": "native",
            },
        )
        with open(os.path.join(self.postfix.etc, "master.cf"), "a") as f:
            f.write("lmtp      unix  -       -       n       -       -       lmtp\n")
        self.addCleanup(self.postfix.stop)

    def maillog(self) -> str:
        try:
            with open(self.postfix.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def statusOf(self, recipient: str) -> str | None:
        """
        The last delivery status Postfix logged for C{recipient}: its
        C{status=...} with the reply, or L{None}.
        """
        found = re.findall(
            rf"to=<{re.escape(recipient)}>.*?(status=\w+ \(.*\))", self.maillog()
        )
        return found[-1] if found else None

    @defer.inlineCallbacks
    def test_postfixDelivers(self):
        """
        Postfix's lmtp client gets one answer per recipient: 250 for acme
        (sent; the file in acme's new/ holds exactly what Postfix sent, its
        name the SHA-256 of those bytes), 452 4.2.2 for bakker's full
        mailbox (deferred: Postfix keeps it and retries), 550 5.1.1 for an
        address of no account (bounced).
        """

        def fillBakker():
            client = smtplib.LMTP(self.socket, timeout=10)
            client.ehlo("core.test")
            try:
                return lmtpDeliver(client, ["retour@bakker.nl"], RETURN)[-1][0]
            finally:
                client.quit()

        self.assertEqual((yield threads.deferToThread(fillBakker)), 250)
        yield threads.deferToThread(self.postfix.start)

        def submit():
            with smtplib.SMTP("127.0.0.1", self.smtpPort, timeout=30) as client:
                client.ehlo("core.test")
                return client.sendmail(
                    CORE_SENDER,
                    ["retour@acme.nl", "retour@bakker.nl", "nobody@acme.nl"],
                    RETURN,
                )

        self.assertEqual((yield threads.deferToThread(submit)), {})
        recipients = ("retour@acme.nl", "retour@bakker.nl", "nobody@acme.nl")
        yield waitUntil(
            lambda: all(self.statusOf(r) for r in recipients),
            60,
            lambda: f"Postfix's delivery of each recipient:\n{self.maillog()[-3000:]}",
        )
        new = os.path.join(self.mailboxes, "acme", "new")
        [name] = os.listdir(new)
        uid, size, digest = re.fullmatch(
            r"(.+),S=(\d+),H=([0-9a-f]{64})", name
        ).groups()
        self.assertEqual(
            self.statusOf("retour@acme.nl"),
            f"status=sent (250 2.0.0 Ok: delivered as {uid})",
        )
        self.assertRegex(
            self.statusOf("retour@bakker.nl"),
            r"^status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 452 4\.2\.2 "
            r"Mailbox full: too many messages",
        )
        self.assertRegex(
            self.statusOf("nobody@acme.nl"),
            r"^status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 550 5\.1\.1 "
            r"<nobody@acme\.nl>: no mailbox here for this address",
        )
        with open(os.path.join(new, name), "rb") as f:
            stored = f.read()
        # Postfix's trace header, then exactly the message as submitted.
        self.assertTrue(stored.startswith(b"Received: from "), stored[:200])
        self.assertTrue(stored.endswith(b"\r\n\r\n" + RETURN.split(b"\r\n\r\n", 1)[1]))
        for header in RETURN.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            self.assertIn(header + b"\r\n", stored)
        self.assertEqual(
            (int(size), digest), (len(stored), hashlib.sha256(stored).hexdigest())
        )
        self.assertEqual(
            len(os.listdir(os.path.join(self.mailboxes, "bakker", "new"))), 1
        )
