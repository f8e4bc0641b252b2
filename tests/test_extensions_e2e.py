# -*- test-case-name: tests.test_extensions_e2e -*-
"""
The extensions of issue 21 over the assembled daemon, started from a TOML
file (L{tests.e2e.RunningMSA}), over STARTTLS, with real clients: Python's
C{smtplib} (SMTPUTF8 through C{send_message}, DSN through C{mail_options}
and C{rcpt_options}, REQUIRETLS), curl with a UTF-8 address, and a raw
client for BDAT.

What the submission side promises is checked where it is kept: the spool
entry of the message (its envelope with the parameters, decoded; its bytes
exactly as sent after the MSA's Received header) while the relay cannot
reach its core, and the bytes a real core (aiosmtpd) receives.  Passing
the parameters on to the core is the relay's part, tested there.
"""

import email.generator
import email.message
import email.policy
import io
import os
import smtplib

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import (
    AiosmtpdCore,
    RunningMSA,
    fixtureAccount,
    freePort,
    requireProgram,
    runProgram,
)
from tests.sessionclient import RawSession
from tests.test_e2e import splitReceived
from tests.waiting import waitUntil

SENDER = "j\u00f6s\u00e9@mijnbedrijf.nl"
RECIPIENT = "b\u00e9lasting@overheid.nl"
TEXT = (
    b"From: ik@mijnbedrijf.nl\r\nTo: belastingdienst@overheid.nl\r\n"
    b"Subject: chunks\r\n\r\nRegel een\r\n.\r\n..twee\r\n\xc3\xa9\xc3\xa9n\r\n"
)


def stuckRelay() -> dict:
    """
    A core that never answers: every message stays in the spool, where
    its entry can be read.
    """
    return {"host": "127.0.0.1", "port": freePort(), "retry_base": 3600}


