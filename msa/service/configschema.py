# -*- test-case-name: tests.test_config_values,tests.test_config -*-
"""
How a configuration key is declared: L{Key} holds one key's kind of value
(type and range, as L{attrs} validators), its default and a line of
documentation.  L{msa.service.configkeys.SCHEMA} declares every key with the
constructors here (L{integer}, L{number}, L{hostName}, ...), one call
per key.

A value that does not fit raises L{BadValue} with what is wrong and what was
given, on one line, with the password of a URL masked; the loader
(L{msa.service.config.loadConfig}) puts the file, section and key in front.
"""

import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from attrs import validators as v
from twisted.internet.endpoints import serverFromString

from msa.redact import maskSecrets
from msa.submission.proxyheader import splitDescription

#: The longest value echoed in an error; longer ones are cut.
_SHOWN = 80


class BadValue(ValueError):
    """
    A value does not fit its key; the message says why, on one line, without
    the key's name (the loader adds it).

    @ivar echoed: whether the message already shows the value given.
    """

    def __init__(self, message: str, echoed: bool = False) -> None:
        super().__init__(message)
        self.echoed = echoed


@attrs.frozen
class _KeyName:
    """
    What an L{attrs} validator is told about the value it checks: the name
    (the attribute of a class, for attrs itself; here, the key).
    """

    name: str


def showValue(value: Any) -> str:
    """
    A value as an error message echoes it: Python's C{repr} (so CR, LF and
    other control characters appear escaped and the message stays one line),
    URL passwords masked, cut after L{_SHOWN} characters.
    """
    shown = maskSecrets(repr(value))
    if len(shown) > _SHOWN:
        shown = shown[: _SHOWN - 3] + "..."
    return shown


@attrs.frozen
class Key:
    """
    One configuration key.

    @ivar description: what a good value is, as an error message says it
        after "must be" (C{"an integer from 1 to 65535"}).
    @ivar validator: an L{attrs} validator (C{(instance, attribute, value)});
        it raises L{TypeError} or L{ValueError} for a value that does not
        fit, or L{BadValue} with a message of its own.
    @ivar default: the value when the file does not give one; L{None} means
        "not set" (some are filled in from other keys).
    @ivar doc: one line for the operator: what the key does.
    @ivar minimum: for numbers, the least value accepted; L{None} otherwise.
    @ivar maximum: for numbers, the greatest value accepted.
    @ivar choices: for choices, the values accepted.
    @ivar normalize: applied to a value that passed, before anything uses it.
    """

    description: str
    validator: Callable[[Any, Any, Any], None]
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    normalize: Callable[[Any], Any] = lambda value: value

    def check(self, name: str, value: Any) -> Any:
        """
        @return: C{value}, normalized, if it fits this key.
        @raise BadValue: if not: what a good value is and what was given.
        """
        try:
            self.validator(None, _KeyName(name), value)
        except BadValue as e:
            if e.echoed:
                raise
            raise BadValue(f"{e} (got {showValue(value)})", True) from None
        except (TypeError, ValueError):
            raise BadValue(
                f"must be {self.description} (got {showValue(value)})", True
            ) from None
        return self.normalize(value)


def _notBoolean(instance: Any, attribute: Any, value: Any) -> None:
    # TOML's true is a Python int too; a count is never a boolean.
    if isinstance(value, bool):
        raise TypeError(attribute.name)


def _finite(instance: Any, attribute: Any, value: Any) -> None:
    # TOML has inf and nan; neither is a time or a size.
    if not math.isfinite(value):
        raise ValueError(attribute.name)


def _range(minimum: float, maximum: float) -> list:
    return [v.ge(minimum), v.le(maximum)]


def integer(default: int | None, minimum: int, maximum: int, doc: str) -> Key:
    """
    A whole number from C{minimum} to C{maximum}.
    """
    return Key(
        f"an integer from {minimum} to {maximum}",
        v.and_(_notBoolean, v.instance_of(int), *_range(minimum, maximum)),
        default,
        doc,
        minimum=minimum,
        maximum=maximum,
    )


