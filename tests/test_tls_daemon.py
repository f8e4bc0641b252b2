# -*- test-case-name: tests.test_tls_daemon -*-
"""
TLS of the assembled daemon (issue 9, items 4, 6, 7 and 11), each shown
over real sockets against L{tests.e2e.RunningMSA}:

  - clients offering ALPN (Python's ssl, C{openssl s_client -alpn}) get
    through the handshake on both listeners, and a core that speaks ALPN
    still gets the relay's mail;
  - with C{client_certificates = "request"}, a certificate from a foreign
    CA leaves the connection up and unidentified (password login works,
    EXTERNAL does not), and is logged; C{require} still refuses it; the
    CertificateRequest names the configured client CAs;
  - TLS 1.2 handshake signatures with SHA-224 or SHA-1 are refused;
  - C{[tls] ocsp_response} is stapled byte for byte, re-read when it
    changes, and a missing file stops the start naming the key;
  - C{[tls] minimum_version} accepts only TLSv1_2 and TLSv1_3.
"""

import datetime
import os
import select
import smtplib
import socket
import ssl
import subprocess
import sys

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from OpenSSL import SSL
from twisted.internet import defer, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa import _compat, tls
from msa.accounts.clientcert import certificateIdentities
from msa.service.config import ConfigError, loadConfig, writeConfig
from msa.tls import ensureSelfSignedCertificate
from tests.e2e import MESSAGE, AiosmtpdCore, RunningMSA, fixtureAccount, requireProgram
from tests.test_clientcert import ClientPKI
from tests.test_e2e import RECIPIENT, SENDER, submit
from tests.test_tls import makeChain

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def readReply(sock: socket.socket) -> bytes:
    """
    Read one (possibly multi-line) SMTP reply from a plain socket, byte by
    byte so that nothing of a following TLS handshake is consumed.
    """
    data = b""
    while True:
        line = b""
        while not line.endswith(b"\r\n"):
            byte = sock.recv(1)
            if not byte:
                raise ConnectionError(f"closed after {data + line!r}")
            line += byte
        data += line
        if line[3:4] == b" ":
            return data


