# -*- test-case-name: tests.test_selftest_pop3 -*-
"""
C{digipoort-msa-admin selftest --pop3} (L{msa.admin.pop3probes}) against
the daemon's POP3 listeners, started from a TOML file
(L{tests.e2e.RunningMSA}): every probe passes on the STLS and the implicit
listener, the clean RETR round trip reads a message delivered into the
real Maildir store and leaves it there; and against a naive POP3 server
(logins before TLS, CAPA offering them, lines pipelined behind STLS
answered inside TLS) the probes that concern those mistakes fail, with
what they saw; a throwaway Dovecot (L{tests.dovecotserver}) as a second
real server.

The self-test is blocking, so it runs in a thread while the servers run
in the test's reactor (L{tests.selftesting.SelftestMixin}).
"""

import hashlib
import io
import os
import subprocess

from twisted.internet import defer, protocol, reactor, ssl, threads
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from msa.admin.command import main
from msa.admin.probeclient import FAIL, PASS, SKIP
from msa.mailbox import MaildirStore
from tests.dovecotserver import ThrowawayDovecot, dovecotDirectory
from tests.e2e import RunningMSA, freePort
from tests.selftesting import SelftestMixin, makeCertificate
from tests.test_pop3_e2e import MESSAGE, auditEvents, deliver, messageFiles

PRE_TLS = ["pre-tls-err", "stls-injection", "no-auth-before-tls"]
POP3_PROBES = [
    "greeting",
    *PRE_TLS,
    "tls1.0-refused",
    "tls1.1-refused",
    "cipher-suites",
    "groups",
    "certificate",
    "clean-retr",
]


class POP3SelftestMixin(SelftestMixin):
    """
    The self-test with C{--pop3}, and its account options (no envelope).
    """

    def pop3Account(self, password: str = "wonderland") -> list[str]:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(password + "\n")
        return ["--user", "alice", "--password-file", path]

    def selftestPOP3(self, port: int, *options: str, host: str = "127.0.0.1"):
        return self.selftest(port, "--pop3", *options, account=False, host=host)


