# -*- test-case-name: tests.test_selftest,tests.test_selftest_report -*-
"""
C{digipoort-msa-admin selftest HOST PORT}: probe a running submission
listener, local or remote, the way an operator would after a deployment or
an auditor at any time, and print one row per probe: PASS, WARN, FAIL or
SKIP (with the reason), and what was seen.  The exit code is 1 when any
probe failed, 0 otherwise (WARN included; 2 for usage errors).

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
 - C{extensions}: the SMTP extensions of issue 21 the listener offers over
   TLS (DSN, SMTPUTF8, CHUNKING, BINARYMIME, REQUIRETLS, LIMITS), as a
   PASS row that names them.
 - With an account (C{--user --password-file --sender --rcpt}), after the
   certificate verified (a password is never sent to an unverified server):
   C{clean-message} is accepted with 250, and C{smuggling <form>} for each
   end-of-data form made of CR, LF or CRLF, a dot, and CR, LF or CRLF other
   than CRLF.CRLF, followed by a smuggled transaction and QUIT in one
   write.  FAIL when the smuggled commands ran (any reply beyond the one to
   the message and the 221 to QUIT, such as a second "queued as"); PASS
   when the message was refused with 5xx; WARN when it was accepted as one
   message with the bare CR or LF inside, which is safe only if the server
   normalises it before relaying (Postfix's C{smtpd_forbid_bare_newline})
   and cannot be told from outside.
   C{smuggling BDAT}: where the listener offers CHUNKING, the same forms
   each inside a text message sent as one C{BDAT <size> LAST} chunk: PASS
   when each is refused with 5xx, WARN when one is accepted, FAIL when a
   smuggled command is answered.
   Every message sent carries an C{X-Digipoort-Selftest} header and a
   Subject saying it is a self-test.  Without an account nothing is sent
   that could be delivered.

With C{--pop3} the listener is a POP3 one (STLS, or implicit TLS with
C{--implicit}) and the probes are L{msa.admin.pop3probes}': C{pre-tls-err}
(USER, PASS, AUTH and APOP refused before STLS), C{stls-injection} (STLS
and CAPA in one write), C{no-auth-before-tls} (neither USER nor SASL in
CAPA before TLS), the same TLS probes, and with an account (C{--user
--password-file}) C{clean-retr}: the smallest message RETRed, its size as
LIST said, and still there after QUIT (nothing is deleted).

The connections are in L{msa.admin.probeclient}, the TLS probes in
L{msa.admin.tlsprobes}, the SMTP probes in L{msa.admin.smtpprobes}, the
POP3 ones in L{msa.admin.pop3probes}; this module has the run, the report
and the command.
"""

import argparse
import datetime
import os
import secrets
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

from msa.admin.chunkprobes import probeBDATSmuggling, probeExtensions
from msa.admin.pop3probes import runPOP3Probes
from msa.admin.probeclient import (
    DEFAULT_TLS13_CIPHERS,
    FAIL,
    PASS,
    SKIP,
    WARN,
    Account,
    ProbeError,
    ProbeResult,
    SMTPSession,
    Target,
    clientContext,
    guard,
    openTLS,
    sslReason,
)
from msa.admin.smtpprobes import (
    SMUGGLING_FORMS,
    probeInjection,
    probeMessages,
    probeNoAuthBeforeTLS,
    probePreTLSCommands,
    untrustedReason,
)
from msa.admin.tlsprobes import expectedCiphers, probeListener
from msa.tls import DEFAULT_CIPHERS, DEFAULT_GROUPS

# -- the whole run ------------------------------------------------------------


