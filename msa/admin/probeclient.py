# -*- test-case-name: tests.test_selftest,tests.test_selftest_plain -*-
"""
The client side of C{digipoort-msa-admin selftest} (L{msa.admin.selftest}):
a blocking SMTP session that can go into TLS after STARTTLS or from the
first byte, the probing and verifying TLS client contexts, and the
description of the listener probed.

Blocking sockets and pyOpenSSL: this is a command-line tool, not the
daemon, and pyOpenSSL (unlike Python's L{ssl}) can restrict a client to one
key-exchange group and list the certificate chain the server sent.
"""

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from OpenSSL import SSL, crypto

from msa import _compat
from msa.tls import DEFAULT_CIPHERS, DEFAULT_GROUPS

#: The verdicts: PASS, FAIL (the only one that makes the exit code 1), WARN
#: (nothing wrong could be seen, but something that cannot be seen from
#: outside decides whether it is safe) and SKIP (not tested, with why).
PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
#: OpenSSL's default TLS 1.3 suites, which the MSA keeps.
DEFAULT_TLS13_CIPHERS = (
    "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
)
#: The EHLO name the probes give.
HELO = "selftest.digipoort-msa.invalid"


@attrs.frozen
class ProbeResult:
    """
    One row of the report.

    @ivar name: the probe.
    @ivar status: L{PASS}, L{WARN}, L{FAIL} or L{SKIP}.
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
    #: C{"smtp"} (STARTTLS after EHLO) or C{"pop3"} (STLS after the
    #: greeting, RFC 2595); the TLS probes work on either.
    protocol: str = "smtp"

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


def guard(name: str, probe: Callable[[], list[ProbeResult]]) -> list[ProbeResult]:
    """
    Run C{probe}; a L{ProbeError} becomes a FAIL row named C{name}.
    """
    try:
        return probe()
    except ProbeError as e:
        return [ProbeResult(name, FAIL, str(e))]


def isIP(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def sslReason(e: Exception) -> str:
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
            raise ProbeError(f"cannot send: {sslReason(e)}")

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
            raise ProbeError(f"connection error: {sslReason(e)}")
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def readLine(self, after: str = "") -> bytes:
        """
        The next line, without its CRLF.

        @param after: what was read before it, for the error.
        @raise ProbeError: when the connection closed or timed out first.
        """
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ProbeError(f"connection closed by the server{after}")
        raw, self.buffer = self.buffer.split(b"\r\n", 1)
        return raw

    def readReply(self) -> Reply:
        """
        The next reply.

        @raise ProbeError: when the connection closed or timed out first.
        """
        lines: list[str] = []
        while True:
            raw = self.readLine(f" after {lines!r}" if lines else "")
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

    def command(
        self, line: str, expect: Iterable[int] | None = None, shown: str = ""
    ) -> Reply:
        """
        Send one command and read its reply.

        @param expect: the codes that let the probe go on; any other raises
            L{ProbeError}.
        @param shown: how the command is named in that error, instead of
            the line itself (which may carry a password).
        """
        self.send(line.encode("utf-8") + b"\r\n")
        reply = self.readReply()
        if expect is not None and reply.code not in expect:
            raise ProbeError(f"{shown or line} answered {reply}")
        return reply

    def startTLS(self, context: SSL.Context) -> SSL.Connection:
        """
        The TLS handshake over this connection (the plaintext buffer must be
        empty: bytes read past the last reply would be lost).
        """
        connection = SSL.Connection(context, self.sock)
        name = self.target.name
        if not isIP(name):
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
        reply = self.command(f"EHLO {HELO}", (250,))
        return [line.upper() for line in reply.lines[1:]]


def beginSTLS(session: SMTPSession) -> None:
    """
    POP3's way into TLS (RFC 2595): the C{+OK} greeting, C{STLS}, C{+OK}.

    @raise ProbeError: when the server said anything else.
    """
    greeting = session.readLine()
    if not greeting.startswith(b"+OK"):
        raise ProbeError(f"greeting: {greeting[:80]!r}")
    session.send(b"STLS\r\n")
    reply = session.readLine()
    if not reply.startswith(b"+OK"):
        raise ProbeError(f"STLS answered {reply[:80]!r}")


def openTLS(target: Target, context: SSL.Context) -> SMTPSession:
    """
    A session in TLS: STARTTLS after EHLO (STLS after the greeting for
    POP3), or the handshake first on an implicit listener (its greeting
    not read yet).

    @raise ProbeError: when the SMTP part did not get as far as the handshake.
    @raise SSL.Error: when the handshake failed.
    """
    session = SMTPSession(target)
    try:
        if not target.implicit and target.protocol == "pop3":
            beginSTLS(session)
        elif not target.implicit:
            session.greet()
            session.command("STARTTLS", (220,))
        session.startTLS(context)
    except BaseException:
        session.close()
        raise
    return session


def clientContext(
    minimum: int = SSL.TLS1_2_VERSION,
    maximum: int | None = None,
    ciphers: str = "ALL:@SECLEVEL=0",
) -> SSL.Context:
    """
    A probing client context: no verification
    (L{msa.admin.tlsprobes.probeCertificate} does that), security level 0
    so that the local OpenSSL offers what is asked.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(minimum)
    if maximum is not None:
        context.set_max_proto_version(maximum)
    context.set_cipher_list(ciphers.encode("ascii"))
    context.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    return context


def handshake(
    target: Target, context: SSL.Context
) -> tuple[SSL.Connection | None, str]:
    """
    Try a handshake.

    @return: the connection (closed already) and its version and cipher; or
        L{None} and why the handshake failed.
    @raise ProbeError: when the listener did not get as far as the handshake.
    """
    try:
        session = openTLS(target, context)
    except (SSL.Error, OSError) as e:
        return None, sslReason(e)
    with session:
        tls = session.tls
        assert tls is not None
        return tls, f"{tls.get_protocol_version_name()} {tls.get_cipher_name()}"


def verifyingContext(target: Target, errors: list[str]) -> SSL.Context:
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


def checkName(connection: SSL.Connection, name: str) -> str | None:
    """
    Why the server's certificate is not valid for C{name}, or L{None}.
    """
    from service_identity import VerificationError
    from service_identity.pyopenssl import verify_hostname, verify_ip_address

    try:
        if isIP(name):
            verify_ip_address(connection, name)
        else:
            verify_hostname(connection, name)
    except VerificationError as e:
        return str(e)
    return None
