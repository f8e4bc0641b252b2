# -*- test-case-name: tests.test_config_values -*-
"""
Bad values, key by key: each stops C{twistd digipoort-msa --config} with
exit code 1 and one line, C{<file>: [section] key: <what is wrong> (got
<value>)}, never a traceback, never a password.

L{BAD} has at least one row for every key of
L{msa.service.configkeys.SCHEMA}.  The whole table runs through
L{msa.service.tap.configFromOptions}, the function twistd's plugin calls
for the message and the exit; L{TwistdTests} runs a few rows through a real
twistd process to show the wiring.
"""

import os
import tomllib

import attrs
from twisted.trial import unittest

from msa.service import services
from msa.service.configkeys import SCHEMA
from msa.service.tap import Options, configFromOptions
from tests.test_tls_daemon import runTwistd


@attrs.frozen
class Bad:
    """
    One bad value.

    @ivar key: C{section.key}.
    @ivar value: the value as TOML text.
    @ivar says: what the error line says after C{[section] key: }, in full.
    @ivar extra: more TOML lines for the same section (for what involves
        two keys).
    @ivar named: the key the error names, when not C{key} (the other key of
        a pair).
    """

    key: str
    value: str
    says: str
    extra: str = ""
    named: str | None = None

    def toml(self) -> str:
        section, key = self.key.split(".")
        if self.key == "content.policy":
            return self.value
        return f"[{section}]\n{self.extra}{key} = {self.value}\n"


def shown(value: str) -> str:
    """
    A TOML value as the error line echoes it.
    """
    return repr(tomllib.loads(f"v = {value}")["v"])


def integer(key: str, low: int, high: int, *values: str) -> list[Bad]:
    says = f"must be an integer from {low} to {high} (got {{}})"
    return [Bad(key, v, says.format(shown(v))) for v in values]


def number(key: str, low: float, high: float, *values: str) -> list[Bad]:
    says = f"must be a number from {low} to {high} (got {{}})"
    return [Bad(key, v, says.format(shown(v))) for v in values]


def path(key: str) -> list[Bad]:
    return [
        Bad(key, '""', "must be a path (not empty, no NUL character) (got '')"),
        Bad(key, "7", "must be a path (got 7)"),
    ]


_HOST = "must be a host name (letters, digits, hyphens and dots)"
_LINE = "must be printable ASCII, not empty, without control characters"
_TOKEN = "must be printable ASCII without spaces"
_PLAIN = (
    "must be a plain stream endpoint (tcp:, tcp6:, unix:, systemd:, "
    "optionally under haproxy:); the MSA applies its own TLS on top"
)
_ENDPOINT = f"each item {_PLAIN}"
_PORT = "each item must name one port from 0 to 65535"
DAY = 86400

