# -*- test-case-name: tests.test_selftest_report -*-
"""
C{digipoort-msa-admin selftest}: the report table, the rules behind the
verdicts and the exit codes that need no listener.
"""

import io
import ssl as stdlibssl

import OpenSSL.SSL
from twisted.trial import unittest

from msa.admin import tlsprobes
from msa.admin.command import main
from msa.admin.probeclient import (
    FAIL,
    PASS,
    SKIP,
    ProbeResult,
    Target,
)
from msa.admin.selftest import SMUGGLING_FORMS, formatTable
from msa.admin.tlsprobes import weakness
from msa.tls import DEFAULT_CIPHERS
from tests.e2e import freePort


class ReportTests(unittest.TestCase):
    """
    The table, the rules behind the verdicts, and the exit codes that need
    no listener.
    """

    def test_table(self):
        """
        A header, then one row per probe: name and result left-aligned in
        columns as wide as their longest entry, two spaces apart, the
        detail last.
        """
        lines = formatTable(
            [
                ProbeResult("greeting", PASS, "220 localhost ESMTP"),
                ProbeResult("smuggling CR.LF", FAIL, "accepted"),
                ProbeResult("groups", SKIP, "why"),
            ]
        )
        self.assertEqual(
            lines,
            [
                "PROBE            RESULT  DETAIL",
                "greeting         PASS    220 localhost ESMTP",
                "smuggling CR.LF  FAIL    accepted",
                "groups           SKIP    why",
            ],
        )

    def test_smugglingForms(self):
        """
        The smuggling forms are a dot between any two of CR, LF and CRLF,
        all but CRLF.CRLF.
        """
        self.assertEqual(
            dict(SMUGGLING_FORMS),
            {
                "LF.LF": b"\n.\n",
                "LF.CR": b"\n.\r",
                "LF.CRLF": b"\n.\r\n",
                "CR.LF": b"\r.\n",
                "CR.CR": b"\r.\r",
                "CR.CRLF": b"\r.\r\n",
                "CRLF.LF": b"\r\n.\n",
                "CRLF.CR": b"\r\n.\r",
            },
        )

    def test_weakness(self):
        """
        Weak: no forward secrecy, anonymous, NULL, CBC with SHA-1.  Not
        weak by the rule (but failing when not expected): CBC with SHA-384,
        AEAD suites with (EC)DHE.
        """
        context = stdlibssl.SSLContext(stdlibssl.PROTOCOL_TLS_CLIENT)
        context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
        ciphers = {c["name"]: c for c in context.get_ciphers()}
        expected = {
            "ECDHE-ECDSA-AES128-GCM-SHA256": None,
            "ECDHE-RSA-CHACHA20-POLY1305": None,
            "DHE-RSA-AES256-GCM-SHA384": None,
            "ECDHE-ECDSA-AES256-SHA384": None,
            "ECDHE-ECDSA-AES128-SHA": "CBC with SHA1",
            "DHE-RSA-AES256-SHA": "CBC with SHA1",
            "AES128-GCM-SHA256": "no forward secrecy",
            "AES256-SHA": "no forward secrecy",
            "ADH-AES128-GCM-SHA256": "anonymous",
            "AECDH-AES128-SHA": "anonymous",
            "ECDHE-ECDSA-NULL-SHA": "no encryption",
            "NULL-SHA256": "no encryption",
        }
        self.assertEqual({name: weakness(ciphers[name]) for name in expected}, expected)

    def test_defaultsAreNotWeak(self):
        """
        None of the MSA's own default suites is weak by the rule.
        """
        context = stdlibssl.SSLContext(stdlibssl.PROTOCOL_TLS_CLIENT)
        context.set_ciphers(DEFAULT_CIPHERS)
        ciphers = [c for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
        self.assertEqual(len(ciphers), 6)
        self.assertEqual([weakness(c) for c in ciphers], [None] * 6)

    def test_localVersionCheck(self):
        """
        The local OpenSSL negotiates TLS 1.2 with itself in memory (and,
        at security level 0, TLS 1.0 here, so the version probes really
        test the server).
        """
        self.assertIsNone(tlsprobes.localCanNegotiate(OpenSSL.SSL.TLS1_2_VERSION))
        self.assertIsNone(tlsprobes.localCanNegotiate(OpenSSL.SSL.TLS1_VERSION))

    def test_couldNotTest(self):
        """
        When the local OpenSSL cannot negotiate an old version, the probe
        says so as a SKIP and connects nowhere.
        """
        self.patch(tlsprobes, "localCanNegotiate", lambda v: "no protocols available")
        results = tlsprobes.probeOldVersions(Target("127.0.0.1", freePort()))
        self.assertEqual(
            results,
            [
                ProbeResult(
                    f"tls{label}-refused",
                    SKIP,
                    f"could not test: the local OpenSSL cannot negotiate TLS "
                    f"{label} even with itself (no protocols available)",
                )
                for label in ("1.0", "1.1")
            ],
        )

    def test_accountOptionsGoTogether(self):
        """
        Some but not all of the account options: exit code 2 and why.
        """
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["selftest", "127.0.0.1", "25", "--user", "alice"], stdout=out, stderr=err
        )
        self.assertEqual(code, 2)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(
            err.getvalue(),
            "digipoort-msa-admin: selftest: --user, --password-file, --sender "
            "and --rcpt go together\n",
        )

    def test_expectedCiphersMatchNothing(self):
        """
        An expected policy that names no suite: exit code 2 and why.
        """
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["selftest", "127.0.0.1", "25", "--expect-ciphers", "NO-SUCH-SUITE"],
            stdout=out,
            stderr=err,
        )
        self.assertEqual(code, 2)
        self.assertEqual(
            err.getvalue(),
            "digipoort-msa-admin: --expect-ciphers: no suite matches 'NO-SUCH-SUITE'\n",
        )

    def test_nothingListening(self):
        """
        No listener: the greeting probe fails with the reason, the table
        ends there, and the exit code is 1.
        """
        port = freePort()
        out, err = io.StringIO(), io.StringIO()
        code = main(["selftest", "127.0.0.1", str(port)], stdout=out, stderr=err)
        self.assertEqual(code, 1)
        self.assertEqual(
            out.getvalue().splitlines(),
            [
                "PROBE     RESULT  DETAIL",
                f"greeting  FAIL    cannot connect to 127.0.0.1:{port}: "
                "[Errno 111] Connection refused",
                f"selftest of 127.0.0.1:{port} (STARTTLS): "
                "0 PASS, 0 WARN, 1 FAIL, 0 SKIP",
            ],
        )
