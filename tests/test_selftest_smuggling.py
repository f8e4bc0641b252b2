# -*- test-case-name: tests.test_selftest_smuggling -*-
"""
The self-test's SMTP smuggling verdicts (L{msa.admin.smtpprobes}) against
real servers: a server that ends the data on a bare LF runs the smuggled
transaction (FAIL, exit 1); one that keeps the bare CR or LF inside the
message, as Postfix with C{smtpd_forbid_bare_newline = yes} does, is
warned about and nothing more (WARN, exit 0), since whether it normalises
before relaying cannot be seen from outside; the MSA refuses (PASS, in
L{tests.test_selftest}).  And the rules themselves, on replies.
"""

import os
import re

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.admin.probeclient import FAIL, PASS, WARN, Reply
from msa.admin.smtpprobes import smugglingVerdict
from msa.tls import DEFAULT_CIPHERS, serverContextFactory
from tests.downstream import DownstreamServer
from tests.e2e import freePort
from tests.plaintwisted import BareLFESMTP, listenPlainTwisted
from tests.postfixserver import ThrowawayPostfix, postfixDirectory
from tests.selftesting import (
    BARE_LF_ENDS,
    BARE_LF_INSIDE,
    NO_CHUNKING,
    PRE_TLS,
    SENDER,
    SMUGGLING,
    SelftestMixin,
    accepted,
    makeCertificate,
    smuggledRan,
)


class VerdictTests(unittest.TestCase):
    """
    L{smugglingVerdict}: what the replies to one message and QUIT show.
    """

    def verdict(self, *replies: tuple[int, str]):
        result = smugglingVerdict(
            "LF.LF", [Reply(code, (text,)) for code, text in replies]
        )
        self.assertEqual(result.name, "smuggling LF.LF")
        return result.status, result.detail

    def test_refused(self):
        """
        5xx to the message, then 221 or the connection closed: PASS.
        """
        for replies in [
            [(550, "5.5.2 bare LF"), (221, "bye")],
            [(550, "5.5.2 bare LF")],
        ]:
            self.assertEqual(
                self.verdict(*replies), (PASS, "refused: 550 5.5.2 bare LF")
            )

    def test_acceptedAsOne(self):
        """
        One 250 and the 221: the bare LF is inside a queued message; WARN.
        """
        reply = "2.0.0 Ok: queued as 4F1"
        self.assertEqual(
            self.verdict((250, reply), (221, "bye")),
            (WARN, accepted("LF.LF", "250 " + reply)),
        )

    def test_temporaryRefusal(self):
        """
        4xx: nothing ran, but a retry may be accepted; WARN.
        """
        status, detail = self.verdict((451, "4.3.0 try later"), (221, "bye"))
        self.assertEqual(status, WARN)
        self.assertTrue(detail.startswith("not refused for good: 451 4.3.0"), detail)

    def test_secondQueueId(self):
        """
        Two "queued as" for one submission: the smuggled message was queued.
        """
        status, detail = self.verdict(
            (250, "2.0.0 Ok: queued as AAA"),
            (250, "2.1.0 Ok"),
            (250, "2.1.5 Ok"),
            (354, "End data with <CR><LF>.<CR><LF>"),
            (250, "2.0.0 Ok: queued as BBB"),
            (221, "bye"),
        )
        self.assertEqual(status, FAIL)
        self.assertTrue(
            detail.startswith(
                "LF.LF ended the message and the smuggled commands were answered "
                "(2 queue ids: AAA, BBB): 250 2.0.0 Ok: queued as AAA; "
            ),
            detail,
        )

    def test_refusedThenSmuggledAnswered(self):
        """
        The message refused at the bare LF, but the smuggled MAIL answered
        after it: the server ended the data there; FAIL, whatever the first
        reply.
        """
        status, detail = self.verdict(
            (550, "5.5.2 bare LF"), (503, "5.5.1 Error: nested MAIL"), (221, "bye")
        )
        self.assertEqual(status, FAIL)
        self.assertIn("503 5.5.1 Error: nested MAIL", detail)

    def test_noReply(self):
        """
        The connection closed without a reply to the message: nothing
        smuggled was answered; WARN.
        """
        status, detail = self.verdict()
        self.assertEqual(status, WARN)
        self.assertTrue(detail.startswith("the connection closed with no reply"))


