# -*- test-case-name: tests.test_config_values,tests.test_config,tests.test_everykey -*-
"""
Every configuration key: one declaration each, with its type and range,
default and one line of documentation (L{msa.service.configschema}).
Adding a key is adding a line here, documenting it in
C{etc/digipoort-msa.toml} and giving it a row in C{tests/test_everykey.py};
C{tests/test_config.py} checks that the file and README.rst agree with this.

Every number has a range with a sane maximum, in the spirit of Postfix's
limits (whose smtpd_recipient_limit defaults to 1000; ours may go to
10000): a typo (an extra zero, a negative number, 0 for an interval) stops
the start instead of running.
A default of L{None} means "not set"; L{msa.service.config} fills in those
that depend on other keys.
"""

import ipaddress
from typing import Any

from msa.queue.commits import COMMIT_DELAY
from msa.sasl.registry import mechanismFactories
from msa.service.configschema import (
    BadValue,
    Key,
    choice,
    endpoint,
    flag,
    heloName,
    host,
    hostName,
    integer,
    listOf,
    network,
    number,
    parsed,
    path,
    protocolText,
    token,
)
from msa.service.services import MINIMUM_WATCH_INTERVAL
from msa.submission.extensions import EXTENSION_NAMES
from msa.tls import MINIMUM_VERSIONS

DAY = 86400
GiB = 1024**3

#: The values of C{[relay] tls}, C{[limits] backend}, C{[limits] fallback}
#: and C{[logging] level} (L{msa.service.logs.LEVELS}).
RELAY_TLS_MODES = ("starttls", "implicit", "none")
LIMITS_BACKENDS = ("memory", "redis")
LIMITS_FALLBACKS = ("refuse", "local")
LOG_LEVELS = ("debug", "info", "warn", "error")
CLIENT_CERTIFICATES = ("off", "request", "require")


def _accountStore(url: str) -> None:
    if url != "file":
        from msa.accounts.pgstore import checkURL

        checkURL(url)


def _mailboxStore(url: str) -> None:
    if url != "maildir":
        from msa.accounts.pgstore import checkURL, isDatabaseURL

        if not isDatabaseURL(url):
            raise ValueError(
                'must be "maildir" or a postgresql://user@host:port/database '
                f"URL, not {url!r}"
            )
        checkURL(url)


def _redisURL(url: str) -> None:
    from msa.policy.redisclient import RedisAddress

    RedisAddress.parse(url)


def _network(instance: Any, attribute: Any, value: Any) -> None:
    # A TypeError or ValueError says "must be a network ..." (Key.check).
    if not isinstance(value, str):
        raise TypeError(attribute.name)
    ipaddress.ip_network(value, strict=False)


#: An address or network, as C{[lmtp] allow_from} lists them.
NETWORK = Key("an address or network such as 192.0.2.0/24", _network, None, "")


def _policyTables(instance: Any, attribute: Any, value: Any) -> None:
    # Each table's own keys are checked by the policy it names (loadPolicies).
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadValue("must be [[content.policy]] tables")


SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": hostName(
            "localhost", "Name in the greeting, EHLO reply and Received header."
        ),
        "state_dir": path("msa-state", "Where the default paths go."),
        "starttls_listeners": listOf(
            ["tcp:2587:interface=127.0.0.1"],
            endpoint(None, ""),
            "Listeners for plaintext then STARTTLS.",
            most=64,
        ),
        "implicit_tls_listeners": listOf(
            ["tcp:2465:interface=127.0.0.1"],
            endpoint(None, ""),
            "Listeners for TLS from the first byte.",
            most=64,
        ),
        "max_message_size": integer(
            52428800, 1024, 4 * GiB, "SIZE (RFC 1870), in octets."
        ),
        "max_line_length": integer(998, 78, 65536, "Longest text line, no CRLF."),
        "max_recipients": integer(100, 1, 10000, "Recipients per message."),
        "max_errors": integer(20, 1, 1000, "Protocol errors before 421."),
        "max_auth_failures": integer(3, 1, 100, "Failed AUTHs before 421."),
        "idle_timeout": number(300, 1, DAY, "Seconds without a command."),
        "shutdown_grace": number(30, 0.1, 3600, "Seconds to finish on SIGTERM."),
        "max_connections": integer(1000, 1, 1000000, "Connections in total."),
        "max_connections_per_client": integer(
            20, 1, 1000000, "Connections from one client address."
        ),
        "accepted_recipients": listOf(
            None,
            protocolText(None, ""),
            "Addresses or @domains accepted; default any.",
            most=100000,
        ),
        "auth_delay_base": number(0.5, 0, 60, "First delay after a failed login."),
        "auth_delay_max": number(16, 0.01, 3600, "Longest delay after failures."),
        "mechanisms": listOf(
            ["SCRAM-SHA-256", "DIGEST-MD5", "PLAIN", "LOGIN"],
            choice(None, tuple(mechanismFactories()), "", anyCase=True),
            "SASL mechanisms offered, in order.",
            fewest=1,
            most=16,
        ),
        "extensions": listOf(
            list(EXTENSION_NAMES),
            choice(None, EXTENSION_NAMES, "", anyCase=True),
            "SMTP extensions offered over TLS.",
            most=len(EXTENSION_NAMES),
        ),
        "sasl_realm": protocolText(
            None, "DIGEST-MD5 realm; default hostname.", refused='"\\'
        ),
        "server_names": listOf(
            None,
            token(None, ""),
            "Names a DIGEST-MD5 digest-uri may carry.",
            most=1000,
        ),
        "tls_handshake_timeout": number(30, 1, DAY, "Seconds for a TLS handshake."),
        "command_line_timeout": number(60, 1, DAY, "Seconds for one command line."),
        "login_timeout": number(120, 1, DAY, "Seconds to a successful AUTH."),
        "data_timeout": number(300, 1, DAY, "Seconds for DATA, plus the rate."),
        "data_min_rate": integer(1024, 1, GiB, "Octets per second DATA earns."),
        "listen_backlog": integer(None, 1, 65535, "Listen backlog of listeners."),
        "workers": integer(1, 1, 64, "Processes taking submissions."),
        "proxy_from": listOf(
            ["127.0.0.1", "::1"],
            network(None, "A peer that may send the PROXY header."),
            "Peers that may send the PROXY header to haproxy: listeners.",
        ),
    },
    "pop3": {
        "starttls_listeners": listOf(
            [],
            endpoint(None, ""),
            "POP3 listeners for plaintext then STLS.",
            most=64,
        ),
        "implicit_tls_listeners": listOf(
            [],
            endpoint(None, ""),
            "POP3 listeners for TLS from the first byte.",
            most=64,
        ),
        "mechanisms": listOf(
            None,
            choice(None, tuple(mechanismFactories()), "", anyCase=True),
            "SASL mechanisms offered; default [server]'s.",
            fewest=1,
            most=16,
        ),
        "max_line_length": integer(255, 255, 65536, "Longest command, CRLF in."),
        "max_errors": integer(20, 1, 1000, "Protocol errors before closing."),
        "max_auth_failures": integer(3, 1, 100, "Failed logins before closing."),
        "idle_timeout": number(600, 1, DAY, "Seconds without a command."),
        "login_timeout": number(120, 1, DAY, "Seconds to a successful login."),
        "max_connections": integer(1000, 1, 1000000, "POP3 connections in total."),
        "max_connections_per_client": integer(
            20, 1, 1000000, "POP3 connections from one address."
        ),
        "expire": integer(None, 0, 36500, "Days in CAPA EXPIRE; default NEVER."),
    },
    "tls": {
        "certificate": path(None, "Certificate (PEM), leaf first."),
        "key": path(None, "Its private key (PEM)."),
        "chain": path(None, "More intermediates (PEM)."),
        "ciphers": token(None, "TLS 1.2 suites, OpenSSL syntax."),
        "groups": token(None, "Key exchange groups."),
        "minimum_version": choice("TLSv1_2", MINIMUM_VERSIONS, "Lowest TLS version."),
        "client_certificates": choice(
            "off", CLIENT_CERTIFICATES, "Client certificates (R13)."
        ),
        "client_ca": path(None, "CA bundle for client certificates."),
        "client_crl": path(None, "CRL for client certificates."),
        "ocsp_response": path(None, "DER OCSP response to staple."),
    },
    "accounts": {
        "file": path(None, "The accounts file."),
        "watch_interval": number(
            2.0, MINIMUM_WATCH_INTERVAL, DAY, "Seconds between change checks."
        ),
        "auth_cache_ttl": number(300, 0, DAY, "Seconds a good password is kept."),
        "store": parsed("file", '"file" or a PostgreSQL URL.', _accountStore),
    },
    "spool": {
        "directory": path(None, "The durable queue."),
        "commit_delay": number(
            None,
            0,
            1,
            f"Seconds a commit waits for messages beside it; default "
            f"{COMMIT_DELAY} x [server] workers.",
        ),
    },
    "content": {
        "policy": Key(
            "[[content.policy]] tables",
            _policyTables,
            [],
            "Content policies (R12), in order.",
        ),
    },
    "logging": {
        "json_file": path(None, "JSON log file."),
        "level": choice("info", LOG_LEVELS, "Least severe events written."),
    },
    "metrics": {
        "listen": endpoint(None, "Endpoint for /metrics and /health."),
        "health_window": number(900, 0.1, 7 * DAY, "Seconds /health looks back."),
    },
    "audit": {
        "enabled": flag(True, "The tamper-evident audit log."),
        "path": path(None, "The audit log file."),
        "max_bytes": integer(
            64 * 1024 * 1024, 4096, 1024 * GiB, "Rotate past this size."
        ),
    },
    "relay": {
        "host": host(None, "The core MTA; without it, the outbox."),
        "port": integer(25, 1, 65535, "The core MTA's port."),
        "tls": choice("starttls", RELAY_TLS_MODES, "TLS towards the core."),
        "verify_certificate": flag(True, "Verify the core's certificate (R14)."),
        "server_name": host(None, "Name the core's certificate carries."),
        "ca_file": path(None, "CA bundle for the core's certificate."),
        "client_certificate": path(None, "Client certificate towards the core."),
        "client_key": path(None, "Its key."),
        "auth_username": protocolText(None, "AUTH PLAIN user at the core."),
        "auth_password_file": path(None, "File with its password."),
        "helo_name": heloName(None, "EHLO name towards the core."),
        "outbox": path(None, "Outbox directory without host."),
        "retry_base": number(60, 0.1, DAY, "First retry after seconds."),
        "retry_max": number(3600, 0.1, DAY, "Longest retry interval."),
        "max_lifetime": number(5 * DAY, 1, 30 * DAY, "Seconds before a bounce."),
        "concurrency": integer(4, 1, 1000, "Deliveries in flight."),
        "send_dsn": flag(True, "Send DSNs (RFC 3464)."),
        "delay_warning_after": number(
            None, 1, 30 * DAY, "Seconds before a delayed DSN."
        ),
        "connect_timeout": number(30, 1, DAY, "Seconds to connect."),
        "command_timeout": number(300, 1, DAY, "Seconds per command."),
        "data_timeout": number(600, 1, DAY, "Seconds for the final reply."),
        "idle_timeout": number(5, 0, 3600, "Seconds to keep a connection."),
        "max_messages_per_connection": integer(
            100, 1, 10000, "Messages over one connection."
        ),
    },
    "lmtp": {
        "listeners": listOf(
            [],
            endpoint(None, ""),
            "LMTP for the core: unix:, or tcp: with allow_from.",
            most=64,
        ),
        "tls_listeners": listOf(
            [],
            endpoint(None, ""),
            "LMTP in TLS, client certificate from client_ca.",
            most=64,
        ),
        "client_ca": path(None, "CA of the core's client certificate."),
        "allow_from": listOf(
            [],
            NETWORK,
            "Networks TCP clients may come from.",
            most=10000,
        ),
        "max_message_size": integer(
            None, 1024, 4 * GiB, "Largest message; default [server]'s."
        ),
        "max_recipients": integer(1000, 1, 10000, "Recipients per message."),
    },
    "mailbox": {
        "store": parsed(
            "maildir", '"maildir" or a PostgreSQL URL (shared).', _mailboxStore
        ),
        "directory": path(None, "The mailboxes (a Maildir each)."),
        "expire_after": number(
            None, 3600, 3650 * DAY, "Seconds a message is kept; default ever."
        ),
        "max_bytes": integer(None, 1024, 1024 * GiB, "Quota in octets per box."),
        "max_messages": integer(None, 1, 10000000, "Quota in messages per box."),
    },
    "limits": {
        "backend": choice("memory", LIMITS_BACKENDS, "Where limits are counted."),
        "url": parsed("redis://127.0.0.1:6379/0", "The Redis server.", _redisURL),
        "key_prefix": token("digipoort-msa:", "Start of every Redis key."),
        "timeout": number(1.0, 0.01, 60, "Seconds per Redis call."),
        "lease": number(60, 0.1, DAY, "Seconds a hold lasts unrefreshed."),
        "fallback": choice("refuse", LIMITS_FALLBACKS, "While Redis is away."),
        "tls_ca": path(None, "CA bundle for Redis's certificate (rediss://)."),
        "tls_certificate": path(None, "Client certificate towards Redis."),
        "tls_key": path(None, "Its key."),
    },
}
