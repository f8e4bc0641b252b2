# -*- test-case-name: tests.test_e2e -*-
"""
End to end over real loopback sockets and real TLS: Python's smtplib (an
independent client) submits to the MSA as the spec example does, over
STARTTLS and implicit TLS, and the message reaches an independent
downstream SMTP server (aiosmtpd) standing in for the core MTA, byte for
byte plus one Received header.  Also: C{twistd -n digipoort-msa} on its
built-in defaults, exactly as README.rst starts it.
"""

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import MESSAGE, AiosmtpdCore, RunningMSA
from tests.waiting import listening, waitUntil, waitUntilBlocking

SENDER = "ik@mijnbedrijf.nl"
RECIPIENT = "belastingdienst@overheid.nl"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def splitReceived(data: bytes) -> tuple[bytes, bytes]:
    """
    The MSA's Received header (three folded lines) and the rest.
    """
    lines = data.split(b"\r\n")
    header = b"\r\n".join(lines[:3]) + b"\r\n"
    return header, data[len(header) :]


def submit(
    port: int,
    context: ssl.SSLContext,
    implicit: bool = False,
    mechanism: str = "PLAIN",
    user: str = "alice",
    password: str = "wonderland",
    message: bytes = MESSAGE,
    recipients=(RECIPIENT,),
):
    """
    A blocking smtplib session (run it in a thread): the spec example.

    @return: the (code, text) of the reply to the final dot.
    """
    if implicit:
        client = smtplib.SMTP_SSL("localhost", port, context=context, timeout=10)
    else:
        client = smtplib.SMTP("localhost", port, timeout=10)
    try:
        client.ehlo("mijnbedrijf.nl")
        if not implicit:
            assert "auth" not in client.esmtp_features
            client.starttls(context=context)
            client.ehlo("mijnbedrijf.nl")
        client.esmtp_features["auth"] = mechanism
        client.login(user, password)
        code, text = client.mail(SENDER)
        assert (code, text) == (250, b"2.1.0 Ok"), (code, text)
        for r in recipients:
            code, text = client.rcpt(r)
            assert (code, text) == (250, b"2.1.5 Ok"), (code, text)
        return client.data(message)
    finally:
        client.close()


