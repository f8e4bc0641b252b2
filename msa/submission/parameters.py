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
(DSN, SMTPUTF8, BINARYMIME, REQUIRETLS) adds its rows there, and
L{EXTENSION_OF} says which rows an extension switched off in the
configuration takes away (L{offeredParameters}): its keywords are then
unknown, 555 5.5.4, as the RFCs ask of a server that does not offer them.
Values are kept decoded (an xtext's C{+HH} as the character it stands
for, L{msa.xtext}).

With SMTPUTF8 on MAIL (RFC 6531 3.3) a value may hold UTF-8 too; without
it, a non-ASCII value is malformed.  The replies:

  - a parameter that is not C{keyword[=value]} in the grammar above:
    501 5.5.4;
  - a keyword the command does not know: 555 5.5.4 (RFC 5321 4.1.1.11);
  - a keyword given twice: 501 5.5.4;
  - a value its keyword's parser refuses: 501 5.5.4 (RFC 3461 says so
    for the DSN parameters; their values are checked as it says: NOTIFY
    is NEVER or a list of SUCCESS, FAILURE, DELAY; ORCPT an addr-type and
    an xtext of at most 500 characters; RET FULL or HDRS; ENVID an xtext
    of at most 100 characters).
"""

import re
from collections.abc import Callable, Mapping

from msa.errors import SMTPReply
from msa.xtext import UTF8_ADDR_XTEXT, XTEXT, decodeUtf8AddrXtext, decodeXtext

#: The parser of one keyword's value: given the value (C{None} when the
#: parameter has no "="), it returns the value to keep, or raises
#: L{SMTPReply} (501 5.5.4, see L{malformedValue}).
ValueParser = Callable[[str | None], str | None]

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
#: RFC 6531 3.3: with SMTPUTF8, esmtp-value =/ UTF8-non-ascii.
_UTF8_VALUE = re.compile(r"(?:[\x21-\x3c\x3e-\x7e]|[^\x00-\x7f])+")
#: SIZE's value (RFC 1870 3): at most 20 ASCII digits.
_SIZE = re.compile(r"[0-9]{1,20}")
#: RFC 3461 4.2 and 4.4: the longest ORCPT and ENVID values.
MAX_ORCPT = 500
MAX_ENVID = 100
#: The NOTIFY conditions other than NEVER (RFC 3461 4.1).
NOTIFY_CONDITIONS = ("SUCCESS", "FAILURE", "DELAY")
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
    BODY=7BIT / 8BITMIME (RFC 6152) / BINARYMIME (RFC 3030), kept in upper
    case.  (Without BINARYMIME offered, L{offeredParameters} puts
    L{textBodyValue} in its place.)
    """
    body = (value or "").upper()
    if body not in ("7BIT", "8BITMIME", "BINARYMIME"):
        raise malformedValue("BODY must be 7BIT, 8BITMIME or BINARYMIME")
    return body


def textBodyValue(value: str | None) -> str:
    """
    BODY=7BIT / 8BITMIME (RFC 6152) alone, when BINARYMIME is not offered.
    """
    body = (value or "").upper()
    if body not in ("7BIT", "8BITMIME"):
        raise malformedValue("BODY must be 7BIT or 8BITMIME")
    return body


def authValue(value: str | None) -> str:
    """
    AUTH=<mailbox> of MAIL (RFC 4954 5): xtext, or C{<>}.
    """
    if value is None or not (value == "<>" or XTEXT.fullmatch(value)):
        raise malformedValue("AUTH needs an xtext mailbox or <>")
    return value


def noValue(value: str | None) -> None:
    """
    A keyword that takes no value: SMTPUTF8 (RFC 6531 3.4), REQUIRETLS
    (RFC 8689 3).
    """
    if value is not None:
        raise malformedValue("This parameter takes no value")
    return None


def _ascii(value: str, name: str) -> str:
    if not value.isascii():
        raise malformedValue(f"{name} must be xtext (ASCII)")
    return value


def retValue(value: str | None) -> str:
    """
    RET=FULL / HDRS (RFC 3461 4.3), kept in upper case.
    """
    ret = _ascii(value or "", "RET").upper()
    if ret not in ("FULL", "HDRS"):
        raise malformedValue("RET must be FULL or HDRS")
    return ret


def envidValue(value: str | None) -> str:
    """
    ENVID=xtext (RFC 3461 4.4), at most 100 characters; kept decoded.
    """
    if value is None or not XTEXT.fullmatch(_ascii(value, "ENVID")):
        raise malformedValue("ENVID must be xtext")
    if len(value) > MAX_ENVID:
        raise malformedValue(f"ENVID is longer than {MAX_ENVID} characters")
    return decodeXtext(value)