class BareLFServerTests(SelftestMixin, unittest.TestCase):
    """
    A plain C{twisted.mail} server behind the MSA's own TLS policy, so that
    the smuggling probes alone decide the exit code.
    """

    def listen(self, protocol=None) -> tuple[int, str]:
        cert, key, _ = makeCertificate(os.path.abspath(self.mktemp()))
        contextFactory = serverContextFactory(cert, key)
        return listenPlainTwisted(self, contextFactory, True, protocol), cert

    @defer.inlineCallbacks
    def test_smuggledCommandsRun(self):
        """
        A server that takes a bare LF for a line end answers the smuggled
        MAIL, RCPT, DATA and message after LF.LF, LF.CRLF and CRLF.LF:
        those FAIL and the exit code is 1; the other forms it kept inside
        one message (WARN).
        """
        port, cert = self.listen(BareLFESMTP)
        code, rows, output = yield self.selftest(
            port, "--implicit", "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(
            rows,
            failing=BARE_LF_ENDS,
            skipped=[*PRE_TLS, *NO_CHUNKING],
            warning=BARE_LF_INSIDE,
        )
        for name in BARE_LF_ENDS:
            self.assertEqual(rows[name][1], smuggledRan(name.split()[1]))
        self.assertEqual(code, 1)
        self.assertTrue(output.endswith(" 8 PASS, 5 WARN, 3 FAIL, 4 SKIP\n"), output)

    @defer.inlineCallbacks
    def test_acceptedInsideOnlyWarns(self):
        """
        A server that keeps every form inside one message: eight WARNs and
        exit code 0.
        """
        port, cert = self.listen()
        code, rows, output = yield self.selftest(
            port, "--implicit", "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(
            rows, failing=[], skipped=[*PRE_TLS, *NO_CHUNKING], warning=SMUGGLING
        )
        self.assertEqual(code, 0)
        self.assertTrue(output.endswith(" 8 PASS, 8 WARN, 0 FAIL, 4 SKIP\n"), output)


class PostfixTests(SelftestMixin, unittest.TestCase):
    """
    Debian's Postfix with C{smtpd_forbid_bare_newline = yes}, implicit TLS
    with the MSA's cipher suites and groups, relaying to a test downstream.
    """

    @defer.inlineCallbacks
    def test_forbidBareNewline(self):
        """
        Postfix accepts each form as one message: eight WARNs, no FAIL, exit
        code 0.  What it relays shows that here the accepted forms were
        harmless, which the probe cannot see: nine messages, each smuggled
        transaction as text inside its outer message, no bare CR or LF
        left.
        """
        directory = postfixDirectory(self)
        downstream = DownstreamServer(os.path.join(directory, "down"), "none")
        downstreamPort = downstream.start()
        self.addCleanup(downstream.stop)
        cert, key, _ = makeCertificate(os.path.join(directory, "cert"))
        postfix = ThrowawayPostfix(
            os.path.join(directory, "postfix"),
            freePort(),
            cert,
            key,
            settings={
                "smtpd_forbid_bare_newline": "yes",
                "tls_high_cipherlist": DEFAULT_CIPHERS,
                "smtpd_tls_ciphers": "high",
                "smtpd_tls_mandatory_ciphers": "high",
                "tls_eecdh_auto_curves": "X25519 prime256v1 secp384r1",
                "relayhost": f"[127.0.0.1]:{downstreamPort}",
                "smtp_tls_security_level": "none",
            },
            account=("alice", "wonderland"),
            implicit=True,
        )
        self.addCleanup(threads.deferToThread, postfix.stop)
        yield threads.deferToThread(postfix.start)
        self.assertEqual(
            postfix.postconf("-h", "smtpd_forbid_bare_newline").strip(), "yes"
        )
        code, rows, _ = yield self.selftest(
            postfix.port, "--implicit", "--servername", "localhost", "--ca-file", cert
        )
        # Postfix offers CHUNKING and normalises the bare LF in BDAT text too.
        self.assertOutcome(
            rows, failing=[], skipped=PRE_TLS, warning=[*SMUGGLING, "smuggling BDAT"]
        )
        self.assertRegex(
            rows["smuggling BDAT"][1], r"^bare CR/LF accepted inside BDAT text: "
        )
        for name in SMUGGLING:
            self.assertRegex(
                rows[name][1],
                r"^accepted as one message with \S+ inside \(250 2\.0\.0 Ok: "
                r"queued as [0-9A-F]+\); no smuggled command ran here",
            )
        self.assertEqual(code, 0)
        # The clean message, the eight DATA forms, the eight BDAT forms.
        messages = yield downstream.waitForMessages(17, timeout=60)
        self.assertEqual(len(messages), 17)
        firstIds = sorted(
            re.search(rb"\r\nMessage-ID: <selftest-[^-]+-[^-]+-([^@]+)@", m.data)
            .group(1)
            .decode()
            for m in messages
        )
        self.assertEqual(
            firstIds,
            sorted(
                ["clean"]
                + [
                    f"{kind}smuggled-{name.split()[1].replace('.', '-')}"
                    for name in SMUGGLING
                    for kind in ("outer-", "bdat-")
                ]
            ),
            "each smuggled message went on inside its outer one, none alone",
        )
        for message in messages:
            self.assertIsNone(
                re.search(rb"(?<!\r)\n|\r(?!\n)", message.data),
                "Postfix relayed a bare CR or LF",
            )
            if b"outer-smuggled" in message.data:
                self.assertIn(b"MAIL FROM:<" + SENDER.encode(), message.data)
