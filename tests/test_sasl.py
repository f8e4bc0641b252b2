# -*- test-case-name: tests.test_sasl -*-
"""
Tests for L{msa.sasl} as a package: the shared steps, context, replies and
credentials of L{msa.sasl.base}, the table of L{msa.sasl.registry}, the
curated public names of the package, and its import structure (the
mechanism modules import L{msa.sasl.base}, never the package, and nothing
in it imports account storage).
"""

import ast
import os

import attrs
from twisted.cred.credentials import IUsernamePassword
from twisted.trial import unittest
from zope.interface.verify import verifyObject

import msa.sasl
from msa.errors import SMTPReply
from msa.interfaces import IMechanismCredentials
from msa.sasl.base import (
    Authenticate,
    Challenge,
    MechanismContext,
    UsernamePassword,
    authenticationFailed,
    malformed,
)
from msa.sasl.registry import mechanismFactories

SASL_DIRECTORY = os.path.dirname(msa.sasl.__file__)


class PasswordCredentialsMixin:
    """
    For the tests of PLAIN and LOGIN: C{assertCredentials} checks that an
    exchange ended with the user name and password of the mechanism named
    by C{mechanismName}.
    """

    mechanismName: str

    def assertCredentials(self, step, username, password):
        self.assertIsInstance(step, Authenticate)
        credentials = step.credentials
        self.assertIsInstance(credentials, UsernamePassword)
        self.assertEqual(
            (credentials.username, credentials.password, credentials.mechanism),
            (username, password, self.mechanismName),
        )


class StepTests(unittest.TestCase):
    """
    L{Challenge} and L{Authenticate}: the two things a mechanism's C{start}
    and C{respond} return.
    """

    def test_challengeValue(self):
        """
        Challenges compare by their data and cannot be changed.
        """
        self.assertEqual(Challenge(b"x"), Challenge(b"x"))
        self.assertNotEqual(Challenge(b"x"), Challenge(b""))
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError, setattr, Challenge(b"x"), "data", b"y"
        )

    def test_authenticateValue(self):
        """
        An L{Authenticate} carries the credentials it was made with and
        cannot be changed.
        """
        credentials = object()
        step = Authenticate(credentials)
        self.assertIs(step.credentials, credentials)
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError, setattr, step, "credentials", None
        )


class MechanismContextTests(unittest.TestCase):
    """
    L{MechanismContext}: what a mechanism may know about the server.
    """

    def test_defaults(self):
        """
        Without arguments the context names C{localhost}, knows no SCRAM
        parameters, no client certificate and no channel binding.
        """
        context = MechanismContext()
        self.assertEqual(context.realm, "localhost")
        self.assertEqual(context.serverNames, ["localhost"])
        self.assertIsNone(context.scramParameters("alice", "SCRAM-SHA-256"))
        self.assertEqual(context.peerIdentities, ())
        self.assertEqual(context.channelBindings, {})

    def test_mutableDefaultsNotShared(self):
        """
        Each context has its own server name list and channel binding
        table, so a session setting its own does not change another's.
        """
        first, second = MechanismContext(), MechanismContext()
        first.serverNames.append("mail.example")
        first.channelBindings["tls-exporter"] = b"x"
        self.assertEqual(second.serverNames, ["localhost"])
        self.assertEqual(second.channelBindings, {})


class RepliesTests(unittest.TestCase):
    """
    L{malformed} and L{authenticationFailed}: the only replies a mechanism
    raises.
    """

    def test_malformedDefault(self):
        """
        A malformed client message is refused with 501 5.5.2.
        """
        reply = malformed()
        self.assertIsInstance(reply, SMTPReply)
        self.assertEqual(
            (reply.code, reply.status, reply.text),
            (501, "5.5.2", "Malformed authentication data"),
        )

    def test_malformedText(self):
        """
        The text says what was wrong.
        """
        reply = malformed("PLAIN fields must be UTF-8")
        self.assertEqual(
            (reply.code, reply.status, reply.text),
            (501, "5.5.2", "PLAIN fields must be UTF-8"),
        )

    def test_authenticationFailed(self):
        """
        Failed credentials get 535 5.7.8 with one text for every reason.
        """
        reply = authenticationFailed()
        self.assertEqual(
            (reply.code, reply.status, reply.text),
            (535, "5.7.8", "Authentication credentials invalid"),
        )