class SubmissionToOutboxTests(unittest.TestCase):
    """
    No core MTA configured: accepted messages land in the outbox, one file
    per message, exactly the bytes that would go to the core.
    """

    def setUp(self):
        self.msa = RunningMSA(self)

    @defer.inlineCallbacks
    def check(self, **kwargs):
        code, text = yield threads.deferToThread(
            submit, context=self.msa.clientContext(), **kwargs
        )
        self.assertEqual(code, 250)
        self.assertTrue(text.startswith(b"2.0.0 Ok: queued as "), text)
        queueId = text.split()[-1].decode()
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(files, [queueId + ".eml"])
        header, body = splitReceived(self.msa.readOutbox(files[0]))
        self.assertEqual(body, MESSAGE)
        self.assertTrue(
            header.startswith(b"Received: from mijnbedrijf.nl ([127.0.0.1])")
        )
        self.assertIn(b"with ESMTPSA (TLSv1.3:", header)
        self.assertIn(f"id {queueId} for <{RECIPIENT}>;".encode(), header)

    def test_starttlsPlain(self):
        return self.check(port=self.msa.starttlsPort, mechanism="PLAIN")

    def test_starttlsLogin(self):
        return self.check(port=self.msa.starttlsPort, mechanism="LOGIN")

    def test_implicitPlain(self):
        return self.check(port=self.msa.implicitPort, implicit=True, mechanism="PLAIN")

    def test_implicitLogin(self):
        return self.check(port=self.msa.implicitPort, implicit=True, mechanism="LOGIN")

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        error = yield self.assertFailure(
            threads.deferToThread(
                submit,
                port=self.msa.starttlsPort,
                context=self.msa.clientContext(),
                password="guess",
            ),
            smtplib.SMTPAuthenticationError,
        )
        self.assertEqual(error.smtp_code, 535)
        self.assertEqual(error.smtp_error, b"5.7.8 Authentication credentials invalid")
        self.assertEqual(self.msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_gateOverRealSocket(self):
        """
        R3 over a real plaintext connection.
        """

        def talk():
            client = smtplib.SMTP("127.0.0.1", self.msa.starttlsPort, timeout=10)
            try:
                client.ehlo("mijnbedrijf.nl")
                return (
                    client.esmtp_features,
                    client.docmd("MAIL", f"FROM:<{SENDER}>"),
                    client.docmd("AUTH", "PLAIN"),
                )
            finally:
                client.close()

        features, mail, auth = yield threads.deferToThread(talk)
        self.assertIn("starttls", features)
        self.assertNotIn("auth", features)
        self.assertEqual(features["size"], "52428800")
        self.assertEqual(mail, (530, b"5.7.0 Must issue a STARTTLS command first"))
        self.assertEqual(auth, (530, b"5.7.0 Must issue a STARTTLS command first"))


class RelayToCoreTests(unittest.TestCase):
    """
    With a core MTA configured, the message goes there over verified
    STARTTLS, and the spool entry is gone afterwards.
    """

    @defer.inlineCallbacks
    def test_relayedByteForByte(self):
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        code, text = yield threads.deferToThread(
            submit,
            port=msa.starttlsPort,
            context=msa.clientContext(),
            recipients=[RECIPIENT, "douane@overheid.nl"],
        )
        self.assertEqual(code, 250)
        [(sender, recipients, data, overTLS)] = yield core.waitForMessages(1)
        self.assertEqual(sender, SENDER)
        self.assertEqual(recipients, [RECIPIENT, "douane@overheid.nl"])
        self.assertTrue(overTLS)
        header, body = splitReceived(data)
        self.assertEqual(body, MESSAGE)
        self.assertEqual(data.count(b"Received: "), 1)
        queueId = text.split()[-1].decode()
        self.assertIn(f"id {queueId};".encode(), header)
        queue = os.path.join(msa.state, "spool", "queue")
        yield waitUntil(lambda: not os.listdir(queue), what="an empty queue")
        self.assertEqual(os.listdir(queue), [])
        self.assertEqual(msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_largeMessageWithDotsAtEveryOffset(self):
        """
        A message of several hundred KiB whose lines start with dots at
        many offsets around 16 KiB chunk boundaries (where Twisted's client
        forgets to stuff) arrives intact.
        """
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        lines = [b"Subject: dots", b""]
        for i in range(6000):
            lines.append(b"." * (i % 3 + 1) + b"x" * (i % 97))
        message = b"\r\n".join(lines) + b"\r\n"
        code, _ = yield threads.deferToThread(
            submit,
            port=msa.implicitPort,
            implicit=True,
            context=msa.clientContext(),
            message=message,
        )
        self.assertEqual(code, 250)
        [(_, _, data, _)] = yield core.waitForMessages(1)
        self.assertEqual(splitReceived(data)[1], message)


class TwistdDefaultsTests(unittest.TestCase):
    """
    README.rst's first command: C{twistd -n digipoort-msa} with no
    configuration at all.
    """

    @defer.inlineCallbacks
    def test_defaults(self):
        for port in (2587, 2465):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise unittest.SkipTest(f"port {port} is in use here")
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        env = dict(os.environ, PYTHONPATH=ROOT)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        logPath = os.path.join(cwd, "twistd.log")
        with open(logPath, "wb") as logFile:
            process = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "digipoort-msa"],
                cwd=cwd,
                env=env,
                stdout=logFile,
                stderr=subprocess.STDOUT,
            )

        def stop():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)

        self.addCleanup(stop)

        def waitAndSubmit():
            waitUntilBlocking(lambda: listening(2465), what="twistd to listen")
            state = os.path.join(cwd, "msa-state")
            context = ssl.create_default_context(
                cafile=os.path.join(state, "selfsigned-cert.pem")
            )
            return submit(2587, context, user="demo", password="demo-password"), submit(
                2465, context, implicit=True, user="demo", password="demo-password"
            )

        replies = yield threads.deferToThread(waitAndSubmit)
        self.assertEqual([code for code, _ in replies], [250, 250])
        outbox = os.path.join(cwd, "msa-state", "outbox")
        yield waitUntil(lambda: len(os.listdir(outbox)) == 2, what="2 outbox files")
        self.assertEqual(len(os.listdir(outbox)), 2)
        stop()
        with open(logPath, "rb") as f:
            log = f.read()
        self.assertIn(b"No core MTA configured", log)
        self.assertIn(b"demo account", log)
        for name in ("selfsigned-cert.pem", "accounts.json", "spool", "outbox"):
            self.assertTrue(os.path.exists(os.path.join(cwd, "msa-state", name)), name)
        self.assertEqual(
            os.stat(os.path.join(cwd, "msa-state", "accounts.json")).st_mode & 0o777,
            0o600,
        )
