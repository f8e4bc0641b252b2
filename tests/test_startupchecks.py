# -*- test-case-name: tests.test_startupchecks -*-
"""
L{msa.service.startupchecks}: what stops the start, what only warns.
"""

import datetime
import os

from twisted.trial import unittest

from msa.service import tap
from msa.service.startupchecks import (
    StartupCheckError,
    checkCertificate,
    checkSpoolDirectory,
)
from tests.e2e import RunningMSA
from tests.test_tls import makeChain, pem

NOW = datetime.datetime.now(datetime.UTC)


def chainProblems(*args, **kwargs):
    # The test certificates live one day: leave out the expiry warning.
    return [w for w in checkCertificate(*args, **kwargs) if "expires in" not in w]


class CertificateCheckTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.paths, self.interKey, self.inter = makeChain(self.directory)

    def test_completeChain(self):
        self.assertEqual(chainProblems(self.paths["full"]), [])

    def test_missingIntermediate(self):
        [warning] = chainProblems(self.paths["leaf"])
        self.assertIn("no intermediate certificate", warning)

    def test_chainFile(self):
        chain = os.path.join(self.directory, "chain.pem")
        with open(chain, "wb") as f:
            f.write(pem(self.inter))
        self.assertEqual(chainProblems(self.paths["leaf"], chain), [])

    def test_selfSigned(self):
        from msa.tls import ensureSelfSignedCertificate

        cert, _ = ensureSelfSignedCertificate(self.directory, "localhost")
        [warning] = checkCertificate(cert)
        self.assertIn("self-signed", warning)

    def test_expiryEdges(self):
        later = NOW + datetime.timedelta(days=700)
        # The test leaf is valid for one day: within 30 days of its end.
        [warning] = checkCertificate(
            self.paths["full"], now=NOW + datetime.timedelta(hours=1)
        )
        self.assertIn("expires in 0 day(s)", warning)
        error = self.assertRaises(
            StartupCheckError, checkCertificate, self.paths["full"], now=later
        )
        self.assertIn("expired on", str(error))
        early = NOW - datetime.timedelta(days=2)
        error = self.assertRaises(
            StartupCheckError, checkCertificate, self.paths["full"], now=early
        )
        self.assertIn("not valid before", str(error))

    def test_thirtyDaysEdge(self):
        from cryptography import x509

        from msa.tls import ensureSelfSignedCertificate

        path, _ = ensureSelfSignedCertificate(self.directory, "localhost")
        with open(path, "rb") as f:
            end = x509.load_pem_x509_certificate(f.read()).not_valid_after_utc

        def expiring(days):
            now = end - datetime.timedelta(days=days, minutes=1)
            return [w for w in checkCertificate(path, now=now) if "expires" in w]

        self.assertEqual(expiring(30), [])
        [warning] = expiring(29)
        self.assertIn("expires in 29 day(s)", warning)


class SpoolDirectoryTests(unittest.TestCase):
    def test_modes(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)
        checkSpoolDirectory(directory)
        os.chmod(directory, 0o750)
        error = self.assertRaises(StartupCheckError, checkSpoolDirectory, directory)
        self.assertIn("chmod 700", str(error))

    def test_startRefused(self):
        msa = RunningMSA(self)
        spool = os.path.join(msa.state, "spool")
        os.chmod(spool, 0o755)
        options = tap.Options()
        options.parseOptions(["--config", msa.configFile])
        error = self.assertRaises(SystemExit, tap.makeService, options)
        self.assertIn(spool, str(error))
