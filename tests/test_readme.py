# -*- test-case-name: tests.test_readme -*-
"""
The code examples of README.rst, run as a newcomer would paste them: the
embedding example builds a working submission server that a real client
(smtplib, STARTTLS + AUTH PLAIN) submits a message to.
"""

import os
import re
import smtplib
import ssl
import unittest as pyunit

import attrs
from twisted.internet import endpoints, threads
from twisted.trial import reporter, unittest

from msa.accounts import makeAccount, writeAccounts
from msa.tls import ensureSelfSignedCertificate
from tests.e2e import MESSAGE, SENDERS, freePort

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.rst")


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
