# -*- test-case-name: tests.test_interop_more -*-
"""
More interoperability: three more independent SASL stacks talk to the whole
MSA (L{tests.e2e.RunningMSA}) over real loopback sockets with verified TLS.

  - msmtp (GNU SASL inside): a real submission, STARTTLS and implicit TLS,
    the certificate verified against C{localhost} (C{--tls-trust-file}).
  - the C{gsasl} command (GNU SASL) in SMTP mode: authentication only, over
    STARTTLS (it has no implicit-TLS mode), verified with C{--x509-ca-file}.
  - Cyrus libsasl2 through C{sasl-sample-client}: not an SMTP client, so the
    test speaks SMTP (smtplib over verified TLS, in a thread) and relays the
    server's challenges to it and its responses back.

Debian packages: C{msmtp gsasl sasl2-bin libsasl2-modules} (C{stdbuf} and
C{setsid} come with coreutils and util-linux, which are essential).

Every program runs without blocking the reactor: through L{runWithStdin}
(C{reactor.spawnProcess}) or, for the Cyrus relay, in a thread.
"""

import base64
import os
import re
import selectors
import shutil
import smtplib
import subprocess
import time

from twisted.internet import defer, protocol, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa.tls import ensureSelfSignedCertificate
from tests.e2e import MESSAGE, USERS, RunningMSA, requireProgram

FROM = "ik@mijnbedrijf.nl"
TO = "belastingdienst@overheid.nl"
PASSWORD = USERS["alice"]

#: msmtp's exit code when the server refuses the login (EX_NOPERM), and
#: when it cannot talk to the server at all, e.g. an untrusted certificate
#: (EX_UNAVAILABLE).
MSMTP_LOGIN_DENIED = 77
MSMTP_UNAVAILABLE = 69

QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)")
REFUSED = b"535 5.7.8 Authentication credentials invalid"
SUCCESS = b"235 2.7.0 Authentication successful"


class _Collect(protocol.ProcessProtocol):
    def __init__(self, deferred):
        self.deferred = deferred
        self.out = []
        self.err = []

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.deferred.callback(
            (b"".join(self.out), b"".join(self.err), reason.value.exitCode)
        )


def runWithStdin(executable: str, args: list[str], stdinPath: str = os.devnull):
    """
    Run a program with a file as its standard input, without blocking the
    reactor.

    @return: Deferred of (stdout, stderr, exit code).
    """
    d = defer.Deferred()
    with open(stdinPath, "rb") as stdin:
        reactor.spawnProcess(
            _Collect(d),
            executable,
            [executable, *args],
            env=os.environ,
            childFDs={0: stdin.fileno(), 1: "r", 2: "r"},
        )
    return d


def writeFile(testCase, data: bytes, suffix: str) -> str:
    path = os.path.abspath(testCase.mktemp()) + suffix
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def otherCertificate(testCase) -> str:
    """
    A self-signed certificate for C{localhost} that is not the MSA's.
    """
    certFile, _ = ensureSelfSignedCertificate(
        os.path.abspath(testCase.mktemp()), "localhost"
    )
    return certFile


def digestDirectives(text: bytes) -> dict[str, str]:
    return {
        k: (q if q else u)
        for k, q, u in re.findall(
            r'([a-z-]+)=(?:"([^"]*)"|([^,]*))', text.decode("utf-8")
        )
    }


def checkOutboxFile(testCase, data: bytes, message: bytes) -> None:
    """
    One C{Received:} header of three folded lines, then C{message} exactly.
    """
    testCase.assertTrue(data.startswith(b"Received: from "), data[:80])
    *header, body = data.split(b"\r\n", 3)
    for line in header[1:]:
        testCase.assertIn(line[:1], (b" ", b"\t"), header)
    testCase.assertIn(b" with ESMTPSA ", b"".join(header))
    testCase.assertEqual(body, message)


