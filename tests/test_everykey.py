# -*- test-case-name: tests.test_everykey -*-
"""
Every configuration key, through the daemon: the keys are read from
etc/digipoort-msa.toml itself (set or commented out there, plus every key
of L{msa.service.config.SCHEMA} and every option of the built-in content policies
it names), and each must have a row in L{ROWS}.  A row either changes the
key from its default in a service started from a TOML file
(L{msa.service.tap.buildService} via L{tests.e2e.RunningMSA}) and shows the effect
over a real socket, or, for a key whose effect cannot be seen from outside
in a test (a delay, a retry schedule), reads the value back from the
running service and names the test that covers the behaviour.

Rows share a service by C{group}: one service per group, so the whole table
runs in a few seconds.  Adding a key is adding one L{Row}.
"""

import base64
import datetime
import importlib
import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import tempfile
import tomllib
from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL, crypto
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.model import makeAccount
from msa.policy.contentpolicies import BUILTIN
from msa.service.config import SCHEMA
from msa.tls import ensureSelfSignedCertificate
from tests import pop3keys, waiting
from tests.downstream import DownstreamServer
from tests.e2e import (
    SENDERS,
    USERS,
    AiosmtpdCore,
    RunningMSA,
    fixtureAccount,
    freePort,
    httpGet,
)
from tests.test_clientcert import ClientPKI
from tests.test_content_e2e import message, multipart
from tests.test_e2e import ROOT, SENDER

EXAMPLE = os.path.join(ROOT, "etc", "digipoort-msa.toml")
RECIPIENT = "belastingdienst@overheid.nl"
#: The main group's core MTA answers 451 for this recipient: its message
#: stays in the spool.
STUCK = "later@overheid.nl"
CAROL = ("carol", "carol's password")
EXAMPLE_POLICY = "tests.example_policy:RequireHeader"
KIND = b"X-Digipoort-Berichttype: aangifte\r\n"


# -- the keys ------------------------------------------------------------

_HEADER = re.compile(r"^#?\s*\[([a-z0-9_.]+)\]\s*$")
_TABLE = re.compile(r"^#?\s*\[\[content\.policy\]\]\s*$")
_KEY = re.compile(r"^#?\s*([a-z][a-z0-9_]*)\s*=\s*\S")


def exampleKeys(path: str = EXAMPLE) -> set[str]:
    """
    Every key etc/digipoort-msa.toml documents, set or commented out:
    C{section.key}, and C{content.policy(NAME).option} for the options of
    each C{[[content.policy]]} table (C{NAME} being its C{name}), with
    every option of a built-in policy it names; plus every key of
    L{SCHEMA}, so that a key missing from the file is not missed here.
    """
    keys = {
        f"{section}.{key}"
        for section, names in SCHEMA.items()
        if section != "content"
        for key in names
    }
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tomllib.loads(text)  # the file itself is valid TOML
    section, table = None, None
    for line in text.splitlines():
        if _TABLE.match(line):
            section, table = "content.policy", {}
            continue
        header = _HEADER.match(line)
        if header:
            section, table = header.group(1), None
            continue
        key = _KEY.match(line)
        if not key or section is None:
            continue
        if table is None:
            keys.add(f"{section}.{key.group(1)}")
            continue
        if key.group(1) == "name":
            table["name"] = line.split("=", 1)[1].strip().strip("\"'")
            keys.add(f"content.policy({table['name']}).name")
            for option in getattr(BUILTIN.get(table["name"]), "options", ()):
                keys.add(f"content.policy({table['name']}).{option}")
        else:
            keys.add(f"content.policy({table['name']}).{key.group(1)}")
    return keys


# -- the environment of a group --------------------------------------------


class Env:
    """
    What the rows of one group share: a directory, ports, peers (a core MTA,
    a client PKI) made on demand, and then the running service.

    @ivar msa: the L{RunningMSA}, once started.
    @ivar values: key -> the value the group's configuration gives it.
    """

    def __init__(self, testCase: unittest.TestCase, group: str) -> None:
        self.testCase = testCase
        self.group = group
        self.directory = os.path.abspath(testCase.mktemp())
        os.makedirs(self.directory)
        self.starttlsPort = freePort()
        self.implicitPort = freePort()
        self.msa: RunningMSA | None = None
        self.values: dict[str, Any] = {}
        self._memo: dict[str, Any] = {}

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def port(self, name: str) -> int:
        return self.memo("port:" + name, freePort)

    def file(self, name: str, content: str) -> str:
        with open(self.path(name), "w") as f:
            f.write(content)
        return self.path(name)

    def certificate(self, name: str) -> tuple[str, str]:
        return self.memo(
            "cert:" + name,
            lambda: ensureSelfSignedCertificate(self.path(name), "localhost"),
        )

    @property
    def pki(self) -> ClientPKI:
        return self.memo("pki", lambda: ClientPKI(self.path("pki")))

    @property
    def downstream(self) -> DownstreamServer:
        """
        A core MTA with implicit TLS and AUTH PLAIN, that defers L{STUCK}.
        """

        def make():
            server = DownstreamServer(self.path("core"), tlsMode="implicit")
            server.accounts = {"msa": "geheim"}
            server.rcptReplies[STUCK] = (451, "4.3.0 try later")
            server.portNumber = server.start()
            self.testCase.addCleanup(server.stop)
            return server

        return self.memo("downstream", make)

    @property
    def core(self) -> AiosmtpdCore:
        """
        A core MTA (aiosmtpd) that requires the MSA's client certificate.
        """
        return self.memo(
            "core", lambda: AiosmtpdCore(self.testCase, clientCA=self.pki.caFile)
        )

    def service(self, name: str):
        """
        A child of the running service, by class name.
        """
        for child in self.msa.service:
            if type(child).__name__ == name:
                return child
        raise LookupError(name)

    def submissionFactory(self):
        for child in self.msa.service:
            factory = getattr(child, "factory", None)
            factory = getattr(factory, "wrappedFactory", factory)
            if type(factory).__name__ == "SubmissionFactory":
                return factory
        raise LookupError("SubmissionFactory")

    def context(self, **kwargs) -> ssl.SSLContext:
        """
        A verifying client context trusting the MSA's certificate.
        """
        context = ssl.create_default_context(cafile=self.msa.certFile)
        for name, value in kwargs.items():
            if name == "ciphers":
                context.set_ciphers(value)
            elif name == "curve":
                context.set_ecdh_curve(value)
            elif name == "cert":
                context.load_cert_chain(*value)
            else:
                setattr(context, name, value)
        return context


# -- client side helpers (blocking, run in a thread) -------------------------


def connect(env: Env, implicit: bool = False, context=None) -> smtplib.SMTP:
    """
    An smtplib session, after EHLO over TLS (STARTTLS or implicit).
    """
    context = context or env.context()
    if implicit:
        client = smtplib.SMTP_SSL(
            "localhost", env.implicitPort, context=context, timeout=10
        )
    else:
        client = smtplib.SMTP("localhost", env.starttlsPort, timeout=10)
        client.ehlo("mijnbedrijf.nl")
        client.starttls(context=context)
    client.ehlo("mijnbedrijf.nl")
    return client


def login(env: Env, user: str = "alice", password: str = USERS["alice"], **kw):
    client = connect(env, **kw)
    client.esmtp_features["auth"] = "PLAIN"
    client.login(user, password)
    return client


def send(env: Env, data: bytes, recipients=(RECIPIENT,), **kw) -> tuple[int, bytes]:
    """
    Submit C{data} as alice: the final reply, or the first refusal.
    """
    client = login(env, **kw)
    try:
        code, text = client.mail(SENDER)
        if code != 250:
            return code, text
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code != 250:
                return code, text
        try:
            return client.data(data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
    finally:
        client.close()


def queued(reply: tuple[int, bytes]) -> str:
    code, text = reply
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), reply
    return text.split()[-1].decode()


