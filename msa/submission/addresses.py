# -*- test-case-name: tests.test_addresses,tests.test_mutants -*-
"""
Parsing of MAIL FROM and RCPT TO arguments (RFC 5321 4.1.2): paths, and
the ESMTP parameters after them through L{msa.submission.parameters}.
Addresses must be complete on injection (R8): the MSA never adds a domain
or rewrites an address, it refuses an incomplete one.
"""

import re

from msa.errors import SMTPReply

# One grammar for the envelope and the header From: (msa.policy.mailboxes).
from msa.policy.mailboxes import DOMAIN, DOT_ATOM, IPV4, IPV6, MAX_LOCAL_PART, QUOTED
from msa.submission.parameters import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    parseParameters,
)

# The domain is what follows the last "@": a quoted local part may hold "@"
# ("a@evil.nl"@acme.nl is a mailbox of acme.nl), a domain never does.
_mailbox = re.compile(
    rf"(?P<local>{DOT_ATOM}|{QUOTED})@(?P<domain>{DOMAIN}|{IPV4}|{IPV6})\Z"
)
_command = re.compile(rb"(?P<kw>FROM|TO):\s*(?P<rest>.*)\Z", re.I | re.S)

MAX_DOMAIN = 255
MAX_PATH = 256


def _incomplete(address: str) -> SMTPReply:
    return SMTPReply(
        553,
        "5.1.3",
        f"<{address}>: address must be complete and fully qualified "
        "(local-part@domain.example); it is never completed for you",
    )


def parseMailbox(address: str) -> str:
    """
    Check that C{address} is a complete mailbox and return it unchanged.

    @raise SMTPReply: 553 5.1.3 for anything else.
    """
    if not address.isascii():
        raise SMTPReply(
            553, "5.6.7", "Non-ASCII addresses are not supported (no SMTPUTF8)"
        )
    if address.startswith("@"):
        raise SMTPReply(553, "5.1.3", "Source routes are not accepted")
    match = _mailbox.match(address)
    if match is None:
        raise _incomplete(address)
    if (
        len(match.group("local")) > MAX_LOCAL_PART
        or len(match.group("domain")) > MAX_DOMAIN
        or len(address) > MAX_PATH
    ):
        raise SMTPReply(553, "5.1.3", "Address too long (RFC 5321 4.5.3.1)")
    return address


def _splitPath(argument: bytes, keyword: bytes) -> tuple[str, str]:
    match = _command.match(argument.strip())
    if match is None or match.group("kw").upper() != keyword:
        verb = "MAIL FROM" if keyword == b"FROM" else "RCPT TO"
        raise SMTPReply(501, "5.5.4", f"Syntax: {verb}:<address>")
    try:
        rest = match.group("rest").decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPReply(
            553, "5.6.7", "Non-ASCII addresses are not supported (no SMTPUTF8)"
        )
    if rest.startswith("<"):
        end = _closingBracket(rest)
        if end < 0:
            raise SMTPReply(
                501, "5.1.7" if keyword == b"FROM" else "5.1.3", "Bad address syntax"
            )
        path, params = rest[1:end], rest[end + 1 :]
        if params and params[0] not in " \t":
            raise SMTPReply(501, "5.5.4", "Syntax error after the address")
    else:
        path, _, params = rest.partition(" ")
    return path, params


def _closingBracket(text: str) -> int:
    """
    The index of the ">" that closes the path, skipping quoted strings.
    """
    quoted = escaped = False
    for i, c in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def parseMailArgument(argument: bytes) -> tuple[str, dict[str, str | None]]:
    """
    Parse what follows C{MAIL}: C{FROM:<path> [parameters]}.

    @return: the sender (C{""} for C{<>}) and the parameters.
    """
    path, rest = _splitPath(argument, b"FROM")
    params = parseParameters(rest, MAIL_PARAMETERS)
    if path == "":
        return "", params
    return parseMailbox(path), params


def parseRcptArgument(argument: bytes) -> tuple[str, dict[str, str | None]]:
    """
    Parse what follows C{RCPT}: C{TO:<path> [parameters]}.
    """
    path, rest = _splitPath(argument, b"TO")
    params = parseParameters(rest, RCPT_PARAMETERS)
    if path == "":
        raise _incomplete(path)
    return parseMailbox(path), params
