# -*- test-case-name: tests.test_observability -*-
"""
Prometheus metrics and the health check, in a registry of the MSA's own
(so that an embedding program's metrics and ours do not collide).  The
counters are always kept; they are served only when the operator turns on
C{[metrics] listen} (off by default; loopback when on), by
L{metricsResource} on a separate endpoint:

  - C{/metrics}: the Prometheus text format;
  - C{/health}: one entry per engine the MSA depends on, in JSON
    (L{msa.service.health}).

The rules in C{etc/prometheus/digipoort-msa-rules.yml} and the dashboard in
C{etc/grafana/digipoort-msa.json} use these names; C{tests.test_dashboards}
checks that every name they use is one the daemon serves.
"""

import time
from collections.abc import Callable, Iterator
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Counter(
    "msa_connections", "Client connections accepted", ["listener"], registry=REGISTRY
)
CONNECTIONS_REFUSED = Counter(
    "msa_connections_refused",
    "Client connections refused at the greeting (limits, shutdown)",
    registry=REGISTRY,
)
TLS_HANDSHAKES = Counter(
    "msa_tls_handshakes", "TLS sessions established", ["version"], registry=REGISTRY
)
AUTH_RESULTS = Counter(
    "msa_auth", "AUTH attempts", ["mechanism", "outcome"], registry=REGISTRY
)
MESSAGES = Counter(
    "msa_messages",
    "Messages after the final dot, by reply code",
    ["code"],
    registry=REGISTRY,
)
BYTES_ACCEPTED = Counter(
    "msa_accepted_bytes", "Octets of accepted messages", registry=REGISTRY
)
SESSION_SECONDS = Histogram(
    "msa_session_seconds",
    "Duration of client sessions",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
RELAY_ATTEMPTS = Counter(
    "msa_relay_attempts",
    "Deliveries attempted to the core MTA, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
RELAY_SECONDS = Histogram(
    "msa_relay_seconds",
    "Duration of one delivery attempt to the core MTA",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
QUEUE_DELAY_WARNING = Gauge(
    "msa_queue_delay_warning_seconds",
    "Age at which a queued message counts as delayed ([relay] "
    "delay_warning_after, else 4 hours)",
    registry=REGISTRY,
)
CERTIFICATE_EXPIRY = Gauge(
    "msa_tls_certificate_expiry_timestamp",
    "Unix time at which the served certificate expires (its notAfter)",
    ["certificate"],
    registry=REGISTRY,
)
CORE_LAST_SUCCESS = Gauge(
    "msa_core_last_success_timestamp",
    "Unix time of the last delivery the core MTA accepted",
    registry=REGISTRY,
)


def relayOutcome(outcome: str, seconds: float) -> None:
    """
    Record one delivery attempt: C{delivered}, C{partial}, C{deferred}
    (temporary failure) or C{failed} (permanent).
    """
    RELAY_ATTEMPTS.labels(outcome).inc()
    RELAY_SECONDS.observe(seconds)
    if outcome in ("delivered", "partial", "failed"):
        # The core answered: it is reachable.
        CORE_LAST_SUCCESS.set(time.time())


def lastCoreSuccess() -> float:
    """
    The Unix time of the core's last answer (0 when none yet), read through
    the gauge's public collector interface.
    """
    for metric in CORE_LAST_SUCCESS.collect():
        for sample in metric.samples:
            return sample.value
    return 0.0


#: Seconds a count of the held messages is reused (L{heldMessages}).
HELD_TTL = 5.0
_heldCache: dict[object, tuple[float, dict[str, list[str]]]] = {}


def heldMessages(spool, clock: Callable[[], float] = time.monotonic) -> dict:
    """
    The queue ids on hold, by why: C{"integrity"} (the MSA held it: its
    bytes are not the ones acknowledged, L{msa.queue.integrity}) or
    C{"operator"} (C{queue hold}).  Reads every queued entry: call it in a
    thread (the scrape and C{/health} do); a count younger than
    L{HELD_TTL} seconds is reused, so that scrapes and health checks of a
    large queue (a long core outage) do not read it again and again.
    """
    now = clock()
    key = spool.queueDirectory or id(spool)
    cached = _heldCache.get(key)
    if cached is not None and now - cached[0] < HELD_TTL:
        return cached[1]
    held = _readHeld(spool)
    _heldCache.clear()
    _heldCache[key] = (now, held)
    return held


def _readHeld(spool) -> dict[str, list[str]]:
    held: dict[str, list[str]] = {"integrity": [], "operator": []}
    for queueId in spool.pending():
        try:
            entry = spool.load(queueId)
        except Exception:
            continue
        if entry.held or entry.heldReason:
            held["integrity" if entry.heldReason else "operator"].append(queueId)
    return held


class QueueCollector(Collector):
    """
    The queue's gauges, read from the spool at each scrape (in the web
    server's thread pool: the scrape may read the spool's files):
    C{msa_queue_messages}, C{msa_queue_oldest_seconds} and
    C{msa_queue_held_messages} by reason.
    """

    def __init__(self) -> None:
        self.spool = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spool = self.spool
        depth = GaugeMetricFamily("msa_queue_messages", "Messages in the queue")
        oldest = GaugeMetricFamily(
            "msa_queue_oldest_seconds", "Age of the oldest message in the queue"
        )
        held = GaugeMetricFamily(
            "msa_queue_held_messages",
            "Messages on hold, by why: integrity (the MSA held it) or operator",
            labels=["reason"],
        )
        if spool is not None:
            pending = spool.pending()
            depth.add_metric([], len(pending))
            age = 0.0
            if pending:
                try:
                    age = max(0.0, time.time() - spool.load(pending[0]).createdAt)
                except Exception:
                    pass
            oldest.add_metric([], age)
            for reason, ids in heldMessages(spool).items():
                held.add_metric([reason], len(ids))
        yield depth
        yield oldest
        yield held


_QUEUE = QueueCollector()
REGISTRY.register(_QUEUE)


def watchQueue(spool, delayWarningAfter: float | None = None) -> None:
    """
    Let the queue gauges read C{spool} when they are scraped.

    @param delayWarningAfter: C{[relay] delay_warning_after}; when unset,
        4 hours (Postfix's C{delay_warning_time}) is what the alert calls
        delayed.
    """
    _QUEUE.spool = spool
    QUEUE_DELAY_WARNING.set(delayWarningAfter or 4 * 3600.0)


def watchCertificate(path: str) -> None:
    """
    Export the expiry (notAfter) of the certificate in C{path}, the first
    in the file: the one the listeners serve.
    """
    with open(path, "rb") as f:
        certificate = x509.load_pem_x509_certificate(f.read())
    CERTIFICATE_EXPIRY.labels(path).set(certificate.not_valid_after_utc.timestamp())


class AuditCollector(Collector):
    """
    The audit log's account of the records it could not write
    (L{msa.audit.lost}), read at each scrape:
    C{msa_audit_records_lost_total}, every fact whose record could not be
    written since the start (each is accounted for by a C{lost} record in
    the chain once the log can write again), and
    C{msa_audit_records_lost_unrecorded}, those whose C{lost} record is
    not yet in the chain (the audit file system is still failing); and
    C{msa_audit_write_failures_total}, every record that could not be made
    durable.
    """

    def __init__(self) -> None:
        self.audit = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lost = CounterMetricFamily(
            "msa_audit_records_lost",
            "Facts (a delivery, a bounce, an operator's command) whose audit "
            "record could not be written",
        )
        pending = GaugeMetricFamily(
            "msa_audit_records_lost_unrecorded",
            "Audit records lost whose lost record is not yet in the chain",
        )
        failures = CounterMetricFamily(
            "msa_audit_write_failures",
            "Audit records that could not be made durable (a message whose "
            "acceptance record failed was refused with 451)",
        )
        if self.audit is not None:
            lost.add_metric([], float(self.audit.lostTotal))
            pending.add_metric([], float(self.audit.lostPending))
            failures.add_metric([], float(self.audit.writeFailures))
        yield lost
        yield pending
        yield failures


_AUDIT = AuditCollector()
REGISTRY.register(_AUDIT)


def watchAudit(audit) -> None:
    """
    Let the audit metrics read the audit log (L{msa.audit.AuditLog}) when
    they are scraped.
    """
    _AUDIT.audit = audit


#: The states of a component (L{msa.service.health}), best first.
COMPONENT_STATES = ("ok", "degraded", "failing")


class ComponentCollector(Collector):
    """
    C{msa_component_status{component=..., status=...}}: for each component
    (L{msa.service.health}) one series per state of L{COMPONENT_STATES},
    1 for its state now and 0 for the others (a Prometheus state set); what
    the alerts on Redis, PostgreSQL, the relay and the audit log read.
    """

    def __init__(self) -> None:
        self.probe: Callable[[], dict[str, str]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "msa_component_status",
            "State of each engine the MSA depends on (1 for the current one)",
            labels=["component", "status"],
        )
        if self.probe is not None:
            for name, state in sorted(self.probe().items()):
                for candidate in COMPONENT_STATES:
                    family.add_metric([name, candidate], float(candidate == state))
        yield family


COMPONENTS = ComponentCollector()
REGISTRY.register(COMPONENTS)


# -- the return channel (R16): LMTP deliveries into the mailboxes -----------

MAILBOX_DELIVERIES = Counter(
    "msa_mailbox_deliveries",
    "Return messages stored in a mailbox over LMTP (one per mailbox), by reply code",
    ["code"],
    registry=REGISTRY,
)


class MailboxCollector:
    """
    C{msa_mailbox_messages{account}} and
    C{msa_mailbox_oldest_seconds{account}}: the messages waiting in each
    account's mailbox and the age of the oldest, read from the store when
    scraped (as the queue gauges read the spool).

    A label per account: fine for a gateway, whose accounts are the
    companies it serves (hundreds, a few thousand), not an unbounded set;
    a mailbox appears once it has received something.
    """

    def __init__(self) -> None:
        #: The store (L{msa.mailbox.MaildirStore}), once the service set it.
        self.store: Any = None
        self.clock = time.time

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        waiting = GaugeMetricFamily(
            "msa_mailbox_messages",
            "Return messages waiting in an account's mailbox",
            labels=["account"],
        )
        oldest = GaugeMetricFamily(
            "msa_mailbox_oldest_seconds",
            "Age of the oldest return message waiting in an account's mailbox",
            labels=["account"],
        )
        store = self.store
        summary: list = []
        if store is not None:
            try:
                summary = store.mailboxSummary()
            except OSError:
                # No gauges while the store cannot be read (a database
                # outage): /metrics still answers with the rest.
                summary = []
        if summary:
            now = self.clock()
            for account, entries in summary:
                waiting.add_metric([account], float(len(entries)))
                ages = [now - e.deliveredAt for e in entries]
                oldest.add_metric([account], max(0.0, max(ages, default=0.0)))
        yield waiting
        yield oldest


MAILBOXES = MailboxCollector()
REGISTRY.register(MAILBOXES)