class SpooledTests(unittest.TestCase):
    """
    Against a core that cannot be reached: the spool entry is what the
    relay will work from.
    """

    def setUp(self):
        jose = attrs.evolve(
            fixtureAccount("jose", "jose pass"),
            extra={"senders": ["jos\u00e9@bedrijf.nl"], "maxRecipients": 7},
        )
        self.msa = RunningMSA(self, relay=stuckRelay(), extraAccounts={"jose": jose})
        self.spool = self.msa.service.getServiceNamed("relay").spool

    @defer.inlineCallbacks
    def entry(self):
        """
        The one message in the spool.
        """
        pending = yield waitUntil(self.spool.pending, 10, "a message in the spool")
        [queueId] = pending
        entry = self.spool.load(queueId)
        with open(entry.messagePath, "rb") as f:
            return entry, splitReceived(f.read())[1]

    def smtplibSession(self, user="alice", password="wonderland") -> smtplib.SMTP:
        client = smtplib.SMTP("localhost", self.msa.starttlsPort, timeout=10)
        client.ehlo("mijnbedrijf.nl")
        client.starttls(context=self.msa.clientContext())
        client.ehlo("mijnbedrijf.nl")
        client.esmtp_features["auth"] = "PLAIN"
        client.login(user, password)
        return client

    @defer.inlineCallbacks
    def test_smtplibSMTPUTF8AndDSN(self):
        """
        smtplib's C{send_message} sees non-ASCII addresses and SMTPUTF8
        offered, and sends SMTPUTF8 (and BODY=8BITMIME); DSN and REQUIRETLS
        go as C{mail_options} and C{rcpt_options}.  The spool keeps the
        addresses as sent, every parameter decoded, and the message's
        UTF-8 header fields byte for byte.
        """
        message = email.message.EmailMessage()
        message["From"] = f"J\u00f6s\u00e9 <{SENDER}>"
        message["To"] = RECIPIENT
        message["Subject"] = "aangifte \u20ac"
        message.set_content("\u00e9\u00e9n regel\n")

        def send():
            client = self.smtplibSession()
            try:
                assert "smtputf8" in client.esmtp_features, client.esmtp_features
                return client.send_message(
                    message,
                    mail_options=["RET=HDRS", "ENVID=aangifte+2B1", "REQUIRETLS"],
                    rcpt_options=[
                        "NOTIFY=SUCCESS,FAILURE",
                        "ORCPT=rfc822;belastingdienst+40overheid.nl",
                    ],
                )
            finally:
                client.quit()

        refused = yield threads.deferToThread(send)
        self.assertEqual(refused, {})
        # What smtplib's send_message writes for SMTPUTF8.
        sent = io.BytesIO()
        email.generator.BytesGenerator(
            sent, policy=message.policy.clone(utf8=True)
        ).flatten(message, linesep="\r\n")
        entry, data = yield self.entry()
        envelope = entry.envelope
        self.assertEqual((envelope.sender, envelope.recipients), (SENDER, [RECIPIENT]))
        self.assertEqual(
            envelope.mailParams,
            {
                "SMTPUTF8": None,
                "BODY": "8BITMIME",
                "RET": "HDRS",
                "ENVID": "aangifte+1",
                "REQUIRETLS": None,
                "SIZE": str(len(sent.getvalue())),
            },
        )
        self.assertEqual(
            envelope.recipientParams,
            [
                {
                    "NOTIFY": "SUCCESS,FAILURE",
                    "ORCPT": "rfc822;belastingdienst@overheid.nl",
                }
            ],
        )
        self.assertEqual(data, sent.getvalue())
        self.assertIn("From: J\u00f6s\u00e9 <j\u00f6s\u00e9@".encode(), data)

    @defer.inlineCallbacks
    def test_nfcSenderAndLimits(self):
        """
        An account whose sender address is UTF-8 (NFC) may send as it
        written decomposed (NFD); the address is kept as sent.  EHLO after
        AUTH says the account's own RCPTMAX.
        """
        decomposed = "jose\u0301@bedrijf.nl"

        def send():
            client = self.smtplibSession("jose", "jose pass")
            try:
                assert client.esmtp_features["limits"] == "RCPTMAX=100", client
                client.ehlo("mijnbedrijf.nl")
                limits = client.esmtp_features["limits"]
                client.sendmail(
                    decomposed,
                    ["belastingdienst@overheid.nl"],
                    b"Subject: x\r\n\r\ny\r\n",
                    mail_options=["SMTPUTF8"],
                )
                return limits
            finally:
                client.quit()

        limits = yield threads.deferToThread(send)
        self.assertEqual(limits, "RCPTMAX=7")
        entry, data = yield self.entry()
        self.assertEqual(entry.envelope.sender, decomposed)
        self.assertEqual(data, b"Subject: x\r\n\r\ny\r\n")

    @defer.inlineCallbacks
    def test_curlUTF8Address(self):
        """
        curl sends SMTPUTF8 for a non-ASCII --mail-from when the server
        offers it.
        """
        curl = requireProgram(self, "curl")
        path = os.path.join(self.msa.directory, "m.txt")
        with open(path, "wb") as f:
            f.write(TEXT)
        out, err, code = yield runProgram(
            curl,
            [
                "-sS",
                "--url",
                f"smtp://localhost:{self.msa.starttlsPort}",
                "--ssl-reqd",
                "--cacert",
                self.msa.certFile,
                "--mail-from",
                SENDER,
                "--mail-rcpt",
                "belastingdienst@overheid.nl",
                "-u",
                "alice:wonderland",
                "-T",
                path,
            ],
        )
        self.assertEqual(code, 0, err)
        entry, data = yield self.entry()
        self.assertEqual(entry.envelope.sender, SENDER)
        self.assertIn("SMTPUTF8", entry.envelope.mailParams)
        self.assertEqual(data, TEXT)

    @defer.inlineCallbacks
    def test_binaryMIME(self):
        """
        BDAT with BODY=BINARYMIME: the octets are stored exactly as sent,
        bare LF, NUL and lines over 998 octets included; DATA is refused.
        """
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n"
            + bytes(range(256)) * 8
            + b"\n.\n\r"
        )

        def send():
            client = RawSession(self.msa.starttlsPort, self.msa.clientContext())
            try:
                client.secure()
                client.login()
                replies = [
                    client.command(b"MAIL FROM:<ik@mijnbedrijf.nl> BODY=BINARYMIME"),
                    client.command(b"RCPT TO:<belastingdienst@overheid.nl>"),
                    client.command(b"DATA"),
                ]
                half = len(content) // 2
                client.send(b"BDAT %d\r\n" % half + content[:half])
                client.send(b"BDAT %d LAST\r\n" % (len(content) - half))
                client.send(content[half:])
                replies += [client.reply()[1][-1], client.reply()[1][-1]]
                return replies
            finally:
                client.close()

        replies = yield threads.deferToThread(send)
        self.assertEqual(
            replies[:3],
            [
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"503 5.5.1 Error: BODY=BINARYMIME requires BDAT",
            ],
        )
        self.assertEqual(
            replies[3], b"2.0.0 Ok: %d octets received so far" % (len(content) // 2)
        )
        self.assertTrue(replies[4].startswith(b"2.0.0 Ok: queued as "), replies)
        entry, data = yield self.entry()
        self.assertEqual(entry.envelope.mailParams, {"BODY": "BINARYMIME"})
        self.assertEqual(data, content)


class ChunkingToCoreTests(unittest.TestCase):
    """
    BDAT relayed to a real core: the bytes arrive as the chunks carried
    them; a chunk that smuggles reaches nothing.
    """

    @defer.inlineCallbacks
    def test_bdatToCore(self):
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())

        def send():
            client = RawSession(msa.starttlsPort, msa.clientContext())
            try:
                client.secure()
                client.login()
                smuggle = b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.com>\r\n"
                cut = TEXT.index(b"Regel een\r") + len(b"Regel een\r")
                client.send(
                    b"MAIL FROM:<ik@mijnbedrijf.nl>\r\n"
                    b"RCPT TO:<belastingdienst@overheid.nl>\r\n"
                    b"BDAT %d LAST\r\n" % len(smuggle) + smuggle + b"NOOP\r\n"
                    b"MAIL FROM:<ik@mijnbedrijf.nl>\r\n"
                    b"RCPT TO:<belastingdienst@overheid.nl>\r\n"
                    b"BDAT %d\r\n" % cut + TEXT[:cut] + b"BDAT %d LAST\r\n"
                    b"" % (len(TEXT) - cut) + TEXT[cut:] + b"QUIT\r\n"
                )
                return [client.reply()[1][-1] for _ in range(9)]
            finally:
                client.close()

        replies = yield threads.deferToThread(send)
        self.assertEqual(
            replies[:6],
            [
                b"2.1.0 Ok",
                b"2.1.5 Ok",
                b"5.5.2 Message refused: bare CR or LF in message text; "
                b"lines must end with CRLF",
                b"2.0.0 Ok",
                b"2.1.0 Ok",
                b"2.1.5 Ok",
            ],
        )
        self.assertEqual(
            replies[6],
            b"2.0.0 Ok: %d octets received so far"
            % (TEXT.index(b"Regel een\r") + len(b"Regel een\r")),
        )
        self.assertTrue(replies[7].startswith(b"2.0.0 Ok: queued as "), replies)
        self.assertEqual(replies[8], b"2.0.0 Bye")
        [(sender, recipients, data, tls)] = yield core.waitForMessages(1)
        self.assertEqual(splitReceived(data)[1], TEXT)
        self.assertEqual(sender, "ik@mijnbedrijf.nl")
