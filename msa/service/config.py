# -*- test-case-name: tests.test_config -*-
"""
The configuration file (TOML): loading, defaults and validation.  Every key
is declared in L{msa.service.configkeys.SCHEMA} with its type, range and
default; a wrong or unknown key stops the start with one line naming the
file, the key, what is wrong and the value given
(C{msa.toml: [relay] port: must be an integer from 1 to 65535 (got 70000)}).
What involves more than one key (a certificate needs its key) is checked
here.  With no file at
all, the built-in defaults give a working MSA on 127.0.0.1 whose state
(certificate, accounts, spool, outbox) lives under C{./msa-state}.

C{etc/digipoort-msa.toml} documents every key.
"""

import copy
import importlib.util
import os
import tomllib
from typing import Any

import attrs

from msa.queue.commits import COMMIT_DELAY
from msa.service.configkeys import (
    LIMITS_BACKENDS,
    LIMITS_FALLBACKS,
    LOG_LEVELS,
    RELAY_TLS_MODES,
    SCHEMA,
)
from msa.service.configschema import BadValue

__all__ = [
    "LIMITS_BACKENDS",
    "LIMITS_FALLBACKS",
    "LOG_LEVELS",
    "RELAY_TLS_MODES",
    "SCHEMA",
    "Config",
    "ConfigError",
    "loadConfig",
    "writeConfig",
]


class ConfigError(Exception):
    """
    The configuration cannot be used; the message names the file and key.
    """


@attrs.define
class Config:
    """
    The validated configuration: C{values[section][key]}, every key
    present, paths made absolute.
    """

    values: dict[str, dict[str, Any]]
    path: str | None = None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def accountsFile(self) -> str:
        return self.values["accounts"]["file"]

    @property
    def realm(self) -> str:
        return self.values["server"]["sasl_realm"]

    @property
    def usesDefaults(self) -> bool:
        return self.path is None


def _where(path: str | None, section: str, key: str) -> str:
    return f"{path or '<built-in defaults>'}: [{section}] {key}"


def loadConfig(path: str | None = None) -> Config:
    """
    Read and validate a configuration file, or the built-in defaults when
    C{path} is L{None}.

    @raise ConfigError: naming the file and the key at fault.
    """
    raw: dict[str, Any] = {}
    base = os.getcwd()
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
        base = os.path.dirname(os.path.abspath(path))
    values: dict[str, dict[str, Any]] = {}
    for section, content in raw.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"{path}: unknown section [{section}] (known: {', '.join(SCHEMA)})"
            )
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: {section} must be a [section]")
        for key in content:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{_where(path, section, key)}: unknown key")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        values[section] = {}
        for key, declaration in keys.items():
            if key not in given:
                # A copy: the code that fills in defaults changes lists.
                values[section][key] = copy.deepcopy(declaration.default)
                continue
            try:
                values[section][key] = declaration.check(key, given[key])
            except BadValue as e:
                raise ConfigError(f"{_where(path, section, key)}: {e}") from None
    config = Config(values, path)
    _resolve(config, base, raw)
    return config