def notifyValue(value: str | None) -> str:
    """
    NOTIFY=NEVER, or a comma-separated list of SUCCESS, FAILURE and DELAY
    (RFC 3461 4.1), each at most once; kept in upper case, in the order
    given.
    """
    words = _ascii(value or "", "NOTIFY").upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if len(set(words)) != len(words) or not set(words) <= set(NOTIFY_CONDITIONS):
        raise malformedValue(
            "NOTIFY must be NEVER or a list of SUCCESS, FAILURE and DELAY"
        )
    return ",".join(words)


def orcptValue(value: str | None) -> str:
    """
    ORCPT=addr-type;xtext (RFC 3461 4.2), at most 500 characters: the
    addr-type C{rfc822} with an xtext, or C{utf-8} with a utf-8-addr-xtext
    (RFC 6533 3); kept as C{addr-type;address}, the address decoded and
    the addr-type as given.
    """
    addrType, semicolon, address = (value or "").partition(";")
    if len(value or "") > MAX_ORCPT:
        raise malformedValue(f"ORCPT is longer than {MAX_ORCPT} characters")
    kind = addrType.lower()
    if semicolon and address and kind == "rfc822" and XTEXT.fullmatch(address):
        return f"{addrType};{decodeXtext(address)}"
    if semicolon and address and kind == "utf-8" and UTF8_ADDR_XTEXT.fullmatch(address):
        try:
            return f"{addrType};{decodeUtf8AddrXtext(address)}"
        except ValueError:
            pass
    raise malformedValue("ORCPT must be rfc822;xtext or utf-8;utf-8-addr-xtext")


#: The parameters MAIL knows, each with the parser of its value.
MAIL_PARAMETERS: Mapping[str, ValueParser] = {
    "SIZE": sizeValue,
    "BODY": bodyValue,
    "AUTH": authValue,
    "RET": retValue,
    "ENVID": envidValue,
    "SMTPUTF8": noValue,
    "REQUIRETLS": noValue,
}

#: The parameters RCPT knows.
RCPT_PARAMETERS: Mapping[str, ValueParser] = {
    "NOTIFY": notifyValue,
    "ORCPT": orcptValue,
}

#: The EHLO keyword (L{msa.submission.extensions}) that brings each
#: parameter; a parameter not named here is always known.
EXTENSION_OF: Mapping[str, str] = {
    "RET": "DSN",
    "ENVID": "DSN",
    "NOTIFY": "DSN",
    "ORCPT": "DSN",
    "SMTPUTF8": "SMTPUTF8",
    "REQUIRETLS": "REQUIRETLS",
}


def offeredParameters(
    table: Mapping[str, ValueParser], extensions: frozenset[str]
) -> dict[str, ValueParser]:
    """
    The rows of C{table} a server offering C{extensions} knows: those of
    extensions switched off are left out (so they are 555 5.5.4), and
    BODY=BINARYMIME is malformed unless BINARYMIME is offered.
    """
    offered = {
        keyword: parser
        for keyword, parser in table.items()
        if EXTENSION_OF.get(keyword, "") in extensions | {""}
    }
    if "BODY" in offered and "BINARYMIME" not in extensions:
        offered["BODY"] = textBodyValue
    return offered


def parseParameters(
    text: str, known: Mapping[str, ValueParser], utf8: bool = False
) -> dict[str, str | None]:
    """
    Parse the parameters after a path.

    @param text: what follows the path's closing bracket (decoded as
        UTF-8, so that a non-ASCII character is refused here by name
        rather than as a decoding error).
    @param known: the command's table (L{MAIL_PARAMETERS}, ...).
    @param utf8: the transaction has SMTPUTF8 (RFC 6531 3.3): values may
        hold UTF-8.  MAIL's own SMTPUTF8 counts too.
    @return: the values (C{None} for a parameter without "="), keyed by
        upper-case keyword, in the order given.
    @raise SMTPReply: 501 or 555 5.5.4, as the module docstring says.
    """
    params: dict[str, str | None] = {}
    words = [word for word in _SEPARATORS.split(text.strip(" \t")) if word]
    if "SMTPUTF8" in known and any(
        w.isascii() and w.upper() == "SMTPUTF8" for w in words
    ):
        utf8 = True
    values = _UTF8_VALUE if utf8 else _VALUE
    for word in words:
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not values.fullmatch(value)):
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
