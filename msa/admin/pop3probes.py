# -*- test-case-name: tests.test_selftest_pop3 -*-
"""
The POP3 probes of C{digipoort-msa-admin selftest --pop3}
(L{msa.admin.selftest}): the commands refused before STLS, the STLS
injection, no login offered before TLS, the TLS probes of
L{msa.admin.tlsprobes} (which reach TLS through STLS or implicit TLS) and,
with an account, a clean RETR round trip that deletes nothing.

A POP3 reply is one status line, C{+OK} or C{-ERR} (RFC 1939 3); a
multi-line one ends with a line of one dot, its other lines dot-stuffed.
The connection is L{msa.admin.probeclient.SMTPSession}'s (lines, TLS, the
buffer kept across the handshake).
"""

import base64
import functools

from OpenSSL import SSL

from msa.admin.probeclient import (
    FAIL,
    PASS,
    SKIP,
    WARN,
    ProbeError,
    ProbeResult,
    SMTPSession,
    Target,
    clientContext,
    guard,
    openTLS,
    sslReason,
)
from msa.admin.smtpprobes import openTrusted, untrustedReason
from msa.admin.tlsprobes import probeListener

#: The commands that carry a user name or password; before STLS each must
#: get C{-ERR} (RFC 2595 4, the R3 rule), each tried on its own connection.
PRE_TLS_COMMANDS = (
    "USER selftest",
    "PASS selftest",
    "AUTH PLAIN",
    "APOP selftest c4c9334bac560ecc979e58001b3e22fb",
)
#: The probes before TLS, reported N/A on an implicit-TLS listener.
PRE_TLS_PROBES = ("pre-tls-err", "stls-injection", "no-auth-before-tls")


def readStatus(session: SMTPSession) -> str:
    """
    The next status line, decoded.

    @raise ProbeError: when it is neither C{+OK} nor C{-ERR}, or nothing came.
    """
    line = session.readLine().decode("utf-8", "replace")
    if not line.startswith(("+OK", "-ERR")):
        raise ProbeError(f"not a POP3 reply: {line[:80]!r}")
    return line


def command(session: SMTPSession, line: str, shown: str = "") -> str:
    """
    Send one command; its reply must be C{+OK}.

    @param shown: how the command is named in the error, instead of the
        line itself (which may carry a password).
    @raise ProbeError: on C{-ERR}.
    """
    session.send(line.encode("utf-8") + b"\r\n")
    reply = readStatus(session)
    if not reply.startswith("+OK"):
        raise ProbeError(f"{shown or line} answered {reply}")
    return reply


def readMultiline(session: SMTPSession) -> list[bytes]:
    """
    The lines of a multi-line reply after its status line, up to the line
    of one dot, unstuffed.
    """
    lines: list[bytes] = []
    while (line := session.readLine(f" after {len(lines)} line(s) of a reply")) != b".":
        lines.append(line[1:] if line.startswith(b".") else line)
    return lines


def readToEnd(session: SMTPSession) -> list[bytes]:
    """
    Every line until the server closes the connection.
    """
    lines: list[bytes] = []
    while True:
        try:
            lines.append(session.readLine())
        except ProbeError:
            if session.eof:
                return lines
            raise


# -- before TLS ---------------------------------------------------------------


def probePreTLSCommands(target: Target) -> list[ProbeResult]:
    """
    Each command that carries a user name or password must get C{-ERR}
    before STLS (and a SASL exchange must not start).
    """
    wrong = []
    for line in PRE_TLS_COMMANDS:
        with SMTPSession(target) as session:
            readStatus(session)
            session.send(line.encode("ascii") + b"\r\n")
            reply = session.readLine().decode("utf-8", "replace")
            if not reply.startswith("-ERR"):
                wrong.append(f"{line.split()[0]} -> {reply[:80]}")
                continue
            session.send(b"QUIT\r\n")
    names = ", ".join(line.split()[0] for line in PRE_TLS_COMMANDS)
    if wrong:
        return [
            ProbeResult(
                "pre-tls-err",
                FAIL,
                "not refused before STLS (a password could go in the clear): "
                + "; ".join(wrong),
            )
        ]
    return [ProbeResult("pre-tls-err", PASS, f"{names}: each answered -ERR")]