BAD: list[Bad] = [
    # [server]
    Bad(
        "server.hostname",
        '"msa.example.nl\\r\\nMAIL FROM:<x@y>"',
        f"{_HOST} (got 'msa.example.nl\\r\\nMAIL FROM:<x@y>')",
    ),
    Bad("server.hostname", '"msa example"', f"{_HOST} (got 'msa example')"),
    Bad("server.hostname", "5", "must be a host name (got 5)"),
    *path("server.state_dir"),
    Bad("server.starttls_listeners", '["ssl:465"]', f"{_ENDPOINT} (got 'ssl:465')"),
    Bad("server.starttls_listeners", '["tcp:70000"]', f"{_PORT} (got 'tcp:70000')"),
    Bad(
        "server.starttls_listeners",
        '"tcp:587"',
        "must be a list of 0 to 64 items, each an endpoint (got 'tcp:587')",
    ),
    Bad(
        "server.implicit_tls_listeners",
        '["tcp:465:bogus=1"]',
        "each item must be a valid endpoint (_parseTCP() got an unexpected "
        "keyword argument 'bogus') (got 'tcp:465:bogus=1')",
    ),
    Bad(
        "server.implicit_tls_listeners",
        '["systemd:index=0"]',
        "each item must be systemd:domain=INET6:index=N (or name=NAME; domain "
        "INET, INET6 or UNIX) (got 'systemd:index=0')",
    ),
    *integer("server.max_message_size", 1024, 4 * 1024**3, "0", "5368709120"),
    *integer("server.max_message_size", 1024, 4 * 1024**3, '"50M"', "1.5"),
    *integer("server.max_line_length", 78, 65536, "10", "100000"),
    *integer("server.max_recipients", 1, 10000, "0", "10001", "true"),
    *integer("server.max_errors", 1, 1000, "0", "1001"),
    *integer("server.max_auth_failures", 1, 100, "0", "101"),
    *number("server.idle_timeout", 1, DAY, "0", "86401", "nan", "inf"),
    *number("server.shutdown_grace", 0.1, 3600, "-1", "3601"),
    *integer("server.max_connections", 1, 1000000, "0", "1000001"),
    *integer("server.max_connections_per_client", 1, 1000000, "0"),
    Bad(
        "server.accepted_recipients",
        '["nobody"]',
        "'nobody' is neither an address (user@domain) nor a domain (@domain)",
    ),
    Bad(
        "server.accepted_recipients",
        '["@overheid.nl\\n"]',
        f"each item {_LINE} (got '@overheid.nl\\n')",
    ),
    *number("server.auth_delay_base", 0, 60, "-1", "61"),
    *number("server.auth_delay_max", 0.01, 3600, "0", "3601"),
    Bad(
        "server.mechanisms",
        '["PLAIN", "CRAM-MD5"]',
        "each item must be one of PLAIN, LOGIN, EXTERNAL, DIGEST-MD5, "
        "SCRAM-SHA-256, SCRAM-SHA-256-PLUS (got 'CRAM-MD5')",
    ),
    Bad(
        "server.mechanisms",
        "[]",
        "must be a list of 1 to 16 items, each one of PLAIN, LOGIN, EXTERNAL, "
        "DIGEST-MD5, SCRAM-SHA-256, SCRAM-SHA-256-PLUS (got [])",
    ),
    Bad(
        "server.extensions",
        '["DSN", "8BITMIME"]',
        "each item must be one of DSN, SMTPUTF8, CHUNKING, BINARYMIME, LIMITS, "
        "REQUIRETLS (got '8BITMIME')",
    ),
    Bad(
        "server.sasl_realm",
        "'realm\"x'",
        "must not contain any of \"\\ (got 'realm\"x')",
    ),
    Bad("server.sasl_realm", '"a\\nb"', f"{_LINE} (got 'a\\nb')"),
    Bad(
        "server.server_names",
        '["msa example"]',
        f"each item {_TOKEN} (got 'msa example')",
    ),
    *number("server.tls_handshake_timeout", 1, DAY, "0", "86401"),
    *number("server.command_line_timeout", 1, DAY, "0"),
    *number("server.login_timeout", 1, DAY, "-5"),
    *number("server.data_timeout", 1, DAY, "0"),
    *integer("server.data_min_rate", 1, 1024**3, "0", "1.5"),
    *integer("server.listen_backlog", 1, 65535, "0", "65536"),
    *integer("server.workers", 1, 64, "0", "65"),
    Bad(
        "server.proxy_from",
        '["10.0.0.0/33"]',
        "each item is not an IP address or network (got '10.0.0.0/33')",
    ),
    Bad(
        "server.proxy_from",
        '["haproxy.example.nl"]',
        "each item is not an IP address or network (got 'haproxy.example.nl')",
    ),
    # [tls]
    *path("tls.certificate"),
    Bad(
        "tls.certificate",
        '"c.pem"',
        "certificate and key go together (got a certificate only)",
    ),
    *path("tls.key"),
    *path("tls.chain"),
    Bad("tls.ciphers", '"ECDHE RSA"', f"{_TOKEN} (got 'ECDHE RSA')"),
    Bad("tls.groups", '"X25519\\u0000"', f"{_LINE} (got 'X25519\\x00')"),
    Bad(
        "tls.minimum_version", '"TLSv1_1"', "must be TLSv1_2 or TLSv1_3 (got 'TLSv1_1')"
    ),
    Bad(
        "tls.client_certificates",
        '"maybe"',
        "must be one of off, request, require (got 'maybe')",
    ),
    *path("tls.client_ca"),
    Bad(
        "tls.client_certificates",
        '"require"',
        "needed for client certificates (got client_certificates = 'require' "
        "and no client_ca)",
        named="client_ca",
    ),
    *path("tls.client_crl"),
    *path("tls.ocsp_response"),
    # [accounts]
    *path("accounts.file"),
    *number("accounts.watch_interval", 0.1, DAY, "0", "-1", "0.05", "86401"),
    *number("accounts.auth_cache_ttl", 0, DAY, "-1", "86401"),
    Bad(
        "accounts.store",
        '"mysql://msa:geheim@db/msa"',
        'must be "file" or a postgresql://user@host:port/database URL, not '
        "'mysql://msa:***@db/msa'",
    ),
    # [spool]
    *path("spool.directory"),
    *number("spool.commit_delay", 0, 1, "-0.001", "1.5"),
    Bad(
        "spool.directory",
        '"a\\u0000b"',
        "must be a path (not empty, no NUL character) (got 'a\\x00b')",
    ),
    # [content]
    Bad(
        "content.policy",
        '[[content.policy]]\nname = "nonsense"\n',
        "unknown content policy 'nonsense': give a built-in name (headers, "
        "mime-parts) or module:Class",
    ),
    Bad(
        "content.policy",
        '[content]\npolicy = "headers"\n',
        "must be [[content.policy]] tables (got 'headers')",
    ),
    # [logging]
    *path("logging.json_file"),
    Bad(
        "logging.level",
        '"verbose"',
        "must be one of debug, info, warn, error (got 'verbose')",
    ),
    # [metrics]
    Bad(
        "metrics.listen",
        '"tcp:99999"',
        "must name one port from 0 to 65535 (got 'tcp:99999')",
    ),
    Bad("metrics.listen", '"bogus:1"', f"{_PLAIN} (got 'bogus:1')"),
    *number("metrics.health_window", 0.1, 7 * DAY, "-1", "0", "604801"),
    # [audit]
    Bad("audit.enabled", '"yes"', "must be true or false (got 'yes')"),
    *path("audit.path"),
    *integer("audit.max_bytes", 4096, 1024**4, "100", "2199023255552"),
    # [relay]
    Bad(
        "relay.host",
        '"core mta"',
        "must be a host name or an IP address (got 'core mta')",
    ),
    Bad(
        "relay.host",
        '"core\\r\\n"',
        "must be a host name or an IP address (got 'core\\r\\n')",
    ),
    *integer("relay.port", 1, 65535, "0", "70000", "-1", '"25"'),
    Bad(
        "relay.tls", '"maybe"', "must be one of starttls, implicit, none (got 'maybe')"
    ),
    Bad("relay.verify_certificate", '"no"', "must be true or false (got 'no')"),
    Bad(
        "relay.server_name",
        '"core_mta"',
        "must be a host name or an IP address (got 'core_mta')",
    ),
    *path("relay.ca_file"),
    *path("relay.client_certificate"),
    *path("relay.client_key"),
    Bad("relay.auth_username", '"msa\\u0000x"', f"{_LINE} (got 'msa\\x00x')"),
    *path("relay.auth_password_file"),
    Bad(
        "relay.auth_username",
        '"msa"',
        "needed with auth_username (got auth_username = 'msa' and no "
        "auth_password_file)",
        named="auth_password_file",
    ),
    Bad(
        "relay.helo_name",
        '"[192.0.2.300]"',
        "must be a host name or an address literal ([192.0.2.1], "
        "[IPv6:2001:db8::1]) (got '[192.0.2.300]')",
    ),
    Bad(
        "relay.helo_name",
        '"msa\\r\\nMAIL FROM:<x@y>"',
        f"{_HOST} (got 'msa\\r\\nMAIL FROM:<x@y>')",
    ),
    *path("relay.outbox"),
    *number("relay.retry_base", 0.1, DAY, "0"),
    *number("relay.retry_max", 0.1, DAY, "86401"),
    *number("relay.max_lifetime", 1, 30 * DAY, "0", "2592001"),
    *integer("relay.concurrency", 1, 1000, "0", "1001"),
    Bad("relay.send_dsn", "1", "must be true or false (got 1)"),
    *number("relay.delay_warning_after", 1, 30 * DAY, "0"),
    *number("relay.connect_timeout", 1, DAY, "0"),
    *number("relay.command_timeout", 1, DAY, "86401"),
    *number("relay.data_timeout", 1, DAY, "-1"),
    *number("relay.idle_timeout", 0, 3600, "-1", "3601"),
    *integer("relay.max_messages_per_connection", 1, 10000, "0", "10001"),
    # [limits]
    Bad(
        "limits.backend",
        '"postgres"',
        "must be memory or redis (got 'postgres')",
    ),
    Bad(
        "limits.url",
        '"redis://:geheim@127.0.0.1:port/0"',
        "the port is not a number (got 'redis://:***@127.0.0.1:port/0')",
    ),
    Bad("limits.key_prefix", '""', f"{_LINE} (got '')"),
    *number("limits.timeout", 0.01, 60, "0", "61"),
    *number("limits.lease", 0.1, DAY, "-1"),
    Bad(
        "limits.lease",
        "10",
        "must be at least three times timeout (a hold is refreshed every "
        "lease / 3 seconds) (got lease = 10, timeout = 5)",
        extra="timeout = 5\n",
    ),
    Bad("limits.fallback", '"ignore"', "must be refuse or local (got 'ignore')"),
    *path("limits.tls_ca"),
    *path("limits.tls_certificate"),
    *path("limits.tls_key"),
    Bad(
        "limits.tls_ca",
        '"ca.pem"',
        "only with a rediss:// url (got url = '127.0.0.1:6379 db 0')",
    ),
    Bad(
        "limits.tls_key",
        '"key.pem"',
        "needs tls_certificate (got a tls_key only)",
        extra='url = "rediss://localhost:6380/0"\n',
    ),
    # [lmtp]
    Bad("lmtp.listeners", '["ssl:2024"]', f"{_ENDPOINT} (got 'ssl:2024')"),
    Bad(
        "lmtp.listeners",
        '["tcp:2024"]',
        "needed with a TCP listener, so that only the core can deliver (got "
        "listeners entry 'tcp:2024' and no allow_from)",
        named="allow_from",
    ),
    Bad("lmtp.tls_listeners", '["tcp:99999"]', f"{_PORT} (got 'tcp:99999')"),
    Bad(
        "lmtp.tls_listeners",
        '["tcp:2025"]',
        "needed with tls_listeners, whose clients must show a certificate from "
        "it (got tls_listeners = ['tcp:2025'] and no client_ca)",
        named="client_ca",
    ),
    *path("lmtp.client_ca"),
    Bad(
        "lmtp.allow_from",
        '["192.0.2.0/33"]',
        "each item must be an address or network such as 192.0.2.0/24 "
        "(got '192.0.2.0/33')",
    ),
    Bad(
        "lmtp.allow_from",
        '"192.0.2.0/24"',
        "must be a list of 0 to 10000 items, each an address or network such "
        "as 192.0.2.0/24 (got '192.0.2.0/24')",
    ),
    *integer("lmtp.max_message_size", 1024, 4 * 1024**3, "1023"),
    *integer("lmtp.max_recipients", 1, 10000, "0", "10001"),
    # [mailbox]
    Bad(
        "mailbox.store",
        '"mysql://msa:geheim@db/msa"',
        'must be "maildir" or a postgresql://user@host:port/database URL, not '
        "'mysql://msa:***@db/msa'",
    ),
    Bad(
        "mailbox.store",
        '"postgresql://msa@db:99999/msa"',
        "not a valid PostgreSQL URL (postgresql://msa@db:99999/msa): port "
        "'99999' is not a number from 1 to 65535",
    ),
    *path("mailbox.directory"),
    *number("mailbox.expire_after", 3600, 3650 * DAY, "0", "60"),
    *integer("mailbox.max_bytes", 1024, 1024 * 1024**3, "0"),
    *integer("mailbox.max_messages", 1, 10000000, "0", "true"),
    # [pop3]
    Bad("pop3.starttls_listeners", '["ssl:995"]', f"{_ENDPOINT} (got 'ssl:995')"),
    Bad(
        "pop3.implicit_tls_listeners",
        '"tcp:995"',
        "must be a list of 0 to 64 items, each an endpoint (got 'tcp:995')",
    ),
    Bad(
        "pop3.mechanisms",
        '["APOP"]',
        "each item must be one of PLAIN, LOGIN, EXTERNAL, DIGEST-MD5, "
        "SCRAM-SHA-256, SCRAM-SHA-256-PLUS (got 'APOP')",
    ),
    *integer("pop3.max_line_length", 255, 65536, "254", "65537"),
    *integer("pop3.max_errors", 1, 1000, "0", "1001"),
    *integer("pop3.max_auth_failures", 1, 100, "0", "101"),
    *number("pop3.idle_timeout", 1, DAY, "0", "86401", "nan"),
    *number("pop3.login_timeout", 1, DAY, "0", "86401"),
    *integer("pop3.max_connections", 1, 1000000, "0", "1000001"),
    *integer("pop3.max_connections_per_client", 1, 1000000, "0"),
    *integer("pop3.expire", 0, 36500, "-1", "36501", '"never"'),
]