def number(default: float | None, minimum: float, maximum: float, doc: str) -> Key:
    """
    A number (integer or decimal; seconds, mostly) from C{minimum} to
    C{maximum}, never infinite.
    """
    return Key(
        f"a number from {minimum} to {maximum}",
        v.and_(
            _notBoolean,
            v.instance_of((int, float)),
            _finite,
            *_range(minimum, maximum),
        ),
        default,
        doc,
        minimum=minimum,
        maximum=maximum,
    )


def flag(default: bool, doc: str) -> Key:
    """
    C{true} or C{false}.
    """
    return Key("true or false", v.instance_of(bool), default, doc)


def choice(
    default: str | None, choices: Sequence[str], doc: str, *, anyCase: bool = False
) -> Key:
    """
    One of C{choices}: exactly as written, or with C{anyCase} in upper or
    lower case (and then used in upper case, as SASL names are).
    """
    described = " or ".join(choices)
    if len(choices) > 2:
        described = "one of " + ", ".join(choices)
    if not anyCase:
        return Key(
            described,
            v.and_(v.instance_of(str), v.in_(tuple(choices))),
            default,
            doc,
            choices=tuple(choices),
        )

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        v.instance_of(str)(instance, attribute, value)
        v.in_(tuple(choices))(instance, attribute, value.upper())

    return Key(
        described,
        validate,
        default,
        doc,
        choices=tuple(choices),
        normalize=str.upper,
    )


def _string(extra: Callable[[str], None]) -> Callable[[Any, Any, Any], None]:
    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(attribute.name)
        extra(value)

    return validate


def _line(text: str) -> None:
    """
    Text that goes into a protocol line or a header: printable ASCII, no
    CR, LF, NUL or other control characters, not empty.
    """
    if not text or not (text.isascii() and text.isprintable()):
        raise BadValue("must be printable ASCII, not empty, without control characters")


def _token(text: str) -> None:
    _line(text)
    if any(c.isspace() for c in text):
        raise BadValue("must be printable ASCII without spaces")


#: A domain name as EHLO, the greeting and certificates carry it.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _hostName(text: str) -> None:
    if len(text) > 253 or not _HOSTNAME.fullmatch(text):
        raise BadValue("must be a host name (letters, digits, hyphens and dots)")