def probeInjection(target: Target) -> list[ProbeResult]:
    """
    C{STLS} and C{CAPA} in one write: the CAPA must be answered neither in
    plaintext nor inside TLS after the handshake (CVE-2011-0411 class).
    """
    name = "stls-injection"
    with SMTPSession(target) as session:
        readStatus(session)
        session.send(b"STLS\r\nCAPA\r\n")
        reply = readStatus(session)
        if not reply.startswith("+OK"):
            return [ProbeResult(name, FAIL, f"STLS answered {reply}")]
        if session.buffer:
            extra = session.buffer[:80].decode("ascii", "replace")
            return [
                ProbeResult(
                    name,
                    FAIL,
                    f"the injected CAPA was answered in plaintext: {extra!r}",
                )
            ]
        try:
            session.startTLS(clientContext())
        except SSL.SysCallError as e:
            # Closed or reset, with nothing read: Dovecot takes the bytes
            # behind STLS for TLS, fails the handshake and disconnects.
            return [
                ProbeResult(
                    name,
                    PASS,
                    f"the server ended the connection at the handshake "
                    f"({sslReason(e)}) rather than answer the injected CAPA",
                )
            ]
        except SSL.Error as e:
            return [
                ProbeResult(
                    name,
                    FAIL,
                    f"handshake after STLS failed ({sslReason(e)}); the injected "
                    "CAPA may have been answered in plaintext",
                )
            ]
        session.send(b"QUIT\r\n")
        lines = readToEnd(session)
    if len(lines) == 1 and lines[0].startswith(b"+OK"):
        return [
            ProbeResult(
                name,
                PASS,
                "the CAPA sent in plaintext behind STLS was discarded (QUIT "
                "after the handshake got the only reply)",
            )
        ]
    shown = " / ".join(line.decode("utf-8", "replace") for line in lines[:6])
    return [
        ProbeResult(
            name,
            FAIL,
            f"after the handshake QUIT got {shown or 'nothing'}: the CAPA injected "
            "in plaintext was processed inside TLS (CVE-2011-0411 class)",
        )
    ]


def probeNoAuthBeforeTLS(target: Target) -> list[ProbeResult]:
    """
    CAPA before TLS must offer neither SASL mechanisms nor USER.
    """
    name = "no-auth-before-tls"
    with SMTPSession(target) as session:
        readStatus(session)
        session.send(b"CAPA\r\n")
        reply = readStatus(session)
        if not reply.startswith("+OK"):
            return [ProbeResult(name, WARN, f"CAPA answered {reply}: cannot tell")]
        capabilities = [
            line.decode("utf-8", "replace").upper() for line in readMultiline(session)
        ]
        session.send(b"QUIT\r\n")
    offered = [
        c for c in capabilities if c.split()[:1] == ["USER"] or c.startswith("SASL ")
    ]
    stls = "STLS offered" if "STLS" in capabilities else "no STLS"
    if offered:
        return [
            ProbeResult(
                name,
                FAIL,
                f"CAPA before TLS offers {', '.join(offered)}: passwords could "
                "go in the clear",
            )
        ]
    return [ProbeResult(name, PASS, f"neither USER nor SASL in CAPA ({stls})")]


# -- with an account ------------------------------------------------------------


def _login(target: Target) -> SMTPSession:
    """
    A TLS session whose certificate verified, logged in: AUTH PLAIN when
    CAPA offers it, else USER and PASS.

    @raise ProbeError: when any step is refused.
    """
    account = target.account
    assert account is not None
    session = openTrusted(target)
    try:
        if target.implicit:
            greeting = readStatus(session)
            if not greeting.startswith("+OK"):
                raise ProbeError(f"greeting: {greeting}")
        command(session, "CAPA")
        capabilities = [
            line.decode("utf-8", "replace").upper() for line in readMultiline(session)
        ]
        mechanisms = {
            word
            for c in capabilities
            if c.startswith("SASL ")
            for word in c.split()[1:]
        }
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{account.user}\0{account.password}".encode())
            command(session, f"AUTH PLAIN {token.decode()}", "AUTH PLAIN")
        elif "USER" in capabilities:
            command(session, f"USER {account.user}")
            command(session, f"PASS {account.password}", "PASS")
        else:
            raise ProbeError(f"neither SASL PLAIN nor USER after TLS: {capabilities}")
    except BaseException:
        session.close()
        raise
    return session


