# -*- test-case-name: tests.test_selftest -*-
"""
C{digipoort-msa-admin selftest} (L{msa.admin.selftest}) against the MSA:
started from a TOML file it passes every probe on both of its listeners,
refuses a wrong password or sender before the message probes, and a
deliberately weakened MSA fails the probes its weakness concerns and only
those; and the README's example, run as a shell script.

The self-test is blocking (a command-line tool), so it runs in a thread or
as a subprocess while the servers run in the test's reactor.
"""

import os
import re
import sys

import attrs
from twisted.internet import defer, utils
from twisted.trial import unittest

from msa.accounts.model import makeAccount
from msa.admin.probeclient import (
    DEFAULT_TLS13_CIPHERS,
    PASS,
)
from msa.service.tap import DEMO_ACCOUNT, DEMO_SENDERS
from msa.tls import DEFAULT_CIPHERS
from tests.e2e import RunningMSA, runProgram
from tests.selftesting import (
    ALL_PROBES,
    MESSAGES,
    PRE_TLS,
    RCPT,
    SENDER,
    SMUGGLING,
    SelftestMixin,
    makeCertificate,
    parseTable,
)
from tests.test_readme import README, literalBlocks


class MSAPassesTests(SelftestMixin, unittest.TestCase):
    """
    The MSA, started from a TOML file with a certificate of its own, passes
    every probe on both listeners.
    """

    def setUp(self):
        self.msa = RunningMSA(self)

    def options(self):
        return ["--servername", "localhost", "--ca-file", self.msa.certFile]

    @defer.inlineCallbacks
    def test_starttlsListener(self):
        """
        Every probe passes on the STARTTLS listener, and the clean message
        reaches the outbox marked as a self-test.
        """
        code, rows, output = yield self.selftest(self.msa.starttlsPort, *self.options())
        self.assertOutcome(rows, failing=[])
        self.assertEqual(code, 0)
        self.assertEqual(rows["pre-tls-530"][0], PASS)
        for name in SMUGGLING:
            self.assertEqual(
                rows[name][1],
                "refused: 550 5.5.2 Message refused: bare CR or LF in message "
                "text; lines must end with CRLF",
            )
        self.assertEqual(
            rows["extensions"][1],
            "offered over TLS: DSN, SMTPUTF8, CHUNKING, BINARYMIME, REQUIRETLS, "
            "LIMITS RCPTMAX=100",
        )
        self.assertEqual(
            rows["smuggling BDAT"][1], "each of the 8 forms refused inside BDAT text"
        )
        self.assertTrue(
            rows["cipher-suites"][1].startswith(
                "TLS 1.2: ECDHE-ECDSA-AES128-GCM-SHA256, "
                "ECDHE-ECDSA-AES256-GCM-SHA384, ECDHE-ECDSA-CHACHA20-POLY1305; "
                "TLS 1.3: TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, "
                "TLS_AES_128_GCM_SHA256 ("
            ),
            rows["cipher-suites"][1],
        )
        self.assertTrue(rows["groups"][1].startswith("accepted: X25519, P-256, P-384"))
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(len(files), 1, "only the clean message is accepted")
        text = self.msa.readOutbox(files[0])
        match = re.search(
            rb"\r\nSubject: digipoort-msa selftest (\d{8}T\d{6}Z-[0-9a-f]{6}): "
            rb"clean message; please discard\r\n",
            text,
        )
        self.assertIsNotNone(match, text)
        self.assertIn(
            b"\r\nX-Digipoort-Selftest: " + match.group(1) + b" clean\r\n", text
        )

    @defer.inlineCallbacks
    def test_implicitListener(self):
        """
        Every probe passes on the implicit-TLS listener; the plaintext ones
        are reported as not applicable.
        """
        code, rows, _ = yield self.selftest(
            self.msa.implicitPort, "--implicit", *self.options()
        )
        self.assertOutcome(rows, failing=[], skipped=PRE_TLS)
        for name in PRE_TLS:
            self.assertEqual(rows[name][1], "N/A: implicit TLS, no plaintext phase")
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def test_withoutAccountNothingIsSent(self):
        """
        Without an account, the message probes are skipped with the reason,
        nothing reaches the outbox, and the exit code is 0.
        """
        code, rows, _ = yield self.selftest(
            self.msa.starttlsPort, *self.options(), account=False
        )
        self.assertOutcome(rows, failing=[], skipped=MESSAGES)
        self.assertEqual(
            rows["clean-message"][1],
            "no account (--user, --password-file, --sender, --rcpt)",
        )
        self.assertEqual(code, 0)
        self.assertEqual(self.msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_subprocess(self):
        """
        C{digipoort-msa-admin selftest} as a real program: the table on
        stdout, the summary line, exit code 0.
        """
        program = os.path.join(os.path.dirname(sys.executable), "digipoort-msa-admin")
        out, err, code = yield runProgram(
            program,
            [
                "selftest",
                "127.0.0.1",
                str(self.msa.implicitPort),
                "--implicit",
                *self.options(),
                *self.accountOptions(),
            ],
        )
        self.assertEqual(err, b"")
        self.assertEqual(code, 0)
        output = out.decode()
        self.assertOutcome(parseTable(output), failing=[], skipped=PRE_TLS)
        self.assertTrue(output.startswith("PROBE "))
        self.assertEqual(
            output.splitlines()[-1],
            f"selftest of 127.0.0.1:{self.msa.implicitPort} (implicit TLS): "
            f"{len(ALL_PROBES) - 3} PASS, 0 WARN, 0 FAIL, 3 SKIP",
        )


class RefusedSessionTests(SelftestMixin, unittest.TestCase):
    """
    When the account cannot get as far as DATA, the clean-message probe
    fails with the server's reply (never the password) and the smuggling
    probes are not tried.
    """

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password: C{535} shown as the reply to C{AUTH PLAIN}, the
        password nowhere in the output.
        """
        msa = RunningMSA(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        wrong = os.path.join(directory, "password")
        with open(wrong, "w") as f:
            f.write("not-the-password\n")
        argv = ["--servername", "localhost", "--ca-file", msa.certFile]
        argv += ["--user", "alice", "--password-file", wrong]
        argv += ["--sender", SENDER, "--rcpt", RCPT]
        code, rows, output = yield self.selftest(msa.starttlsPort, *argv, account=False)
        self.assertOutcome(
            rows, failing=["clean-message"], skipped=[*SMUGGLING, "smuggling BDAT"]
        )
        self.assertEqual(
            rows["clean-message"][1],
            "AUTH PLAIN answered 535 5.7.8 Authentication credentials invalid",
        )
        self.assertEqual(
            rows["smuggling LF.LF"][1],
            "not tried: the session for clean-message failed",
        )
        self.assertNotIn("not-the-password", output)
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_senderNotAllowed(self):
        """
        A sender the account may not use: the refusal of MAIL is shown.
        """
        msa = RunningMSA(self)
        argv = ["--servername", "localhost", "--ca-file", msa.certFile]
        argv += ["--user", "alice", "--password-file", self.passwordFile()]
        argv += ["--sender", "someone@elders.example", "--rcpt", RCPT]
        code, rows, _ = yield self.selftest(
            msa.implicitPort, "--implicit", *argv, account=False
        )
        self.assertOutcome(
            rows,
            failing=["clean-message"],
            skipped=[*PRE_TLS, *SMUGGLING, "smuggling BDAT"],
        )
        self.assertEqual(
            rows["clean-message"][1],
            "MAIL FROM:<someone@elders.example> answered 553 5.7.1 Sender "
            "address <someone@elders.example> is not owned by the "
            "authenticated account",
        )
        self.assertEqual(code, 1)


class WeakenedMSATests(SelftestMixin, unittest.TestCase):
    """
    The MSA with one part of its TLS configuration weakened fails the
    probes about that part, and no other.
    """

    @defer.inlineCallbacks
    def test_weakCiphersAndGroups(self):
        """
        A CBC-SHA1 suite and a CBC-SHA384 suite added to C{[tls] ciphers},
        P-521 and ffdhe2048 to C{[tls] groups}: the suites and groups probes
        fail and name exactly what was added; everything else passes.
        """
        msa = RunningMSA(
            self,
            tls={
                "ciphers": DEFAULT_CIPHERS
                + ":ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384",
                "groups": "X25519:P-256:P-384:P-521:ffdhe2048",
            },
        )
        code, rows, _ = yield self.selftest(
            msa.starttlsPort, "--servername", "localhost", "--ca-file", msa.certFile
        )
        self.assertOutcome(rows, failing=["cipher-suites", "groups"])
        self.assertEqual(code, 1)
        self.assertTrue(
            rows["cipher-suites"][1].startswith(
                "accepts ECDHE-ECDSA-AES128-SHA (weak: CBC with SHA1), "
                "ECDHE-ECDSA-AES256-SHA384 (not expected); TLS 1.2: "
            ),
            rows["cipher-suites"][1],
        )
        self.assertTrue(
            rows["groups"][1].startswith(
                "accepts P-521, ffdhe2048, not in X25519:P-256:P-384; "
                "accepted: X25519, P-256, P-384, P-521, ffdhe2048"
            ),
            rows["groups"][1],
        )

    @defer.inlineCallbacks
    def test_operatorPolicy(self):
        """
        With the policy the operator passes (C{--expect-ciphers},
        C{--expect-groups}) covering what was added, only the weak suite
        still fails: an expected list cannot make CBC-SHA1 acceptable.
        """
        msa = RunningMSA(
            self,
            tls={
                "ciphers": DEFAULT_CIPHERS
                + ":ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384",
                "groups": "X25519:P-256:P-384:P-521",
            },
        )
        code, rows, _ = yield self.selftest(
            msa.implicitPort,
            "--implicit",
            "--servername",
            "localhost",
            "--ca-file",
            msa.certFile,
            "--expect-ciphers",
            "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE-ECDSA-AES256-SHA384"
            ":ECDHE-ECDSA-AES128-SHA:" + DEFAULT_TLS13_CIPHERS,
            "--expect-groups",
            "X25519:P-256:P-384:P-521",
        )
        self.assertOutcome(rows, failing=["cipher-suites"], skipped=PRE_TLS)
        self.assertTrue(
            rows["cipher-suites"][1].startswith(
                "accepts ECDHE-ECDSA-AES128-SHA (weak: CBC with SHA1); "
            ),
            rows["cipher-suites"][1],
        )
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_wrongName(self):
        """
        A certificate for another name fails the certificate probe, and the
        message probes send no password to it.
        """
        directory = os.path.abspath(self.mktemp())
        cert, key, _ = makeCertificate(directory, "other.example")
        msa = RunningMSA(self, tls={"certificate": cert, "key": key})
        code, rows, _ = yield self.selftest(
            msa.starttlsPort, "--servername", "localhost", "--ca-file", cert
        )
        self.assertOutcome(rows, failing=["certificate"], skipped=MESSAGES)
        self.assertIn("not valid for localhost", rows["certificate"][1])
        self.assertEqual(
            rows["clean-message"][1],
            "no password sent: the certificate is not valid for localhost",
        )
        self.assertEqual(code, 1)
        self.assertEqual(msa.outboxFiles(), [])

    @defer.inlineCallbacks
    def test_tooFewDaysLeft(self):
        """
        A certificate with 5 days left fails with C{--min-days} 14 (the
        default) and passes with C{--min-days 3}; the chain verified, so
        the message probes run either way.
        """
        directory = os.path.abspath(self.mktemp())
        cert, key, _ = makeCertificate(directory, days=5)
        msa = RunningMSA(self, tls={"certificate": cert, "key": key})
        options = ["--servername", "localhost", "--ca-file", cert]
        code, rows, _ = yield self.selftest(msa.starttlsPort, *options)
        self.assertOutcome(rows, failing=["certificate"])
        self.assertRegex(
            rows["certificate"][1],
            r"expires \d{4}-\d\d-\d\d \(4 days left, less than 14\)",
        )
        self.assertEqual(code, 1)
        code, rows, _ = yield self.selftest(
            msa.starttlsPort, *options, "--min-days", "3", account=False
        )
        self.assertOutcome(rows, failing=[], skipped=MESSAGES)
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def test_chain(self):
        """
        A certificate issued by an intermediate: with the intermediate in
        C{[tls] chain} every probe passes; without it the certificate probe
        fails, whether the client has the intermediate (it is named as not
        sent) or not (the chain does not verify).
        """
        directory = os.path.abspath(self.mktemp())
        rootPath, _, root = makeCertificate(directory, "Selftest Root", ca=True)
        interPath, _, inter = makeCertificate(
            directory, "Selftest Intermediate", ca=True, issuer=root
        )
        cert, key, _ = makeCertificate(directory, issuer=inter)
        both = os.path.join(directory, "root-and-intermediate.pem")
        with open(both, "wb") as f:
            for path in (rootPath, interPath):
                with open(path, "rb") as g:
                    f.write(g.read())
        options = ["--servername", "localhost"]
        full = RunningMSA(
            self, tls={"certificate": cert, "key": key, "chain": interPath}
        )
        code, rows, _ = yield self.selftest(
            full.starttlsPort, *options, "--ca-file", rootPath, account=False
        )
        self.assertOutcome(rows, failing=[], skipped=MESSAGES)
        self.assertIn("chain of 3 verified by", rows["certificate"][1])
        leafOnly = RunningMSA(self, tls={"certificate": cert, "key": key})
        code, rows, _ = yield self.selftest(
            leafOnly.starttlsPort, *options, "--ca-file", rootPath, account=False
        )
        self.assertOutcome(rows, failing=["certificate"], skipped=MESSAGES)
        self.assertIn("unable to get local issuer certificate", rows["certificate"][1])
        code, rows, _ = yield self.selftest(
            leafOnly.starttlsPort, *options, "--ca-file", both, account=False
        )
        self.assertOutcome(rows, failing=["certificate"], skipped=MESSAGES)
        self.assertIn(
            "intermediate(s) not sent by the server: CN=Selftest Intermediate",
            rows["certificate"][1],
        )
        self.assertEqual(code, 1)


class ReadmeExampleTests(unittest.TestCase):
    """
    The README's self-test example, run as a shell script against the MSA
    with the built-in defaults' demo account, its ports pointed at the test
    listeners.
    """

    @defer.inlineCallbacks
    def test_example(self):
        with open(README, encoding="utf-8") as f:
            blocks = [
                b
                for b in literalBlocks(f.read())
                if "digipoort-msa-admin selftest" in b
            ]
        self.assertEqual(len(blocks), 1)
        demo = attrs.evolve(
            makeAccount(*DEMO_ACCOUNT, ["localhost"]),
            extra={"senders": list(DEMO_SENDERS)},
        )
        msa = RunningMSA(self, extraAccounts={"demo": demo})
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        os.symlink(msa.state, os.path.join(cwd, "msa-state"))
        script = blocks[0]
        for old, new in [
            ("localhost 2587 ", f"localhost {msa.starttlsPort} "),
            ("localhost 2465 ", f"localhost {msa.implicitPort} "),
        ]:
            self.assertIn(old, script)
            script = script.replace(old, new)
        env = dict(
            os.environ,
            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        )
        out, err, code = yield utils.getProcessOutputAndValue(
            "/bin/bash", ["-ec", script], env=env, path=cwd
        )
        self.assertEqual((code, err), (0, b""), out.decode())
        summaries = [
            line
            for line in out.decode().splitlines()
            if line.startswith("selftest of ")
        ]
        self.assertEqual(
            summaries,
            [
                f"selftest of localhost:{msa.starttlsPort} (STARTTLS): "
                f"{len(ALL_PROBES) - 10} PASS, 0 WARN, 0 FAIL, 10 SKIP",
                f"selftest of localhost:{msa.implicitPort} (implicit TLS): "
                f"{len(ALL_PROBES) - 3} PASS, 0 WARN, 0 FAIL, 3 SKIP",
            ],
        )
        self.assertEqual(len(msa.outboxFiles()), 1)
