# -*- test-case-name: tests.test_observability -*-
"""
Prometheus metrics and the health check, in a registry of the MSA's own
(so that an embedding program's metrics and ours do not collide).  The
counters are always kept; they are served only when the operator turns on
C{[metrics] listen} (off by default; loopback when on), by
L{metricsResource} on a separate endpoint:

  - C{/metrics}: the Prometheus text format;
  - C{/health}: 200 when the core MTA accepted a message or answered a
    connection recently (or nothing was waiting to be relayed), else 503;
    always 503 while the relay holds messages the core acknowledged but the
    spool could not remove (L{msa.relay.runner.RelayRunner.unremovable}),
    while the shared limits store (Redis) cannot be reached, and while the
    return channel cannot take messages from the core (an LMTP listener
    not listening, the mailbox store failing).
"""

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource

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
QUEUE_DEPTH = Gauge("msa_queue_messages", "Messages in the queue", registry=REGISTRY)
QUEUE_OLDEST = Gauge(
    "msa_queue_oldest_seconds",
    "Age of the oldest message in the queue",
    registry=REGISTRY,
)
CORE_LAST_SUCCESS = Gauge(
    "msa_core_last_success_timestamp",
    "Unix time of the last delivery the core MTA accepted",
    registry=REGISTRY,
)

AUDIT_LOST = Gauge(
    "msa_audit_records_lost",
    "Audit records that could not be written since the start (each is "
    "accounted for by a lost record in the chain once the log can write)",
    registry=REGISTRY,
)
AUDIT_LOST_PENDING = Gauge(
    "msa_audit_records_lost_unrecorded",
    "Audit records that could not be written and whose lost record is not "
    "yet in the chain (the audit file system is still failing)",
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


def watchQueue(spool) -> None:
    """
    Let the queue gauges read the spool when they are scraped.
    """

    def depth() -> float:
        return float(len(spool.pending()))

    def oldest() -> float:
        pending = spool.pending()
        if not pending:
            return 0.0
        try:
            entry = spool.load(pending[0])
        except Exception:
            return 0.0
        return max(0.0, time.time() - entry.createdAt)

    QUEUE_DEPTH.set_function(depth)
    QUEUE_OLDEST.set_function(oldest)


def watchAudit(audit) -> None:
    """
    Let the audit gauges read the audit log (L{msa.audit.AuditLog}) when
    they are scraped.
    """
    AUDIT_LOST.set_function(lambda: float(audit.lostTotal))
    AUDIT_LOST_PENDING.set_function(lambda: float(audit.lostPending))


class HealthResource(Resource):
    """
    C{/health}: is the core MTA reachable?  Healthy when it accepted
    something within C{window} seconds, or when the queue is empty (nothing
    to tell from).
    """

    isLeaf = True

    def __init__(
        self,
        spool,
        window: float = 900.0,
        clock=time.time,
        relay=None,
        limits=None,
        returnChannel=None,
    ) -> None:
        super().__init__()
        self.spool = spool
        self.window = window
        self.clock = clock
        self.relay = relay
        #: The shared limits (L{msa.policy.redislimits.RedisLimits}), or
        #: L{None}: its C{healthProblem()} says why it is unhealthy.
        self.limits = limits
        #: The return channel (L{msa.service.returnchannel.ReturnChannel}),
        #: or L{None}: its C{healthProblem()} says why LMTP delivery fails.
        self.returnChannel = returnChannel

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        unremovable = getattr(self.relay, "unremovable", None)
        if unremovable:
            request.setResponseCode(503)
            reasons = "".join(f"{reason}\n" for reason in unremovable.values())
            return (
                f"spool cannot be changed: {len(unremovable)} message(s) "
                f"delivered but not removed\n{reasons}"
            ).encode()
        problem = self.limits.healthProblem() if self.limits is not None else None
        if problem is None and self.returnChannel is not None:
            problem = self.returnChannel.healthProblem()
        if problem:
            request.setResponseCode(503)
            return f"{problem}\n".encode()
        last = lastCoreSuccess()
        queued = len(self.spool.pending())
        recent = last and self.clock() - last <= self.window
        if recent or queued == 0:
            return b"ok\n"
        request.setResponseCode(503)
        age = "never" if not last else f"{int(self.clock() - last)}s ago"
        return (
            f"core MTA not reached recently (last success {age}); "
            f"{queued} message(s) queued\n"
        ).encode()


def metricsResource(
    spool, healthWindow: float = 900.0, relay=None, limits=None, returnChannel=None
) -> Resource:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=REGISTRY))
    health = HealthResource(
        spool, healthWindow, relay=relay, limits=limits, returnChannel=returnChannel
    )
    root.putChild(b"health", health)
    return root


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
