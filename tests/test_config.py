# -*- test-case-name: tests.test_config -*-
"""
L{msa.service.config}: defaults, paths, and errors that name the file and the key.
"""

import os
import re
import tomllib

from twisted.trial import unittest

from msa.service.config import (
    SCHEMA,
    ConfigError,
    _tomlValue,
    loadConfig,
    writeConfig,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "digipoort-msa.toml")


class ConfigTests(unittest.TestCase):
    def write(self, text: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "msa.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def assertError(self, text: str, *fragments: str):
        path = self.write(text)
        error = self.assertRaises(ConfigError, loadConfig, path)
        for fragment in (path,) + fragments:
            self.assertIn(fragment, str(error))

    def test_builtInDefaults(self):
        config = loadConfig(None)
        state = os.path.join(os.getcwd(), "msa-state")
        self.assertTrue(config.usesDefaults)
        self.assertEqual(config["server"]["state_dir"], state)
        self.assertEqual(
            config["server"]["starttls_listeners"], ["tcp:2587:interface=127.0.0.1"]
        )
        self.assertEqual(
            config["server"]["implicit_tls_listeners"], ["tcp:2465:interface=127.0.0.1"]
        )
        self.assertEqual(config["server"]["max_message_size"], 52428800)
        self.assertEqual(config.accountsFile, os.path.join(state, "accounts.json"))
        self.assertEqual(config["spool"]["directory"], os.path.join(state, "spool"))
        self.assertEqual(config["relay"]["outbox"], os.path.join(state, "outbox"))
        self.assertIsNone(config["relay"]["host"])
        self.assertEqual(config.realm, "localhost")
        self.assertEqual(config["server"]["server_names"], ["localhost", "127.0.0.1"])

    def test_relativePathsFromFile(self):
        path = self.write(
            '[server]\nstate_dir = "state"\nhostname = "msa.example.nl"\n'
        )
        config = loadConfig(path)
        base = os.path.dirname(path)
        self.assertEqual(config["server"]["state_dir"], os.path.join(base, "state"))
        self.assertEqual(
            config.accountsFile, os.path.join(base, "state", "accounts.json")
        )
        self.assertEqual(config.realm, "msa.example.nl")
        self.assertEqual(config["relay"]["helo_name"], "msa.example.nl")

    def test_unknownKey(self):
        self.assertError(
            "[server]\nhostnaam = 'x'\n", "[server] hostnaam", "unknown key"
        )

    def test_unknownSection(self):
        self.assertError("[servers]\n", "unknown section [servers]")

    def test_wrongType(self):
        self.assertError(
            "[server]\nmax_message_size = '50M'\n", "max_message_size", "int"
        )
        self.assertError("[relay]\nport = true\n", "[relay] port")
        self.assertError("[relay]\nverify_certificate = 'yes'\n", "verify_certificate")

    def test_badValues(self):
        """
        A sample; L{tests.test_config_values} has a bad value for every key.
        """
        self.assertError("[relay]\ntls = 'maybe'\n", "[relay] tls", "starttls")
        self.assertError(
            "[server]\nmax_recipients = 0\n",
            "[server] max_recipients: must be an integer from 1 to 10000 (got 0)",
        )
        self.assertError("[server]\nmax_line_length = 10\n", "max_line_length")
        self.assertError("[tls]\ncertificate = 'c.pem'\n", "[tls] certificate", "key")
        self.assertError(
            "[server]\nstarttls_listeners = ['ssl:465']\n", "starttls_listeners", "ssl:"
        )
        self.assertError("[relay]\nauth_username = 'msa'\n", "auth_password_file")

    def test_defaultsNotShared(self):
        """
        What fills in a default (EXTERNAL put first with client
        certificates) changes this configuration's copy, not the schema's.
        """
        ca = self.write("")
        path = self.write(
            f"[tls]\nclient_certificates = 'request'\nclient_ca = '{ca}'\n"
        )
        self.assertEqual(loadConfig(path)["server"]["mechanisms"][0], "EXTERNAL")
        self.assertEqual(
            loadConfig(None)["server"]["mechanisms"],
            ["SCRAM-SHA-256", "DIGEST-MD5", "PLAIN", "LOGIN"],
        )

    def test_hostNames(self):
        """
        The core may be named by address; EHLO may give an address literal.
        """
        path = self.write(
            "[relay]\nhost = '2001:db8::25'\nserver_name = '192.0.2.25'\n"
            "helo_name = '[IPv6:2001:db8::1]'\n"
        )
        relay = loadConfig(path)["relay"]
        self.assertEqual(
            (relay["host"], relay["server_name"], relay["helo_name"]),
            ("2001:db8::25", "192.0.2.25", "[IPv6:2001:db8::1]"),
        )

    def test_mechanismsAnyCase(self):
        path = self.write("[server]\nmechanisms = ['plain', 'Login']\n")
        self.assertEqual(loadConfig(path)["server"]["mechanisms"], ["PLAIN", "LOGIN"])

    def test_endpoints(self):
        """
        The listener forms README.rst shows load: tcp with an interface,
        tcp6 with an escaped address, unix, systemd, each also under haproxy:.
        """
        listeners = [
            "tcp:587",
            "tcp:465:interface=192.0.2.10",
            "tcp6:587:interface=\\:\\:1",
            "unix:/run/msa.sock",
            "systemd:domain=INET6:index=0",
            "systemd:domain=INET:name=submission",
            "haproxy:tcp:10587:interface=127.0.0.1",
        ]
        path = self.write("")
        writeConfig(path, {"server": {"starttls_listeners": listeners}})
        self.assertEqual(loadConfig(path)["server"]["starttls_listeners"], listeners)

    def test_contentPolicyErrors(self):
        self.assertError(
            "[[content.policy]]\nname = 'nonsense'\n", "[content] policy", "nonsense"
        )
        self.assertError(
            "[[content.policy]]\nname = 'headers'\nrequire_date = 'yes'\n",
            "[content] policy",
        )

    def test_notTOML(self):
        self.assertError("[server\n", "not valid TOML")

    def test_missingFile(self):
        error = self.assertRaises(ConfigError, loadConfig, "/nonexistent/msa.toml")
        self.assertIn("/nonexistent/msa.toml: cannot read", str(error))

    def test_exampleConfigLoads(self):
        """
        etc/digipoort-msa.toml is itself valid.
        """
        config = loadConfig(EXAMPLE)
        self.assertEqual(config["relay"]["host"], "core-mta.digipoort.example.nl")
        self.assertEqual(len(config["content"]["chain"]), 2)


class SchemaTests(unittest.TestCase):
    """
    L{SCHEMA} against itself, etc/digipoort-msa.toml and README.rst.
    """

    def test_defaultsFit(self):
        """
        Every key has a line of documentation, and its default passes its
        own check (L{None}: not set).
        """
        for section, keys in SCHEMA.items():
            for name, key in keys.items():
                self.assertTrue(key.doc, f"{section}.{name} has no doc line")
                if key.default is not None:
                    self.assertEqual(
                        key.check(name, key.default), key.default, f"{section}.{name}"
                    )

    def test_exampleDocumentsEveryKey(self):
        """
        Every key of L{SCHEMA} is in etc/digipoort-msa.toml (set or commented
        out) with its default, either as its value or as "default: VALUE" in
        the comments about it, its range ("# 1 to 65535" after a number) and
        its choices; and every key the file has is in L{SCHEMA}.
        """
        documented = documentedKeys(EXAMPLE)
        problems = []
        for section, keys in SCHEMA.items():
            for name, key in keys.items():
                where = f"{section}.{name}"
                if where == "content.policy":
                    continue  # [[content.policy]] tables, each its own keys
                if where not in documented:
                    problems.append(f"{where}: not in the file")
                    continue
                values, comments = documented[where]
                if key.minimum is not None:
                    shown = f"# {_number(key.minimum)} to {_number(key.maximum)}"
                    if shown not in comments:
                        problems.append(f"{where}: range not shown as {shown!r}")
                for choice in key.choices:
                    if choice not in comments:
                        problems.append(f"{where}: {choice} not mentioned")
                if key.default is None:
                    continue
                shown = f"default: {_tomlValue(key.default)}"
                if key.default not in values and shown not in comments.lower():
                    problems.append(f"{where}: default {key.default!r} not shown")
        for where in documented:
            section, name = where.split(".", 1)
            if name not in SCHEMA.get(section, {}):
                problems.append(f"{where}: in the file, not in SCHEMA")
        self.assertEqual(problems, [])

    def test_readmeNamesEverySection(self):
        """
        README.rst's Configuration section describes each section of
        L{SCHEMA}, and no other.
        """
        with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
            text = f.read()
        start = text.index("\nConfiguration\n-------------\n")
        end = text.index("\n-------", start + 30)
        named = set(re.findall(r"``\[([a-z0-9_]+)\]``", text[start:end]))
        self.assertEqual(sorted(named), sorted(SCHEMA))


def _number(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def documentedKeys(path: str) -> dict[str, tuple[list, str]]:
    """
    The keys a documented TOML file names, set or commented out, outside
    C{[[content.policy]]} tables.

    @return: C{section.key} -> (the values it is given or shown with, the
        comment lines about it: those just above it, and its own line).
    """
    keys: dict[str, tuple[list, str]] = {}
    section, comments = None, ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            header = re.match(r"^#?\s*(\[\[?)([a-z0-9_.]+)\]", line)
            if header:
                table = header.group(1) == "[["
                section, comments = None if table else header.group(2), ""
                continue
            assignment = re.match(r"^#?\s*([a-z][a-z0-9_]*)\s*=\s*(.*)$", line)
            if assignment and section is not None:
                name, rest = assignment.groups()
                values, before = keys.setdefault(f"{section}.{name}", ([], ""))
                try:
                    values.append(tomllib.loads(f"v = {rest}")["v"])
                except tomllib.TOMLDecodeError:
                    pass
                keys[f"{section}.{name}"] = (values, before + comments + line)
                comments = ""
            elif line.startswith("#"):
                comments += line
            else:
                comments = ""
    return keys
