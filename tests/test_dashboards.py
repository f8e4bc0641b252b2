# -*- test-case-name: tests.test_dashboards -*-
"""
The Grafana dashboard (C{etc/grafana/digipoort-msa.json}, issue 22 item 2)
and the alert rules (C{etc/prometheus/digipoort-msa-rules.yml}) name only
metrics and labels that the running daemon exports: the daemon is started
from TOML, takes a real submission over STARTTLS (relayed to aiosmtpd) and
a failed login, and its C{/metrics} is read over HTTP and compared with
every query.
"""

import json
import os
import re

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import AiosmtpdCore, RunningMSA, freePort
from tests.test_alertrules import RULES
from tests.test_e2e import submit
from tests.test_health import get

DASHBOARD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "etc",
    "grafana",
    "digipoort-msa.json",
)

#: The panels the issue asks for, by title.
PANELS = {
    "Accepted, refused and relayed per second",
    "Queue depth",
    "Age of the oldest queued message",
    "Relay latency",
    "Logins by mechanism and result",
    "TLS versions",
    "Accepted per second, per instance",
}

#: PromQL's words that are not metric names.
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "histogram_quantile",
    "time",
    "and",
    "or",
    "unless",
    "label_values",
}
GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
)
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
#: The labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def exported(text: str) -> dict[str, set[str]]:
    """
    The sample names of a C{/metrics} page, each with its label names.
    """
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    # Prometheus's own, per target.
    names["up"] = set()
    return names


def problems(expr: str, legend: str, names: dict[str, set[str]]) -> list[str]:
    """
    What in one query names a metric or label the daemon does not export.
    """
    found = []
    used: dict[str, set[str]] = {}
    for metric, body in SELECTOR.findall(expr):
        labels = set(MATCHER.findall(body))
        if metric:
            used.setdefault(metric, set()).update(labels)
    bare = GROUPING.sub(" ", SELECTOR.sub(lambda m: f" {m.group(1)} ", expr))
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    for word in re.findall(r"\b[A-Za-z_:][\w:]*\b", bare):
        if word not in PROMQL_WORDS:
            used.setdefault(word, set())
    known: set[str] = set(TARGET_LABELS)
    for metric, labels in used.items():
        if metric not in names:
            found.append(f"{expr!r}: metric {metric} is not exported")
            continue
        known |= names[metric]
        for label in labels - names[metric] - TARGET_LABELS:
            found.append(f"{expr!r}: {metric} has no label {label}")
    grouped = {
        label.strip() for group in GROUPING.findall(expr) for label in group.split(",")
    } - {""}
    for label in grouped - known:
        found.append(f"{expr!r}: groups by {label}, which no metric in it has")
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        if label not in (grouped or known):
            found.append(f"{expr!r}: legend names {label}, which the query lacks")
    return found


def dashboardQueries() -> list[tuple[str, str, str]]:
    """
    (panel title, expression, legend) of every query of the dashboard.
    """
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def ruleExpressions() -> list[str]:
    """
    The C{expr} of every rule (one line, or a folded C{>-} block).
    """
    with open(RULES) as f:
        lines = f.read().splitlines()
    expressions = []
    for i, line in enumerate(lines):
        key, _, value = line.strip().partition(":")
        if key != "expr":
            continue
        value = value.strip()
        if value == ">-":
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
            block = []
            for following in lines[i + 1 :]:
                if len(following) - len(following.lstrip()) < indent:
                    break
                block.append(following.strip())
            value = " ".join(block)
        expressions.append(value)
    return expressions


class DashboardTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        core = AiosmtpdCore(self)
        port = freePort()
        msa = RunningMSA(
            self,
            relay=core.relayConfig(),
            server={"auth_delay_base": 0},
            metrics={"listen": f"tcp:{port}:interface=127.0.0.1"},
        )
        code, _ = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250)
        yield self.assertFailure(
            threads.deferToThread(
                submit,
                port=msa.starttlsPort,
                context=msa.clientContext(),
                password="wrong",
            ),
            Exception,
        )
        yield core.waitForMessages(1)

        status, text = yield threads.deferToThread(get, port, "/metrics")
        self.assertEqual(status, 200)
        self.names = exported(text)

    def test_dashboardNamesWhatTheDaemonExports(self):
        queries = dashboardQueries()
        self.assertTrue(PANELS <= {title for title, _, _ in queries})
        found = []
        for _, expr, legend in queries:
            found.extend(problems(expr.replace("$instance", ".*"), legend, self.names))
        self.assertEqual(found, [])

    def test_rulesNameWhatTheDaemonExports(self):
        expressions = ruleExpressions()
        self.assertEqual(len(expressions), 12)
        found = []
        for expr in expressions:
            found.extend(problems(expr, "", self.names))
        self.assertEqual(found, [])

    def test_aMisspeltNameIsFound(self):
        """
        The check itself: a metric or label the daemon lacks is named.
        """
        self.assertEqual(
            problems(
                'sum by (mech) (rate(msa_auth_total{result="x"}[5m]))', "", self.names
            ),
            [
                "'sum by (mech) (rate(msa_auth_total{result=\"x\"}[5m]))': "
                "msa_auth_total has no label result",
                "'sum by (mech) (rate(msa_auth_total{result=\"x\"}[5m]))': "
                "groups by mech, which no metric in it has",
            ],
        )
        self.assertEqual(
            problems("msa_queue_depth > 0", "", self.names),
            ["'msa_queue_depth > 0': metric msa_queue_depth is not exported"],
        )
