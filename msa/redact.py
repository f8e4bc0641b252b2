# -*- test-case-name: tests.test_redact -*-
"""
Passwords out of what the MSA prints: L{maskSecrets} replaces every
password in the connection strings of a text (a log line, an error message)
with C{***}, found by the strings' structure, never by knowing the secret:

  - URL userinfo: C{scheme://user:PASSWORD@host}, C{redis://:PASSWORD@host};
  - URL query parameters named like a secret: C{?password=},
    C{&sslpassword=} (not C{passfile=}: that is a file name);
  - libpq key/value connection strings: C{password=PASSWORD},
    C{password = 'quoted value, with \\' escapes'}.

Percent-encoded or not, the whole value goes.  L{maskParseError} also
hides the pieces of a connection string that libpq quotes in its parse
errors (a password cut in two by a stray space comes back as C{missing "="
after "half"}).
"""

import re

__all__ = ["MASK", "maskParseError", "maskSecrets"]

#: What a secret is replaced with.
MASK = "***"

#: Parameter names whose value is a secret (matched whole, ignoring case):
#: libpq's C{password} and C{sslpassword}, and the usual others.
_SECRET_KEY = re.compile(
    r"[a-z0-9_]*(?:password|passwd|secret|token)|pass|pwd", re.IGNORECASE
)

_CONNECTION_STRING = re.compile(
    # A URL: the userinfo runs to the last "@" before the query, the
    # fragment or a quote (a password may hold a raw space, "/" or "@":
    # better mask too much than too little); the rest to the next space or
    # quote.
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
    r"(?:(?P<userinfo>[^?#\n'\"<>]*)@)?"
    r"(?P<rest>[^\s'\"<>]*)"
    # Or a libpq keyword = value: quoted (with backslash escapes, perhaps
    # unterminated) or up to the next space (backslash escapes too).
    r"|(?P<key>\b[A-Za-z_][A-Za-z0-9_]*)(?P<equals>\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)*\\?)",
    re.DOTALL,
)

#: What libpq quotes in its messages.
_QUOTED = re.compile(r'"([^"]*)"')

#: A query parameter: name, "=", value up to the next separator.
_QUERY_PARAMETER = re.compile(r"(?P<key>[^&;=#]+)=(?P<value>[^&;#]*)")


def maskSecrets(text: str) -> str:
    """
    C{text} with the password of every URL and libpq connection string in
    it replaced by L{MASK}.
    """
    return _CONNECTION_STRING.sub(_maskMatch, text)


def maskParseError(message: str, connectionString: str) -> str:
    """
    A libpq (psycopg) parse error about C{connectionString}, with the
    pieces of the string it quotes replaced by L{MASK}, since libpq cannot
    know which of them were part of a password; except the parameter names
    the string gives (C{invalid URI query parameter: "pool"}).
    """

    def mask(match: re.Match) -> str:
        token = match.group(1)
        if token == "=" or (
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token)
            and re.search(rf"(?:^|[\s?&;]){token}\s*=", connectionString)
        ):
            return match.group(0)
        return f'"{MASK}"'

    return _QUOTED.sub(mask, maskSecrets(message))


def _maskMatch(match: re.Match) -> str:
    if match.group("scheme") is None:
        if not _SECRET_KEY.fullmatch(match.group("key")):
            return match.group(0)
        return f"{match.group('key')}{match.group('equals')}{MASK}"
    masked = match.group("scheme")
    userinfo = match.group("userinfo")
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        masked += f"{user}:{MASK}@" if colon else f"{userinfo}@"
    rest = match.group("rest")
    path, question, query = rest.partition("?")
    if question:
        query = _QUERY_PARAMETER.sub(_maskParameter, query)
    return masked + path + question + query


def _maskParameter(match: re.Match) -> str:
    if _SECRET_KEY.fullmatch(match.group("key")):
        return f"{match.group('key')}={MASK}"
    return match.group(0)