def runProbes(target: Target) -> list[ProbeResult]:
    """
    Every probe against C{target}, in the order of the report.
    """
    if target.protocol == "pop3":
        return runPOP3Probes(target)
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
    results += probeListener(target, preTLS)
    keywords: list[str] = []
    try:
        extensions, keywords = probeExtensions(target)
        results += extensions
    except (ProbeError, SSL.Error, OSError) as e:
        detail = str(e) if isinstance(e, ProbeError) else sslReason(e)
        results.append(ProbeResult("extensions", FAIL, detail))
    runId = (
        datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        + "-"
        + secrets.token_hex(3)
    )
    messageProbes = ["clean-message"] + [f"smuggling {f}" for f, _ in SMUGGLING_FORMS]
    messageProbes.append("smuggling BDAT")
    if target.account is None:
        results += [
            ProbeResult(
                n, SKIP, "no account (--user, --password-file, --sender, --rcpt)"
            )
            for n in messageProbes
        ]
    elif (untrusted := untrustedReason(target)) is not None:
        results += [
            ProbeResult(n, SKIP, f"no password sent: {untrusted}")
            for n in messageProbes
        ]
    else:
        messages = guard("clean-message", lambda: probeMessages(target, runId))
        results += messages
        if messages[0].status == FAIL:
            reason = "not tried: the session for clean-message failed"
            results.append(ProbeResult("smuggling BDAT", SKIP, reason))
        else:
            results += guard(
                "smuggling BDAT", lambda: probeBDATSmuggling(target, runId, keywords)
            )
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
        help="probe a running SMTP or POP3 listener (TLS, STARTTLS/STLS, smuggling)",
        description=(
            "Probe a running submission (or, with --pop3, POP3) listener; exit 1 "
            "on any FAIL (not on WARN)."
        ),
    )
    parser.add_argument("host", metavar="HOST")
    parser.add_argument("port", type=int, metavar="PORT")
    parser.add_argument(
        "--implicit", action="store_true", help="the listener is TLS from the start"
    )
    parser.add_argument(
        "--pop3",
        action="store_true",
        help="a POP3 listener (STLS, or implicit TLS): the POP3 probes",
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
    parser.add_argument(
        "--user", metavar="USER", help="account for the messages (POP3: for the RETR)"
    )
    parser.add_argument(
        "--password-file", metavar="FILE", help="its password (first line)"
    )
    parser.add_argument(
        "--sender", metavar="ADDRESS", help="envelope sender the account may use"
    )
    parser.add_argument(
        "--rcpt", metavar="ADDRESS", help="recipient of the test messages"
    )


def selftestCommand(args: argparse.Namespace, stdout: Any, stderr: Any) -> int:
    """
    Run C{selftest} with parsed arguments.

    @return: 0 when nothing failed (warnings included), 1 on any FAIL, 2
        for usage errors.
    """
    accountArgs: tuple = (args.user, args.password_file, args.sender, args.rcpt)
    together = "--user, --password-file, --sender and --rcpt"
    if args.pop3:
        # POP3 only reads: no envelope.
        if args.sender is not None or args.rcpt is not None:
            print(
                "digipoort-msa-admin: selftest: --sender and --rcpt are for "
                "SMTP, not --pop3",
                file=stderr,
            )
            return 2
        accountArgs = (args.user, args.password_file)
        together = "--user and --password-file"
    account = None
    if any(a is not None for a in accountArgs):
        if not all(a is not None for a in accountArgs):
            print(f"digipoort-msa-admin: selftest: {together} go together", file=stderr)
            return 2
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            print(f"digipoort-msa-admin: {args.password_file}: {e}", file=stderr)
            return 2
        account = Account(args.user, password, args.sender or "", args.rcpt or "")
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
        protocol="pop3" if args.pop3 else "smtp",
    )
    results = runProbes(target)
    for line in formatTable(results):
        print(line, file=stdout)
    statuses = (PASS, WARN, FAIL, SKIP)
    counts = {s: sum(r.status == s for r in results) for s in statuses}
    mode = "implicit TLS" if args.implicit else "STLS" if args.pop3 else "STARTTLS"
    if args.pop3:
        mode = f"POP3, {mode}"
    print(
        f"selftest of {args.host}:{args.port} ({mode}): "
        + ", ".join(f"{counts[s]} {s}" for s in statuses),
        file=stdout,
    )
    return 1 if counts[FAIL] else 0
