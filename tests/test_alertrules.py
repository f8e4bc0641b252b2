# -*- test-case-name: tests.test_alertrules -*-
"""
The Prometheus alert rules an operator loads (C{etc/prometheus/
digipoort-msa-rules.yml}, issue 22 item 1), checked by the real C{promtool}
(Debian's C{prometheus} package): the file is valid, and its unit tests
(C{digipoort-msa-rules.test.yml}: input series under which each alert fires
and under which it does not) pass.  C{tests.test_dashboards} checks that
the rules name only metrics the daemon exports.
"""

import os
import subprocess

from twisted.trial import unittest

from tests.e2e import requireProgram

RULES_DIRECTORY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "prometheus"
)
RULES = os.path.join(RULES_DIRECTORY, "digipoort-msa-rules.yml")
RULE_TESTS = os.path.join(RULES_DIRECTORY, "digipoort-msa-rules.test.yml")

#: Every alert the issue asks for, by its name in the rules.
ALERTS = {
    "MSAInstanceDown",
    "MSACoreUnreachable",
    "MSAQueueDelayed",
    "MSAMessagesHeldForIntegrity",
    "MSASpoolUnremovable",
    "MSAFailedLoginStorm",
    "MSARedisUnavailable",
    "MSAPostgreSQLUnavailable",
    "MSAWorkerDown",
    "MSAAuditUnwritable",
    "MSAAuditRecordsLost",
    "MSACertificateExpiresSoon",
}


def promtool(testCase, *args: str) -> subprocess.CompletedProcess:
    program = requireProgram(testCase, "promtool")
    return subprocess.run(
        [program, *args],
        cwd=RULES_DIRECTORY,
        capture_output=True,
        text=True,
        timeout=120,
    )


class AlertRulesTests(unittest.TestCase):
    def test_checkRules(self):
        """
        C{promtool check rules}: the file parses and every expression is
        valid PromQL; it has one rule per alert.
        """
        done = promtool(self, "check", "rules", RULES)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn(f"SUCCESS: {len(ALERTS)} rules found", done.stdout)

    def test_ruleUnitTests(self):
        """
        C{promtool test rules}: each alert fires on its input series and
        stays quiet on the others.
        """
        done = promtool(self, "test", "rules", RULE_TESTS)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("SUCCESS", done.stdout)

    def test_everyAlertTestedBothWays(self):
        """
        The unit tests have, for every alert, a case where it fires and one
        where it does not.
        """
        with open(RULES) as f:
            names = {
                line.split(":", 1)[1].strip()
                for line in f
                if line.strip().startswith("- alert:")
            }
        self.assertEqual(names, ALERTS)
        with open(RULE_TESTS) as f:
            text = f.read()
        for name in ALERTS:
            blocks = text.split(f"alertname: {name}\n")[1:]
            firing = [b for b in blocks if b.lstrip().startswith("exp_alerts:\n")]
            quiet = [b for b in blocks if b.lstrip().startswith("exp_alerts: []")]
            self.assertTrue(firing and quiet, name)
