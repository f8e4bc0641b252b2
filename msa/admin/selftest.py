# -*- test-case-name: tests.test_selftest -*-
"""
C{digipoort-msa-admin selftest HOST PORT}: probe a running submission
listener, local or remote, the way an operator would after a deployment or
an auditor at any time, and print one row per probe: PASS, FAIL or SKIP
(with the reason), and what was seen.  The exit code is 1 when any probe
failed, 0 otherwise (2 for usage errors).

The probes (the first three only on a STARTTLS listener; on an
implicit-TLS one there is no plaintext phase and they are reported N/A):

 - C{pre-tls-530}: before STARTTLS every command but NOOP, EHLO, QUIT and
   STARTTLS is answered 530 (R3): HELO, MAIL, RCPT, DATA, RSET, AUTH, VRFY,
   EXPN and HELP are each tried on a connection of their own.
 - C{starttls-injection}: C{STARTTLS} and C{NOOP} sent in one write; the
   NOOP must be answered neither in plaintext nor after the handshake
   (CVE-2011-0411 class).
 - C{no-auth-before-tls}: the EHLO reply before TLS offers no AUTH.
 - C{tls1.0-refused}, C{tls1.1-refused}: a client offering only that
   version (ciphers at C{@SECLEVEL=0}, so that the local OpenSSL really
   offers it) cannot complete a handshake.  When the local OpenSSL cannot
   negotiate the version even with itself, the probe says "could not test".
 - C{cipher-suites}: every TLS 1.2 suite the local OpenSSL knows (PSK and
   SRP suites need a shared secret and are left out) and every TLS 1.3
   suite; the server must accept none outside the expected policy
   (C{--expect-ciphers}, an OpenSSL cipher string; the MSA's built-in
   L{msa.tls.DEFAULT_CIPHERS} and OpenSSL's default TLS 1.3 suites by
   default) and none that is weak by L{weakness}, whatever is expected.
 - C{groups}: each key-exchange group alone (X25519, X448, the NIST and
   brainpool curves, the RFC 7919 ffdhe groups); the server must accept
   none outside C{--expect-groups} (L{msa.tls.DEFAULT_GROUPS} by default).
 - C{certificate}: the chain verifies against C{--ca-file} or the system
   store, the server sends every intermediate itself, the leaf is valid for
   C{--servername} (default HOST) and has at least C{--min-days} left.
 - With an account (C{--user --password-file --sender --rcpt}), after the
   certificate verified (a password is never sent to an unverified server):
   C{clean-message} is accepted with 250, and C{smuggling <form>} for each
   end-of-data form made of CR, LF or CRLF, a dot, and CR, LF or CRLF other
   than CRLF.CRLF, followed by a smuggled transaction: the server must
   refuse the message with 5xx and run none of the smuggled commands.
   Every message sent carries an C{X-Digipoort-Selftest} header and a
   Subject saying it is a self-test.  Without an account nothing is sent
   that could be delivered.

This is a command-line tool, not the daemon: it uses blocking sockets and
pyOpenSSL (which, unlike Python's L{ssl}, can restrict a client to one
key-exchange group and list the certificate chain the server sent).
"""

import argparse
import base64
import datetime
import email.utils
import functools
import ipaddress
import os
import secrets
import socket
import ssl
import struct
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from msa import _compat
from msa.tls import DEFAULT_CIPHERS, DEFAULT_GROUPS

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

#: What R3 allows before STARTTLS; every other command must get 530.
PRE_TLS_ALLOWED = ("NOOP", "EHLO", "QUIT", "STARTTLS")
#: The commands tried before STARTTLS, each on its own connection.
PRE_TLS_COMMANDS = (
    "HELO selftest.invalid",
    "MAIL FROM:<>",
    "RCPT TO:<postmaster>",
    "DATA",
    "RSET",
    "AUTH PLAIN",
    "VRFY postmaster",
    "EXPN postmaster",
    "HELP",
)
#: OpenSSL's default TLS 1.3 suites, which the MSA keeps.
DEFAULT_TLS13_CIPHERS = (
    "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
)
#: Every TLS 1.3 suite OpenSSL implements.
ALL_TLS13_CIPHERS = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
)
#: The key-exchange groups probed, by OpenSSL name; those the local OpenSSL
#: does not know are listed as not probed.
PROBED_GROUPS = (
    "X25519",
    "X448",
    "P-256",
    "P-384",
    "P-521",
    "secp224r1",
    "secp256k1",
    "brainpoolP256r1",
    "brainpoolP384r1",
    "brainpoolP512r1",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "ffdhe6144",
    "ffdhe8192",
)
_GROUP_ALIASES = {
    "prime256v1": "P-256",
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
    "x25519": "X25519",
    "x448": "X448",
}
#: Key exchanges whose suites need a shared secret, not probed.
_NOT_PROBED_KEX = ("kx-psk", "kx-dhe-psk", "kx-rsa-psk", "kx-ecdhe-psk", "kx-srp")
_CR, _LF, _CRLF = b"\r", b"\n", b"\r\n"
_ENDINGS = {"CR": _CR, "LF": _LF, "CRLF": _CRLF}
#: The SMTP smuggling end-of-data forms: a dot between any two of CR, LF
#: and CRLF, except the one real end, CRLF.CRLF.
SMUGGLING_FORMS = tuple(
    (f"{a}.{b}", _ENDINGS[a] + b"." + _ENDINGS[b])
    for a in ("LF", "CR", "CRLF")
    for b in ("LF", "CR", "CRLF")
    if (a, b) != ("CRLF", "CRLF")
)
_HELO = "selftest.digipoort-msa.invalid"
_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}