class MSAPassesTests(POP3SelftestMixin, unittest.TestCase):
    """
    The daemon's POP3 listeners pass every probe.
    """

    def setUp(self):
        self.msa = RunningMSA(self, pop3={})
        self.tlsOptions = ["--servername", "localhost", "--ca-file", self.msa.certFile]

    @defer.inlineCallbacks
    def test_stlsListener(self):
        """
        On the STLS listener every probe passes; the clean RETR round trip
        reads the message delivered (its size as LIST said) and leaves it
        in the mailbox; the summary line names POP3 and STLS.
        """
        uid = yield deliver(self.msa, "alice", MESSAGE)
        code, rows, output = yield self.selftestPOP3(
            self.msa.pop3Port, *self.tlsOptions, *self.pop3Account()
        )
        self.assertOutcome(rows, failing=[], probes=POP3_PROBES)
        self.assertEqual(code, 0)
        self.assertEqual(
            rows["pre-tls-err"][1], "USER, PASS, AUTH, APOP: each answered -ERR"
        )
        self.assertEqual(
            rows["stls-injection"][1],
            "the CAPA sent in plaintext behind STLS was discarded (QUIT after "
            "the handshake got the only reply)",
        )
        self.assertEqual(
            rows["no-auth-before-tls"][1],
            "neither USER nor SASL in CAPA (STLS offered)",
        )
        self.assertEqual(
            rows["clean-retr"][1],
            f"message 1 ({uid}): {len(MESSAGE)} octets as LIST said, CRLF lines; "
            "still there after QUIT without DELE",
        )
        self.assertIn(
            f"selftest of 127.0.0.1:{self.msa.pop3Port} (POP3, STLS): "
            f"{len(POP3_PROBES)} PASS, 0 WARN, 0 FAIL, 0 SKIP",
            output,
        )
        self.assertEqual(len(messageFiles(self.msa)), 1)
        [retrieved] = auditEvents(self.msa, "mailbox-retrieved")
        self.assertEqual((retrieved["account"], retrieved["uid"]), ("alice", uid))
        self.assertEqual(auditEvents(self.msa, "mailbox-deleted"), [])

    @defer.inlineCallbacks
    def test_implicitListener(self):
        """
        On the implicit-TLS listener the plaintext probes are N/A, the TLS
        ones pass, and with an empty mailbox the round trip is skipped
        after a successful login.
        """
        code, rows, _ = yield self.selftestPOP3(
            self.msa.pop3sPort, "--implicit", *self.tlsOptions, *self.pop3Account()
        )
        self.assertOutcome(
            rows, failing=[], skipped=[*PRE_TLS, "clean-retr"], probes=POP3_PROBES
        )
        for name in PRE_TLS:
            self.assertEqual(rows[name][1], "N/A: implicit TLS, no plaintext phase")
        self.assertEqual(
            rows["clean-retr"][1],
            "logged in as alice; the mailbox is empty, nothing to RETR",
        )
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password fails the round trip with the server's refusal;
        the message stays.
        """
        yield deliver(self.msa, "alice", MESSAGE)
        code, rows, _ = yield self.selftestPOP3(
            self.msa.pop3Port, *self.tlsOptions, *self.pop3Account("not it")
        )
        self.assertOutcome(rows, failing=["clean-retr"], probes=POP3_PROBES)
        self.assertEqual(
            rows["clean-retr"][1],
            "AUTH PLAIN answered -ERR [AUTH] Authentication failed",
        )
        self.assertEqual(code, 1)
        self.assertEqual(len(messageFiles(self.msa)), 1)

    @defer.inlineCallbacks
    def test_unverifiedCertificate(self):
        """
        Without the CA that issued the certificate no password is sent:
        the certificate probe fails and the round trip is skipped, saying
        why.
        """
        code, rows, _ = yield self.selftestPOP3(
            self.msa.pop3Port, "--servername", "localhost", *self.pop3Account()
        )
        self.assertOutcome(
            rows, failing=["certificate"], skipped=["clean-retr"], probes=POP3_PROBES
        )
        self.assertTrue(
            rows["clean-retr"][1].startswith(
                "no password sent: the certificate does not verify ("
            ),
            rows["clean-retr"][1],
        )
        self.assertEqual(code, 1)

    def test_usage(self):
        """
        C{--sender} and C{--rcpt} are SMTP's: with C{--pop3} they are a
        usage error (exit 2).
        """
        out, err = io.StringIO(), io.StringIO()
        argv = ["selftest", "127.0.0.1", "1", "--pop3", "--sender", "a@b.nl"]
        self.assertEqual(main(argv, stdout=out, stderr=err), 2)
        self.assertEqual(
            err.getvalue(),
            "digipoort-msa-admin: selftest: --sender and --rcpt are for SMTP, "
            "not --pop3\n",
        )


class NaivePOP3(LineReceiver):
    """
    A POP3 server with the mistakes the probes are for: USER and PASS
    answered +OK before TLS, CAPA offering USER and SASL PLAIN before TLS,
    and the lines read in one go with STLS handled after the handshake
    (CVE-2011-0411 class: Twisted's C{LineReceiver} goes on with the lines
    already read).
    """

    delimiter = b"\r\n"

    def connectionMade(self):
        self.sendLine(b"+OK naive POP3 ready")

    def lineReceived(self, line):
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"STLS":
            self.sendLine(b"+OK Begin TLS negotiation")
            self.transport.startTLS(self.factory.tlsOptions)
        elif verb == b"CAPA":
            self.sendLine(b"+OK Capability list follows")
            for capability in (b"USER", b"SASL PLAIN", b"STLS"):
                self.sendLine(capability)
            self.sendLine(b".")
        elif verb == b"QUIT":
            self.sendLine(b"+OK bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"+OK")


class ClosingPOP3(NaivePOP3):
    """
    A server that ends the connection when a client sends anything behind
    STLS (Dovecot fails the handshake on those bytes and disconnects).
    """

    def lineReceived(self, line):
        if line.upper() == b"STLS" and self._buffer:
            self.sendLine(b"+OK Begin TLS negotiation")
            self.transport.loseConnection()
            return
        NaivePOP3.lineReceived(self, line)


class NaiveServerTests(POP3SelftestMixin, unittest.TestCase):
    """
    The naive server fails the three probes before TLS, each saying what
    it saw; a server that disconnects when bytes follow STLS passes the
    injection probe.
    """

    def listen(self, server: type = NaivePOP3) -> None:
        certFile, keyFile, _ = makeCertificate(self.mktemp())
        with open(certFile) as c, open(keyFile) as k:
            certificate = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        factory = protocol.ServerFactory.forProtocol(server)
        factory.tlsOptions = certificate.options()
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.certFile = certFile

    @defer.inlineCallbacks
    def test_mistakesBeforeTLS(self):
        self.listen()
        code, rows, _ = yield self.selftestPOP3(
            self.port.getHost().port,
            "--servername",
            "localhost",
            "--ca-file",
            self.certFile,
        )
        self.assertEqual([rows[name][0] for name in PRE_TLS], [FAIL] * 3)
        self.assertEqual(
            rows["pre-tls-err"][1],
            "not refused before STLS (a password could go in the clear): "
            "USER -> +OK; PASS -> +OK; AUTH -> +OK; APOP -> +OK",
        )
        self.assertEqual(
            rows["stls-injection"][1],
            "after the handshake QUIT got +OK Capability list follows / USER / "
            "SASL PLAIN / STLS / . / +OK bye: the CAPA injected in plaintext was "
            "processed inside TLS (CVE-2011-0411 class)",
        )
        self.assertEqual(
            rows["no-auth-before-tls"][1],
            "CAPA before TLS offers USER, SASL PLAIN: passwords could go in the clear",
        )
        self.assertEqual(rows["greeting"], (PASS, "+OK naive POP3 ready"))
        self.assertEqual(rows["certificate"][0], PASS)
        self.assertEqual(rows["clean-retr"][0], SKIP)
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_closedAtInjection(self):
        """
        A server that drops the connection when bytes follow STLS answers
        nothing injected: the injection probe passes, saying so.
        """
        self.listen(ClosingPOP3)
        _, rows, _ = yield self.selftestPOP3(
            self.port.getHost().port, "--ca-file", self.certFile
        )
        status, detail = rows["stls-injection"]
        self.assertEqual(status, PASS, detail)
        self.assertTrue(
            detail.startswith("the server ended the connection at the handshake ("),
            detail,
        )
        self.assertTrue(
            detail.endswith(") rather than answer the injected CAPA"), detail
        )


class DovecotTests(POP3SelftestMixin, unittest.TestCase):
    """
    Dovecot 2.3 (L{tests.dovecotserver}), a second POP3 server, on a
    Maildir the MSA's store wrote: the probes before TLS and the round
    trip pass; its default TLS policy is wider than the MSA's.
    """

    @defer.inlineCallbacks
    def test_dovecot(self):
        directory = dovecotDirectory(self)
        certFile, keyFile, _ = makeCertificate(os.path.join(directory, "tls"))
        mailboxes = os.path.join(directory, "mailboxes")
        uid = yield MaildirStore(mailboxes).deliver(
            "alice",
            io.BytesIO(MESSAGE),
            len(MESSAGE),
            hashlib.sha256(MESSAGE).hexdigest(),
        )
        hashed = subprocess.run(
            ["doveadm", "pw", "-s", "BLF-CRYPT", "-r", "4", "-p", "wonderland"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # Not 127.0.0.1: Dovecot takes logins before STLS from a client
        # whose address is its own.
        dovecot = ThrowawayDovecot(
            os.path.join(directory, "dovecot"),
            mailboxes,
            certFile,
            keyFile,
            {"alice": hashed},
            freePort(),
            freePort(),
            address="127.0.0.2",
        )
        self.addCleanup(dovecot.stop)
        yield threads.deferToThread(dovecot.start)
        code, rows, _ = yield self.selftestPOP3(
            dovecot.pop3Port,
            "--servername",
            "localhost",
            "--ca-file",
            certFile,
            *self.pop3Account(),
            host="127.0.0.2",
        )
        self.assertOutcome(
            rows, failing=["cipher-suites", "groups"], probes=POP3_PROBES
        )
        # Closed or reset: which one the client sees depends on timing.
        self.assertRegex(
            rows["stls-injection"][1],
            r"^the server ended the connection at the handshake \(.+\) rather "
            r"than answer the injected CAPA$",
        )
        self.assertIn(
            "ECDHE-ECDSA-AES128-SHA (weak: CBC with SHA1)", rows["cipher-suites"][1]
        )
        # Dovecot's UIDL here is the file name (pop3_uidl_format = %f).
        fileName = f"{uid},S={len(MESSAGE)},H={hashlib.sha256(MESSAGE).hexdigest()}"
        self.assertEqual(
            rows["clean-retr"][1],
            f"message 1 ({fileName}): {len(MESSAGE)} octets as LIST said, CRLF "
            "lines; still there after QUIT without DELE",
        )
        self.assertEqual(code, 1)
        left = [
            name
            for sub in ("new", "cur")
            for name in os.listdir(os.path.join(mailboxes, "alice", sub))
        ]
        self.assertEqual(len(left), 1, left)