def _resolve(config: Config, base: str, raw: dict) -> None:
    """
    Make paths absolute, fill in the defaults that depend on other keys, and
    check what involves more than one key (each key's own type and range
    were checked against L{SCHEMA} already).
    """
    server, tls, relay = config["server"], config["tls"], config["relay"]
    path = config.path

    def absolute(value: str | None, default: str | None = None) -> str | None:
        value = value if value is not None else default
        if value is None:
            return None
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))

    state = absolute(server["state_dir"])
    assert state is not None  # the schema gives state_dir a default
    server["state_dir"] = state
    server["sasl_realm"] = server["sasl_realm"] or server["hostname"]
    if not server["server_names"]:
        # The names a client may put in a DIGEST-MD5 digest-uri: the host
        # name, and the addresses the listeners are bound to.
        names = [server["hostname"]]
        for description in (
            server["starttls_listeners"] + server["implicit_tls_listeners"]
        ):
            for part in description.split(":"):
                if part.startswith("interface=") and part[10:] not in names:
                    names.append(part[10:])
        server["server_names"] = names
    for key in ("certificate", "key", "chain", "client_ca", "client_crl"):
        tls[key] = absolute(tls[key])
    _resolveOCSP(path, tls, absolute)
    if tls["client_certificates"] != "off" and not tls["client_ca"]:
        raise ConfigError(
            f"{_where(path, 'tls', 'client_ca')}: needed for client certificates "
            f"(got client_certificates = {tls['client_certificates']!r} and no "
            "client_ca)"
        )
    if (tls["certificate"] is None) != (tls["key"] is None):
        given = "certificate" if tls["certificate"] else "key"
        raise ConfigError(
            f"{_where(path, 'tls', 'certificate')}: certificate and key go "
            f"together (got a {given} only)"
        )
    config["accounts"]["file"] = absolute(
        config["accounts"]["file"], os.path.join(state, "accounts.json")
    )
    config["spool"]["directory"] = absolute(
        config["spool"]["directory"], os.path.join(state, "spool")
    )
    relay["outbox"] = absolute(relay["outbox"], os.path.join(state, "outbox"))
    audit = config["audit"]
    audit["path"] = absolute(audit["path"], os.path.join(state, "audit", "audit.jsonl"))
    config["logging"]["json_file"] = absolute(config["logging"]["json_file"])
    for key in ("ca_file", "client_certificate", "client_key", "auth_password_file"):
        relay[key] = absolute(relay[key])
    if relay["auth_username"] and not relay["auth_password_file"]:
        raise ConfigError(
            f"{_where(path, 'relay', 'auth_password_file')}: needed with "
            f"auth_username (got auth_username = {relay['auth_username']!r} and "
            "no auth_password_file)"
        )
    relay["server_name"] = relay["server_name"] or relay["host"]
    relay["helo_name"] = relay["helo_name"] or server["hostname"]
    mechanismsGiven = "mechanisms" in raw.get("server", {})
    if tls["client_certificates"] != "off" and not mechanismsGiven:
        # With client certificates on, EXTERNAL is offered first by default.
        server["mechanisms"].insert(0, "EXTERNAL")
    if server["accepted_recipients"] is not None:
        from msa.policy.authorization import AddressList

        try:
            server["accepted_recipients"] = AddressList.parse(
                server["accepted_recipients"]
            )
        except ValueError as e:
            raise ConfigError(f"{_where(path, 'server', 'accepted_recipients')}: {e}")
    from msa.policy.contentpolicies import loadPolicies

    try:
        config["content"]["chain"] = loadPolicies(config["content"]["policy"])
    except ValueError as e:
        raise ConfigError(f"{_where(path, 'content', 'policy')}: {e}")
    _resolveLimits(path, config["limits"])
    if config["spool"]["commit_delay"] is None:
        # Each worker's commits wait for the messages its own sessions
        # receive: with N workers, N times as long for the same company.
        config["spool"]["commit_delay"] = min(1.0, COMMIT_DELAY * server["workers"])
    _resolveReturnChannel(config, absolute)
    if server["listen_backlog"] is None:
        # Room in the kernel's queue for a burst of twice the connection
        # limit, so that each connection over it gets its 421 at once.
        server["listen_backlog"] = min(max(2 * server["max_connections"], 50), 65535)