def _hostOrAddress(text: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if len(text) > 253 or not _HOSTNAME.fullmatch(text):
            raise BadValue("must be a host name or an IP address") from None


def _path(text: str) -> None:
    if not text or "\0" in text:
        raise BadValue("must be a path (not empty, no NUL character)")


def token(default: str | None, doc: str) -> Key:
    """
    One word of printable ASCII, no spaces (a key prefix, a cipher list, a
    host name as a client may write it).
    """
    return Key("a word without spaces", _string(_token), default, doc)


def protocolText(default: str | None, doc: str, *, refused: str = "") -> Key:
    """
    Text that ends up in a protocol line (a SASL realm, a user name):
    printable ASCII, no CR, LF or NUL, none of the characters in C{refused}.
    """

    def check(text: str) -> None:
        _line(text)
        if any(c in refused for c in text):
            raise BadValue(f"must not contain any of {refused}")

    return Key("printable text", _string(check), default, doc)


def _heloName(text: str) -> None:
    literal = text[1:-1] if text[:1] == "[" and text[-1:] == "]" else None
    if literal is None:
        _hostName(text)
        return
    try:
        ipaddress.ip_address(literal.removeprefix("IPv6:"))
    except ValueError:
        raise BadValue(
            "must be a host name or an address literal ([192.0.2.1], "
            "[IPv6:2001:db8::1])"
        ) from None


def heloName(default: str | None, doc: str) -> Key:
    """
    What a client says after EHLO (RFC 5321 4.1.1.1): a domain name or an
    address literal.
    """
    return Key("a host name", _string(_heloName), default, doc)


def hostName(default: str | None, doc: str) -> Key:
    """
    A domain name (C{[server] hostname}, EHLO names): letters, digits,
    hyphens and dots.
    """
    return Key("a host name", _string(_hostName), default, doc)


def host(default: str | None, doc: str) -> Key:
    """
    A host to connect to: a domain name or an IP address.
    """
    return Key("a host name or address", _string(_hostOrAddress), default, doc)


def path(default: str | None, doc: str) -> Key:
    """
    A file or directory (relative to the configuration file's directory).
    """
    return Key("a path", _string(_path), default, doc)


def parsed(default: str | None, doc: str, parse: Callable[[str], object]) -> Key:
    """
    A string that C{parse} accepts (a URL); C{parse} raises L{ValueError}
    with what is wrong.
    """

    def check(text: str) -> None:
        _line(text)
        try:
            parse(text)
        except ValueError as e:
            # The parser's own words, and the value unless they show it.
            message = maskSecrets(str(e))
            raise BadValue(message, maskSecrets(text) in message) from None

    return Key("a URL", _string(check), default, doc)


def _network(text: str) -> None:
    _line(text)
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise BadValue("is not an IP address or network", False) from None


def network(default: str | None, doc: str) -> Key:
    """
    An IP address or network (C{10.1.2.0/24}, C{::1}).
    """
    return Key("an IP address or network", _string(_network), default, doc)


def listOf(
    default: list | None, item: Key, doc: str, *, fewest: int = 0, most: int = 1000
) -> Key:
    """
    A list of C{fewest} to C{most} items, each of which is an C{item}; an
    error shows the first item that is not.
    """

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, list) or not fewest <= len(value) <= most:
            raise TypeError(attribute.name)
        for each in value:
            try:
                item.check(attribute.name, each)
            except BadValue as e:
                raise BadValue(f"each item {e}", True) from None

    return Key(
        f"a list of {fewest} to {most} items, each {item.description}",
        validate,
        default,
        doc,
        choices=item.choices,
        normalize=lambda value: [item.normalize(each) for each in value],
    )


#: Endpoint types a listener may have: plain stream endpoints, because the
#: MSA applies its own TLS policy on top.
_STREAM_TYPES = ("tcp", "tcp6", "unix", "systemd")


def _endpoint(description: str) -> None:
    _line(description)
    _, inner = splitDescription(description)
    parts = re.split(r"(?<!\\):", inner)
    kind = parts[0]
    if kind not in _STREAM_TYPES:
        raise BadValue(
            "must be a plain stream endpoint (tcp:, tcp6:, unix:, systemd:, "
            "optionally under haproxy:); the MSA applies its own TLS on top"
        )
    if kind in ("tcp", "tcp6"):
        ports = [p for p in parts[1:] if "=" not in p]
        ports += [p[5:] for p in parts[1:] if p.startswith("port=")]
        if len(ports) != 1 or not ports[0].isdigit() or int(ports[0]) > 65535:
            raise BadValue("must name one port from 0 to 65535")
    if kind == "systemd":
        # Its parser takes the sockets systemd passed, which a check at load
        # time does not have: check its arguments here.
        arguments = dict(p.partition("=")[::2] for p in parts[1:])
        if (
            arguments.get("domain") not in ("INET", "INET6", "UNIX")
            or ("index" in arguments) == ("name" in arguments)
            or not arguments.get("index", "0").isdigit()
        ):
            raise BadValue(
                "must be systemd:domain=INET6:index=N (or name=NAME; domain "
                "INET, INET6 or UNIX)"
            )
        return
    try:
        # Parsed only, never listened on: no reactor needed.
        serverFromString(None, inner)
    except (ValueError, TypeError, KeyError) as e:
        raise BadValue(f"must be a valid endpoint ({e})") from None


def endpoint(default: str | None, doc: str) -> Key:
    """
    A Twisted server endpoint string for a stream listener (C{tcp:587},
    C{unix:/run/x.sock}, C{systemd:domain=INET6:index=0}), parsed at load so
    that a bad one names the key.
    """
    return Key("an endpoint", _string(_endpoint), default, doc)
