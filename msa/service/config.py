# -*- test-case-name: tests.test_config -*-
"""
The configuration file (TOML): loading, defaults and validation.  Every key
is listed in L{SCHEMA}, with its type and default; a wrong or unknown key
stops the start with an error naming the key and the file.  With no file at
all, the built-in defaults give a working MSA on 127.0.0.1 whose state
(certificate, accounts, spool, outbox) lives under C{./msa-state}.

C{etc/digipoort-msa.toml} documents every key.
"""

import os
import tomllib
from typing import Any

import attrs

#: section -> key -> (accepted types, default).  A default of L{None} means
#: "not set"; defaults that depend on other keys are filled in by
#: L{Config.resolve}.
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "server": {
        "hostname": ((str,), "localhost"),
        "state_dir": ((str,), "msa-state"),
        "starttls_listeners": ((list,), ["tcp:2587:interface=127.0.0.1"]),
        "implicit_tls_listeners": ((list,), ["tcp:2465:interface=127.0.0.1"]),
        "max_message_size": ((int,), 52428800),
        "max_line_length": ((int,), 998),
        "max_recipients": ((int,), 100),
        "max_errors": ((int,), 20),
        "max_auth_failures": ((int,), 3),
        "idle_timeout": ((int, float), 300),
        "shutdown_grace": ((int, float), 30),
        "max_connections": ((int,), 1000),
        "max_connections_per_client": ((int,), 20),
        "accepted_recipients": ((list,), None),
        "auth_delay_base": ((int, float), 0.5),
        "auth_delay_max": ((int, float), 16),
        "mechanisms": ((list,), ["SCRAM-SHA-256", "DIGEST-MD5", "PLAIN", "LOGIN"]),
        "sasl_realm": ((str,), None),
        "server_names": ((list,), None),
        "tls_handshake_timeout": ((int, float), 30),
        "command_line_timeout": ((int, float), 60),
        "login_timeout": ((int, float), 120),
        "data_timeout": ((int, float), 300),
        "data_min_rate": ((int, float), 1024),
        "listen_backlog": ((int,), None),
        "proxy_from": ((list,), ["127.0.0.1", "::1"]),
    },
    "tls": {
        "certificate": ((str,), None),
        "key": ((str,), None),
        "chain": ((str,), None),
        "ciphers": ((str,), None),
        "groups": ((str,), None),
        "minimum_version": ((str,), "TLSv1_2"),
        "client_certificates": ((str,), "off"),
        "client_ca": ((str,), None),
        "client_crl": ((str,), None),
        "ocsp_response": ((str,), None),
    },
    "accounts": {
        "file": ((str,), None),
        "watch_interval": ((int, float), 2.0),
        "auth_cache_ttl": ((int, float), 300),
        "store": ((str,), "file"),
    },
    "spool": {
        "directory": ((str,), None),
    },
    "content": {
        "policy": ((list,), []),
    },
    "logging": {
        "json_file": ((str,), None),
        "level": ((str,), "info"),
    },
    "metrics": {
        "listen": ((str,), None),
        "health_window": ((int, float), 900),
    },
    "audit": {
        "enabled": ((bool,), True),
        "path": ((str,), None),
        "max_bytes": ((int,), 64 * 1024 * 1024),
    },
    "relay": {
        "host": ((str,), None),
        "port": ((int,), 25),
        "tls": ((str,), "starttls"),
        "verify_certificate": ((bool,), True),
        "server_name": ((str,), None),
        "ca_file": ((str,), None),
        "client_certificate": ((str,), None),
        "client_key": ((str,), None),
        "auth_username": ((str,), None),
        "auth_password_file": ((str,), None),
        "helo_name": ((str,), None),
        "outbox": ((str,), None),
        "retry_base": ((int, float), 60),
        "retry_max": ((int, float), 3600),
        "max_lifetime": ((int, float), 5 * 86400),
        "concurrency": ((int,), 4),
        "send_dsn": ((bool,), True),
        "delay_warning_after": ((int, float), None),
        "connect_timeout": ((int, float), 30),
        "command_timeout": ((int, float), 300),
        "data_timeout": ((int, float), 600),
        "idle_timeout": ((int, float), 5),
        "max_messages_per_connection": ((int,), 100),
    },
    "limits": {
        "backend": ((str,), "memory"),
        "url": ((str,), "redis://127.0.0.1:6379/0"),
        "key_prefix": ((str,), "digipoort-msa:"),
        "timeout": ((int, float), 1.0),
        "lease": ((int, float), 60),
        "fallback": ((str,), "refuse"),
    },
}

