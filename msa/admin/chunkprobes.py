# -*- test-case-name: tests.test_selftest -*-
"""
The self-test's probes of the extensions a listener offers (issue 21):
which it advertises over TLS, and, when it offers CHUNKING, the SMTP
smuggling forms sent through BDAT (RFC 3030).  A BDAT chunk is counted,
so a smuggled command inside it can only run on a server that miscounts;
what the probe shows is whether the server applies the bare CR/LF rule of
text bodies (RFC 5321 2.3.8) inside chunks too, as this MSA does for
DATA.  Each returns L{msa.admin.probeclient.ProbeResult}s.
"""

from msa.admin.probeclient import (
    FAIL,
    HELO,
    PASS,
    SKIP,
    WARN,
    ProbeError,
    ProbeResult,
    SMTPSession,
    Target,
    clientContext,
    openTLS,
)
from msa.admin.smtpprobes import SMUGGLING_FORMS, loginSession, probeMessage

#: The keywords of issue 21, in the order the report names them.
EXTENSIONS = ("DSN", "SMTPUTF8", "CHUNKING", "BINARYMIME", "REQUIRETLS", "LIMITS")


def extensionKeywords(target: Target) -> list[str]:
    """
    The EHLO keywords the listener offers over TLS, upper case.

    @raise ProbeError: when the session does not get that far.
    """
    with openTLS(target, clientContext()) as session:
        if target.implicit:
            session.readReply()
        keywords = session.command(f"EHLO {HELO}", (250,)).lines[1:]
        session.send(b"QUIT\r\n")
    return [line.upper() for line in keywords]


def probeExtensions(target: Target) -> tuple[list[ProbeResult], list[str]]:
    """
    Which of the extensions of issue 21 the listener offers over TLS.

    @return: the report's row and the keywords.
    """
    keywords = extensionKeywords(target)
    offered = [k for k in keywords if k.split()[0] in EXTENSIONS]
    if not offered:
        text = "none of " + ", ".join(EXTENSIONS) + " offered over TLS"
    else:
        text = "offered over TLS: " + ", ".join(offered)
    return [ProbeResult("extensions", PASS, text)], keywords


def probeBDATSmuggling(
    target: Target, runId: str, keywords: list[str]
) -> list[ProbeResult]:
    """
    Each bare CR/LF end-of-data form inside a text message sent with
    C{BDAT <size> LAST}, one transaction each over one session: each must
    be refused (5xx); one accepted is a warning; a reply to a smuggled
    command (more replies than commands) fails.
    """
    name = "smuggling BDAT"
    if "CHUNKING" not in [k.split()[0] for k in keywords]:
        return [ProbeResult(name, SKIP, "N/A: CHUNKING not offered")]
    account = target.account
    assert account is not None
    refused: list[str] = []
    accepted: list[str] = []
    session: SMTPSession = loginSession(target, data=False)
    with session:
        for label, form in SMUGGLING_FORMS:
            tag = "bdat-smuggled-" + label.replace(".", "-")
            body = probeMessage(target, runId, f"BDAT smuggling probe {label}", tag)
            smuggled = (
                f"MAIL FROM:<{account.sender}>\r\nRCPT TO:<{account.recipient}>\r\n"
            ).encode("ascii")
            content = body.rstrip(b"\r\n") + form + smuggled
            session.command(f"MAIL FROM:<{account.sender}>", (250,))
            session.command(f"RCPT TO:<{account.recipient}>", (250, 251))
            session.send(b"BDAT %d LAST\r\n" % len(content) + content)
            reply = session.readReply()
            (refused if 500 <= reply.code < 600 else accepted).append(
                f"{label} {reply.code}"
            )
        session.send(b"QUIT\r\n")
        try:
            extra = [r for r in session.readAll() if r.code != 221]
        except ProbeError as e:
            extra = []
            accepted.append(str(e))
    if extra:
        shown = "; ".join(str(r) for r in extra)
        return [ProbeResult(name, FAIL, f"smuggled commands were answered: {shown}")]
    if accepted:
        return [
            ProbeResult(
                name,
                WARN,
                "bare CR/LF accepted inside BDAT text: " + ", ".join(accepted),
            )
        ]
    return [
        ProbeResult(
            name, PASS, f"each of the {len(refused)} forms refused inside BDAT text"
        )
    ]
