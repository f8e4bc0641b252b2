# -*- test-case-name: tests.test_addresses,tests.test_mutants -*-
"""
Parsing of MAIL FROM and RCPT TO arguments (RFC 5321 4.1.2): paths, and
the ESMTP parameters after them through L{msa.submission.parameters}.
Addresses must be complete on injection (R8): the MSA never adds a domain
or rewrites an address, it refuses an incomplete one.

With SMTPUTF8 (RFC 6531 3.3) an address may hold UTF-8: a local part of
ASCII atext and non-ASCII characters (no controls), and domain labels that
are U-labels (IDNA 2008).  It is checked against the same grammar as an
ASCII address, with each non-ASCII character of the local part standing
for one atext character and each U-label for its A-label, and its lengths
count octets of UTF-8.  The address is kept exactly as the client sent it
(no normalisation: L{msa.policy.authorization} compares it after NFC).
Without SMTPUTF8, a non-ASCII address is 553 5.6.7 (RFC 6531 3.4).
"""

import re

import idna

from msa.errors import SMTPReply

# One grammar for the envelope and the header From: (msa.policy.mailboxes).
from msa.policy.mailboxes import DOMAIN, DOT_ATOM, IPV4, IPV6, MAX_LOCAL_PART, QUOTED
from msa.submission.extensions import ALL_EXTENSIONS
from msa.submission.parameters import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    offeredParameters,
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

#: What a non-ASCII local part may not hold: C0 and C1 controls, DEL.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NO_SMTPUTF8 = SMTPReply(
    553, "5.6.7", "Non-ASCII addresses are not supported (no SMTPUTF8)"
)
_NEEDS_SMTPUTF8 = SMTPReply(
    553, "5.6.7", "Non-ASCII addresses require the SMTPUTF8 parameter (RFC 6531)"
)


def _incomplete(address: str) -> SMTPReply:
    return SMTPReply(
        553,
        "5.1.3",
        f"<{address}>: address must be complete and fully qualified "
        "(local-part@domain.example); it is never completed for you",
    )


def _asciiShadow(address: str) -> str | None:
    """
    The ASCII address that C{address} (UTF-8) is checked as: each
    non-ASCII character of the local part as C{x}, each U-label of the
    domain as its A-label; L{None} when a character or label cannot be in
    an address (a control character, a label IDNA 2008 refuses).
    """
    local, at, domain = address.rpartition("@")
    if not at or _CONTROLS.search(local):
        return None
    local = "".join(c if c.isascii() else "x" for c in local)
    labels = []
    for label in domain.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(idna.encode(label.lower()).decode("ascii"))
        except idna.IDNAError:
            return None
    return f"{local}@{'.'.join(labels)}"


def parseMailbox(address: str, utf8: bool = False, offered: bool = False) -> str:
    """
    Check that C{address} is a complete mailbox and return it unchanged.

    @param utf8: the transaction has SMTPUTF8: UTF-8 is allowed.
    @param offered: the server offers SMTPUTF8 (for the wording of the
        refusal of a non-ASCII address without it).
    @raise SMTPReply: 553 5.1.3 for anything else; 553 5.6.7 for a
        non-ASCII address without SMTPUTF8.
    """
    checked = address
    if not address.isascii():
        if not utf8:
            raise _NEEDS_SMTPUTF8 if offered else _NO_SMTPUTF8
        shadow = _asciiShadow(address)
        if shadow is None:
            raise _incomplete(address)
        checked = shadow
    if address.startswith("@"):
        raise SMTPReply(553, "5.1.3", "Source routes are not accepted")
    match = _mailbox.match(checked)
    if match is None:
        raise _incomplete(address)
    local, _, domain = address.rpartition("@")
    if (
        len(local.encode("utf-8")) > MAX_LOCAL_PART
        or len(domain.encode("utf-8")) > MAX_DOMAIN
        or len(address.encode("utf-8")) > MAX_PATH
    ):
        raise SMTPReply(553, "5.1.3", "Address too long (RFC 5321 4.5.3.1)")
    return address


def _splitPath(argument: bytes, keyword: bytes, offered: bool) -> tuple[str, str]:
    match = _command.match(argument.strip())
    if match is None or match.group("kw").upper() != keyword:
        verb = "MAIL FROM" if keyword == b"FROM" else "RCPT TO"
        raise SMTPReply(501, "5.5.4", f"Syntax: {verb}:<address>")
    try:
        rest = match.group("rest").decode("utf-8")
    except UnicodeDecodeError:
        if not offered:
            raise _NO_SMTPUTF8
        raise SMTPReply(553, "5.6.7", "Address is not valid UTF-8")
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


def parseMailArgument(
    argument: bytes, extensions: frozenset[str] = ALL_EXTENSIONS
) -> tuple[str, dict[str, str | None]]:
    """
    Parse what follows C{MAIL}: C{FROM:<path> [parameters]}.

    @param extensions: the EHLO keywords the server offers: the parameters
        of the others are unknown (L{offeredParameters}).
    @return: the sender (C{""} for C{<>}) and the parameters.
    """
    path, rest = _splitPath(argument, b"FROM", "SMTPUTF8" in extensions)
    params = parseParameters(rest, offeredParameters(MAIL_PARAMETERS, extensions))
    if path == "":
        return "", params
    utf8 = "SMTPUTF8" in params
    return parseMailbox(path, utf8, "SMTPUTF8" in extensions), params


def parseRcptArgument(
    argument: bytes,
    extensions: frozenset[str] = ALL_EXTENSIONS,
    utf8: bool = False,
) -> tuple[str, dict[str, str | None]]:
    """
    Parse what follows C{RCPT}: C{TO:<path> [parameters]}.

    @param utf8: the transaction's MAIL had SMTPUTF8.
    """
    path, rest = _splitPath(argument, b"TO", "SMTPUTF8" in extensions)
    params = parseParameters(rest, offeredParameters(RCPT_PARAMETERS, extensions), utf8)
    if path == "":
        raise _incomplete(path)
    return parseMailbox(path, utf8, "SMTPUTF8" in extensions), params
