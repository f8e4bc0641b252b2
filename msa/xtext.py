# -*- test-case-name: tests.test_parameters -*-
"""
The two encodings of DSN parameter values: xtext (RFC 3461 4) for C{ENVID}
and an C{rfc822} C{ORCPT}, and utf-8-addr-xtext (RFC 6533 3) for a
C{utf-8} C{ORCPT}.

The submission side decodes what a client sent (L{decodeXtext},
L{decodeUtf8AddrXtext}) and the envelope keeps the decoded text; the relay
encodes it again (L{encodeXtext}, L{encodeUtf8AddrXtext}) when it passes
the parameter on.  Both directions live here, below both sides, so that
what is stored always reads back as what was sent.
"""

import re

#: xtext: printable ASCII but "+" and "=", or "+" and two upper-case hex
#: digits (RFC 3461 4).
XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
#: utf-8-addr-xtext (RFC 6533 3): printable ASCII but "+", "=" and "\\",
#: non-ASCII UTF-8, or "\\x{HEX}" naming a character by its code point.
UTF8_ADDR_XTEXT = re.compile(
    r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|[^\x00-\x7f]"
    r"|\\x\{[0-9A-F]{1,6}\})*"
)
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_UNITEXT = re.compile(r"\\x\{([0-9A-F]{1,6})\}")


def decodeXtext(text: str) -> str:
    """
    The text an xtext stands for.  C{text} must match L{XTEXT}.
    """
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)


def encodeXtext(text: str) -> str:
    """
    The xtext of C{text} (ASCII): "+", "=" and anything outside printable
    ASCII as "+HH".
    """
    return "".join(
        c if "\x21" <= c <= "\x7e" and c not in "+=" else f"+{ord(c):02X}" for c in text
    )


def decodeUtf8AddrXtext(text: str) -> str:
    """
    The address a utf-8-addr-xtext stands for.  C{text} must match
    L{UTF8_ADDR_XTEXT}.

    @raise ValueError: an escape names no character, or a surrogate.
    """

    def character(match: re.Match) -> str:
        code = int(match.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"\\x{{{match.group(1)}}} is not a character")
        return chr(code)

    return _UNITEXT.sub(character, text)


def encodeUtf8AddrXtext(text: str) -> str:
    """
    The utf-8-addr-xtext of an address: non-ASCII stays UTF-8 (the core
    was offered it with SMTPUTF8), "+", "=", "\\" and controls become
    "\\x{HEX}".
    """
    return "".join(
        c
        if (c >= "\x80" or "\x21" <= c <= "\x7e") and c not in "+=\\"
        else f"\\x{{{ord(c):X}}}"
        for c in text
    )