@attrs.frozen
class ProbeResult:
    """
    One row of the report.

    @ivar name: the probe.
    @ivar status: L{PASS}, L{FAIL} or L{SKIP}.
    @ivar detail: what was seen, or why it was not tested.
    """

    name: str
    status: str
    detail: str


@attrs.frozen
class Account:
    """
    The account the message probes log in with, and their envelope.
    """

    user: str
    password: str
    sender: str
    recipient: str


@attrs.frozen
class Target:
    """
    The listener probed and what it is expected to do.
    """

    host: str
    port: int
    implicit: bool = False
    serverName: str | None = None
    caFile: str | None = None
    minDays: int = 14
    expectCiphers: str = DEFAULT_CIPHERS + ":" + DEFAULT_TLS13_CIPHERS
    expectGroups: str = DEFAULT_GROUPS
    timeout: float = 30.0
    account: Account | None = None

    @property
    def name(self) -> str:
        """
        The name the certificate must be valid for.
        """
        return self.serverName or self.host


class ProbeError(Exception):
    """
    The conversation did not go as far as the probe needed; the message says
    what happened instead.
    """


@attrs.frozen
class Reply:
    """
    An SMTP reply: its code and its lines' text.
    """

    code: int
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}".strip()


def _isIP(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _sslReason(e: Exception) -> str:
    """
    The short text of an OpenSSL error: its reasons, or what happened to the
    connection.
    """
    if isinstance(e, SSL.WantReadError):
        return "timed out"
    if isinstance(e, SSL.SysCallError):
        return "connection closed by the server" if e.args[0] == -1 else str(e)
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        reasons = [str(r[-1]) for r in e.args[0] if r]
        if reasons:
            return ", ".join(reasons)
    return str(e) or e.__class__.__name__


class SMTPSession:
    """
    A blocking SMTP client connection, plaintext or TLS, that keeps what it
    read beyond the reply it wanted (so that a reply pipelined behind the
    220 to STARTTLS is seen, not lost in the handshake).
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        try:
            sock = socket.create_connection(
                (target.host, target.port), timeout=target.timeout
            )
        except OSError as e:
            raise ProbeError(f"cannot connect to {target.host}:{target.port}: {e}")
        # Blocking with kernel timeouts: pyOpenSSL cannot use a socket with a
        # Python-level timeout (its descriptor is non-blocking).
        sock.settimeout(None)
        seconds = int(target.timeout)
        micro = int((target.timeout - seconds) * 1e6)
        timeval = struct.pack("ll", seconds, micro)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.sock = sock
        self.tls: SSL.Connection | None = None
        self.buffer = b""
        self.eof = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "SMTPSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        try:
            if self.tls is not None:
                self.tls.sendall(data)
            else:
                self.sock.sendall(data)
        except (OSError, SSL.Error) as e:
            raise ProbeError(f"cannot send: {_sslReason(e)}")

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            if self.tls is not None:
                data = self.tls.recv(65536)
            else:
                data = self.sock.recv(65536)
        except (SSL.ZeroReturnError, ConnectionResetError):
            data = b""
        except SSL.SysCallError as e:
            if e.args[0] != -1:
                raise ProbeError(f"connection error: {e}")
            data = b""
        except (BlockingIOError, TimeoutError, SSL.WantReadError):
            raise ProbeError(f"no answer within {self.target.timeout:g} s")
        except (OSError, SSL.Error) as e:
            raise ProbeError(f"connection error: {_sslReason(e)}")
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def readReply(self) -> Reply:
        """
        The next reply.

        @raise ProbeError: when the connection closed or timed out first.
        """
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                if not self._fill():
                    got = f" after {lines!r}" if lines else ""
                    raise ProbeError(f"connection closed by the server{got}")
            raw, self.buffer = self.buffer.split(b"\r\n", 1)
            text = raw.decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit():
                raise ProbeError(f"not an SMTP reply: {text[:80]!r}")
            lines.append(text[4:])
            if text[3:4] != "-":
                return Reply(int(text[:3]), tuple(lines))

    def readAll(self) -> list[Reply]:
        """
        Every reply up to the 221 to QUIT, or until the server closes the
        connection.
        """
        replies: list[Reply] = []
        while not replies or replies[-1].code != 221:
            try:
                replies.append(self.readReply())
            except ProbeError:
                if self.eof and not self.buffer.strip():
                    return replies
                raise
        return replies

    def command(self, line: str, expect: Iterable[int] | None = None) -> Reply:
        """
        Send one command and read its reply.

        @param expect: the codes that let the probe go on; any other raises
            L{ProbeError}.
        """
        self.send(line.encode("utf-8") + b"\r\n")
        reply = self.readReply()
        if expect is not None and reply.code not in expect:
            shown = line.split()[0] if line.upper().startswith("AUTH") else line
            raise ProbeError(f"{shown} answered {reply}")
        return reply

    def startTLS(self, context: SSL.Context) -> SSL.Connection:
        """
        The TLS handshake over this connection (the plaintext buffer must be
        empty: bytes read past the last reply would be lost).
        """
        connection = SSL.Connection(context, self.sock)
        name = self.target.name
        if not _isIP(name):
            connection.set_tlsext_host_name(name.encode("idna"))
        connection.set_connect_state()
        connection.do_handshake()
        self.tls = connection
        return connection

    def greet(self) -> list[str]:
        """
        Read the greeting and say EHLO.

        @return: the EHLO keywords, upper case.
        """
        greeting = self.readReply()
        if greeting.code != 220:
            raise ProbeError(f"greeting: {greeting}")
        reply = self.command(f"EHLO {_HELO}", (250,))
        return [line.upper() for line in reply.lines[1:]]


def _openTLS(target: Target, context: SSL.Context) -> SMTPSession:
    """
    A session in TLS: STARTTLS after EHLO, or the handshake first on an
    implicit listener (its greeting not read yet).

    @raise ProbeError: when the SMTP part did not get as far as the handshake.
    @raise SSL.Error: when the handshake failed.
    """
    session = SMTPSession(target)
    try:
        if not target.implicit:
            session.greet()
            session.command("STARTTLS", (220,))
        session.startTLS(context)
    except BaseException:
        session.close()
        raise
    return session


def _clientContext(
    minimum: int = SSL.TLS1_2_VERSION,
    maximum: int | None = None,
    ciphers: str = "ALL:@SECLEVEL=0",
) -> SSL.Context:
    """
    A probing client context: no verification (L{_certificateProbe} does
    that), security level 0 so that the local OpenSSL offers what is asked.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(minimum)
    if maximum is not None:
        context.set_max_proto_version(maximum)
    context.set_cipher_list(ciphers.encode("ascii"))
    context.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    return context


def _handshake(
    target: Target, context: SSL.Context
) -> tuple[SSL.Connection | None, str]:
    """
    Try a handshake.

    @return: the connection (closed already) and its version and cipher; or
        L{None} and why the handshake failed.
    @raise ProbeError: when the listener did not get as far as the handshake.
    """
    try:
        session = _openTLS(target, context)
    except (SSL.Error, OSError) as e:
        return None, _sslReason(e)
    with session:
        tls = session.tls
        assert tls is not None
        return tls, f"{tls.get_protocol_version_name()} {tls.get_cipher_name()}"


# -- probes before TLS ------------------------------------------------------


def probePreTLSCommands(target: Target) -> list[ProbeResult]:
    """
    Each command R3 does not allow before STARTTLS must be answered 530.
    """
    wrong = []
    for line in PRE_TLS_COMMANDS:
        with SMTPSession(target) as session:
            session.greet()
            reply = session.command(line)
            if reply.code != 530:
                wrong.append(f"{line.split()[0]} -> {reply}")
            if reply.code in (334, 354):
                # Something was started: leave it by closing.
                continue
            session.send(b"QUIT\r\n")
    names = ", ".join(line.split()[0] for line in PRE_TLS_COMMANDS)
    if wrong:
        return [ProbeResult("pre-tls-530", FAIL, "not 530: " + "; ".join(wrong))]
    return [ProbeResult("pre-tls-530", PASS, f"{names}: each answered 530")]


def probeInjection(target: Target) -> list[ProbeResult]:
    """
    STARTTLS and NOOP in one write: the NOOP must have no effect, neither
    in plaintext nor after the handshake.
    """
    name = "starttls-injection"
    with SMTPSession(target) as session:
        session.greet()
        session.send(b"STARTTLS\r\nNOOP\r\n")
        reply = session.readReply()
        if reply.code != 220:
            return [ProbeResult(name, FAIL, f"STARTTLS answered {reply}")]
        if session.buffer:
            extra = session.buffer[:80].decode("ascii", "replace")
            return [
                ProbeResult(
                    name,
                    FAIL,
                    f"the injected NOOP was answered in plaintext: {extra!r}",
                )
            ]
        try:
            session.startTLS(_clientContext())
        except SSL.Error as e:
            return [
                ProbeResult(
                    name,
                    FAIL,
                    f"handshake after STARTTLS failed ({_sslReason(e)}); the "
                    "injected NOOP may have been answered in plaintext",
                )
            ]
        session.send(b"QUIT\r\n")
        replies = session.readAll()
    if replies and replies[0].code == 221:
        return [
            ProbeResult(
                name,
                PASS,
                "the NOOP sent in plaintext behind STARTTLS was discarded "
                "(QUIT after the handshake got the first reply)",
            )
        ]
    shown = "; ".join(str(r) for r in replies) or "nothing"
    return [
        ProbeResult(
            name,
            FAIL,
            f"after the handshake QUIT got {shown}: the NOOP injected in "
            "plaintext was processed inside TLS (CVE-2011-0411 class)",
        )
    ]


def probeNoAuthBeforeTLS(target: Target) -> list[ProbeResult]:
    """
    The EHLO reply before TLS must not offer AUTH.
    """
    with SMTPSession(target) as session:
        keywords = session.greet()
        session.send(b"QUIT\r\n")
    offered = [k for k in keywords if k.split("=")[0].split()[0] == "AUTH"]
    starttls = "STARTTLS offered" if "STARTTLS" in keywords else "no STARTTLS"
    if offered:
        return [
            ProbeResult(
                "no-auth-before-tls",
                FAIL,
                f"EHLO before TLS offers {offered[0]!r}: passwords could go in "
                "the clear",
            )
        ]
    return [
        ProbeResult(
            "no-auth-before-tls", PASS, f"no AUTH in the EHLO reply ({starttls})"
        )
    ]


# -- TLS ----------------------------------------------------------------------


_localCert: tuple[crypto.X509, crypto.PKey] | None = None


def _localCertificate() -> tuple[crypto.X509, crypto.PKey]:
    """
    A throwaway self-signed certificate for the local handshake check.
    """
    global _localCert
    if _localCert is None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "selftest")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        _localCert = (
            crypto.X509.from_cryptography(cert),
            crypto.PKey.from_cryptography_key(key),
        )
    return _localCert


