# -*- test-case-name: tests.test_parameters -*-
"""
ESMTP parameters of MAIL and RCPT (RFC 5321 4.1.2), in ASCII only::

    esmtp-param   = esmtp-keyword ["=" esmtp-value]
    esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
    esmtp-value   = 1*(%d33-60 / %d62-126)

Every check here is an explicit ASCII character class: C{str.isdigit()},
C{str.upper()}, C{\\d} and C{re.I} all accept or fold non-ASCII characters
(C{"SIZE=\\u00b2"} passed C{isdigit()} and then broke C{int()}: issue 18,
defect 4; C{"\\u017fIZE".upper()} is C{"SIZE"}).

Each command has a table of the keywords it knows (L{MAIL_PARAMETERS},
L{RCPT_PARAMETERS}), each with the parser of its value; an extension
(DSN, SMTPUTF8, BINARYMIME, REQUIRETLS) adds its rows there.  The replies:

  - a parameter that is not C{keyword[=value]} in the grammar above:
    501 5.5.4;
  - a keyword the command does not know: 555 5.5.4 (RFC 5321 4.1.1.11);
  - a keyword given twice: 501 5.5.4;
  - a value its keyword's parser refuses: 501 5.5.4.
"""

import re
from collections.abc import Callable, Mapping

from msa.errors import SMTPReply

#: The parser of one keyword's value: given the value (C{None} when the
#: parameter has no "="), it returns the value to keep, or raises
#: L{SMTPReply} (501 5.5.4, see L{malformedValue}).
ValueParser = Callable[[str | None], str | None]

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
#: SIZE's value (RFC 1870 3): at most 20 ASCII digits.
_SIZE = re.compile(r"[0-9]{1,20}")
#: xtext (RFC 3461 4, RFC 4954 5): printable ASCII but "+" and "=", or
#: "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
#: Separators between parameters: SP (RFC 5321), and HTAB as clients send.
_SEPARATORS = re.compile(r"[ \t]+")


def malformedValue(expected: str) -> SMTPReply:
    """
    The reply to a value its keyword's parser refuses: 501 5.5.4 saying
    what the value must be.
    """
    return SMTPReply(501, "5.5.4", expected)


def sizeValue(value: str | None) -> str:
    """
    SIZE=<octets> (RFC 1870): 1*20DIGIT, ASCII digits only.
    """
    if value is None or not _SIZE.fullmatch(value):
        raise malformedValue("SIZE needs a number of octets")
    return value


def bodyValue(value: str | None) -> str:
    """
    BODY=7BIT / 8BITMIME (RFC 6152), kept in upper case.
    """
    body = (value or "").upper()
    if body not in ("7BIT", "8BITMIME"):
        raise malformedValue("BODY must be 7BIT or 8BITMIME")
    return body


def authValue(value: str | None) -> str:
    """
    AUTH=<mailbox> of MAIL (RFC 4954 5): xtext, or C{<>}.
    """
    if value is None or not (value == "<>" or _XTEXT.fullmatch(value)):
        raise malformedValue("AUTH needs an xtext mailbox or <>")
    return value


#: The parameters MAIL knows, each with the parser of its value.
MAIL_PARAMETERS: Mapping[str, ValueParser] = {
    "SIZE": sizeValue,
    "BODY": bodyValue,
    "AUTH": authValue,
}

#: The parameters RCPT knows.
RCPT_PARAMETERS: Mapping[str, ValueParser] = {}


def parseParameters(
    text: str, known: Mapping[str, ValueParser]
) -> dict[str, str | None]:
    """
    Parse the parameters after a path.

    @param text: what follows the path's closing bracket (decoded as
        UTF-8, so that a non-ASCII character is refused here by name
        rather than as a decoding error).
    @param known: the command's table (L{MAIL_PARAMETERS}, ...).
    @return: the values (C{None} for a parameter without "="), keyed by
        upper-case keyword, in the order given.
    @raise SMTPReply: 501 or 555 5.5.4, as the module docstring says.
    """
    params: dict[str, str | None] = {}
    for word in _SEPARATORS.split(text.strip(" \t")):
        if not word:
            continue
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not _VALUE.fullmatch(value)):
            raise SMTPReply(501, "5.5.4", f"Bad parameter syntax: {_shown(word)}")
        # ASCII only from here: upper() cannot fold anything into a keyword.
        keyword = keyword.upper()
        parser = known.get(keyword)
        if parser is None:
            raise SMTPReply(555, "5.5.4", f"Unsupported parameter: {keyword}")
        if keyword in params:
            raise SMTPReply(501, "5.5.4", f"Duplicate parameter: {keyword}")
        params[keyword] = parser(value if eq else None)
    return params


def sizeOctets(params: Mapping[str, str | None]) -> int | None:
    """
    The octets MAIL's SIZE parameter declares (already checked by
    L{sizeValue}), or C{None} without one.
    """
    size = params.get("SIZE")
    return None if size is None else int(size)


def _shown(word: str) -> str:
    """
    A client's parameter, made safe to put in a reply: ASCII, printable,
    at most 64 characters.
    """
    text = "".join(c if " " <= c <= "~" else "?" for c in word)
    return text if len(text) <= 64 else text[:61] + "..."
