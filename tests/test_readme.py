# -*- test-case-name: tests.test_readme -*-
"""
The code examples of README.rst, run as a newcomer would paste them: the
embedding example builds a working submission server that a real client
(smtplib, STARTTLS + AUTH PLAIN) submits a message to.  And the README's
Layout agrees with the import contracts it describes.
"""

import os
import re
import smtplib
import ssl
import tomllib
import unittest as pyunit

import attrs
from twisted.internet import endpoints, threads
from twisted.trial import reporter, unittest

from msa.accounts.model import makeAccount, writeAccounts
from msa.tls import ensureSelfSignedCertificate
from tests.e2e import MESSAGE, SENDERS, freePort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")


def literalBlocks(text: str) -> list[str]:
    """
    The literal blocks (after a C{::} paragraph) of a reStructuredText text,
    dedented.
    """
    blocks = []
    for match in re.finditer(r"::\n\n((?:(?:    .*)?\n)+)", text):
        lines = match.group(1).splitlines()
        blocks.append("\n".join(line[4:] for line in lines).strip() + "\n")
    return blocks


def pythonBlocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [
        b for b in literalBlocks(text) if b.startswith(("from msa", "from twisted"))
    ]


class EmbeddingExampleTests(unittest.TestCase):
    def test_examplesFound(self):
        """
        The README has two Python examples to run, the embedding one and
        the L{msa.testing} one, and each is run by a test below (if they
        move, these tests must follow them rather than pass on nothing).
        """
        self.assertEqual(len(pythonBlocks()), 2)

    def test_embeddingExampleServesASubmission(self):
        """
        The embedding example, with its paths pointed at a temporary
        directory and its port at a free one, accepts a message over
        STARTTLS with AUTH PLAIN and spools it.
        """
        code = pythonBlocks()[0]
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        cert, key = ensureSelfSignedCertificate(base, "localhost")
        accounts = os.path.join(base, "accounts.json")
        account = makeAccount("alice", "wonderland", ["localhost"])
        writeAccounts(
            accounts, {"alice": attrs.evolve(account, extra={"senders": SENDERS})}
        )
        port = freePort()
        listening = []
        realServerFromString = endpoints.serverFromString

        def serverFromString(reactor, description):
            self.assertEqual(description, "tcp:587")
            endpoint = realServerFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
            listen = endpoint.listen

            def recordingListen(factory):
                d = listen(factory)
                listening.append(d)
                return d

            endpoint.listen = recordingListen
            return endpoint

        self.patch(endpoints, "serverFromString", serverFromString)
        replacements = {
            "/var/spool/digipoort-msa": os.path.join(base, "spool"),
            "/etc/digipoort-msa/accounts.json": accounts,
            "/etc/digipoort-msa/cert.pem": cert,
            "/etc/digipoort-msa/key.pem": key,
        }
        for old, new in replacements.items():
            self.assertIn(old, code)
            code = code.replace(old, new)
        namespace: dict = {}
        exec(compile(code, "README.rst", "exec"), namespace)
        self.assertEqual(len(listening), 1)

        def stop(port):
            return port.stopListening()

        listening[0].addCallback(lambda p: self.addCleanup(stop, p))

        def submit():
            context = ssl.create_default_context(cafile=cert)
            with smtplib.SMTP("localhost", port, timeout=10) as client:
                client.starttls(context=context)
                client.login("alice", "wonderland")
                return client.sendmail(
                    "ik@mijnbedrijf.nl", ["belastingdienst@overheid.nl"], MESSAGE
                )

        d = listening[0].addCallback(lambda _: threads.deferToThread(submit))

        def check(refused):
            self.assertEqual(refused, {})
            spool = namespace["spool"]
            self.assertEqual(len(spool.pending()), 1)

        return d.addCallback(check)

    def test_testingExamplePasses(self):
        """
        The L{msa.testing} example's test case passes, running both of its
        tests.
        """
        code = pythonBlocks()[1]
        namespace: dict = {}
        exec(compile(code, "README.rst", "exec"), namespace)
        suite = pyunit.defaultTestLoader.loadTestsFromTestCase(
            namespace["SubmissionTests"]
        )
        result = reporter.TestResult()
        suite.run(result)
        self.assertEqual(result.testsRun, 2)
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)


class LayoutTests(unittest.TestCase):
    """
    The README's Layout section and the import-linter layers contract in
    pyproject.toml name the same layers, in the same order, and hold every
    package and module under msa/.
    """

    def readmeLayers(self) -> list[str]:
        with open(README, encoding="utf-8") as f:
            text = f.read()
        section = text.split("\nLayout\n------\n", 1)[1].split("\n----", 1)[0]
        self.section = section
        return literalBlocks(section)[0].splitlines()

    def contractLayers(self) -> list[str]:
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
        (layers,) = [c for c in contracts if c["id"] == "layers"]
        self.assertEqual(layers["containers"], ["msa"])
        return layers["layers"]

    def test_sameLayers(self):
        """
        The README's list is the contract's, line for line.
        """
        normal = [" ".join(layer.split()) for layer in self.contractLayers()]
        self.assertEqual(self.readmeLayers(), normal)

    def test_everyPackageInBoth(self):
        """
        Every package and module under msa/ (but C{__init__}, the public
        API above the layers) is in the contract's layers and is described
        in the Layout section; and nothing is named that does not exist.
        """
        found = set()
        for name in os.listdir(os.path.join(ROOT, "msa")):
            path = os.path.join(ROOT, "msa", name)
            if os.path.isfile(os.path.join(path, "__init__.py")):
                found.add(name)
            elif name.endswith(".py") and name != "__init__.py":
                found.add(name[:-3])
        named = set(re.split(r"[|:\s]+", " ".join(self.contractLayers())))
        self.assertEqual(named - {""}, found)
        self.readmeLayers()
        for name in sorted(found):
            isPackage = os.path.isdir(os.path.join(ROOT, "msa", name))
            shown = f"``msa/{name}/``" if isPackage else f"{name}.py``"
            self.assertIn(shown, self.section, f"{name} not in README's Layout")


class RequirementsTests(unittest.TestCase):
    """
    The requirements the README, issues and tests cite are in the project:
    REQUIREMENTS.rst defines R1 to R16, and no file points outside the
    checkout for them.
    """

    def test_everyRequirementDefined(self):
        with open(os.path.join(ROOT, "REQUIREMENTS.rst"), encoding="utf-8") as f:
            defined = re.findall(r"^(R\d+) \(", f.read(), re.M)
        self.assertEqual(defined, [f"R{n}" for n in range(1, 17)])
        with open(README, encoding="utf-8") as f:
            self.assertIn("``REQUIREMENTS.rst``", f.read())

    def test_nothingOutsideTheCheckout(self):
        """
        A clone has no folder of notes beside it: no file of the project
        refers to one.
        """
        outside = "../" + "shared"
        found = []
        for directory, subdirectories, files in os.walk(ROOT):
            subdirectories[:] = [
                d
                for d in subdirectories
                if not d.startswith((".", "_trial_temp"))
                and not d.endswith(".egg-info")
                and d != "node_modules"
            ]
            for name in files:
                if name.endswith((".py", ".rst", ".md", ".toml", ".cfg", ".sh")):
                    path = os.path.join(directory, name)
                    with open(path, encoding="utf-8", errors="replace") as f:
                        if outside in f.read():
                            found.append(os.path.relpath(path, ROOT))
        self.assertEqual(found, [])