def localCanNegotiate(version: int) -> str | None:
    """
    Whether this machine's OpenSSL can complete a handshake at C{version}
    with itself, in memory: if not, it cannot offer it to a server either.

    @return: L{None} when it can, else OpenSSL's reason.
    """
    cert, key = _localCertificate()
    server = _clientContext(version, version)
    server.use_certificate(cert)
    server.use_privatekey(key)
    client = _clientContext(version, version)
    s, c = SSL.Connection(server, None), SSL.Connection(client, None)
    s.set_accept_state()
    c.set_connect_state()
    try:
        for _ in range(10):
            done = True
            for conn, peer in ((c, s), (s, c)):
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    done = False
                try:
                    data = conn.bio_read(65536)
                except SSL.WantReadError:
                    data = b""
                if data:
                    peer.bio_write(data)
            if done:
                return None
    except SSL.Error as e:
        return _sslReason(e)
    return "the handshake did not complete"


def probeOldVersions(target: Target) -> list[ProbeResult]:
    """
    TLS 1.0 and 1.1 must be refused.
    """
    results = []
    for label, version in (("1.0", SSL.TLS1_VERSION), ("1.1", SSL.TLS1_1_VERSION)):
        name = f"tls{label}-refused"
        local = localCanNegotiate(version)
        if local is not None:
            results.append(
                ProbeResult(
                    name,
                    SKIP,
                    f"could not test: the local OpenSSL cannot negotiate TLS "
                    f"{label} even with itself ({local})",
                )
            )
            continue
        tls, detail = _handshake(target, _clientContext(version, version))
        if tls is None:
            results.append(ProbeResult(name, PASS, f"refused: {detail}"))
        else:
            results.append(ProbeResult(name, FAIL, f"accepted: {detail}"))
    return results