class BadValueTests(unittest.TestCase):
    """
    Every row of L{BAD} through the function twistd's plugin calls.
    """

    def write(self, text: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "msa.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def refusal(self, bad: Bad) -> tuple[str, str | None]:
        """
        @return: the file, and the line twistd would print and exit 1 with
            (L{None} if the value was accepted).
        """
        path = self.write(bad.toml())
        options = Options()
        options.parseOptions(["--config", path])
        try:
            configFromOptions(options)
        except SystemExit as exited:
            # SystemExit with a string: Python prints it and exits 1.
            self.assertIsInstance(exited.code, str)
            return path, str(exited.code)
        return path, None

    def test_everyKeyHasABadValue(self):
        keys = {f"{section}.{key}" for section, keys in SCHEMA.items() for key in keys}
        self.assertEqual(sorted(keys - {bad.key for bad in BAD}), [])

    def test_badValues(self):
        failures = []
        for bad in BAD:
            path, line = self.refusal(bad)
            if line is None:
                failures.append(f"{bad.key} = {bad.value}: accepted")
                continue
            section, key = bad.key.split(".")
            where = f"digipoort-msa: {path}: [{section}] {bad.named or key}: "
            problems = []
            if not line.startswith(where):
                problems.append("does not name the key")
            if bad.says and line[len(where) :] != bad.says:
                problems.append(f"does not say {bad.says!r}")
            if "\n" in line or "\r" in line or "Traceback" in line:
                problems.append("is not one line")
            if "geheim" in line:
                problems.append("shows the password")
            if problems:
                failures.append(f"{bad.key} = {bad.value}: {line!r} {problems}")
        self.assertEqual(failures, [], "\n".join(failures))

    def test_protocolLinesStayOneLine(self):
        """
        A host name with CR LF (an SMTP command smuggled into the greeting
        and EHLO) is refused, and the error shows it escaped.
        """
        path, line = self.refusal(BAD[0])
        self.assertEqual(
            line,
            f"digipoort-msa: {path}: [server] hostname: {_HOST} "
            "(got 'msa.example.nl\\r\\nMAIL FROM:<x@y>')",
        )


class TwistdTests(unittest.TestCase):
    """
    A few rows of L{BAD} through a real C{twistd -n digipoort-msa}: exit
    code 1, the one line, no traceback (L{runTwistd}).
    """

    def test_twistd(self):
        rows = {
            (bad.key, bad.value): bad
            for bad in BAD
            if (bad.key, bad.value)
            in {
                ("accounts.watch_interval", "0"),
                ("accounts.watch_interval", "-1"),
                ("server.hostname", '"msa.example.nl\\r\\nMAIL FROM:<x@y>"'),
                ("relay.port", "70000"),
                ("metrics.health_window", "-1"),
                ("limits.url", '"redis://:geheim@127.0.0.1:port/0"'),
            }
        }
        self.assertEqual(len(rows), 6)
        for bad in rows.values():
            path = os.path.join(os.path.abspath(self.mktemp()), "msa.toml")
            os.makedirs(os.path.dirname(path))
            with open(path, "w") as f:
                f.write(bad.toml())
            section, key = bad.key.split(".")
            line = runTwistd(self, path)
            self.assertTrue(
                line.startswith(f"digipoort-msa: {path}: [{section}] {key}: "), line
            )
            self.assertTrue(line.endswith(bad.says), line)
            self.assertNotIn("geheim", line)


class WatchIntervalTests(unittest.TestCase):
    """
    The accounts watcher never polls in a loop without a pause, whatever
    interval an embedder gives it (C{watch_interval = 0} ran at 100% CPU).
    """

    def test_floor(self):
        watched = []

        class Store:
            def startWatching(self, interval):
                watched.append(interval)

            def stopWatching(self):
                return None

        for given, used in ((0, 0.1), (-1, 0.1), (0.5, 0.5)):
            watcher = services.AccountWatcher(Store(), given)
            watcher.startService()
            watcher.stopService()
            self.assertEqual(watched.pop(), used)