class UsernamePasswordTests(unittest.TestCase):
    """
    L{UsernamePassword}: PLAIN's and LOGIN's credentials.
    """

    def test_interfaces(self):
        """
        They provide twisted.cred's L{IUsernamePassword} and
        L{IMechanismCredentials}, naming the mechanism.
        """
        credentials = UsernamePassword("alice", "wonderland", "LOGIN")
        self.assertTrue(verifyObject(IUsernamePassword, credentials))
        self.assertTrue(verifyObject(IMechanismCredentials, credentials))
        self.assertEqual(
            (credentials.username, credentials.password, credentials.mechanism),
            ("alice", "wonderland", "LOGIN"),
        )

    def test_checkPassword(self):
        """
        C{checkPassword} takes L{str} or UTF-8 L{bytes} and is exact.
        """
        credentials = UsernamePassword("alice", "wönderland", "PLAIN")
        self.assertTrue(credentials.checkPassword("wönderland"))
        self.assertTrue(credentials.checkPassword("wönderland".encode()))
        self.assertFalse(credentials.checkPassword("Wönderland"))
        self.assertFalse(credentials.checkPassword("wönderland "))
        self.assertFalse(credentials.checkPassword(b""))


class RegistryTests(unittest.TestCase):
    """
    L{mechanismFactories}: every mechanism the package implements.
    """

    def test_names(self):
        """
        Each of the six mechanisms is there under its SASL name, and each
        factory makes a mechanism of that name from a context.
        """
        factories = mechanismFactories()
        self.assertEqual(
            sorted(factories),
            [
                "DIGEST-MD5",
                "EXTERNAL",
                "LOGIN",
                "PLAIN",
                "SCRAM-SHA-256",
                "SCRAM-SHA-256-PLUS",
            ],
        )
        for name, factory in factories.items():
            mechanism = factory(MechanismContext())
            self.assertEqual(mechanism.name, name)

    def test_fresh(self):
        """
        Every call returns a new table, so a server narrowing its own does
        not change another's.
        """
        first = mechanismFactories()
        del first["PLAIN"]
        self.assertIn("PLAIN", mechanismFactories())

    def test_packageNames(self):
        """
        The package's public names are those of the modules that define
        them.
        """
        self.assertIs(msa.sasl.mechanismFactories, mechanismFactories)
        self.assertIs(msa.sasl.MechanismContext, MechanismContext)
        self.assertIs(msa.sasl.UsernamePassword, UsernamePassword)
        for name in msa.sasl.__all__:
            value = getattr(msa.sasl, name)
            self.assertTrue(value.__module__.startswith("msa.sasl."), name)


def _imports(path):
    """
    The modules a source file imports, each with whether the import is at
    module level.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    topLevel = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in topLevel
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, id(node) in topLevel


class ImportStructureTests(unittest.TestCase):
    """
    The package has no import cycle to work around: the mechanism modules
    import the shared base, not the package that gathers them, and SASL
    imports no account storage.
    """

    def modules(self):
        return sorted(
            name
            for name in os.listdir(SASL_DIRECTORY)
            if name.endswith(".py") and name != "__init__.py"
        )

    def test_modulesDoNotImportPackage(self):
        """
        No module of the package imports C{msa.sasl} itself.
        """
        for name in self.modules():
            for module, _ in _imports(os.path.join(SASL_DIRECTORY, name)):
                self.assertNotEqual(module, "msa.sasl", name)

    def test_noLocalImports(self):
        """
        Every import in the package is at module level.
        """
        for name in self.modules() + ["__init__.py"]:
            for module, topLevel in _imports(os.path.join(SASL_DIRECTORY, name)):
                self.assertTrue(topLevel, f"{name} imports {module} locally")

    def test_noAccountStorage(self):
        """
        Nothing in the package imports L{msa.accounts}.
        """
        for name in self.modules() + ["__init__.py"]:
            for module, _ in _imports(os.path.join(SASL_DIRECTORY, name)):
                self.assertFalse(module.startswith("msa.accounts"), name)