def _cipherInfo(cipherString: str) -> list[dict[str, Any]]:
    """
    The suites an OpenSSL cipher string names, with Python's description
    of each (key exchange, authentication, AEAD, digest).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers(cipherString + ":@SECLEVEL=0")
    return [dict(c) for c in context.get_ciphers()]


def weakness(cipher: dict[str, Any]) -> str | None:
    """
    Why a TLS 1.2 suite is weak, whatever the operator expects; L{None}
    when it is not.  The rule: no forward secrecy (static RSA key exchange),
    no authentication (anonymous), no encryption (NULL), a broken cipher
    (RC4, DES, 3DES, export strength), or CBC with an MD5 or SHA-1 MAC.
    Other suites outside the expected policy (CBC with SHA-256, CCM,
    Camellia, ARIA, DHE...) are not weak by this rule but still fail the
    probe when not expected.

    @param cipher: a L{ssl.SSLContext.get_ciphers} entry.
    """
    name = cipher["name"]
    symmetric = (cipher.get("symmetric") or "").lower()
    if cipher.get("auth") == "auth-null" or name.startswith(("ADH-", "AECDH-")):
        return "anonymous"
    if "NULL" in name.split("-") or not symmetric or symmetric == "null":
        return "no encryption"
    if cipher.get("kea") not in ("kx-ecdhe", "kx-dhe", "kx-any"):
        return "no forward secrecy"
    if any(w in symmetric for w in ("rc4", "des", "rc2", "idea", "seed")):
        return "broken cipher"
    if cipher.get("strength_bits", 128) < 128:
        return "export strength"
    if not cipher.get("aead") and cipher.get("digest") in ("sha1", "md5"):
        return f"CBC with {cipher['digest'].upper()}"
    return None


def _accepted(
    target: Target, candidates: list[str], contextFor: Callable[[list[str]], Any]
) -> list[str]:
    """
    The candidates the server accepts, found by elimination: offer all,
    note the one the server picks, offer the rest, until it accepts none.
    """
    accepted: list[str] = []
    remaining = list(candidates)
    while remaining:
        tls, _ = _handshake(target, contextFor(remaining))
        if tls is None:
            break
        chosen = tls.get_cipher_name() or ""
        if chosen not in remaining:
            break
        accepted.append(chosen)
        remaining.remove(chosen)
    return accepted


def probeCiphers(target: Target) -> list[ProbeResult]:
    """
    The suites the server accepts, TLS 1.2 and 1.3, against the expected
    policy and the weakness rule.
    """
    known = [
        c
        for c in _cipherInfo("ALL:COMPLEMENTOFALL")
        if c["protocol"] != "TLSv1.3" and c["kea"] not in _NOT_PROBED_KEX
    ]
    info = {c["name"]: c for c in known}
    expectTLS13 = {n for n in target.expectCiphers.split(":") if n.startswith("TLS_")}
    rest = ":".join(
        n for n in target.expectCiphers.split(":") if n and not n.startswith("TLS_")
    )
    try:
        expected = {c["name"] for c in _cipherInfo(rest)} if rest else set()
    except ssl.SSLError:
        expected = set()
    tls12 = _accepted(
        target,
        list(info),
        lambda names: _clientContext(
            SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, ":".join(names) + ":@SECLEVEL=0"
        ),
    )
    tls13: list[str] = []
    for suite in ALL_TLS13_CIPHERS:
        context = _clientContext(SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)
        try:
            context.set_tls13_ciphersuites(suite.encode("ascii"))
        except SSL.Error:
            continue
        tls, _ = _handshake(target, context)
        if tls is not None and tls.get_cipher_name() == suite:
            tls13.append(suite)
    problems = []
    for name in tls12:
        why = weakness(info[name])
        if why is not None:
            problems.append(f"{name} (weak: {why})")
        elif name not in expected:
            problems.append(f"{name} (not expected)")
    problems += [f"{name} (not expected)" for name in tls13 if name not in expectTLS13]
    problems.sort()
    seen = (
        f"TLS 1.2: {', '.join(tls12) or 'none'}; TLS 1.3: {', '.join(tls13) or 'none'}"
    )
    if not tls12 and not tls13:
        return [ProbeResult("cipher-suites", FAIL, "no suite accepted at all")]
    if problems:
        return [
            ProbeResult("cipher-suites", FAIL, f"accepts {', '.join(problems)}; {seen}")
        ]
    return [
        ProbeResult(
            "cipher-suites",
            PASS,
            f"{seen} ({len(info)} TLS 1.2 suites offered, by elimination)",
        )
    ]


def _groupName(name: str | None) -> str:
    if not name:
        return ""
    return _GROUP_ALIASES.get(name.lower(), _GROUP_ALIASES.get(name, name))


def probeGroups(target: Target) -> list[ProbeResult]:
    """
    The key-exchange groups the server accepts, one group per handshake.
    """
    expected = {_groupName(g) for g in target.expectGroups.split(":") if g}
    accepted, unknown = [], []
    for group in PROBED_GROUPS:
        context = _clientContext(SSL.TLS1_2_VERSION)
        if not _compat.setGroups(context, group):
            unknown.append(group)
            continue
        tls, _ = _handshake(target, context)
        if tls is None:
            continue
        used = _groupName(tls.get_group_name())
        if used.lower() == _groupName(group).lower():
            accepted.append(_groupName(group))
    unexpected = [g for g in accepted if g not in expected]
    tail = f" (not known locally, not probed: {', '.join(unknown)})" if unknown else ""
    if not accepted:
        return [ProbeResult("groups", FAIL, "no group accepted" + tail)]
    if unexpected:
        return [
            ProbeResult(
                "groups",
                FAIL,
                f"accepts {', '.join(unexpected)}, not in {target.expectGroups}; "
                f"accepted: {', '.join(accepted)}{tail}",
            )
        ]
    return [ProbeResult("groups", PASS, f"accepted: {', '.join(accepted)}{tail}")]


def _verifyingContext(target: Target, errors: list[str]) -> SSL.Context:
    """
    A client context that verifies the chain against C{--ca-file} or the
    system store, noting every verification error in C{errors} (and going
    on, so that the probe can say everything that is wrong).
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)

    def verify(conn: Any, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            subject = cert.to_cryptography().subject.rfc4514_string()
            reason = _compat.verifyErrorString(errno) or f"verify error {errno}"
            errors.append(f"{reason} (depth {depth}: {subject})")
        return True

    context.set_verify(SSL.VERIFY_PEER, verify)
    if target.caFile:
        context.load_verify_locations(target.caFile)
    else:
        context.set_default_verify_paths()
    return context


def _checkName(connection: SSL.Connection, name: str) -> str | None:
    """
    Why the server's certificate is not valid for C{name}, or L{None}.
    """
    from service_identity import VerificationError
    from service_identity.pyopenssl import verify_hostname, verify_ip_address

    try:
        if _isIP(name):
            verify_ip_address(connection, name)
        else:
            verify_hostname(connection, name)
    except VerificationError as e:
        return str(e)
    return None


def probeCertificate(target: Target) -> list[ProbeResult]:
    """
    The certificate verifies, for the name, with the whole chain sent, and
    has enough time left.
    """
    name = "certificate"
    errors: list[str] = []
    try:
        session = _openTLS(target, _verifyingContext(target, errors))
    except (SSL.Error, OSError) as e:
        return [ProbeResult(name, FAIL, f"handshake failed: {_sslReason(e)}")]
    with session:
        tls = session.tls
        assert tls is not None
        leafCert = tls.get_peer_certificate()
        sent = tls.get_peer_cert_chain() or []
        verified = tls.get_verified_chain() or []
        wrongName = _checkName(tls, target.name)
    if leafCert is None:
        return [ProbeResult(name, FAIL, "no certificate")]
    leaf = leafCert.to_cryptography()
    problems = list(errors)
    if wrongName is not None:
        problems.append(f"not valid for {target.name}: {wrongName}")
    sentDER = {c.to_cryptography().fingerprint(hashes.SHA256()) for c in sent}
    missing = [
        c.to_cryptography().subject.rfc4514_string()
        for c in verified[1:-1]
        if c.to_cryptography().fingerprint(hashes.SHA256()) not in sentDER
    ]
    if missing:
        problems.append(
            f"intermediate(s) not sent by the server: {', '.join(missing)} "
            "(clients without them cannot verify)"
        )
    expires = leaf.not_valid_after_utc
    left = expires - datetime.datetime.now(datetime.UTC)
    days = left.days
    if left.total_seconds() > 0 and days < target.minDays:
        problems.append(
            f"expires {expires:%Y-%m-%d} ({days} days left, less than {target.minDays})"
        )
    store = target.caFile or "the system store"
    subject = leaf.subject.rfc4514_string()
    if problems:
        return [ProbeResult(name, FAIL, f"{subject}: " + "; ".join(problems))]
    return [
        ProbeResult(
            name,
            PASS,
            f"{subject}, valid for {target.name}, chain of {len(verified)} "
            f"verified by {store}, expires {expires:%Y-%m-%d} ({days} days left)",
        )
    ]


# -- messages -----------------------------------------------------------------


def _message(target: Target, runId: str, subject: str, tag: str) -> bytes:
    """
    A test message with the headers a strict content policy wants, marked
    as a self-test in a header and in the Subject.
    """
    account = target.account
    assert account is not None
    domain = account.sender.rpartition("@")[2] or "selftest.invalid"
    return (
        f"From: <{account.sender}>\r\n"
        f"To: <{account.recipient}>\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: <selftest-{runId}-{tag}@{domain}>\r\n"
        f"Subject: digipoort-msa selftest {runId}: {subject}; please discard\r\n"
        f"X-Digipoort-Selftest: {runId} {tag}\r\n"
        "\r\n"
        f"This message was sent by digipoort-msa-admin selftest ({tag}).\r\n"
    ).encode()


def _untrusted(target: Target) -> str | None:
    """
    Why the server's certificate cannot be trusted with a password (it
    does not verify, or not for the name), or L{None} when it can.
    """
    errors: list[str] = []
    try:
        session = _openTLS(target, _verifyingContext(target, errors))
    except (SSL.Error, OSError) as e:
        return f"handshake failed: {_sslReason(e)}"
    except ProbeError as e:
        return str(e)
    with session:
        tls = session.tls
        assert tls is not None
        wrongName = _checkName(tls, target.name)
    if errors:
        return f"the certificate does not verify ({errors[0]})"
    if wrongName is not None:
        return f"the certificate is not valid for {target.name}"
    return None


def _login(target: Target) -> SMTPSession:
    """
    A verified TLS session logged in with the account, after RCPT.

    @raise ProbeError: when any step is refused.
    """
    account = target.account
    assert account is not None
    errors: list[str] = []
    try:
        session = _openTLS(target, _verifyingContext(target, errors))
    except (SSL.Error, OSError) as e:
        raise ProbeError(f"handshake failed: {_sslReason(e)}")
    try:
        tls = session.tls
        assert tls is not None
        if errors or _checkName(tls, target.name) is not None:
            raise ProbeError("the certificate did not verify; no password sent")
        if target.implicit:
            greeting = session.readReply()
            if greeting.code != 220:
                raise ProbeError(f"greeting: {greeting}")
        keywords = session.command(f"EHLO {_HELO}", (250,)).lines[1:]
        mechanisms: set[str] = set()
        for line in keywords:
            words = line.upper().replace("=", " ").split()
            if words and words[0] == "AUTH":
                mechanisms.update(words[1:])
        if "PLAIN" in mechanisms:
            token = f"\0{account.user}\0{account.password}".encode()
            session.command("AUTH PLAIN " + base64.b64encode(token).decode(), (235,))
        elif "LOGIN" in mechanisms:
            session.command("AUTH LOGIN", (334,))
            session.command(base64.b64encode(account.user.encode()).decode(), (334,))
            session.command(
                base64.b64encode(account.password.encode()).decode(), (235,)
            )
        else:
            raise ProbeError(f"neither PLAIN nor LOGIN offered after TLS: {keywords}")
        session.command(f"MAIL FROM:<{account.sender}>", (250,))
        session.command(f"RCPT TO:<{account.recipient}>", (250, 251))
        session.command("DATA", (354,))
    except BaseException:
        session.close()
        raise
    return session


def probeCleanMessage(target: Target, runId: str) -> list[ProbeResult]:
    """
    A well-formed message is accepted with 250.
    """
    try:
        session = _login(target)
    except ProbeError as e:
        return [ProbeResult("clean-message", FAIL, str(e))]
    with session:
        session.send(_message(target, runId, "clean message", "clean") + b".\r\n")
        reply = session.readReply()
        session.send(b"QUIT\r\n")
    status = PASS if reply.code == 250 else FAIL
    return [ProbeResult("clean-message", status, str(reply))]


def probeSmuggling(target: Target, runId: str) -> list[ProbeResult]:
    """
    For each bare CR/LF end-of-data form: the message, the form, a smuggled
    transaction, the real end.  The server must refuse it with 5xx and
    execute none of the smuggled commands.
    """
    account = target.account
    assert account is not None
    results = []
    for label, form in SMUGGLING_FORMS:
        name = f"smuggling {label}"
        tag = "smuggled-" + label.replace(".", "-")
        body = _message(target, runId, f"smuggling probe {label}", "outer-" + tag)
        smuggled = (
            f"MAIL FROM:<{account.sender}>\r\nRCPT TO:<{account.recipient}>\r\nDATA\r\n"
        ).encode("ascii") + _message(target, runId, f"SMUGGLED message ({label})", tag)
        try:
            session = _login(target)
        except ProbeError as e:
            results.append(ProbeResult(name, FAIL, str(e)))
            continue
        with session:
            session.send(body.rstrip(b"\r\n") + form + smuggled + b".\r\nQUIT\r\n")
            try:
                replies = session.readAll()
            except ProbeError as e:
                results.append(ProbeResult(name, FAIL, str(e)))
                continue
        first = replies[0] if replies else None
        if first is None:
            results.append(ProbeResult(name, FAIL, "no reply to the message"))
        elif any(r.code == 354 for r in replies):
            shown = "; ".join(str(r) for r in replies)
            results.append(
                ProbeResult(
                    name,
                    FAIL,
                    f"{label} ended the message and the smuggled transaction "
                    f"ran: {shown}",
                )
            )
        elif 500 <= first.code < 600:
            results.append(ProbeResult(name, PASS, f"refused: {first}"))
        elif first.code == 250:
            results.append(
                ProbeResult(
                    name,
                    FAIL,
                    f"accepted with {label} inside ({first}): a next hop that "
                    "ends data on it would run the smuggled commands",
                )
            )
        else:
            results.append(ProbeResult(name, FAIL, f"not a permanent refusal: {first}"))
    return results


# -- the whole run ------------------------------------------------------------


def _guard(name: str, probe: Callable[[], list[ProbeResult]]) -> list[ProbeResult]:
    try:
        return probe()
    except ProbeError as e:
        return [ProbeResult(name, FAIL, str(e))]


def runProbes(target: Target) -> list[ProbeResult]:
    """
    Every probe against C{target}, in the order of the report.
    """
    try:
        with (
            _openTLS(target, _clientContext())
            if target.implicit
            else SMTPSession(target)
        ) as session:
            greeting = session.readReply()
            session.send(b"QUIT\r\n")
    except (ProbeError, SSL.Error, OSError) as e:
        detail = str(e) if isinstance(e, ProbeError) else _sslReason(e)
        return [ProbeResult("greeting", FAIL, detail)]
    results = [
        ProbeResult("greeting", PASS if greeting.code == 220 else FAIL, str(greeting))
    ]
    if greeting.code != 220:
        return results
    preTLS: list[tuple[str, Callable[[Target], list[ProbeResult]]]] = [
        ("pre-tls-530", probePreTLSCommands),
        ("starttls-injection", probeInjection),
        ("no-auth-before-tls", probeNoAuthBeforeTLS),
    ]
    for name, probe in preTLS:
        if target.implicit:
            results.append(
                ProbeResult(name, SKIP, "N/A: implicit TLS, no plaintext phase")
            )
        else:
            results += _guard(name, functools.partial(probe, target))
    for name, probe in [
        ("tls-versions", probeOldVersions),
        ("cipher-suites", probeCiphers),
        ("groups", probeGroups),
        ("certificate", probeCertificate),
    ]:
        results += _guard(name, functools.partial(probe, target))
    runId = (
        datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        + "-"
        + secrets.token_hex(3)
    )
    messageProbes = ["clean-message"] + [f"smuggling {f}" for f, _ in SMUGGLING_FORMS]
    if target.account is None:
        results += [
            ProbeResult(
                n, SKIP, "no account (--user, --password-file, --sender, --rcpt)"
            )
            for n in messageProbes
        ]
    elif (untrusted := _untrusted(target)) is not None:
        results += [
            ProbeResult(n, SKIP, f"no password sent: {untrusted}")
            for n in messageProbes
        ]
    else:
        results += _guard("clean-message", lambda: probeCleanMessage(target, runId))
        results += _guard("smuggling", lambda: probeSmuggling(target, runId))
    return results


def formatTable(results: list[ProbeResult]) -> list[str]:
    """
    The report: a header and one row per probe, columns aligned, the
    detail last.
    """
    rows = [("PROBE", "RESULT", "DETAIL")] + [
        (r.name, r.status, r.detail) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return [
        f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}"
        for row in rows
    ]


def addParser(topics: Any) -> None:
    """
    Add the C{selftest} command to the admin program's subcommands.
    """
    parser = topics.add_parser(
        "selftest",
        help="probe a running listener (TLS policy, STARTTLS, smuggling)",
        description="Probe a running submission listener; exit 1 on any FAIL.",
    )
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--implicit", action="store_true", help="the listener is TLS from the start"
    )
    parser.add_argument(
        "--servername", help="the name the certificate must be valid for (HOST)"
    )
    parser.add_argument("--ca-file", help="trust these CAs, not the system store")
    parser.add_argument(
        "--min-days",
        type=int,
        default=14,
        help="least days the certificate must have left (%(default)s)",
    )
    parser.add_argument(
        "--expect-ciphers",
        default=DEFAULT_CIPHERS + ":" + DEFAULT_TLS13_CIPHERS,
        help="OpenSSL cipher string of the suites allowed (the MSA's defaults)",
    )
    parser.add_argument(
        "--expect-groups",
        default=DEFAULT_GROUPS,
        help="groups allowed (%(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per reply (%(default)s)"
    )
    parser.add_argument("--user", help="account for the message probes")
    parser.add_argument("--password-file", help="file with its password")
    parser.add_argument("--sender", help="envelope sender the account may use")
    parser.add_argument("--rcpt", help="recipient of the test messages")