RELAY_TLS_MODES = ("starttls", "implicit", "none")

#: The values of C{[limits] backend} and C{[limits] fallback}.
LIMITS_BACKENDS = ("memory", "redis")
LIMITS_FALLBACKS = ("refuse", "local")

#: The values of C{[logging] level} (L{msa.service.logs.LEVELS}).
LOG_LEVELS = ("debug", "info", "warn", "error")


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
        for key, value in content.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{_where(path, section, key)}: unknown key")
            types, _ = SCHEMA[section][key]
            if isinstance(value, bool) and bool not in types:
                types = ()
            if not isinstance(value, types):
                expected = " or ".join(t.__name__ for t in types) or "not a boolean"
                raise ConfigError(f"{_where(path, section, key)}: must be {expected}")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        values[section] = {k: given.get(k, default) for k, (_, default) in keys.items()}
    config = Config(values, path)
    _resolve(config, base, raw)
    return config


def _resolve(config: Config, base: str, raw: dict) -> None:
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
    _resolveTLS(path, tls, absolute)
    if tls["client_certificates"] not in ("off", "request", "require"):
        raise ConfigError(
            f"{_where(path, 'tls', 'client_certificates')}: must be off, request "
            "or require"
        )
    if tls["client_certificates"] != "off" and not tls["client_ca"]:
        raise ConfigError(
            f"{_where(path, 'tls', 'client_ca')}: needed for client certificates"
        )
    if (tls["certificate"] is None) != (tls["key"] is None):
        raise ConfigError(
            f"{_where(path, 'tls', 'certificate')}: certificate and key go together"
        )
    config["accounts"]["file"] = absolute(
        config["accounts"]["file"], os.path.join(state, "accounts.json")
    )
    _resolveStore(path, config["accounts"])
    config["spool"]["directory"] = absolute(
        config["spool"]["directory"], os.path.join(state, "spool")
    )
    relay["outbox"] = absolute(relay["outbox"], os.path.join(state, "outbox"))
    audit = config["audit"]
    audit["path"] = absolute(audit["path"], os.path.join(state, "audit", "audit.jsonl"))
    if audit["max_bytes"] < 4096:
        raise ConfigError(
            f"{_where(path, 'audit', 'max_bytes')}: must be at least 4096"
        )
    config["logging"]["json_file"] = absolute(config["logging"]["json_file"])
    if config["logging"]["level"] not in LOG_LEVELS:
        levels = ", ".join(LOG_LEVELS)
        where = _where(path, "logging", "level")
        raise ConfigError(f"{where}: must be one of {levels}")
    for key in ("ca_file", "client_certificate", "client_key", "auth_password_file"):
        relay[key] = absolute(relay[key])
    if relay["tls"] not in RELAY_TLS_MODES:
        modes = ", ".join(RELAY_TLS_MODES)
        raise ConfigError(f"{_where(path, 'relay', 'tls')}: must be one of {modes}")
    if relay["auth_username"] and not relay["auth_password_file"]:
        raise ConfigError(
            f"{_where(path, 'relay', 'auth_password_file')}: needed with auth_username"
        )
    relay["server_name"] = relay["server_name"] or relay["host"]
    relay["helo_name"] = relay["helo_name"] or server["hostname"]
    for key in ("starttls_listeners", "implicit_tls_listeners", "mechanisms"):
        if not all(isinstance(v, str) for v in server[key]):
            raise ConfigError(
                f"{_where(path, 'server', key)}: must be a list of strings"
            )
    for key in ("starttls_listeners", "implicit_tls_listeners"):
        for description in server[key]:
            if description.split(":", 1)[0] in ("ssl", "tls"):
                raise ConfigError(
                    f"{_where(path, 'server', key)}: {description!r}: give a plain "
                    "stream endpoint (tcp:, systemd:, unix:); the MSA applies its "
                    "own TLS policy on top"
                )
    server["mechanisms"] = [m.upper() for m in server["mechanisms"]]
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
    if relay["idle_timeout"] < 0:
        raise ConfigError(f"{_where(path, 'relay', 'idle_timeout')}: negative")
    if relay["delay_warning_after"] is not None and relay["delay_warning_after"] <= 0:
        raise ConfigError(
            f"{_where(path, 'relay', 'delay_warning_after')}: must be positive"
        )
    if server["auth_delay_base"] < 0:
        raise ConfigError(f"{_where(path, 'server', 'auth_delay_base')}: negative")
    positive = [
        ("server", "max_message_size"),
        ("server", "max_line_length"),
        ("server", "max_recipients"),
        ("server", "max_errors"),
        ("server", "max_auth_failures"),
        ("server", "idle_timeout"),
        ("server", "shutdown_grace"),
        ("server", "max_connections"),
        ("server", "max_connections_per_client"),
        ("server", "auth_delay_max"),
        ("relay", "retry_base"),
        ("relay", "retry_max"),
        ("relay", "max_lifetime"),
        ("relay", "concurrency"),
        ("relay", "connect_timeout"),
        ("relay", "command_timeout"),
        ("relay", "data_timeout"),
        ("relay", "max_messages_per_connection"),
    ]
    for section, key in positive:
        if config[section][key] <= 0:
            raise ConfigError(f"{_where(path, section, key)}: must be positive")
    if not 78 <= server["max_line_length"] <= 65536:
        raise ConfigError(
            f"{_where(path, 'server', 'max_line_length')}: must be 78 to 65536"
        )
    for key in (
        "tls_handshake_timeout",
        "command_line_timeout",
        "login_timeout",
        "data_timeout",
        "data_min_rate",
    ):
        if server[key] <= 0:
            raise ConfigError(f"{_where(path, 'server', key)}: must be positive")
    _resolveLimits(path, config["limits"])
    if server["listen_backlog"] is None:
        # Room in the kernel's queue for a burst of twice the connection
        # limit, so that each connection over it gets its 421 at once.
        server["listen_backlog"] = max(2 * server["max_connections"], 50)
    elif server["listen_backlog"] <= 0:
        raise ConfigError(
            f"{_where(path, 'server', 'listen_backlog')}: must be positive"
        )


