# -*- test-case-name: tests.test_pipelining_e2e -*-
"""
Deep pipelining and malformed ESMTP parameters through the assembled daemon
(built from a TOML file, over STARTTLS, relaying to an independent core),
issue 18 defects 3 and 4: MAIL, 1000 RCPT, NOOP and DATA in one write get
every reply in order and the message reaches the core with all its
recipients; C{SIZE=\\u00b2} gets 501 5.5.4 and the session goes on to
submit its message.  No error is logged.
"""

from twisted.internet import defer, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from tests.e2e import MESSAGE, AiosmtpdCore, RunningMSA
from tests.sessionclient import RawSession
from tests.test_fuzz_sessions import stuff

#: The recipients of the deep pipeline.
DEPTH = 1000

SUPERSCRIPT_SIZE = "MAIL FROM:<ik@mijnbedrijf.nl> SIZE=\u00b2".encode()


def recipientAddress(n: int) -> bytes:
    return b"r%d@overheid.nl" % (n,)


def collectErrors(testCase: unittest.TestCase) -> list:
    """
    Every failure or error-level event logged for the rest of C{testCase}.
    """
    errors: list = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)
        elif event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    testCase.addCleanup(globalLogPublisher.removeObserver, observe)
    return errors


class DeepPipelineTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.errors = collectErrors(self)
        self.core = AiosmtpdCore(self)
        self.msa = RunningMSA(
            self, relay=self.core.relayConfig(), server={"max_recipients": DEPTH}
        )

    def session(self, talk):
        """
        Run C{talk(client)} in a thread on a logged-in STARTTLS session.
        """

        def run():
            client = RawSession(self.msa.starttlsPort, self.msa.clientContext())
            client.settimeout(60)
            try:
                client.secure()
                assert client.login() == b"235 2.7.0 Authentication successful"
                return talk(client)
            finally:
                client.close()

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_thousandRecipientsInOneWrite(self):
        """
        MAIL + 1000 RCPT + NOOP + DATA in one write: 1003 replies in order,
        then the message is queued and reaches the core with 1000
        recipients (before the fix: RecursionError after about 110
        commands and a session that hung).
        """
        recipients = [recipientAddress(n) for n in range(DEPTH)]

        def talk(client):
            client.send(
                b"MAIL FROM:<ik@mijnbedrijf.nl>\r\n"
                + b"".join(b"RCPT TO:<%s>\r\n" % r for r in recipients)
                + b"NOOP\r\nDATA\r\n"
            )
            codes = [client.reply()[0] for _ in range(DEPTH + 3)]
            client.send(stuff(MESSAGE.split(b"\r\n")[:-1]) + b"QUIT\r\n")
            return codes, client.readUntilClosed()

        codes, rest = yield self.session(talk)
        self.assertEqual(codes, [250] + [250] * DEPTH + [250, 354])
        self.assertEqual(len(rest), 2, rest)
        self.assertTrue(rest[0].startswith(b"250 2.0.0 Ok: queued as "), rest)
        self.assertEqual(rest[1], b"221 2.0.0 Bye")
        [(sender, rcpts, data, _)] = yield self.core.waitForMessages(1, timeout=60)
        self.assertEqual(sender, "ik@mijnbedrijf.nl")
        self.assertEqual(sorted(rcpts), sorted(r.decode() for r in recipients))
        self.assertTrue(data.endswith(MESSAGE), data[-200:])
        self.assertEqual(self.errors, [])

    @defer.inlineCallbacks
    def test_superscriptSize(self):
        """
        C{SIZE=\\u00b2} is 501 5.5.4, the session goes on, and its message
        goes through afterwards (before the fix: a traceback and the
        connection dropped).
        """

        def talk(client):
            first = client.command(SUPERSCRIPT_SIZE)
            noop = client.command(b"NOOP")
            client.send(
                b"MAIL FROM:<ik@mijnbedrijf.nl> SIZE=300\r\n"
                b"RCPT TO:<belastingdienst@overheid.nl>\r\nDATA\r\n"
            )
            codes = [client.reply()[0] for _ in range(3)]
            client.send(stuff(MESSAGE.split(b"\r\n")[:-1]) + b"QUIT\r\n")
            return first, noop, codes, client.readUntilClosed()

        first, noop, codes, rest = yield self.session(talk)
        self.assertEqual(first, b"501 5.5.4 Bad parameter syntax: SIZE=?")
        self.assertEqual(noop, b"250 2.0.0 Ok")
        self.assertEqual(codes, [250, 250, 354])
        self.assertTrue(rest[0].startswith(b"250 2.0.0 Ok: queued as "), rest)
        self.assertEqual(rest[1:], [b"221 2.0.0 Bye"])
        [(sender, rcpts, data, _)] = yield self.core.waitForMessages(1, timeout=60)
        self.assertEqual(rcpts, ["belastingdienst@overheid.nl"])
        self.assertTrue(data.endswith(MESSAGE), data[-200:])
        self.assertEqual(self.errors, [])