def rawLines(port: int, count: int, send: bytes = b"") -> list[bytes]:
    """
    Connect in plaintext, send C{send}, and read C{count} reply lines (fewer
    if the server closes first).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(send)
        f = s.makefile("rb")
        lines = []
        for _ in range(count):
            line = f.readline()
            if not line:
                break
            lines.append(line)
        return lines


def eventually(condition: Callable[[], Any], what: str, timeout: float = 10.0):
    """
    L{waiting.waitUntilBlocking}: the rows' checks run in a thread.
    """
    return waiting.waitUntilBlocking(condition, timeout, what)


def tlsRefused(env: Env, context: ssl.SSLContext) -> str:
    """
    The handshake (or the first read after it, in TLS 1.3) fails.
    """
    try:
        with socket.create_connection(("127.0.0.1", env.implicitPort), 10) as s:
            with context.wrap_socket(s, server_hostname="localhost") as t:
                greeting = t.recv(100)
    except (ssl.SSLError, ConnectionError) as e:
        return str(e)
    raise AssertionError(f"TLS accepted, greeting {greeting!r}")


def tlsGreeting(env: Env, context: ssl.SSLContext) -> tuple[bytes, tuple, bytes]:
    """
    Over implicit TLS: the greeting, the cipher and the server's certificate.
    """
    with socket.create_connection(("127.0.0.1", env.implicitPort), 10) as s:
        with context.wrap_socket(s, server_hostname="localhost") as t:
            return t.recv(100), t.cipher(), t.getpeercert(binary_form=True)


def relayed(env: Env):
    """
    The main group's message as its core MTA received it (submitted once).
    """

    def make():
        queued(send(env, message(b"Subject-Tag: relayed\r\n")))
        return eventually(
            lambda: [m for m in env.downstream.messages if b"Subject-Tag" in m.data],
            "relayed",
        )[0]

    return env.memo("relayed", make)


def relayedToCore(env: Env):
    def make():
        queued(send(env, message()))
        return eventually(lambda: env.core.messages, "relayed to the core")[0]

    return env.memo("relayedToCore", make)


def padded(size: int, lineLength: int = 100) -> bytes:
    """
    A message of exactly C{size} octets, no line longer than C{lineLength}.
    """
    data = message()
    left = size - len(data)
    assert left >= 2
    while left:
        take = min(lineLength + 2, left)
        if left - take == 1:
            take -= 1
        data += b"x" * (take - 2) + b"\r\n"
        left -= take
    return data


# -- the checks ----------------------------------------------------------


def checkHostname(env):
    assert rawLines(env.starttlsPort, 1) == [b"220 gateway.test ESMTP\r\n"]
    client = connect(env)
    assert client.ehlo_resp.split(b"\n")[0] == b"gateway.test", client.ehlo_resp
    client.close()


def checkStateDir(env):
    from msa.service.controlsocket import request

    result = request(os.path.join(env.msa.state, "control.sock"), "list")
    assert isinstance(result, list), result


def checkStartTLSListener(env):
    client = smtplib.SMTP("localhost", env.starttlsPort, timeout=10)
    client.ehlo("x")
    assert client.has_extn("starttls") and not client.has_extn("auth")
    assert client.starttls(context=env.context())[0] == 220
    client.close()


def checkImplicitListener(env):
    greeting, cipher, _ = tlsGreeting(env, env.context())
    assert greeting == b"220 gateway.test ESMTP\r\n" and cipher, greeting


def checkMessageSize(env):
    client = connect(env)
    assert client.esmtp_features["size"] == "3000", client.esmtp_features
    client.close()
    queued(send(env, padded(3000)))
    assert send(env, padded(3001)) == (
        552,
        b"5.3.4 Message size exceeds fixed maximum message size (3000)",
    )
    client = login(env)
    assert client.mail(SENDER, ["SIZE=3001"]) == (
        552,
        b"5.3.4 Message size exceeds fixed maximum message size",
    )
    client.close()


def checkLineLength(env):
    queued(send(env, message(body=b"y" * 200 + b"\r\n")))
    code, text = send(env, message(body=b"y" * 201 + b"\r\n"))
    assert (code, text[:50]) == (
        550,
        b"5.6.0 Message refused: a line is longer than 202 o",
    ), (code, text)


def checkRecipients(env):
    client = login(env)
    client.mail(SENDER)
    for i in range(3):
        assert client.rcpt(f"r{i}@overheid.nl") == (250, b"2.1.5 Ok")
    assert client.rcpt("r3@overheid.nl") == (452, b"4.5.3 Error: too many recipients")
    client.close()


def checkErrors(env):
    client = connect(env, implicit=True)
    for _ in range(3):
        assert client.docmd("BOGUS") == (500, b"5.5.2 Error: command not recognized")
    assert client.docmd("BOGUS") == (421, b"4.7.0 localhost Error: too many errors")
    client.close()


def checkAuthFailures(env):
    client = connect(env, implicit=True)
    token = base64.b64encode(b"\0nobody\0wrong").decode()
    assert client.docmd("AUTH PLAIN", token)[0] == 535
    code, text = client.docmd("AUTH PLAIN", token)
    assert code == 535, (code, text)
    assert client.getreply() == (421, b"4.7.0 localhost Error: too many failed logins")
    client.close()


def checkAcceptedRecipients(env):
    client = login(env)
    client.mail(SENDER)
    assert client.rcpt(RECIPIENT) == (250, b"2.1.5 Ok")
    assert client.rcpt("iemand@example.com") == (
        550,
        b"5.7.1 Recipient <iemand@example.com> is not served by this gateway "
        b"for this account",
    )
    client.close()


def checkMechanisms(env):
    client = connect(env)
    assert client.esmtp_features["auth"] == " PLAIN DIGEST-MD5", client.esmtp_features
    assert client.docmd("AUTH LOGIN") == (
        504,
        b"5.5.4 Unrecognized authentication type",
    )
    client.close()


def checkExtensions(env):
    client = connect(env)
    features = client.esmtp_features
    assert "dsn" in features and "limits" in features, features
    for off in ("smtputf8", "chunking", "binarymime", "requiretls"):
        assert off not in features, features
    client.esmtp_features["auth"] = "PLAIN"
    client.login("alice", USERS["alice"])
    assert client.docmd("BDAT 1 LAST") == (500, b"5.5.2 Error: command not recognized")
    assert client.docmd("MAIL FROM:<ik@mijnbedrijf.nl> SMTPUTF8") == (
        555,
        b"5.5.4 Unsupported parameter: SMTPUTF8",
    )
    client.close()


def checkRealm(env):
    client = connect(env)
    code, challenge = client.docmd("AUTH DIGEST-MD5")
    assert code == 334 and b'realm="realm.test"' in base64.b64decode(challenge)
    client.close()


def digestLogin(env, host: str) -> tuple[int, bytes]:
    from puresasl.client import SASLClient

    client = connect(env)
    try:
        sasl = SASLClient(
            host, "smtp", mechanism="DIGEST-MD5", username=CAROL[0], password=CAROL[1]
        )
        code, challenge = client.docmd("AUTH DIGEST-MD5")
        response = sasl.process(base64.b64decode(challenge))
        code, final = client.docmd(base64.b64encode(response).decode())
        if code != 334:
            return code, final
        return client.docmd("")
    finally:
        client.close()


def checkServerNames(env):
    assert digestLogin(env, "alias.test") == (235, b"2.7.0 Authentication successful")
    assert digestLogin(env, "gateway.test")[0] == 535


def checkCertificate(env):
    _, _, der = tlsGreeting(env, env.context())
    with open(env.certificate("tls")[0], "rb") as f:
        pem = f.read()
    assert der == ssl.PEM_cert_to_DER_cert(pem.decode())


def checkKey(env):
    _, _, der = tlsGreeting(env, env.context())
    with open(env.certificate("tls")[1], "rb") as f:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
    cert = crypto.load_certificate(crypto.FILETYPE_ASN1, der)
    public = crypto.dump_publickey(crypto.FILETYPE_PEM, cert.get_pubkey())
    assert public == crypto.dump_publickey(crypto.FILETYPE_PEM, key)


def checkChain(env):
    context = SSL.Context(SSL.TLS_METHOD)
    with socket.create_connection(("127.0.0.1", env.implicitPort), 10) as s:
        s.setblocking(True)
        connection = SSL.Connection(context, s)
        connection.set_connect_state()
        connection.set_tlsext_host_name(b"localhost")
        connection.do_handshake()
        chain = connection.get_peer_cert_chain(as_cryptography=True)
        connection.shutdown()
    with open(env.certificate("chain")[0], "rb") as f:
        extra = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
    assert extra.to_cryptography() in chain[1:], chain


def checkCiphers(env):
    tls12 = {"maximum_version": ssl.TLSVersion.TLSv1_2}
    _, cipher, _ = tlsGreeting(env, env.context(**tls12))
    assert cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384", cipher
    tlsRefused(env, env.context(ciphers="ECDHE-ECDSA-AES128-GCM-SHA256", **tls12))


def checkGroups(env):
    # TLS 1.3: there the groups are only for the key exchange (in TLS 1.2
    # they also name the curves of an ECDSA certificate).
    tlsGreeting(env, env.context(curve="secp384r1"))
    tlsRefused(env, env.context(curve="prime256v1"))


def checkMinimumVersion(env):
    tlsRefused(env, env.context(maximum_version=ssl.TLSVersion.TLSv1_2))
    assert tlsGreeting(env, env.context())[1][1] == "TLSv1.3"


def checkClientCertificates(env):
    tlsRefused(env, env.context())
    _, certFile, keyFile = env.memo("acme", lambda: env.pki.issue("acme", "NTRNL-1"))
    greeting, _, _ = tlsGreeting(env, env.context(cert=(certFile, keyFile)))
    assert greeting == b"220 localhost ESMTP\r\n", greeting


def checkClientCA(env):
    other = ClientPKI(env.path("other-pki"))
    _, certFile, keyFile = other.issue("stranger", "NTRNL-2")
    tlsRefused(env, env.context(cert=(certFile, keyFile)))


def revokedCertificate(env):
    return env.memo("revoked", lambda: env.pki.issue("revoked", "NTRNL-3"))


def checkClientCRL(env):
    _, certFile, keyFile = revokedCertificate(env)
    tlsRefused(env, env.context(cert=(certFile, keyFile)))


def checkAccountsFile(env):
    client = login(env, "bob", USERS["bob"])
    client.close()


#: An account only the database of the C{accounts.store} row holds.
DORA = ("dora", "dora's password")


def accountDatabase(env):
    """
    A throwaway PostgreSQL server holding alice and L{DORA} (not bob, whom
    the accounts file has): its URL.
    """
    from msa.accounts.pgstore import AccountTable
    from tests.pgserver import PostgreSQLServer

    server = PostgreSQLServer(env.testCase)
    table = AccountTable(server.url)
    table.save(
        {
            name: attrs.evolve(
                fixtureAccount(name, password), extra={"senders": SENDERS}
            )
            for name, password in (("alice", USERS["alice"]), DORA)
        }
    )
    table.close()
    return server.url


def checkAccountStore(env):
    login(env, *DORA).close()
    try:
        login(env, "bob", USERS["bob"]).close()
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535, e
    else:
        raise AssertionError("bob, only in the accounts file, logged in")


def checkSpool(env):
    queueId = queued(send(env, message(), recipients=[STUCK]))
    directory = env.values["spool.directory"]

    def found():
        return [
            name
            for _, _, files in os.walk(directory)
            for name in files
            if queueId in name
        ]

    eventually(found, f"{queueId} in {directory}")


def checkJSONFile(env):
    queueId = queued(send(env, message()))

    def lines():
        with open(env.values["logging.json_file"], encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    eventually(
        lambda: any(
            e["event"] == "accepted" and e.get("queue_id") == queueId for e in lines()
        ),
        "accepted event in the JSON file",
    )


def _auditRecords(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f]


def checkAuditPath(env):
    """
    The acceptance record is in the configured file before the 250.
    """
    queueId = queued(send(env, message()))
    records = _auditRecords(env.values["audit.path"])
    assert any(r["event"] == "accepted" and r["queueId"] == queueId for r in records), (
        records
    )


def checkAuditDisabled(env):
    """
    Off: a message is accepted and no audit log is written.
    """
    queued(send(env, message()))
    default = os.path.join(env.msa.state, "audit", "audit.jsonl")
    assert not os.path.exists(default), default


def checkAuditRotation(env):
    """
    A small max_bytes: the log rotates, and the new file starts with a
    rotated record naming its predecessor.
    """
    default = os.path.join(env.msa.state, "audit", "audit.jsonl")
    for _ in range(12):
        queued(send(env, message()))
    first = _auditRecords(default)[0]
    assert first["event"] == "rotated", first
    assert os.path.exists(os.path.join(os.path.dirname(default), first["previousFile"]))


def checkLogLevel(env):
    """
    With C{level = "warn"}, the JSON log gets the error of a broken
    accounts file, and neither the C{accepted} line of the submission made
    before it nor any other INFO or DEBUG line.
    """
    queueId = queued(send(env, message()))
    with open(env.msa.accountsFile, "w") as f:
        f.write("{ not json")

    def lines():
        with open(env.path("events.json"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    eventually(
        lambda: any(e["level"] == "error" for e in lines()),
        "the error line in the JSON file",
    )
    written = lines()
    env.testCase.assertEqual(
        [
            e
            for e in written
            if e.get("queue_id") == queueId or e["event"] == "accepted"
        ],
        [],
    )
    env.testCase.assertEqual(
        {e["level"] for e in written} - {"warning", "error", "critical"}, set()
    )


def checkMetricsListen(env):
    status, body = httpGet(env.port("metrics"), "/metrics")
    assert status == 200 and b"msa_messages_total" in body, status


def checkHealthWindow(env):
    """
    The core was reached (a delivery), a message waits: /health turns 503
    once that delivery is older than health_window (900 s by default).
    """
    relayed(env)
    queued(send(env, message(), recipients=[STUCK]))

    def unhealthy():
        status, body = httpGet(env.port("metrics"), "/health")
        return body if status == 503 else None

    body = eventually(unhealthy, "/health 503 after health_window")
    relay = json.loads(body)["components"]["relay"]
    assert relay["status"] == "failing", body
    assert relay["detail"].startswith("core MTA not reached recently"), body


def checkRelayed(env):
    message = relayed(env)
    assert message.recipients == [RECIPIENT] and b"Subject-Tag: relayed" in message.data


def checkRelayTLS(env):
    assert relayed(env).tls


def checkHeloName(env):
    relayed(env)
    assert (True, b"EHLO helo.test") in env.downstream.commands, env.downstream.commands


def checkRelayAuth(env):
    assert relayed(env).authenticated == "msa"


def checkRelayedToCore(env):
    _, _, data, overTLS = relayedToCore(env)
    assert overTLS and b"Message-ID: <1@mijnbedrijf.nl>" in data


def checkOutbox(env):
    queueId = queued(send(env, message()))
    outbox = env.values["relay.outbox"]
    eventually(
        lambda: os.path.exists(os.path.join(outbox, queueId + ".eml")),
        f"{queueId}.eml in {outbox}",
    )


def checkIdleTimeout(env):
    lines = rawLines(env.starttlsPort, 3)
    assert lines == [
        b"220 localhost ESMTP\r\n",
        b"421 4.4.2 localhost Error: timeout exceeded\r\n",
    ], lines


def connectionLimit(env):
    held = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", env.starttlsPort), 10)
            held.append(s)
            assert s.makefile("rb").readline() == b"220 localhost ESMTP\r\n"
        lines = rawLines(env.starttlsPort, 2)
        assert lines == [b"421 4.7.0 localhost Error: too many connections\r\n"], lines
    finally:
        for s in held:
            s.close()


def _timeoutLine(what: str) -> bytes:
    return f"421 4.4.2 localhost Error: timeout exceeded ({what})\r\n".encode()


def checkHandshakeTimeout(env):
    """
    A client that connects to the implicit-TLS port and never starts its
    handshake is cut off (the 1 s deadline; nothing can be said before TLS,
    and the MSA aborts the connection, so the close may come as a reset).
    """
    with socket.create_connection(("127.0.0.1", env.implicitPort), 10) as s:
        try:
            data = s.recv(1024)
        except ConnectionResetError:
            data = b""
        assert data == b"", "expected the connection to be closed"


def checkCommandLineTimeout(env):
    lines = rawLines(env.starttlsPort, 3, b"EHLO partial")
    assert lines == [b"220 localhost ESMTP\r\n", _timeoutLine("command line")], lines


def checkLoginTimeout(env):
    lines = rawLines(env.starttlsPort, 20, b"EHLO client.test\r\n")
    assert lines[0] == b"220 localhost ESMTP\r\n", lines
    assert lines[-1] == _timeoutLine("login"), lines


def checkDataTimeout(env):
    client = login(env)
    try:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        assert client.docmd("DATA")[0] == 354
        reply = client.getreply()
        assert reply == (421, b"4.4.2 localhost Error: timeout exceeded (DATA)"), reply
    finally:
        client.close()
    assert env.msa.outboxFiles() == []


def checkListenBacklog(env):
    """
    The kernel's accept queue of each listener has the configured length
    (C{ss} shows it as Send-Q of a listening socket).
    """
    import subprocess

    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{env.starttlsPort}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[2] == "77", out


def checkProxyFrom(env):
    """
    On the group's C{haproxy:} listener, a PROXY header is taken from the
    one allowed peer (127.0.0.2) and not from 127.0.0.1: that connection
    is closed unread.
    """
    from tests.test_proxy import proxyV1
    from tests.test_proxy_from import forgedConnection

    header = proxyV1("192.0.2.1", 40000)
    allowed = forgedConnection(env.starttlsPort, header, source="127.0.0.2")
    assert allowed.startswith(b"220 "), allowed
    refused = forgedConnection(env.starttlsPort, header, source="127.0.0.1")
    assert refused == b"", refused


def ocspChain(env):
    from tests.test_tls_daemon import makeChain, ocspResponse

    def make():
        paths, issuerKey, issuer = makeChain(env.directory)
        response = ocspResponse(
            paths["full"],
            issuer,
            issuerKey,
            datetime.datetime.now(datetime.UTC).replace(microsecond=0),
        )
        with open(env.path("ocsp.der"), "wb") as f:
            f.write(response)
        return paths, env.path("ocsp.der"), response

    return env.memo("ocsp", make)


def checkOCSP(env):
    from tests.test_tls_daemon import stapled

    _, _, response = ocspChain(env)
    assert stapled(env.implicitPort, False) == response
    assert stapled(env.starttlsPort, True) == response


def policyCheck(*cases: tuple[bytes, tuple[int, bytes] | None]):
    """
    A check submitting each message: L{None} means it is queued, else the
    exact refusal.
    """

    def check(env):
        for data, expected in cases:
            reply = send(env, data)
            if expected is None:
                queued(reply)
            else:
                assert reply == expected, (reply, expected)

    return check


def _refusal550(text: bytes) -> tuple[int, bytes]:
    return 550, b"5.6.0 Message refused: " + text


def _refusal552(text: bytes) -> tuple[int, bytes]:
    return 552, b"5.3.4 Message refused: " + text


def nested(extraHeaders: bytes) -> bytes:
    inner = (
        b'Content-Type: multipart/alternative; boundary="binnen"\r\n\r\n'
        b"--binnen\r\n\r\ntekst\r\n--binnen--\r\n"
    )
    return message(
        extraHeaders + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="buiten"\r\n',
        b"--buiten\r\n" + inner + b"--buiten--\r\n",
    )


# -- the table -----------------------------------------------------------


@attrs.frozen
class Row:
    """
    One configuration key.

    @ivar key: C{section.key}, or C{content.policy(NAME).option}.
    @ivar value: the value the group's configuration gives the key (a
        callable gets the L{Env}); L{None} when the group's helper already
        sets it (state_dir, accounts file).
    @ivar check: shows the effect over a socket (blocking, run in a thread).
    @ivar wired: for a key not observable from outside: reads the value
        back from the running service; C{reason} says why, C{coveredBy}
        names the tests of the behaviour.
    """

    key: str
    value: Any = None
    check: Callable[[Env], None] | None = None
    group: str = "main"
    wired: Callable[[Env], Any] | None = None
    reason: str = ""
    coveredBy: tuple[str, ...] = ()


def _relayRunner(env):
    return env.msa.service.getServiceNamed("relay")


def _relayClient(env):
    return _relayRunner(env).downstream


_TIMING = "a delay or schedule: its effect is time, which tests here must not assert"

_POP3_ROWS: list[Row] = [
    Row(
        "pop3.starttls_listeners",
        pop3keys.starttlsListener,
        pop3keys.checkStartTLSListener,
        "pop3",
    ),
    Row(
        "pop3.implicit_tls_listeners",
        pop3keys.implicitListener,
        pop3keys.checkImplicitListener,
        "pop3",
    ),
    Row("pop3.mechanisms", ["PLAIN"], pop3keys.checkMechanisms, "pop3"),
    Row("pop3.max_line_length", 300, pop3keys.checkLineLength, "pop3"),
    Row("pop3.max_errors", 2, pop3keys.checkErrors, "pop3"),
    Row("pop3.max_auth_failures", 1, pop3keys.checkAuthFailures, "pop3"),
    Row("pop3.expire", 30, pop3keys.checkExpire, "pop3"),
    Row("pop3.idle_timeout", 1, pop3keys.checkIdleTimeout, "pop3idle"),
    Row("pop3.login_timeout", 1, pop3keys.checkLoginTimeout, "pop3login"),
    Row(
        "pop3.max_connections",
        1,
        pop3keys.checkConnectionLimitAcrossListeners,
        "pop3conn",
    ),
    Row(
        "pop3.max_connections_per_client",
        1,
        pop3keys.checkConnectionLimit,
        "pop3perclient",
    ),
]

ROWS: list[Row] = [
    # [server]
    Row("server.hostname", "gateway.test", checkHostname),
    Row("server.state_dir", None, checkStateDir),
    Row(
        "server.starttls_listeners",
        lambda env: [f"tcp:{env.starttlsPort}:interface=127.0.0.1"],
        checkStartTLSListener,
    ),
    Row(
        "server.implicit_tls_listeners",
        lambda env: [f"tcp:{env.implicitPort}:interface=127.0.0.1"],
        checkImplicitListener,
    ),
    Row("server.max_message_size", 3000, checkMessageSize, "limits"),
    Row("server.max_line_length", 200, checkLineLength, "limits"),
    Row("server.max_recipients", 3, checkRecipients, "limits"),
    Row("server.max_errors", 3, checkErrors, "limits"),
    Row("server.max_auth_failures", 2, checkAuthFailures, "limits"),
    Row("server.idle_timeout", 1, checkIdleTimeout, "idle"),
    Row("server.tls_handshake_timeout", 1, checkHandshakeTimeout, "deadlines"),
    Row("server.command_line_timeout", 1, checkCommandLineTimeout, "deadlines"),
    Row("server.login_timeout", 3, checkLoginTimeout, "deadlines"),
    Row("server.data_timeout", 1, checkDataTimeout, "deadlines"),
    Row(
        "server.data_min_rate",
        4096,
        group="deadlines",
        wired=lambda env: env.submissionFactory().policy.dataMinRate,
        reason="its effect is a rate over time, which tests here must not assert",
        coveredBy=(
            "tests.test_deadlines.DataDeadlineTests.test_octetsExtendIt",
            "tests.test_deadlines.DataDeadlineTests.test_trickle",
            "tests.test_slowclients.SlowlorisTests.test_trickledMessage",
        ),
    ),
    Row("server.listen_backlog", 77, checkListenBacklog, "limits"),
    Row("server.proxy_from", ["127.0.0.2"], checkProxyFrom, "proxy"),
    Row(
        "server.shutdown_grace",
        7,
        wired=lambda env: env.service("SessionShutdown").grace,
        reason="its effect shows only when the daemon stops (SIGTERM)",
        coveredBy=("tests.test_crash.CrashTests.test_sigterm",),
    ),
    Row("server.max_connections", 2, connectionLimit, "connections"),
    Row("server.max_connections_per_client", 2, connectionLimit, "perclient"),
    Row(
        "server.accepted_recipients",
        ["@overheid.nl"],
        checkAcceptedRecipients,
        "limits",
    ),
    Row(
        "server.auth_delay_base",
        0.01,
        group="limits",
        wired=lambda env: env.submissionFactory().authThrottle.base,
        reason=_TIMING,
        coveredBy=(
            "tests.test_authorization.AuthThrottleProtocolTests."
            "test_escalatingDelayAndNoLockout",
        ),
    ),
    Row(
        "server.auth_delay_max",
        0.02,
        group="limits",
        wired=lambda env: env.submissionFactory().authThrottle.maximum,
        reason=_TIMING,
        coveredBy=(
            "tests.test_authorization.RuleObjectTests."
            "test_throttleEscalatesPerAccountAndAddress",
        ),
    ),
    Row("server.mechanisms", ["PLAIN", "DIGEST-MD5"], checkMechanisms),
    Row("server.extensions", ["DSN", "LIMITS"], checkExtensions),
    Row("server.sasl_realm", "realm.test", checkRealm),
    Row("server.server_names", ["alias.test"], checkServerNames),
    # [tls]
    Row("tls.certificate", lambda env: env.certificate("tls")[0], checkCertificate),
    Row("tls.key", lambda env: env.certificate("tls")[1], checkKey),
    Row("tls.chain", lambda env: env.certificate("chain")[0], checkChain),
    Row("tls.ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384", checkCiphers),
    Row("tls.groups", "P-384", checkGroups),
    Row("tls.minimum_version", "TLSv1_3", checkMinimumVersion, "tls13"),
    Row("tls.ocsp_response", lambda env: ocspChain(env)[1], checkOCSP, "ocsp"),
    Row("tls.client_certificates", "require", checkClientCertificates, "clientcert"),
    Row("tls.client_ca", lambda env: env.pki.caFile, checkClientCA, "clientcert"),
    Row(
        "tls.client_crl",
        lambda env: env.pki.crl(revokedCertificate(env)[0]),
        checkClientCRL,
        "clientcert",
    ),
    # [accounts]
    Row("accounts.file", None, checkAccountsFile),
    Row(
        "accounts.watch_interval",
        0.5,
        wired=lambda env: env.service("AccountWatcher").interval,
        reason=_TIMING,
        coveredBy=(
            "tests.test_accounts_e2e.AdminRoundTripTests.test_addSubmitDisableRefused",
        ),
    ),
    Row(
        "accounts.auth_cache_ttl",
        17,
        wired=lambda env: (
            env.submissionFactory()
            .portal.checkers[
                importlib.import_module("twisted.cred.credentials").IUsernamePassword
            ]
            ._verifier.ttl
        ),
        reason="a cache: its effect is speed",
        coveredBy=(
            "tests.test_passwordcheck.PasswordVerifierTests.test_successCached",
            "tests.test_passwordcheck.PasswordVerifierTests.test_expiryEdge",
        ),
    ),
    Row("accounts.store", accountDatabase, checkAccountStore, "pgstore"),
    # [spool]
    Row("spool.directory", lambda env: env.path("queue"), checkSpool),
    Row(
        "spool.commit_delay",
        0.005,
        wired=lambda env: _relayRunner(env).spool.commits.commitDelay,
        reason="a delay: its effect is speed (fewer fsyncs per message)",
        coveredBy=(
            "tests.test_commitdelay.SpoolCommitDelayTests.test_sideBySideShareOneRound",
            "tests.test_commitdelay.SpoolCommitDelayTests.test_aloneNotHeldBack",
            "tests.test_commitdelay.DaemonCommitDelayTests.test_sideBySideOverSMTP",
        ),
    ),
    # [logging], [metrics]
    Row("logging.json_file", lambda env: env.path("events.json"), checkJSONFile),
    Row("logging.level", "warn", checkLogLevel, "loglevel"),
    Row(
        "metrics.listen",
        lambda env: f"tcp:{env.port('metrics')}:interface=127.0.0.1",
        checkMetricsListen,
    ),
    Row("metrics.health_window", 0.5, checkHealthWindow),
    # [audit]
    Row("audit.enabled", False, checkAuditDisabled, "auditoff"),
    Row("audit.path", lambda env: env.path("trail/audit.jsonl"), checkAuditPath),
    Row("audit.max_bytes", 4096, checkAuditRotation, "auditrotate"),
    # [relay]
    Row("relay.host", "127.0.0.1", checkRelayed),
    Row("relay.port", lambda env: env.downstream.portNumber, checkRelayed),
    Row("relay.tls", "implicit", checkRelayTLS),
    Row("relay.verify_certificate", False, checkRelayed),
    Row("relay.server_name", "localhost", checkRelayedToCore, "relay2"),
    Row("relay.ca_file", lambda env: env.core.certFile, checkRelayedToCore, "relay2"),
    Row(
        "relay.client_certificate",
        lambda env: env.memo("relayCert", lambda: env.pki.issue("msa", "MSA-1"))[1],
        checkRelayedToCore,
        "relay2",
    ),
    Row(
        "relay.client_key",
        lambda env: env.memo("relayCert", lambda: env.pki.issue("msa", "MSA-1"))[2],
        checkRelayedToCore,
        "relay2",
    ),
    Row("relay.auth_username", "msa", checkRelayAuth),
    Row(
        "relay.auth_password_file",
        lambda env: env.file("relay-password", "geheim\n"),
        checkRelayAuth,
    ),
    Row("relay.helo_name", "helo.test", checkHeloName),
    Row("relay.outbox", lambda env: env.path("uit"), checkOutbox, "outbox"),
]


def _attribute(get: Callable[[Env], Any], name: str) -> Callable[[Env], Any]:
    return lambda env: getattr(get(env), name)


_RUNNER_TESTS = "tests.test_relay.RelayRunnerTests."
_FAILURE_TESTS = "tests.test_relay_failures.FailureMatrixTests."
_REUSE_TESTS = "tests.test_relay_client.ConnectionReuseTests."
ROWS += [
    Row(
        "relay.retry_base",
        3600,
        wired=_attribute(_relayRunner, "retryBase"),
        reason=_TIMING,
        coveredBy=(_RUNNER_TESTS + "test_temporaryFailureRetried",),
    ),
    Row(
        "relay.retry_max",
        7200,
        wired=_attribute(_relayRunner, "retryMax"),
        reason=_TIMING,
        coveredBy=(_RUNNER_TESTS + "test_retryDelayCapped",),
    ),
    Row(
        "relay.max_lifetime",
        86400,
        wired=_attribute(_relayRunner, "maxLifetime"),
        reason=_TIMING,
        coveredBy=(_RUNNER_TESTS + "test_expiry", _FAILURE_TESTS + "test_expiry"),
    ),
    Row(
        "relay.concurrency",
        2,
        wired=_attribute(_relayRunner, "concurrency"),
        reason="needs more deliveries in flight at once than a test can hold "
        "open without timing",
        coveredBy=(_RUNNER_TESTS + "test_concurrencyAndOnePerMessage",),
    ),
    Row(
        "relay.send_dsn",
        False,
        wired=lambda env: _relayRunner(env).dsnHostname is not None,
        reason="off means no message is sent: nothing to see but a bounce that "
        "never comes",
        coveredBy=(_FAILURE_TESTS + "test_noDSNWithoutHostname",),
    ),
    Row(
        "relay.delay_warning_after",
        600,
        wired=_attribute(_relayRunner, "delayWarningAfter"),
        reason=_TIMING,
        coveredBy=(_FAILURE_TESTS + "test_delayedOnce",),
    ),
    Row(
        "relay.connect_timeout",
        11,
        wired=_attribute(_relayClient, "connectTimeout"),
        reason=_TIMING + "; and loopback never leaves a connect unanswered",
        coveredBy=(_FAILURE_TESTS + "test_connectionRefused",),
    ),
    Row(
        "relay.command_timeout",
        12,
        wired=_attribute(_relayClient, "commandTimeout"),
        reason=_TIMING,
        coveredBy=(
            _FAILURE_TESTS + "test_serverHangs",
            "tests.test_relay_client.SMTPDownstreamTests.test_greetingTimeout",
        ),
    ),
    Row(
        "relay.data_timeout",
        13,
        wired=_attribute(_relayClient, "dataTimeout"),
        reason=_TIMING,
        coveredBy=(_FAILURE_TESTS + "test_slowServer",),
    ),
    Row(
        "relay.idle_timeout",
        0,
        wired=_attribute(_relayClient, "idleTimeout"),
        reason=_TIMING + " (how long a connection to the core stays open)",
        coveredBy=(_REUSE_TESTS + "test_idleTimeout", _REUSE_TESTS + "test_noReuse"),
    ),
    Row(
        "relay.max_messages_per_connection",
        5,
        wired=_attribute(_relayClient, "maxTransactions"),
        reason="needs messages queued faster than they are relayed, which "
        "depends on timing",
        coveredBy=(_REUSE_TESTS + "test_maxTransactions",),
    ),
]

# Content policies (R12): one of each kind, in the "content" group.
_HEADERS = "content.policy(headers)"
_MIME = "content.policy(mime-parts)"
_EXAMPLE = f"content.policy({EXAMPLE_POLICY})"
ROWS += [
    Row(
        f"{_HEADERS}.name",
        "headers",
        policyCheck(
            (
                message(KIND + b"geen kopregel\r\n"),
                _refusal550(
                    b"malformed header section: line 7 is neither a header field "
                    b"nor a continuation line (RFC 5322 2.2)"
                ),
            )
        ),
        "content",
    ),
    Row(
        f"{_HEADERS}.require_from",
        True,
        policyCheck(
            (
                message(KIND, drop=[b"From"]),
                _refusal550(
                    b"exactly one From: header field is required (RFC 5322 3.6)"
                ),
            )
        ),
        "content",
    ),
    Row(
        f"{_HEADERS}.require_date",
        False,
        policyCheck((message(KIND, drop=[b"Date"]), None)),
        "content",
    ),
    Row(
        f"{_HEADERS}.require_message_id",
        True,
        policyCheck(
            (
                message(KIND, drop=[b"Message-ID"]),
                _refusal550(
                    b"exactly one Message-ID: header field is required (RFC 5322 3.6)"
                ),
            )
        ),
        "content",
    ),
    Row(
        f"{_HEADERS}.single_from",
        False,
        policyCheck(
            (
                message(KIND + b"Sender: ik@mijnbedrijf.nl\r\n").replace(
                    b"From: ik@mijnbedrijf.nl",
                    b"From: a@mijnbedrijf.nl, b@mijnbedrijf.nl",
                ),
                None,
            )
        ),
        "content",
    ),
    Row(
        f"{_MIME}.name",
        "mime-parts",
        policyCheck((multipart(2, extraHeaders=KIND), None)),
        "content",
    ),
    Row(
        f"{_MIME}.max_parts",
        2,
        policyCheck(
            (
                multipart(3, extraHeaders=KIND),
                _refusal552(b"more than 2 MIME body parts"),
            )
        ),
        "content",
    ),
    Row(
        f"{_MIME}.max_part_size",
        500,
        policyCheck(
            (message(KIND, b"z" * 500 + b"\r\n"), None),
            (
                message(KIND, b"z" * 501 + b"\r\n"),
                _refusal552(b"a MIME part exceeds 500 octets"),
            ),
        ),
        "content",
    ),
    Row(
        f"{_MIME}.max_depth",
        1,
        policyCheck(
            (nested(KIND), _refusal552(b"MIME multiparts nested deeper than 1 levels"))
        ),
        "content",
    ),
    Row(
        f"{_EXAMPLE}.name",
        EXAMPLE_POLICY,
        policyCheck((message(KIND), None)),
        "content",
    ),
    Row(
        f"{_EXAMPLE}.header",
        "X-Digipoort-Berichttype",
        policyCheck(
            (
                message(),
                _refusal550(
                    b"exactly one X-Digipoort-Berichttype: header field is required"
                ),
            )
        ),
        "content",
    ),
    Row(
        f"{_EXAMPLE}.values",
        ["aangifte", "suppletie"],
        policyCheck(
            (message(b"X-Digipoort-Berichttype: suppletie\r\n"), None),
            (
                message(b"X-Digipoort-Berichttype: iets\r\n"),
                _refusal550(b"unknown X-Digipoort-Berichttype"),
            ),
        ),
        "content",
    ),
]


# [limits]: one Redis for the "redis" group, started with its rows' values.


def _redis(env: Env):
    from tests.redisserver import RedisServer

    return env.memo("redis", lambda: RedisServer(env.testCase))


def checkSharedCounts(env):
    """
    A failed login is counted in the configured Redis, under the configured
    prefix.
    """
    client = connect(env)
    token = base64.b64encode(b"\0nobody\0wrong").decode()
    assert client.docmd("AUTH PLAIN", token)[0] == 535
    client.close()
    key = f"{env.values['limits.key_prefix']}authfail:account:nobody:127.0.0.1"
    assert _redis(env).integer("GET", key) >= 1, key


def checkFallback(env):
    """
    Last of its group: Redis stops; with C{fallback = "local"} a failed
    login is still counted (here, in memory) and answered 535, not 454.
    """
    _redis(env).stop()
    client = connect(env)
    token = base64.b64encode(b"\0nobody\0wrong").decode()
    reply = client.docmd("AUTH PLAIN", token)
    client.close()
    assert reply == (535, b"5.7.8 Authentication credentials invalid"), reply


def _limits(env):
    return env.service("RedisLimits")


def checkWorkers(env):
    """
    A second process, started by this one (worker 0: the service runs in
    the test's process), accepts on the same listening socket: its
    descriptors include the socket of the STARTTLS listener.
    """
    import time

    from tests.test_workers import children

    def socketOf(pid: int, port: int) -> set[str]:
        inodes = set()
        with open("/proc/net/tcp") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
        held = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
        return inodes & held

    ours = socketOf(os.getpid(), env.starttlsPort)
    assert len(ours) == 1, ours
    deadline = time.monotonic() + 20
    while True:
        workers = children(os.getpid())
        if len(workers) == 1 and socketOf(workers[0], env.starttlsPort) == ours:
            return
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)


_REDIS_TESTS = "tests.test_limits_redis."
ROWS += [
    Row("limits.backend", "redis", checkSharedCounts, "redis"),
    Row("limits.url", lambda env: _redis(env).url, checkSharedCounts, "redis"),
    Row("limits.key_prefix", "everykey:", checkSharedCounts, "redis"),
    Row(
        "limits.timeout",
        2.5,
        group="redis",
        wired=lambda env: _limits(env).connection.timeout,
        reason=_TIMING,
        coveredBy=(_REDIS_TESTS + "BrokenRedisTests.test_noAnswer",),
    ),
    Row(
        "limits.lease",
        30,
        group="redis",
        wired=_attribute(_limits, "lease"),
        reason=_TIMING + " (how long a crashed instance's slots stay counted)",
        coveredBy=(
            _REDIS_TESTS + "RatesTests.test_crashedInstanceHoldsLapse",
            _REDIS_TESTS + "SessionTests.test_crashedInstanceSessionsLapse",
        ),
    ),
    *_POP3_ROWS,
    Row("server.workers", 2, checkWorkers, "redis"),
    Row("limits.fallback", "local", checkFallback, "redis"),
]


# [limits] over TLS: a TLS-only Redis with a test CA, for the "rediss" group.


def _tlsRedis(env: Env):
    from tests.redisserver import tlsRedisServer

    return env.memo("rediss", lambda: tlsRedisServer(env.testCase))


def checkCountedOverTLS(env):
    """
    A failed login is counted in the TLS-only Redis: the MSA verified its
    certificate with C{tls_ca} and showed C{tls_certificate} and its key.
    """
    client = connect(env)
    token = base64.b64encode(b"\0nobody\0wrong").decode()
    reply = client.docmd("AUTH PLAIN", token)
    client.close()
    assert reply[0] == 535, reply
    key = "digipoort-msa:authfail:account:nobody:127.0.0.1"
    assert _tlsRedis(env).integer("GET", key) >= 1, key


# [lmtp] and [mailbox]: the core delivers to carol's mailbox (@carol.example).

RETURN = b"From: core@digipoort.example\r\nSubject: retour\r\n\r\nontvangen\r\n"


def _lmtpSocket(env: Env) -> str:
    """
    The group's LMTP socket, in a short directory (sun_path: 107 bytes).
    """

    def make():
        directory = tempfile.mkdtemp(prefix="msa-everykey-")
        env.testCase.addCleanup(shutil.rmtree, directory, True)
        return os.path.join(directory, "lmtp.sock")

    return env.memo("lmtpSocket", make)


def _lmtp(env: Env) -> smtplib.LMTP:
    client = smtplib.LMTP(_lmtpSocket(env), timeout=10)
    client.ehlo("core.test")
    return client


def _lmtpDeliver(client: smtplib.LMTP, data: bytes = RETURN) -> tuple[int, bytes]:
    assert client.mail("core@digipoort.example")[0] == 250
    code, text = client.rcpt("retour@carol.example")
    if code != 250:
        return code, text
    return client.data(data)


def checkLMTPListener(env):
    client = _lmtp(env)
    assert client.has_extn("pipelining"), client.ehlo_resp
    code, text = _lmtpDeliver(client)
    client.quit()
    assert code == 250 and text.startswith(b"2.0.0 Ok: delivered as "), text


def checkLMTPSize(env):
    client = _lmtp(env)
    assert client.esmtp_features["size"] == "2000", client.esmtp_features
    assert client.mail("core@digipoort.example", ["SIZE=2001"]) == (
        552,
        b"5.3.4 Message size exceeds fixed maximum message size",
    )
    client.quit()


def checkLMTPRecipients(env):
    client = _lmtp(env)
    client.mail("core@digipoort.example")
    for _ in range(2):
        assert client.rcpt("retour@carol.example") == (250, b"2.1.5 Ok")
    assert client.rcpt("retour@carol.example") == (
        452,
        b"4.5.3 Error: too many recipients",
    )
    client.quit()


def checkMailboxDirectory(env):
    client = _lmtp(env)
    code, text = _lmtpDeliver(client)
    client.quit()
    uid = text.split()[-1].decode()
    new = os.path.join(env.values["mailbox.directory"], "carol", "new")
    assert [n.split(",")[0] for n in os.listdir(new)].count(uid) == 1, os.listdir(new)


def checkAllowFrom(env):
    """
    allow_from names 192.0.2.0/24 only: a client from 127.0.0.1 gets no
    word, the connection is closed.
    """
    port = env.port("lmtp")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(b"LHLO core.test\r\n")
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
    assert data == b"", data


def _lmtpTLS(env: Env, cert: bool) -> smtplib.LMTP:
    context = ssl.create_default_context(cafile=env.msa.certFile)
    context.check_hostname = False
    if cert:
        pair = env.memo("coreCert", lambda: env.pki.issue("core", "CORE-1"))
        context.load_cert_chain(pair[1], pair[2])
    client = smtplib.LMTP(timeout=10)
    raw = socket.create_connection(("127.0.0.1", env.port("lmtptls")), timeout=10)
    client.sock = context.wrap_socket(raw)
    assert client.getreply()[0] == 220
    client.ehlo("core.test")
    return client


def checkLMTPTLS(env):
    client = _lmtpTLS(env, cert=True)
    code, text = _lmtpDeliver(client)
    client.quit()
    assert code == 250, (code, text)
    try:
        _lmtpTLS(env, cert=False)
    except (ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected):
        return
    raise AssertionError("TLS accepted without a client certificate")


def checkQuotaMessages(env):
    client = _lmtp(env)
    assert _lmtpDeliver(client)[0] == 250
    client.rset()
    assert _lmtpDeliver(client) == (452, b"4.2.2 Mailbox full: too many messages")
    client.quit()


def checkQuotaBytes(env):
    client = _lmtp(env)
    assert (
        _lmtpDeliver(client, RETURN + b"x" * (1024 - len(RETURN) - 2) + b"\r\n")[0]
        == 250
    )
    client.rset()
    assert _lmtpDeliver(client) == (452, b"4.2.2 Mailbox full: over its size quota")
    client.quit()


def mailboxDatabase(env) -> str:
    """
    A throwaway PostgreSQL server for the C{mailbox.store} row: its URL.
    """
    from tests.pgserver import PostgreSQLServer

    return env.memo("mailboxDatabase", lambda: PostgreSQLServer(env.testCase).url)


def checkMailboxStore(env):
    """
    The message the core delivers over LMTP is in the database, byte for
    byte, under the uid of the 250; no Maildir is made.
    """
    import psycopg

    client = _lmtp(env)
    code, text = _lmtpDeliver(client)
    client.quit()
    assert code == 250, (code, text)
    uid = text.split()[-1].decode()
    with psycopg.connect(env.values["mailbox.store"]) as connection:
        rows = connection.execute(
            "SELECT m.account, string_agg(c.data, ''::bytea ORDER BY c.seq) "
            "FROM msa_mailbox_messages m JOIN msa_mailbox_chunks c USING (uid) "
            "WHERE uid = %s GROUP BY m.account",
            (uid,),
        ).fetchall()
    assert rows == [("carol", RETURN)], rows
    maildir = os.path.join(env.msa.state, "mailboxes", "carol")
    assert not os.path.exists(maildir), maildir


def _returnChannel(env):
    return env.msa.service.getServiceNamed("return-channel")


ROWS += [
    Row(
        "limits.tls_ca",
        lambda env: _tlsRedis(env).tls.serverCA,
        checkCountedOverTLS,
        "rediss",
    ),
    Row(
        "limits.tls_certificate",
        lambda env: _tlsRedis(env).tls.clientCertificate,
        checkCountedOverTLS,
        "rediss",
    ),
    Row(
        "limits.tls_key",
        lambda env: _tlsRedis(env).tls.clientKey,
        checkCountedOverTLS,
        "rediss",
    ),
    Row(
        "lmtp.listeners",
        lambda env: [f"unix:{_lmtpSocket(env)}:mode=600"],
        checkLMTPListener,
        "lmtp",
    ),
    Row("lmtp.max_message_size", 2000, checkLMTPSize, "lmtp"),
    Row("lmtp.max_recipients", 2, checkLMTPRecipients, "lmtp"),
    Row(
        "mailbox.directory",
        lambda env: env.path("boxes"),
        checkMailboxDirectory,
        "lmtp",
    ),
    Row("lmtp.allow_from", ["192.0.2.0/24"], checkAllowFrom, "lmtptcp"),
    Row(
        "lmtp.tls_listeners",
        lambda env: [f"tcp:{env.port('lmtptls')}:interface=127.0.0.1"],
        checkLMTPTLS,
        "lmtptls",
    ),
    Row("lmtp.client_ca", lambda env: env.pki.caFile, checkLMTPTLS, "lmtptls"),
    Row("mailbox.store", mailboxDatabase, checkMailboxStore, "pgmailbox"),
    Row("mailbox.max_messages", 1, checkQuotaMessages, "quotamessages"),
    Row("mailbox.max_bytes", 1024, checkQuotaBytes, "quotabytes"),
    Row(
        "mailbox.expire_after",
        86400,
        group="lmtp",
        wired=_attribute(_returnChannel, "expireAfter"),
        reason="its effect is age: a message must be older than an hour, which "
        "a test can only set up before the daemon starts",
        coveredBy=(
            "tests.test_returnchannel.OperationsTests.test_expiryAtStart",
            "tests.test_mailbox.ExpiryTests.test_expire",
        ),
    ),
]


def _lmtpListener(env: Env) -> dict[str, dict]:
    return {"lmtp": {"listeners": [f"unix:{_lmtpSocket(env)}"]}}


#: What a group needs besides its rows' keys.
GROUP_BASE: dict[str, Callable[[Env], dict[str, dict]]] = {
    # A listener that takes the PROXY header.
    "proxy": lambda env: {
        "server": {
            "starttls_listeners": [
                f"haproxy:tcp:{env.starttlsPort}:interface=127.0.0.1"
            ]
        }
    },
    # rediss://: the TLS-only Redis of its rows.
    "rediss": lambda env: {"limits": {"backend": "redis", "url": _tlsRedis(env).url}},
    "lmtptcp": lambda env: {
        "lmtp": {"listeners": [f"tcp:{env.port('lmtp')}:interface=127.0.0.1"]}
    },
    "quotamessages": _lmtpListener,
    "pgmailbox": _lmtpListener,
    "quotabytes": _lmtpListener,
    # OpenSSL staples only for a certificate whose issuer is in the chain.
    "ocsp": lambda env: {
        "tls": {
            "certificate": ocspChain(env)[0]["full"],
            "key": ocspChain(env)[0]["key"],
        }
    },
    # The JSON log shows what the level lets through; the accounts file is
    # watched often, so that its breakage (an error) shows soon.
    "loglevel": lambda env: {
        "logging": {"json_file": env.path("events.json")},
        "accounts": {"watch_interval": 0.2},
    },
    # The core's host and port; its name, CA and client certificate are rows.
    "relay2": lambda env: {
        "relay": {
            key: value
            for key, value in env.core.relayConfig().items()
            if key not in ("server_name", "ca_file")
        }
    },
}


def configuration(env: Env, rows: list[Row]) -> dict[str, Any]:
    """
    The L{RunningMSA} arguments for a group: its base, then its rows' keys.
    """
    sections: dict[str, dict] = {
        "server": {
            "starttls_listeners": [f"tcp:{env.starttlsPort}:interface=127.0.0.1"],
            "implicit_tls_listeners": [f"tcp:{env.implicitPort}:interface=127.0.0.1"],
        }
    }
    for section, keys in GROUP_BASE.get(env.group, lambda env: {})(env).items():
        sections.setdefault(section, {}).update(keys)
    policies: dict[str, dict] = {}
    for row in rows:
        if row.value is None:
            continue
        value = row.value(env) if callable(row.value) else row.value
        env.values[row.key] = value
        match = re.fullmatch(r"content\.policy\((.+)\)\.(\w+)", row.key)
        if match:
            name, option = match.groups()
            policies.setdefault(name, {"name": name})[option] = value
        else:
            section, key = row.key.split(".", 1)
            sections.setdefault(section, {})[key] = value
    return {"sections": sections, "content": list(policies.values())}


#: The sections L{RunningMSA} takes as arguments.
SECTIONS = (
    "server",
    "tls",
    "accounts",
    "spool",
    "logging",
    "metrics",
    "relay",
    "audit",
    "limits",
    "lmtp",
    "mailbox",
    "pop3",
)


def carol():
    """
    An account with DIGEST-MD5 secrets for the realm the main group sets.
    """
    account = makeAccount(CAROL[0], CAROL[1], ["localhost", "realm.test"])
    return attrs.evolve(
        account, extra={"senders": SENDERS, "mailboxes": ["@carol.example"]}
    )


def resolve(name: str) -> object:
    """
    The test module, class or method a dotted name names.
    """
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(name)


class EveryKeyTests(unittest.TestCase):
    """
    The table against etc/digipoort-msa.toml, then the table through the
    daemon.
    """

    def test_everyKeyHasARow(self):
        keys = exampleKeys()
        rows = [row.key for row in ROWS]
        self.assertEqual(
            sorted({k for k in rows if rows.count(k) > 1}), [], "keys with two rows"
        )
        missing = sorted(keys - set(rows))
        if missing:
            self.fail(
                "configuration key(s) without a row in tests.test_everykey.ROWS "
                "(add a Row that shows the key's effect, or says why it cannot "
                f"be seen and which test covers it): {', '.join(missing)}"
            )
        stale = sorted(set(rows) - keys)
        self.assertEqual(stale, [], "rows for keys etc/digipoort-msa.toml lacks")

    def test_everyRowChecksOrSaysWhy(self):
        for row in ROWS:
            if row.check is not None:
                self.assertIsNone(row.wired, row.key)
                continue
            self.assertTrue(row.wired and row.reason and row.coveredBy, row.key)
            for name in row.coveredBy:
                resolve(name)

    @defer.inlineCallbacks
    def test_everyKeyThroughTheDaemon(self):
        groups: dict[str, list[Row]] = {}
        for row in ROWS:
            groups.setdefault(row.group, []).append(row)
        failures = []
        for group, rows in groups.items():
            env = Env(self, group)
            config = configuration(env, rows)
            sections = config["sections"]
            env.msa = RunningMSA(
                self,
                content=config["content"],
                extraAccounts={CAROL[0]: carol()},
                **{name: sections.get(name) for name in SECTIONS},
            )
            if "tls.certificate" in env.values:
                env.msa.certFile = env.values["tls.certificate"]
            for row in rows:
                try:
                    if row.check is not None:
                        yield threads.deferToThread(row.check, env)
                    else:
                        seen = row.wired(env)
                        expected = env.values[row.key]
                        assert seen == expected, f"service has {seen!r}"
                except Exception as e:
                    failures.append(f"{row.key} (group {group}): {e!r}")
        if failures:
            self.fail(
                f"{len(failures)} of {len(ROWS)} rows failed:\n" + "\n".join(failures)
            )