def _resolveLimits(path: str | None, limits: dict[str, Any]) -> None:
    """
    Check C{[limits]}: the backend, Redis's URL, the fallback, the times.
    """
    for key, allowed in (
        ("backend", LIMITS_BACKENDS),
        ("fallback", LIMITS_FALLBACKS),
    ):
        if limits[key] not in allowed:
            raise ConfigError(
                f"{_where(path, 'limits', key)}: must be "
                f"{' or '.join(allowed)}, not {limits[key]!r}"
            )
    from msa.policy.redisclient import RedisAddress

    try:
        limits["address"] = RedisAddress.parse(limits["url"])
    except ValueError as e:
        raise ConfigError(f"{_where(path, 'limits', 'url')}: {e}") from None
    for key in ("timeout", "lease"):
        if limits[key] <= 0:
            raise ConfigError(f"{_where(path, 'limits', key)}: must be positive")
    if limits["lease"] < 3 * limits["timeout"]:
        raise ConfigError(
            f"{_where(path, 'limits', 'lease')}: must be at least three times "
            "timeout (a hold is refreshed every lease / 3 seconds)"
        )
    if limits["backend"] == "redis":
        try:
            import txredisapi  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{_where(path, 'limits', 'backend')}: redis needs the Redis "
                "client: pip install 'digipoort-msa[redis]' (txredisapi)"
            ) from None
    if not limits["key_prefix"].strip():
        raise ConfigError(f"{_where(path, 'limits', 'key_prefix')}: must not be empty")


def _resolveStore(path: str | None, accounts: dict[str, Any]) -> None:
    """
    Check C{[accounts] store}: C{"file"} or a PostgreSQL URL.
    """
    if accounts["store"] == "file":
        return
    from msa.accounts.pgstore import checkURL

    try:
        checkURL(accounts["store"])
    except ValueError as e:
        raise ConfigError(f"{_where(path, 'accounts', 'store')}: {e}") from e


def _resolveTLS(path: str | None, tls: dict[str, Any], absolute) -> None:
    """
    Check C{[tls] minimum_version} and C{[tls] ocsp_response}.
    """
    from msa.tls import MINIMUM_VERSIONS, readOCSPResponse

    if tls["minimum_version"] not in MINIMUM_VERSIONS:
        raise ConfigError(
            f"{_where(path, 'tls', 'minimum_version')}: must be "
            f"{' or '.join(MINIMUM_VERSIONS)}, not {tls['minimum_version']!r}"
        )
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