def _smallest(session: SMTPSession) -> tuple[int, int] | None:
    """
    The number and size of the smallest message (LIST), or L{None}.
    """
    command(session, "LIST")
    sizes = []
    for line in readMultiline(session):
        fields = line.split()
        sizes.append((int(fields[1]), int(fields[0])))
    if not sizes:
        return None
    smallest = min(sizes)
    return smallest[1], smallest[0]


def _uid(session: SMTPSession, number: int) -> str:
    return command(session, f"UIDL {number}").split()[2]


def probeRetrieval(target: Target) -> list[ProbeResult]:
    """
    Log in, RETR the smallest message, QUIT without DELE: the message has
    the size LIST gave, ends with CRLF, and a second session still sees it
    under the same uid (the self-test deletes nothing).
    """
    name = "clean-retr"
    account = target.account
    assert account is not None
    with _login(target) as session:
        smallest = _smallest(session)
        if smallest is None:
            session.send(b"QUIT\r\n")
            return [
                ProbeResult(
                    name,
                    SKIP,
                    f"logged in as {account.user}; the mailbox is empty, "
                    "nothing to RETR",
                )
            ]
        number, listed = smallest
        uid = _uid(session, number)
        command(session, f"RETR {number}")
        lines = readMultiline(session)
        command(session, "QUIT")
    octets = sum(len(line) + 2 for line in lines)
    problems = []
    if octets != listed:
        problems.append(f"RETR gave {octets} octets, LIST said {listed}")
    if any(b"\r" in line or b"\n" in line for line in lines):
        problems.append("bare CR or LF in the message")
    with _login(target) as session:
        try:
            again = _uid(session, number)
        except ProbeError as e:
            again = str(e)
        command(session, "QUIT")
    if again != uid:
        problems.append(
            f"after QUIT without DELE message {number} is {again!r}, was {uid!r}"
        )
    if problems:
        return [
            ProbeResult(name, FAIL, f"message {number} ({uid}): " + "; ".join(problems))
        ]
    return [
        ProbeResult(
            name,
            PASS,
            f"message {number} ({uid}): {octets} octets as LIST said, CRLF lines; "
            "still there after QUIT without DELE",
        )
    ]


# -- the whole run --------------------------------------------------------------


def runPOP3Probes(target: Target) -> list[ProbeResult]:
    """
    Every POP3 probe against C{target}, in the order of the report.
    """
    try:
        with (
            openTLS(target, clientContext()) if target.implicit else SMTPSession(target)
        ) as session:
            greeting = readStatus(session)
            session.send(b"QUIT\r\n")
    except (ProbeError, SSL.Error, OSError) as e:
        detail = str(e) if isinstance(e, ProbeError) else sslReason(e)
        return [ProbeResult("greeting", FAIL, detail)]
    ok = greeting.startswith("+OK")
    results = [ProbeResult("greeting", PASS if ok else FAIL, greeting)]
    if not ok:
        return results
    preTLS = (probePreTLSCommands, probeInjection, probeNoAuthBeforeTLS)
    results += probeListener(target, list(zip(PRE_TLS_PROBES, preTLS, strict=True)))
    if target.account is None:
        results.append(
            ProbeResult("clean-retr", SKIP, "no account (--user, --password-file)")
        )
    elif (untrusted := untrustedReason(target)) is not None:
        results.append(
            ProbeResult("clean-retr", SKIP, f"no password sent: {untrusted}")
        )
    else:
        results += guard("clean-retr", functools.partial(probeRetrieval, target))
    return results