class MsmtpTests(unittest.TestCase):
    """
    msmtp 1.8 with GNU SASL and GnuTLS: a whole submission, the server's
    certificate verified for the name C{localhost}.
    """

    timeout = 30

    def setUp(self):
        self.msmtp = requireProgram(self, "msmtp")
        self.msa = RunningMSA(self)
        self.messageFile = writeFile(self, MESSAGE, ".eml")
        # An empty configuration: nothing from ~/.msmtprc or /etc/msmtprc.
        self.configFile = writeFile(self, b"", ".msmtprc")
        self.logFile = os.path.abspath(self.mktemp()) + ".log"

    def args(self, implicit, mechanism, password=PASSWORD, extra=(), trust=None):
        if implicit:
            mode = [f"--port={self.msa.implicitPort}", "--tls-starttls=off"]
        else:
            mode = [f"--port={self.msa.starttlsPort}", "--tls-starttls=on"]
        return [
            f"--file={self.configFile}",
            "--host=localhost",
            *mode,
            "--tls=on",
            f"--tls-trust-file={trust or self.msa.certFile}",
            f"--auth={mechanism}",
            "--user=alice",
            f"--passwordeval=echo '{password}'",
            f"--from={FROM}",
            f"--logfile={self.logFile}",
            "--debug",
            *extra,
            TO,
        ]

    def readLog(self) -> bytes:
        with open(self.logFile, "rb") as f:
            return f.read()

    @defer.inlineCallbacks
    def submit(self, implicit, mechanism, extra=("--set-date-header=off",)):
        out, err, code = yield runWithStdin(
            self.msmtp, self.args(implicit, mechanism, extra=extra), self.messageFile
        )
        transcript = out + err
        self.assertEqual(code, 0, transcript.decode("utf-8", "replace"))
        lines = transcript.splitlines()
        auth = [line for line in lines if line.startswith(b"--> AUTH ")]
        self.assertEqual(len(auth), 1, auth)
        self.assertEqual(auth[0].split()[2], mechanism.upper().encode("ascii"))
        self.assertIn(b"<-- " + SUCCESS, lines)
        # The TLS session was the one msmtp verified (no --tls-certcheck=off).
        self.assertIn(b"TLS session parameters:", transcript)
        log = self.readLog()
        self.assertIn(b"exitcode=EX_OK", log)
        self.assertIn(b"tls=on auth=on user=alice", log)
        (queueId,) = QUEUED.findall(log)
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(files, [queueId.decode("ascii") + ".eml"])
        return lines, self.msa.readOutbox(files[0])

    @defer.inlineCallbacks
    def checkExact(self, implicit, mechanism):
        lines, data = yield self.submit(implicit, mechanism)
        # With its Date header switched off msmtp sends the bytes unchanged.
        checkOutboxFile(self, data, MESSAGE)
        return lines

    @defer.inlineCallbacks
    def checkDigest(self, implicit):
        lines = yield self.checkExact(implicit, "digest-md5")
        index = lines.index(b"--> AUTH DIGEST-MD5")
        self.assertTrue(lines[index + 1].startswith(b"<-- 334 "))
        response = base64.b64decode(lines[index + 2][4:])
        directives = digestDirectives(response)
        self.assertEqual(directives["digest-uri"], "smtp/localhost")
        self.assertEqual(directives["username"], "alice")
        self.assertEqual(directives["charset"], "utf-8")
        self.assertNotIn("authzid", directives)
        # GNU SASL separates directives with ", ".
        self.assertIn(b'", nonce="', response)
        rspauth = base64.b64decode(lines[index + 3][8:])
        self.assertTrue(rspauth.startswith(b"rspauth="), lines[index + 3])
        # GNU SASL checked rspauth, then sent the empty response.
        self.assertEqual(lines[index + 4], b"--> ")
        self.assertEqual(lines[index + 5], b"<-- " + SUCCESS)

    def test_digestMD5StartTLS(self):
        return self.checkDigest(implicit=False)

    def test_digestMD5ImplicitTLS(self):
        return self.checkDigest(implicit=True)

    @defer.inlineCallbacks
    def checkPlain(self, implicit):
        lines = yield self.checkExact(implicit, "plain")
        (auth,) = [line for line in lines if line.startswith(b"--> AUTH ")]
        # An initial response on the AUTH line, no authzid.
        self.assertEqual(
            base64.b64decode(auth.split()[3]), b"\0alice\0" + PASSWORD.encode()
        )

    def test_plainStartTLS(self):
        return self.checkPlain(implicit=False)

    def test_plainImplicitTLS(self):
        return self.checkPlain(implicit=True)

    def test_loginStartTLS(self):
        return self.checkExact(False, "login")

    def test_loginImplicitTLS(self):
        return self.checkExact(True, "login")

    @defer.inlineCallbacks
    def checkScram(self, implicit):
        lines = yield self.checkExact(implicit, "scram-sha-256")
        index = lines.index(b"--> AUTH SCRAM-SHA-256")
        # No initial response: the server asks with an empty challenge.
        self.assertEqual(lines[index + 1], b"<-- 334 ")
        first = base64.b64decode(lines[index + 2][4:])
        self.assertTrue(first.startswith(b"n,,n=alice,r="), first)
        final = base64.b64decode(lines[index + 5][8:])
        self.assertTrue(final.startswith(b"v="), final)
        self.assertEqual(lines[index + 6], b"--> ")
        self.assertEqual(lines[index + 7], b"<-- " + SUCCESS)

    def test_scramSHA256StartTLS(self):
        return self.checkScram(implicit=False)

    def test_scramSHA256ImplicitTLS(self):
        return self.checkScram(implicit=True)

    @defer.inlineCallbacks
    def test_dateHeaderAdded(self):
        """
        By default msmtp adds a C{Date:} header to a message without one,
        in front of the message, and changes nothing else.
        """
        _, data = yield self.submit(False, "plain", extra=())
        checkOutboxFile(self, data, data.split(b"\r\n", 3)[3])
        date, body = data.split(b"\r\n", 4)[3:]
        self.assertRegex(
            date, rb"^Date: \w{3}, \d{1,2} \w{3} \d{4} [\d:]{8} [+-]\d{4}$"
        )
        self.assertEqual(body, MESSAGE)

    @defer.inlineCallbacks
    def checkWrongPassword(self, implicit, mechanism):
        out, err, code = yield runWithStdin(
            self.msmtp,
            self.args(implicit, mechanism, password="wrong"),
            self.messageFile,
        )
        transcript = out + err
        self.assertEqual(
            code, MSMTP_LOGIN_DENIED, transcript.decode("utf-8", "replace")
        )
        self.assertIn(b"<-- " + REFUSED, transcript)
        self.assertNotIn(b"MAIL FROM", transcript)
        self.assertIn(b"exitcode=EX_NOPERM", self.readLog())
        self.assertEqual(self.msa.outboxFiles(), [])

    def test_wrongPasswordDigestMD5(self):
        return self.checkWrongPassword(False, "digest-md5")

    def test_wrongPasswordPlain(self):
        return self.checkWrongPassword(True, "plain")

    def test_wrongPasswordScramSHA256(self):
        return self.checkWrongPassword(False, "scram-sha-256")

    @defer.inlineCallbacks
    def checkUntrusted(self, implicit):
        """
        The certificate really is verified: trusting another one, msmtp
        gives up before it authenticates.
        """
        args = self.args(implicit, "plain", trust=otherCertificate(self))
        out, err, code = yield runWithStdin(self.msmtp, args, self.messageFile)
        transcript = out + err
        self.assertEqual(code, MSMTP_UNAVAILABLE, transcript.decode("utf-8", "replace"))
        self.assertIn(b"msmtp: TLS certificate verification failed", transcript)
        self.assertNotIn(b"AUTH", transcript)
        self.assertEqual(self.msa.outboxFiles(), [])

    def test_untrustedStartTLS(self):
        return self.checkUntrusted(implicit=False)

    def test_untrustedImplicitTLS(self):
        return self.checkUntrusted(implicit=True)