def selftestCommand(args: argparse.Namespace, stdout: Any, stderr: Any) -> int:
    """
    Run C{selftest} with parsed arguments.

    @return: 0 when nothing failed, 1 on any FAIL, 2 for usage errors.
    """
    accountArgs = (args.user, args.password_file, args.sender, args.rcpt)
    account = None
    if any(a is not None for a in accountArgs):
        if not all(a is not None for a in accountArgs):
            print(
                "digipoort-msa-admin: selftest: --user, --password-file, "
                "--sender and --rcpt go together",
                file=stderr,
            )
            return 2
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            print(f"digipoort-msa-admin: {args.password_file}: {e}", file=stderr)
            return 2
        account = Account(args.user, password, args.sender, args.rcpt)
    if args.ca_file is not None and not os.path.isfile(args.ca_file):
        print(f"digipoort-msa-admin: no CA file {args.ca_file}", file=stderr)
        return 2
    target = Target(
        host=args.host,
        port=args.port,
        implicit=args.implicit,
        serverName=args.servername,
        caFile=args.ca_file,
        minDays=args.min_days,
        expectCiphers=args.expect_ciphers,
        expectGroups=args.expect_groups,
        timeout=args.timeout,
        account=account,
    )
    results = runProbes(target)
    for line in formatTable(results):
        print(line, file=stdout)
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    mode = "implicit TLS" if args.implicit else "STARTTLS"
    print(
        f"selftest of {args.host}:{args.port} ({mode}): {counts[PASS]} PASS, "
        f"{counts[FAIL]} FAIL, {counts[SKIP]} SKIP",
        file=stdout,
    )
    return 1 if counts[FAIL] else 0
