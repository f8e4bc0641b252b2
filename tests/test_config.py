# -*- test-case-name: tests.test_config -*-
"""
L{msa.service.config}: defaults, paths, and errors that name the file and the key.
"""

import os

from twisted.trial import unittest

from msa.service.config import ConfigError, loadConfig, writeConfig


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
        etc/digipoort-msa.toml documents every key and is itself valid.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        example = os.path.join(root, "etc", "digipoort-msa.toml")
        config = loadConfig(example)
        self.assertEqual(config["relay"]["host"], "core-mta.digipoort.example.nl")
        with open(example) as f:
            text = f.read()
        from msa.service.config import SCHEMA

        self.assertEqual(len(config["content"]["chain"]), 2)
        for section, keys in SCHEMA.items():
            if section == "content":
                self.assertIn("[[content.policy]]", text)
                continue
            self.assertIn(f"[{section}]", text)
            for key in keys:
                self.assertIn(key + " =", text, f"{section}.{key} not documented")
