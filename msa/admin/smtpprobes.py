# -*- test-case-name: tests.test_selftest_smuggling,tests.test_selftest_plain -*-
"""
The SMTP probes of C{digipoort-msa-admin selftest} (L{msa.admin.selftest}):
the commands before STARTTLS, the STARTTLS injection, no AUTH before TLS,
and with an account a clean message and the SMTP smuggling forms.  Each
returns L{msa.admin.probeclient.ProbeResult}s.
"""

import base64
import email.utils
import re

from OpenSSL import SSL

from msa.admin.probeclient import (
    FAIL,
    HELO,
    PASS,
    SKIP,
    WARN,
    ProbeError,
    ProbeResult,
    Reply,
    SMTPSession,
    Target,
    checkName,
    clientContext,
    openTLS,
    sslReason,
    verifyingContext,
)

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


def probeMessage(target: Target, runId: str, subject: str, tag: str) -> bytes:
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


class Untrusted(ProbeError):
    """
    The server's certificate cannot be trusted with a password.
    """


def openTrusted(target: Target) -> SMTPSession:
    """
    A TLS session whose certificate verified for the name.

    @raise Untrusted: when it did not, or the handshake failed.
    """
    errors: list[str] = []
    try:
        session = openTLS(target, verifyingContext(target, errors))
    except (SSL.Error, OSError) as e:
        raise Untrusted(f"handshake failed: {sslReason(e)}")
    except ProbeError as e:
        raise Untrusted(str(e))
    tls = session.tls
    assert tls is not None
    if errors or checkName(tls, target.name) is not None:
        session.close()
        if errors:
            raise Untrusted(f"the certificate does not verify ({errors[0]})")
        raise Untrusted(f"the certificate is not valid for {target.name}")
    return session


def untrustedReason(target: Target) -> str | None:
    """
    Why the server's certificate cannot be trusted with a password (it
    does not verify, or not for the name), or L{None} when it can.
    """
    try:
        openTrusted(target).close()
    except Untrusted as e:
        return str(e)
    return None


def loginSession(target: Target, data: bool = True) -> SMTPSession:
    """
    A verified TLS session logged in with the account, after RCPT and (with
    C{data}) DATA's 354, or (without) before MAIL.

    @raise ProbeError: when any step is refused.
    """
    account = target.account
    assert account is not None
    session = openTrusted(target)
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
        if data:
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
        session = loginSession(target)
    except ProbeError as e:
        reason = "not tried: the session for clean-message failed"
        return [ProbeResult("clean-message", FAIL, str(e))] + [
            ProbeResult(f"smuggling {label}", SKIP, reason)
            for label, _ in SMUGGLING_FORMS
        ]
    with session:
        session.send(probeMessage(target, runId, "clean message", "clean") + b".\r\n")
        reply = session.readReply()
        session.send(b"QUIT\r\n")
    status = PASS if reply.code == 250 else FAIL
    return [ProbeResult("clean-message", status, str(reply))] + probeSmuggling(
        target, runId
    )


def probeSmuggling(target: Target, runId: str) -> list[ProbeResult]:
    """
    For each bare CR/LF end-of-data form: the message, the form, a smuggled
    transaction, the real end, QUIT, all in one write; each form judged by
    L{smugglingVerdict}.
    """
    account = target.account
    assert account is not None
    results = []
    for label, form in SMUGGLING_FORMS:
        name = f"smuggling {label}"
        tag = "smuggled-" + label.replace(".", "-")
        body = probeMessage(target, runId, f"smuggling probe {label}", "outer-" + tag)
        smuggled = (
            f"MAIL FROM:<{account.sender}>\r\nRCPT TO:<{account.recipient}>\r\nDATA\r\n"
        ).encode("ascii") + probeMessage(
            target, runId, f"SMUGGLED message ({label})", tag
        )
        try:
            session = loginSession(target)
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
        results.append(smugglingVerdict(label, replies))
    return results


def smugglingVerdict(label: str, replies: list[Reply]) -> ProbeResult:
    """
    What the replies to one smuggling attempt show.  The client sent one
    message and QUIT, so a server that kept the smuggled commands inside the
    message answers exactly twice: once to the message, 221 to QUIT (or only
    once, when it refused the message and closed the connection).

     - Any other reply answers a smuggled command (MAIL, RCPT, DATA, or the
       second message's end): C{label} ended the data and the smuggled
       transaction ran.  L{FAIL}.
     - The message refused with 5xx: L{PASS}.
     - The message accepted as one (or deferred with 4xx, or the connection
       closed without a reply): L{WARN}.  Nothing ran here, but the bare CR
       or LF may be in a queued message; that is safe only if the server
       normalises it before relaying (Postfix with
       C{smtpd_forbid_bare_newline}, say), which cannot be seen from outside.
    """
    name = f"smuggling {label}"
    if not replies:
        return ProbeResult(
            name,
            WARN,
            "the connection closed with no reply to the message: no smuggled "
            "command was answered, but the client cannot tell whether the "
            "message was kept",
        )
    first, extra = replies[0], replies[1:]
    if extra and extra[-1].code == 221:
        extra = extra[:-1]
    if extra:
        shown = "; ".join(str(r) for r in replies)
        ids = sorted({m for r in replies for m in _queueIds(r)})
        queued = f" ({len(ids)} queue ids: {', '.join(ids)})" if len(ids) > 1 else ""
        return ProbeResult(
            name,
            FAIL,
            f"{label} ended the message and the smuggled commands were "
            f"answered{queued}: {shown}",
        )
    if 500 <= first.code < 600:
        return ProbeResult(name, PASS, f"refused: {first}")
    if first.code == 250:
        return ProbeResult(
            name,
            WARN,
            f"accepted as one message with {label} inside ({first}); no smuggled "
            "command ran here, but a next hop that ends data on it would run "
            "them unless this server normalises bare CR/LF before relaying "
            "(not visible from outside)",
        )
    return ProbeResult(
        name,
        WARN,
        f"not refused for good: {first}; no smuggled command ran, but a "
        "retry may be accepted with it inside",
    )


def _queueIds(reply: Reply) -> list[str]:
    """
    The queue ids in a reply's "queued as ID" (Postfix, the MSA, Exim's
    "id=ID").
    """
    text = " ".join(reply.lines)
    return re.findall(r"(?:queued as|id=)\s*([A-Za-z0-9._-]+)", text)