def pyOpenSSLHandshake(
    port: int,
    starttls: bool,
    configure=lambda context: None,
    prepare=lambda connection: None,
):
    """
    A blocking pyOpenSSL client handshake (run it in a thread), after
    EHLO and STARTTLS when C{starttls}.  C{configure(context)} and
    C{prepare(connection)} set them up before the handshake.

    @return: the L{SSL.Connection} after the handshake (its socket closed).
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    configure(context)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if starttls:
            readReply(sock)
            sock.sendall(b"EHLO mijnbedrijf.nl\r\n")
            readReply(sock)
            sock.sendall(b"STARTTLS\r\n")
            assert readReply(sock).startswith(b"220 ")
        conn = SSL.Connection(context, sock)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"localhost")
        prepare(conn)
        while True:
            # The socket has a timeout, so pyOpenSSL does not block.
            try:
                conn.do_handshake()
                return conn
            except SSL.WantReadError:
                if not select.select([sock], [], [], 10)[0]:
                    raise TimeoutError("no TLS handshake reply") from None
    finally:
        sock.close()


def sClient(args: list[str], stdin: bytes = b"") -> tuple[int, str]:
    """
    Run C{openssl s_client} (blocking; run it in a thread).

    @return: exit code and the combined output.
    """
    result = subprocess.run(
        ["openssl", "s_client", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
    )
    return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")


def smtplibSession(port, context, implicit, actions):
    """
    A blocking smtplib session over TLS; C{actions(client)} does the work.
    """
    if implicit:
        client = smtplib.SMTP_SSL("localhost", port, context=context, timeout=10)
    else:
        client = smtplib.SMTP("localhost", port, timeout=10)
    try:
        client.ehlo("mijnbedrijf.nl")
        if not implicit:
            client.starttls(context=context)
            client.ehlo("mijnbedrijf.nl")
        return actions(client)
    finally:
        client.close()


def tryExternal(client):
    """
    AUTH EXTERNAL as the certificate's own account: the reply, and whether
    EXTERNAL was advertised.
    """
    offered = "EXTERNAL" in client.esmtp_features.get("auth", "").split()
    return client.docmd("AUTH", "EXTERNAL ="), offered


class ALPNTests(unittest.TestCase):
    """
    Twisted 26.10 answers every ALPN offer with nothing, which OpenSSL
    turns into alert 80 (internal error); the MSA must ignore ALPN instead
    (RFC 7301 3.2), as these tests show with real clients.
    """

    def setUp(self):
        self.msa = RunningMSA(self)

    @defer.inlineCallbacks
    def test_pythonClientOffersALPN(self):
        for port, implicit in (
            (self.msa.starttlsPort, False),
            (self.msa.implicitPort, True),
        ):
            context = self.msa.clientContext()
            context.set_alpn_protocols(["smtp", "h2"])
            result = yield threads.deferToThread(
                smtplibSession,
                port,
                context,
                implicit,
                lambda client: (
                    client.ehlo("mijnbedrijf.nl")[0],
                    client.sock.selected_alpn_protocol(),
                ),
            )
            self.assertEqual(result, (250, None))
            code, text = yield threads.deferToThread(
                submit, port=port, context=context, implicit=implicit
            )
            self.assertEqual(code, 250, text)
        files = yield self.msa.waitForOutbox(2)
        self.assertEqual(len(files), 2)

    @defer.inlineCallbacks
    def test_opensslClientOffersALPN(self):
        requireProgram(self, "openssl")
        common = ["-alpn", "smtp", "-crlf", "-ign_eof", "-CAfile", self.msa.certFile]
        for args in (
            ["-connect", f"127.0.0.1:{self.msa.implicitPort}"],
            ["-connect", f"127.0.0.1:{self.msa.starttlsPort}", "-starttls", "smtp"],
        ):
            code, output = yield threads.deferToThread(
                sClient, args + common, b"EHLO mijnbedrijf.nl\r\nQUIT\r\n"
            )
            self.assertEqual(code, 0, output)
            self.assertIn("No ALPN negotiated", output)
            self.assertIn("Verify return code: 0 (ok)", output)
            self.assertIn("\n250-localhost\r\n", output)
            self.assertIn("\n221 2.0.0 Bye\r\n", output)
            self.assertNotIn("alert", output)

    @defer.inlineCallbacks
    def test_coreSpeaksALPN(self):
        """
        A core whose TLS server selects ALPN protocols still gets the
        relay's mail over STARTTLS.
        """
        core = AiosmtpdCore(self, alpnProtocols=["smtp", "h2"])
        msa = RunningMSA(self, relay=core.relayConfig())
        code, text = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250, text)
        [(sender, recipients, data, overTLS)] = yield core.waitForMessages(1)
        self.assertEqual((sender, recipients, overTLS), (SENDER, [RECIPIENT], True))
        self.assertTrue(data.endswith(MESSAGE))


class RequestedCertificateTests(unittest.TestCase):
    """
    C{client_certificates = "request"} with a certificate the MSA does not
    trust: the client is not turned away, it is just not identified by it.
    """

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.trusted = ClientPKI(os.path.join(base, "trusted"))
        self.foreign = ClientPKI(os.path.join(base, "foreign"), "Foreign Client CA")
        self.foreignCert, self.certFile, self.keyFile = self.foreign.issue(
            "foreign", "NTRNL-99999999"
        )
        # Another trusted CA, so that the list of names has two entries.
        self.second = ClientPKI(os.path.join(base, "second"), "Second Client CA")
        self.caBundle = os.path.join(base, "client-cas.pem")
        with open(self.caBundle, "wb") as f:
            for pki in (self.trusted, self.second):
                f.write(pki.ca.public_bytes(serialization.Encoding.PEM))
        [fingerprint, _] = certificateIdentities(self.foreignCert)
        # The account even lists the foreign certificate: an unverified
        # certificate must still identify no one.
        self.account = attrs.evolve(
            fixtureAccount("foreign", "foreign pw", mechanisms=("PLAIN", "EXTERNAL")),
            extra={"senders": ["@mijnbedrijf.nl"], "certificates": [fingerprint]},
        )
        self.events = []

    def start(self, mode):
        msa = RunningMSA(
            self,
            tls={"client_certificates": mode, "client_ca": self.caBundle},
            extraAccounts={"foreign": self.account},
        )
        # Added after the start, so not behind the daemon's level filter:
        # the DEBUG "tls" events are seen too.
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return msa

    def context(self, msa):
        context = msa.clientContext()
        context.load_cert_chain(self.certFile, self.keyFile)
        return context

    @defer.inlineCallbacks
    def test_foreignCertificateThenPassword(self):
        msa = self.start("request")
        for port, implicit in ((msa.starttlsPort, False), (msa.implicitPort, True)):
            code, text = yield threads.deferToThread(
                submit,
                port=port,
                context=self.context(msa),
                implicit=implicit,
                user="foreign",
                password="foreign pw",
            )
            self.assertEqual(code, 250, text)
            reply, offered = yield threads.deferToThread(
                smtplibSession, port, self.context(msa), implicit, tryExternal
            )
            # EXTERNAL is offered only with a verified certificate, and
            # asking for it anyway is refused without counting as a login.
            self.assertFalse(offered)
            self.assertEqual(
                reply, (504, b"5.5.4 EXTERNAL needs a verified client certificate")
            )
        files = yield msa.waitForOutbox(2)
        self.assertEqual(len(files), 2)
        logged = [
            e for e in self.events if e.get("event") == "client_certificate_unverified"
        ]
        # One per connection: two submissions and two EXTERNAL attempts.
        self.assertEqual(len(logged), 4)
        self.assertEqual(
            {(e["reason"], e["subject"], e["depth"]) for e in logged},
            {
                (
                    "unable to get local issuer certificate",
                    self.foreignCert.subject.rfc4514_string(),
                    0,
                )
            },
        )
        self.assertEqual({e["client"] for e in logged}, {"127.0.0.1"})
        sessions = {e["session"] for e in self.events if e.get("event") == "tls"}
        self.assertEqual(len({e["session"] for e in logged}), 4)
        self.assertTrue({e["session"] for e in logged} <= sessions)
        self.assertEqual(logged[0]["log_level"].name, "warn")

    @defer.inlineCallbacks
    def test_foreignCertificateWithRequire(self):
        msa = self.start("require")
        for port, implicit in ((msa.starttlsPort, False), (msa.implicitPort, True)):
            yield self.assertFailure(
                threads.deferToThread(
                    smtplibSession,
                    port,
                    self.context(msa),
                    implicit,
                    lambda client: client.noop(),
                ),
                ssl.SSLError,
                smtplib.SMTPServerDisconnected,
                ConnectionResetError,
            )

    @defer.inlineCallbacks
    def test_acceptableCANames(self):
        """
        The CertificateRequest names the configured client CAs (TLS 1.3 on
        the implicit port, TLS 1.2 after STARTTLS).
        """
        msa = self.start("request")
        expected = [
            self.trusted.ca.subject.public_bytes(),
            self.second.ca.subject.public_bytes(),
        ]
        for port, starttls, version in (
            (msa.implicitPort, False, SSL.TLS1_3_VERSION),
            (msa.starttlsPort, True, SSL.TLS1_2_VERSION),
        ):

            def configure(context, version=version):
                context.set_max_proto_version(version)

            conn = yield threads.deferToThread(
                pyOpenSSLHandshake, port, starttls, configure
            )
            names = [n.der() for n in conn.get_client_ca_list()]
            self.assertEqual(names, expected)

    @defer.inlineCallbacks
    def test_acceptableCANamesOpenSSL(self):
        requireProgram(self, "openssl")
        msa = self.start("request")
        code, output = yield threads.deferToThread(
            sClient,
            ["-connect", f"127.0.0.1:{msa.starttlsPort}", "-starttls", "smtp"],
            b"QUIT\r\n",
        )
        self.assertEqual(code, 0, output)
        section = output.split("Acceptable client certificate CA names\n")[1]
        self.assertEqual(
            section.splitlines()[:2], ["CN = Test Client CA", "CN = Second Client CA"]
        )


class SignatureAlgorithmTests(unittest.TestCase):
    """
    NCSC: SHA-224 and SHA-1 handshake signatures are phased out.
    """

    def test_privateAPIPresent(self):
        """
        The OpenSSL functions pyOpenSSL has no API for are still in the
        binding; without them the policy silently narrows or weakens.
        """
        missing = [
            n for n in _compat.PRIVATE_FUNCTIONS if _compat.opensslFunction(n) is None
        ]
        self.assertEqual(missing, [], "pyOpenSSL's binding lost these functions")

    @defer.inlineCallbacks
    def test_tls12Sigalgs(self):
        requireProgram(self, "openssl")
        msa = RunningMSA(self)
        results = {}
        for sigalg in ("ECDSA+SHA224", "ECDSA+SHA1", "ECDSA+SHA256", "ECDSA+SHA384"):
            results[sigalg] = yield threads.deferToThread(
                sClient,
                [
                    "-connect",
                    f"127.0.0.1:{msa.implicitPort}",
                    "-tls1_2",
                    "-sigalgs",
                    sigalg,
                    # The client itself would refuse SHA-1 at its level 1.
                    "-cipher",
                    "ECDHE-ECDSA-AES128-GCM-SHA256:@SECLEVEL=0",
                    "-CAfile",
                    msa.certFile,
                ],
                b"",
            )
        for sigalg in ("ECDSA+SHA224", "ECDSA+SHA1"):
            code, output = results[sigalg]
            self.assertNotEqual(code, 0, output)
            self.assertIn("alert handshake failure", output)
            self.assertIn("Cipher is (NONE)", output)
        for sigalg in ("ECDSA+SHA256", "ECDSA+SHA384"):
            code, output = results[sigalg]
            self.assertEqual(code, 0, output)
            self.assertIn(
                "New, TLSv1.2, Cipher is ECDHE-ECDSA-AES128-GCM-SHA256", output
            )
            self.assertIn(f"Peer signing digest: {sigalg[6:]}", output)


def ocspResponse(certFile: str, issuer, issuerKey, thisUpdate) -> bytes:
    """
    A DER OCSP response "good" for the leaf in C{certFile}, signed by its
    issuer (the CA itself answering).
    """
    with open(certFile, "rb") as f:
        cert = x509.load_pem_x509_certificates(f.read())[0]
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=issuer,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=thisUpdate,
            next_update=thisUpdate + datetime.timedelta(days=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
    )
    return builder.sign(issuerKey, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )


def stapled(port: int, starttls: bool) -> bytes:
    """
    The OCSP response a client asking for one gets (blocking).
    """
    received = []

    def check(conn, data, _):
        received.append(data)
        return True

    pyOpenSSLHandshake(
        port,
        starttls,
        lambda context: context.set_ocsp_client_callback(check),
        lambda conn: conn.request_ocsp(),
    )
    [data] = received
    return data


class OCSPStaplingTests(unittest.TestCase):
    """
    OCSP stapling for a certificate from a CA (root, intermediate, leaf).
    OpenSSL matches a response to the certificate through the issuer in
    the chain, so a self-signed certificate gets nothing stapled.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.paths, self.issuerKey, self.issuer = makeChain(self.directory)
        self.certFile, self.keyFile = self.paths["full"], self.paths["key"]
        self.ocspFile = os.path.join(self.directory, "ocsp.der")
        self.now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self.response = self.makeResponse(self.now)
        with open(self.ocspFile, "wb") as f:
            f.write(self.response)

    def otherChain(self):
        directory = os.path.join(self.directory, "other")
        os.makedirs(directory)
        return makeChain(directory)

    def makeResponse(self, thisUpdate) -> bytes:
        return ocspResponse(self.certFile, self.issuer, self.issuerKey, thisUpdate)

    def start(self, **extra):
        return RunningMSA(
            self, tls={"certificate": self.certFile, "key": self.keyFile, **extra}
        )

    @defer.inlineCallbacks
    def test_stapledAndReread(self):
        msa = self.start(ocsp_response=self.ocspFile)
        for port, starttls in ((msa.implicitPort, False), (msa.starttlsPort, True)):
            data = yield threads.deferToThread(stapled, port, starttls)
            self.assertEqual(data, self.response)
        newer = self.makeResponse(self.now + datetime.timedelta(hours=1))
        self.assertNotEqual(newer, self.response)
        with open(self.ocspFile, "wb") as f:
            f.write(newer)
        stat = os.stat(self.ocspFile)
        os.utime(self.ocspFile, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        data = yield threads.deferToThread(stapled, msa.implicitPort, False)
        self.assertEqual(data, newer)

    @defer.inlineCallbacks
    def test_badUpdateKeepsLastResponse(self):
        """
        A file replaced by something unusable (here a response for another
        certificate, then garbage) is logged once; the last good response
        stays stapled.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        msa = self.start(ocsp_response=self.ocspFile)
        other = self.otherChain()
        stat = os.stat(self.ocspFile)
        for step, content in enumerate(
            [
                ocspResponse(other[0]["full"], other[2], other[1], self.now),
                b"not DER",
            ]
        ):
            with open(self.ocspFile, "wb") as f:
                f.write(content)
            os.utime(self.ocspFile, ns=(stat.st_atime_ns, stat.st_mtime_ns + step + 1))
            for _ in range(2):
                data = yield threads.deferToThread(stapled, msa.implicitPort, False)
                self.assertEqual(data, self.response)
        warnings = [
            e["log_format"]
            for e in events
            if "cannot re-read" in e.get("log_format", "")
        ]
        self.assertEqual(len(warnings), 1)

    def test_responseForAnotherCertificate(self):
        other = self.otherChain()
        with open(self.ocspFile, "wb") as f:
            f.write(ocspResponse(other[0]["full"], other[2], other[1], self.now))
        error = self.assertRaises(
            tls.TLSConfigurationError,
            self.start,
            ocsp_response=self.ocspFile,
        )
        self.assertIn("the OCSP response is for serial number", str(error))
        self.assertIn(self.ocspFile, str(error))

    @defer.inlineCallbacks
    def test_opensslStatus(self):
        requireProgram(self, "openssl")
        msa = self.start(ocsp_response=self.ocspFile)
        code, output = yield threads.deferToThread(
            sClient,
            [
                "-connect",
                f"127.0.0.1:{msa.implicitPort}",
                "-status",
                "-CAfile",
                self.paths["root"],
            ],
            b"",
        )
        self.assertEqual(code, 0, output)
        self.assertIn("OCSP Response Status: successful (0x0)", output)
        self.assertIn("Cert Status: good", output)

    @defer.inlineCallbacks
    def test_nothingStapledWithoutKey(self):
        msa = self.start()
        data = yield threads.deferToThread(stapled, msa.implicitPort, False)
        self.assertEqual(data, b"")

    def test_missingFile(self):
        path = os.path.join(self.directory, "msa.toml")
        writeConfig(path, {"tls": {"ocsp_response": "nowhere.der"}})
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(
            str(error),
            f"{path}: [tls] ocsp_response: cannot read "
            f"{os.path.join(self.directory, 'nowhere.der')}: No such file or directory",
        )

    def test_notAnOCSPResponse(self):
        path = os.path.join(self.directory, "msa.toml")
        writeConfig(path, {"tls": {"ocsp_response": self.certFile}})
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertIn(
            f"{path}: [tls] ocsp_response: {self.certFile}: not a DER OCSP response",
            str(error),
        )


def runTwistd(testCase, path: str) -> str:
    """
    Start C{twistd -n digipoort-msa --config path}, expecting it to stop at
    once with exit code 1 and one line of error, no traceback.

    @return: that line.
    """
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "digipoort-msa", "--config", path],
        capture_output=True,
        timeout=60,
        cwd=os.path.dirname(path),
    )
    output = (result.stdout + result.stderr).decode()
    testCase.assertEqual(result.returncode, 1, output)
    testCase.assertNotIn("Traceback", output)
    lines = output.strip().splitlines()
    testCase.assertEqual(len(lines), 1, output)
    return lines[0]


class MinimumVersionTests(unittest.TestCase):
    def write(self, value: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "msa.toml")
        writeConfig(
            path,
            {
                "server": {
                    "state_dir": os.path.join(directory, "state"),
                    "starttls_listeners": ["tcp:0:interface=127.0.0.1"],
                    "implicit_tls_listeners": ["tcp:0:interface=127.0.0.1"],
                },
                "tls": {"minimum_version": value},
            },
        )
        return path

    def test_accepted(self):
        for value in ("TLSv1_2", "TLSv1_3"):
            config = loadConfig(self.write(value))
            self.assertEqual(config["tls"]["minimum_version"], value)

    def test_refused(self):
        for value in ("SSLv3", "TLSv1_1", "TLSv1", "bogus", "tlsv1_2", ""):
            path = self.write(value)
            error = self.assertRaises(ConfigError, loadConfig, path)
            self.assertEqual(
                str(error),
                f"{path}: [tls] minimum_version: must be TLSv1_2 or TLSv1_3 "
                f"(got {value!r})",
            )

    def test_twistdRefuses(self):
        """
        C{twistd -n digipoort-msa} stops with the one-line error, no
        traceback, and a non-zero exit (a missing C{ocsp_response} too).
        """
        for value in ("SSLv3", "bogus"):
            path = self.write(value)
            self.assertEqual(
                runTwistd(self, path),
                f"digipoort-msa: {path}: [tls] minimum_version: must be TLSv1_2 "
                f"or TLSv1_3 (got {value!r})",
            )
        path = self.write("TLSv1_3")
        with open(path, "a") as f:
            f.write('ocsp_response = "missing.der"\n')
        missing = os.path.join(os.path.dirname(path), "missing.der")
        self.assertEqual(
            runTwistd(self, path),
            f"digipoort-msa: {path}: [tls] ocsp_response: cannot read {missing}: "
            "No such file or directory",
        )

    def test_serverContextFactoryRefuses(self):
        directory = os.path.abspath(self.mktemp())
        certFile, keyFile = ensureSelfSignedCertificate(directory, "localhost")
        error = self.assertRaises(
            tls.TLSConfigurationError,
            tls.serverContextFactory,
            certFile,
            keyFile,
            minimumVersion="TLSv1_1",
        )
        self.assertIn("'TLSv1_1'", str(error))
