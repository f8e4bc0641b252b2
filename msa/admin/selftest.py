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
   default) and none that is weak by L{msa.admin.tlsprobes.weakness},
   whatever is expected.
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

The connections are in L{msa.admin.probeclient}, the TLS probes in
L{msa.admin.tlsprobes}; this module has the SMTP probes, the run and the
command.
"""

import argparse
import base64
import datetime
import email.utils
import functools
import os
import secrets
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

from msa.admin.probeclient import (
    DEFAULT_TLS13_CIPHERS,
    FAIL,
    HELO,
    PASS,
    SKIP,
    Account,
    ProbeError,
    ProbeResult,
    SMTPSession,
    Target,
    checkName,
    clientContext,
    openTLS,
    sslReason,
    verifyingContext,
)
from msa.admin.tlsprobes import (
    expectedCiphers,
    probeCertificate,
    probeCiphers,
    probeGroups,
    probeOldVersions,
)
from msa.tls import DEFAULT_CIPHERS, DEFAULT_GROUPS

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
    allowed = ", ".join(PRE_TLS_ALLOWED)
    return [
        ProbeResult(
            "pre-tls-530",
            PASS,
            f"{names}: each answered 530 (R3 allows only {allowed})",
        )
    ]


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
            session.startTLS(clientContext())
        except SSL.Error as e:
            return [
                ProbeResult(
                    name,
                    FAIL,
                    f"handshake after STARTTLS failed ({sslReason(e)}); the "
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
    offered = [k for k in keywords if k.replace("=", " ").split()[:1] == ["AUTH"]]
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


class _Untrusted(ProbeError):
    """
    The server's certificate cannot be trusted with a password.
    """


def _openTrusted(target: Target) -> SMTPSession:
    """
    A TLS session whose certificate verified for the name.

    @raise _Untrusted: when it did not, or the handshake failed.
    """
    errors: list[str] = []
    try:
        session = openTLS(target, verifyingContext(target, errors))
    except (SSL.Error, OSError) as e:
        raise _Untrusted(f"handshake failed: {sslReason(e)}")
    except ProbeError as e:
        raise _Untrusted(str(e))
    tls = session.tls
    assert tls is not None
    if errors or checkName(tls, target.name) is not None:
        session.close()
        if errors:
            raise _Untrusted(f"the certificate does not verify ({errors[0]})")
        raise _Untrusted(f"the certificate is not valid for {target.name}")
    return session


def _untrusted(target: Target) -> str | None:
    """
    Why the server's certificate cannot be trusted with a password (it
    does not verify, or not for the name), or L{None} when it can.
    """
    try:
        _openTrusted(target).close()
    except _Untrusted as e:
        return str(e)
    return None


def _login(target: Target) -> SMTPSession:
    """
    A verified TLS session logged in with the account, after RCPT.

    @raise ProbeError: when any step is refused.
    """
    account = target.account
    assert account is not None
    session = _openTrusted(target)
    try:
        if target.implicit:
            greeting = session.readReply()
            if greeting.code != 220:
                raise ProbeError(f"greeting: {greeting}")
        keywords = session.command(f"EHLO {HELO}", (250,)).lines[1:]
        mechanisms: set[str] = set()
        for line in keywords:
            words = line.upper().replace("=", " ").split()
            if words and words[0] == "AUTH":
                mechanisms.update(words[1:])
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{account.user}\0{account.password}".encode())
            session.command(f"AUTH PLAIN {token.decode()}", (235,), "AUTH PLAIN")
        elif "LOGIN" in mechanisms:
            user = base64.b64encode(account.user.encode()).decode()
            password = base64.b64encode(account.password.encode()).decode()
            session.command("AUTH LOGIN", (334,))
            session.command(user, (334,), "AUTH LOGIN user name")
            session.command(password, (235,), "AUTH LOGIN password")
        else:
            raise ProbeError(f"neither PLAIN nor LOGIN offered after TLS: {keywords}")
        session.command(f"MAIL FROM:<{account.sender}>", (250,))
        session.command(f"RCPT TO:<{account.recipient}>", (250, 251))
        session.command("DATA", (354,))
    except BaseException:
        session.close()
        raise
    return session


def probeMessages(target: Target, runId: str) -> list[ProbeResult]:
    """
    A well-formed message must be accepted with 250; then the smuggling
    forms.  When the session for the clean message cannot get as far as
    DATA (a wrong password, a sender the account may not use), the
    smuggling probes are not tried: each would fail the same way, and
    repeated failed logins are slowed down by the server.
    """
    try:
        session = _login(target)
    except ProbeError as e:
        reason = "not tried: the session for clean-message failed"
        return [ProbeResult("clean-message", FAIL, str(e))] + [
            ProbeResult(f"smuggling {label}", SKIP, reason)
            for label, _ in SMUGGLING_FORMS
        ]
    with session:
        session.send(_message(target, runId, "clean message", "clean") + b".\r\n")
        reply = session.readReply()
        session.send(b"QUIT\r\n")
    status = PASS if reply.code == 250 else FAIL
    return [ProbeResult("clean-message", status, str(reply))] + probeSmuggling(
        target, runId
    )


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
            openTLS(target, clientContext()) if target.implicit else SMTPSession(target)
        ) as session:
            greeting = session.readReply()
            session.send(b"QUIT\r\n")
    except (ProbeError, SSL.Error, OSError) as e:
        detail = str(e) if isinstance(e, ProbeError) else sslReason(e)
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
        results += _guard("clean-message", lambda: probeMessages(target, runId))
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
    parser.add_argument("host", metavar="HOST")
    parser.add_argument("port", type=int, metavar="PORT")
    parser.add_argument(
        "--implicit", action="store_true", help="the listener is TLS from the start"
    )
    parser.add_argument(
        "--servername",
        metavar="NAME",
        help="the name the certificate must be valid for (default HOST)",
    )
    parser.add_argument(
        "--ca-file", metavar="PEM", help="trust these CAs, not the system store"
    )
    parser.add_argument(
        "--min-days",
        type=int,
        default=14,
        metavar="N",
        help="least days the certificate must have left (%(default)s)",
    )
    parser.add_argument(
        "--expect-ciphers",
        default=DEFAULT_CIPHERS + ":" + DEFAULT_TLS13_CIPHERS,
        metavar="CIPHERS",
        help="OpenSSL cipher string of the suites allowed (the MSA's defaults)",
    )
    parser.add_argument(
        "--expect-groups",
        default=DEFAULT_GROUPS,
        metavar="GROUPS",
        help="groups allowed (%(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest wait for a reply (%(default)s)",
    )
    parser.add_argument("--user", metavar="USER", help="account for the messages")
    parser.add_argument("--password-file", metavar="FILE", help="its password")
    parser.add_argument(
        "--sender", metavar="ADDRESS", help="envelope sender the account may use"
    )
    parser.add_argument(
        "--rcpt", metavar="ADDRESS", help="recipient of the test messages"
    )


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
    try:
        expectedCiphers(args.expect_ciphers)
    except ValueError as e:
        print(f"digipoort-msa-admin: --expect-ciphers: {e}", file=stderr)
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