def _resolveReturnChannel(config: Config, absolute) -> None:
    """
    C{[lmtp]} and C{[mailbox]}: the defaults from C{[server]}, and an LMTP
    listener that only the core can reach (R16): TCP needs C{allow_from},
    TLS needs C{client_ca}.
    """
    path, lmtp, mailbox = config.path, config["lmtp"], config["mailbox"]
    state = config["server"]["state_dir"]
    mailbox["directory"] = absolute(
        mailbox["directory"], os.path.join(state, "mailboxes")
    )
    lmtp["client_ca"] = absolute(lmtp["client_ca"])
    if lmtp["max_message_size"] is None:
        lmtp["max_message_size"] = config["server"]["max_message_size"]
    if lmtp["tls_listeners"] and not lmtp["client_ca"]:
        raise ConfigError(
            f"{_where(path, 'lmtp', 'client_ca')}: needed with tls_listeners, "
            "whose clients must show a certificate from it (got tls_listeners = "
            f"{lmtp['tls_listeners']!r} and no client_ca)"
        )
    for description in lmtp["listeners"]:
        local = description.startswith("unix:") or (
            description.startswith("systemd:") and "domain=UNIX" in description
        )
        if not local and not lmtp["allow_from"]:
            raise ConfigError(
                f"{_where(path, 'lmtp', 'allow_from')}: needed with a TCP "
                "listener, so that only the core can deliver (got listeners "
                f"entry {description!r} and no allow_from)"
            )


def _resolveLimits(path: str | None, limits: dict[str, Any]) -> None:
    """
    C{[limits]}: Redis's address, the lease against the timeout, the Redis
    client when Redis is used.
    """
    from msa.policy.redisclient import RedisAddress

    limits["address"] = RedisAddress.parse(limits["url"])  # checked by SCHEMA
    if not limits["address"].tls:
        for key in ("tls_ca", "tls_certificate", "tls_key"):
            if limits[key] is not None:
                raise ConfigError(
                    f"{_where(path, 'limits', key)}: only with a rediss:// url "
                    f"(got url = {limits['address'].describe()!r})"
                )
    if limits["tls_key"] is not None and limits["tls_certificate"] is None:
        raise ConfigError(
            f"{_where(path, 'limits', 'tls_key')}: needs tls_certificate "
            "(got a tls_key only)"
        )
    if limits["lease"] < 3 * limits["timeout"]:
        raise ConfigError(
            f"{_where(path, 'limits', 'lease')}: must be at least three times "
            "timeout (a hold is refreshed every lease / 3 seconds) (got lease = "
            f"{limits['lease']!r}, timeout = {limits['timeout']!r})"
        )
    # Found, not imported: txredisapi imports the reactor, which must not be
    # there yet when worker 0 forks its workers (msa.service.forked).
    if limits["backend"] == "redis" and importlib.util.find_spec("txredisapi") is None:
        raise ConfigError(
            f"{_where(path, 'limits', 'backend')}: redis needs the Redis "
            "client: pip install 'digipoort-msa[redis]' (txredisapi)"
        )


def _resolveOCSP(path: str | None, tls: dict[str, Any], absolute) -> None:
    """
    C{[tls] ocsp_response}: read at start, so that a missing file or one
    that is no OCSP response stops the start.
    """
    from msa.tls import readOCSPResponse

    tls["ocsp_response"] = absolute(tls["ocsp_response"])
    if tls["ocsp_response"] is not None:
        try:
            readOCSPResponse(tls["ocsp_response"])
        except OSError as e:
            raise ConfigError(
                f"{_where(path, 'tls', 'ocsp_response')}: cannot read "
                f"{tls['ocsp_response']}: {e.strerror}"
            ) from e
        except ValueError as e:
            raise ConfigError(f"{_where(path, 'tls', 'ocsp_response')}: {e}") from e


def _tomlValue(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_tomlValue(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def writeConfig(path: str, sections: dict[str, dict[str, Any]]) -> None:
    """
    Write a configuration file from C{{section: {key: value}}} (strings,
    numbers, booleans and lists of them), for tools and tests that generate
    one.
    """
    with open(path, "w", encoding="utf-8") as f:
        for section, values in sections.items():
            f.write(f"[{section}]\n")
            for key, value in values.items():
                f.write(f"{key} = {_tomlValue(value)}\n")