class GsaslTests(unittest.TestCase):
    """
    The C{gsasl} command (GNU SASL 2.x): authentication only, then QUIT.
    It has no implicit-TLS mode (only C{--starttls}/C{--no-starttls}), so
    only the STARTTLS port.
    """

    timeout = 30

    def setUp(self):
        self.gsasl = requireProgram(self, "gsasl")
        self.msa = RunningMSA(self)

    def args(self, mechanism, password=PASSWORD, extra=(), trust=None):
        return [
            "--smtp",
            f"--connect=localhost:{self.msa.starttlsPort}",
            "--starttls",
            f"--x509-ca-file={trust or self.msa.certFile}",
            f"--mechanism={mechanism}",
            "--authentication-id=alice",
            f"--password={password}",
            # Answer the prompts for DIGEST-MD5's optional settings.
            "--quality-of-protection=qop-auth",
            "--realm=localhost",
            *extra,
        ]

    @defer.inlineCallbacks
    def authenticate(self, mechanism, extra=()):
        out, err, code = yield runWithStdin(
            self.gsasl, self.args(mechanism, extra=extra)
        )
        transcript = out + err
        self.assertEqual(code, 0, transcript.decode("utf-8", "replace"))
        lines = transcript.splitlines()
        self.assertIn(b"TLS X.509 Verification: The certificate is trusted. ", lines)
        self.assertIn(b"AUTH " + mechanism.encode("ascii"), lines)
        self.assertIn(SUCCESS, lines)
        self.assertIn(b"Client authentication finished (server trusted)...", lines)
        self.assertEqual(self.msa.outboxFiles(), [])
        return lines

    @defer.inlineCallbacks
    def test_digestMD5(self):
        lines = yield self.authenticate("DIGEST-MD5")
        index = lines.index(b"AUTH DIGEST-MD5")
        self.assertTrue(lines[index + 1].startswith(b"334 "))
        directives = digestDirectives(base64.b64decode(lines[index + 2]))
        self.assertEqual(directives["digest-uri"], "smtp/localhost")
        self.assertEqual(directives["qop"], "auth")
        rspauth = base64.b64decode(lines[index + 3][4:])
        self.assertTrue(rspauth.startswith(b"rspauth="), lines[index + 3])

    @defer.inlineCallbacks
    def test_digestMD5EmptyAuthzid(self):
        """
        C{gsasl -z ''} sends C{authzid=""}, which means none (RFC 2831;
        issue 18, defect 13): the login succeeds as alice, GNU SASL checks
        the rspauth, and no failed login is logged.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        lines = yield self.authenticate("DIGEST-MD5", extra=["-z", ""])
        index = lines.index(b"AUTH DIGEST-MD5")
        directives = digestDirectives(base64.b64decode(lines[index + 2]))
        self.assertEqual(directives["authzid"], "")
        self.assertEqual(directives["username"], "alice")
        self.assertEqual(lines[index + 4], b"")
        self.assertEqual(lines[index + 5], SUCCESS)
        failures = [e for e in events if e.get("outcome") == "failure"]
        self.assertEqual(failures, [])

    @defer.inlineCallbacks
    def test_scramSHA256(self):
        """
        SCRAM-SHA-256 without channel binding (C{--no-cb}): GNU SASL 2.2.0's
        command fails on its own before it sends its client-first message
        when it has TLS channel-binding data.
        """
        lines = yield self.authenticate("SCRAM-SHA-256", extra=["--no-cb"])
        index = lines.index(b"AUTH SCRAM-SHA-256")
        self.assertEqual(lines[index + 1], b"334 ")
        first = base64.b64decode(lines[index + 2])
        self.assertTrue(first.startswith(b"n,,n=alice,r="), first)

    def test_plain(self):
        return self.authenticate("PLAIN")

    def test_login(self):
        return self.authenticate("LOGIN")

    @defer.inlineCallbacks
    def checkWrongPassword(self, mechanism):
        out, err, code = yield runWithStdin(
            self.gsasl, self.args(mechanism, password="wrong", extra=["--no-cb"])
        )
        transcript = out + err
        self.assertEqual(code, 1, transcript.decode("utf-8", "replace"))
        self.assertIn(REFUSED, transcript.splitlines())
        self.assertIn(b"gsasl: server error", transcript)
        self.assertEqual(self.msa.outboxFiles(), [])

    def test_wrongPasswordDigestMD5(self):
        return self.checkWrongPassword("DIGEST-MD5")

    def test_wrongPasswordScramSHA256(self):
        return self.checkWrongPassword("SCRAM-SHA-256")

    def test_wrongPasswordPlain(self):
        return self.checkWrongPassword("PLAIN")

    @defer.inlineCallbacks
    def test_untrusted(self):
        args = self.args("PLAIN", trust=otherCertificate(self))
        out, err, code = yield runWithStdin(self.gsasl, args)
        transcript = out + err
        self.assertEqual(code, 1, transcript.decode("utf-8", "replace"))
        self.assertIn(b"Error in the certificate verification", transcript)
        self.assertNotIn(b"AUTH", transcript)


class CyrusSampleClient:
    """
    C{sasl-sample-client} as the SASL engine of an SMTP exchange (blocking:
    use in a thread).

    It reads C{S: <base64>} lines (first the server's mechanism list, then
    each challenge) and prints C{C: <base64>} lines (first the mechanism
    name, a NUL and any initial response, then each response), and asks for
    the password with C{getpass}, which reads standard input and prompts on
    standard error when there is no controlling terminal (C{setsid}).  Its
    standard output is a pipe, so C{stdbuf -oL} makes it line-buffered.
    """

    def __init__(
        self,
        mechanism: str,
        password: str,
        authzid: str | None = None,
        timeout: float = 10.0,
        user: str = "alice",
    ):
        self.password = password
        self.deadline = time.monotonic() + timeout
        self.process = subprocess.Popen(
            [
                shutil.which("stdbuf"),
                "-oL",
                shutil.which("sasl-sample-client"),
                "-s",
                "smtp",
                "-n",
                "localhost",
                "-m",
                mechanism,
                "-a",
                user,
                *(["-u", authzid] if authzid else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.process.stdout, selectors.EVENT_READ)
        self.selector.register(self.process.stderr, selectors.EVENT_READ)
        self.out = b""
        self.err = b""
        self.prompts = 0
        self.passwordsGiven = 0

    def send(self, data: bytes) -> None:
        self.process.stdin.write(b"S: " + base64.b64encode(data) + b"\n")
        self.process.stdin.flush()

    def readLine(self) -> bytes:
        """
        The next line the client prints, giving it the password whenever
        it asks.
        """
        while b"\n" not in self.out:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"sasl-sample-client hangs: {self.transcript()}")
            for key, _ in self.selector.select(remaining):
                chunk = os.read(key.fd, 4096)
                if not chunk:
                    self.selector.unregister(key.fileobj)
                    if not self.selector.get_map():
                        raise AssertionError(
                            f"sasl-sample-client ended: {self.transcript()}"
                        )
                elif key.fileobj is self.process.stdout:
                    self.out += chunk
                else:
                    self.err += chunk
                    self.prompts = self.err.count(b"Password: ")
                    while self.passwordsGiven < self.prompts:
                        self.process.stdin.write(self.password.encode() + b"\n")
                        self.process.stdin.flush()
                        self.passwordsGiven += 1
        line, self.out = self.out.split(b"\n", 1)
        return line

    def receive(self) -> bytes:
        """
        The client's next C{C:} line, decoded.
        """
        while True:
            line = self.readLine()
            if line.startswith(b"C: "):
                return base64.b64decode(line[3:])

    def waitComplete(self) -> None:
        while self.readLine() != b"Negotiation complete":
            pass

    def transcript(self) -> str:
        return (self.out + self.err).decode("utf-8", "replace")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for f in (self.process.stdin, self.process.stdout, self.process.stderr):
            f.close()
        self.selector.close()


class CyrusSASLTests(unittest.TestCase):
    """
    Cyrus libsasl2's client mechanisms (C{sasl-sample-client}) relayed over
    an smtplib session with STARTTLS and a verified certificate.
    """

    timeout = 30

    def setUp(self):
        requireProgram(self, "sasl-sample-client")
        requireProgram(self, "stdbuf")
        self.msa = RunningMSA(self)

    def session(
        self,
        mechanism: str,
        password: str,
        authzid: str | None = None,
        user: str = "alice",
    ):
        """
        Authenticate; on success submit L{MESSAGE}.

        @return: the SMTP exchange as (direction, bytes) pairs, the final
            reply code, the queue id or C{None}, and the number of times the
            client asked for the password.
        """
        exchange = []
        smtp = smtplib.SMTP("localhost", self.msa.starttlsPort, timeout=10)
        client = None
        try:
            smtp.ehlo()
            code, _ = smtp.starttls(context=self.msa.clientContext())
            assert code == 220, code
            smtp.ehlo()
            advertised = smtp.esmtp_features["auth"].split()
            assert mechanism in advertised, advertised
            client = CyrusSampleClient(mechanism, password, authzid, user=user)
            client.send(" ".join(advertised).encode("ascii"))
            start = client.receive()
            name, _, initial = start.partition(b"\0")
            assert name == mechanism.encode("ascii"), start
            command = mechanism
            if b"\0" in start:
                command += " " + (base64.b64encode(initial).decode() or "=")
                exchange.append(("C", initial))
            code, reply = smtp.docmd("AUTH", command)
            while code == 334:
                challenge = base64.b64decode(reply)
                exchange.append(("S", challenge))
                client.send(challenge)
                response = client.receive()
                exchange.append(("C", response))
                code, reply = smtp.docmd(base64.b64encode(response).decode())
            exchange.append((code, reply))
            if code != 235:
                return exchange, code, None, client.prompts
            # The client accepted the server's last word (rspauth, v=).
            client.waitComplete()
            code, reply = smtp.mail(FROM)
            assert code == 250, (code, reply)
            code, reply = smtp.rcpt(TO)
            assert code == 250, (code, reply)
            code, reply = smtp.data(MESSAGE)
            assert code == 250, (code, reply)
            smtp.quit()
            match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", reply)
            assert match, reply
            return exchange, 235, match.group(1).decode("ascii"), client.prompts
        finally:
            if client is not None:
                client.close()
            smtp.close()

    @defer.inlineCallbacks
    def submit(self, mechanism, authzid=None):
        exchange, code, queueId, prompts = yield threads.deferToThread(
            self.session, mechanism, PASSWORD, authzid
        )
        self.assertEqual(code, 235, exchange)
        self.assertEqual(prompts, 1)
        files = yield self.msa.waitForOutbox(1)
        self.assertEqual(files, [f"{queueId}.eml"])
        checkOutboxFile(self, self.msa.readOutbox(files[0]), MESSAGE)
        return exchange

    @defer.inlineCallbacks
    def test_digestMD5(self):
        exchange = yield self.submit("DIGEST-MD5")
        (kind, challenge), (_, response), (_, rspauth), (_, empty), final = exchange
        self.assertEqual(kind, "S")
        self.assertIn(b'realm="localhost"', challenge)
        directives = digestDirectives(response)
        self.assertEqual(directives["username"], "alice")
        self.assertEqual(directives["digest-uri"], "smtp/localhost")
        self.assertEqual(directives["maxbuf"], "2048")
        self.assertNotIn("charset", directives)
        self.assertNotIn("authzid", directives)
        self.assertTrue(rspauth.startswith(b"rspauth="), rspauth)
        self.assertEqual(empty, b"")
        self.assertEqual(final, (235, b"2.7.0 Authentication successful"))

    @defer.inlineCallbacks
    def test_scramSHA256(self):
        exchange = yield self.submit("SCRAM-SHA-256")
        (kind, first), (_, serverFirst), (_, final), (_, verifier), (_, empty) = (
            exchange[:5]
        )
        self.assertEqual(kind, "C")
        # An initial response on the AUTH line; no channel binding.
        self.assertTrue(first.startswith(b"n,,n=alice,r="), first)
        self.assertTrue(serverFirst.startswith(b"r="), serverFirst)
        self.assertTrue(final.startswith(b"c=biws,r="), final)
        self.assertTrue(verifier.startswith(b"v="), verifier)
        self.assertEqual(empty, b"")
        self.assertEqual(exchange[5], (235, b"2.7.0 Authentication successful"))

    @defer.inlineCallbacks
    def test_plain(self):
        exchange = yield self.submit("PLAIN")
        self.assertEqual(exchange[0], ("C", b"\0alice\0" + PASSWORD.encode()))
        self.assertEqual(exchange[1], (235, b"2.7.0 Authentication successful"))

    @defer.inlineCallbacks
    def test_digestMD5OwnAuthzid(self):
        """
        Asked for an authorization id equal to the user name (C{-u alice}),
        Cyrus leaves it out of its DIGEST-MD5 response (unlike PLAIN).
        """
        exchange = yield self.submit("DIGEST-MD5", authzid="alice")
        directives = digestDirectives(exchange[1][1])
        self.assertNotIn("authzid", directives)
        self.assertEqual(exchange[-1], (235, b"2.7.0 Authentication successful"))

    @defer.inlineCallbacks
    def test_plainOwnAuthzid(self):
        exchange = yield self.submit("PLAIN", authzid="alice")
        self.assertEqual(exchange[0], ("C", b"alice\0alice\0" + PASSWORD.encode()))
        self.assertEqual(exchange[-1], (235, b"2.7.0 Authentication successful"))

    @defer.inlineCallbacks
    def checkRefused(self, mechanism, password=PASSWORD, authzid=None):
        exchange, code, queueId, prompts = yield threads.deferToThread(
            self.session, mechanism, password, authzid
        )
        self.assertEqual(exchange[-1], (535, REFUSED[4:]))
        self.assertEqual(prompts, 1)
        self.assertIsNone(queueId)
        self.assertEqual(self.msa.outboxFiles(), [])
        return exchange

    def checkWrongPassword(self, mechanism):
        return self.checkRefused(mechanism, password="wrong")

    @defer.inlineCallbacks
    def test_digestMD5OtherAuthzid(self):
        """
        Acting for another account (authzid C{bob}) is refused, with the
        right password.
        """
        exchange = yield self.checkRefused("DIGEST-MD5", authzid="bob")
        self.assertEqual(digestDirectives(exchange[1][1])["authzid"], "bob")

    @defer.inlineCallbacks
    def test_plainOtherAuthzid(self):
        exchange = yield self.checkRefused("PLAIN", authzid="bob")
        self.assertEqual(exchange[0], ("C", b"bob\0alice\0" + PASSWORD.encode()))

    def test_wrongPasswordDigestMD5(self):
        return self.checkWrongPassword("DIGEST-MD5")

    def test_wrongPasswordScramSHA256(self):
        return self.checkWrongPassword("SCRAM-SHA-256")
