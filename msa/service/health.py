# -*- test-case-name: tests.test_health -*-
"""
C{/health}: one entry per engine the MSA depends on, in JSON, for a load
balancer (the HTTP status) and a person (the details) alike::

  {"status": "ok" | "degraded" | "unhealthy",
   "components": {"relay": {"status": "ok", "detail": "..."}, ...}}

Each component is C{ok}, C{degraded} (it works, but an operator should
know: 200) or C{failing} (this instance cannot do its job: 503, so that a
load balancer sends clients elsewhere):

  - C{relay}: failing when the core MTA has not answered within
    C{[metrics] health_window} while messages (not on hold) wait;
  - C{spool}: failing while the relay holds messages the core acknowledged
    but the spool could not remove; degraded while messages are held for
    integrity;
  - C{limits}: the shared limits (Redis): failing while Redis cannot be
    reached and C{fallback = "refuse"} (MAIL gets 451 4.3.0), degraded with
    C{fallback = "local"};
  - C{accounts}: degraded while the PostgreSQL account store cannot be
    reached: logins go on from the last good copy;
  - C{audit}: failing while audit records cannot be made durable (every
    message is refused with 451 4.3.0 until they can).

The same states are exported as C{msa_component_status}
(L{msa.metrics.ComponentCollector}) for the alert rules.
"""

import json
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from msa import metrics
from msa.audit import AuditLog
from msa.interfaces import ILiveAccountStore, IRelay
from msa.threadpool import runBlocking

__all__ = ["ComponentHealth", "Health", "HealthResource"]

OK, DEGRADED, FAILING = metrics.COMPONENT_STATES


@attrs.frozen
class ComponentHealth:
    """
    One component's state (L{OK}, L{DEGRADED} or L{FAILING}) and what a
    person needs to know about it.
    """

    status: str
    detail: str


@attrs.define
class Health:
    """
    The checks behind C{/health} and C{msa_component_status}.  L{check}
    reads the spool's files: call it in a thread.

    @ivar window: seconds within which the core must have answered while
        messages wait (C{[metrics] health_window}).
    @ivar limits: the shared limits (L{msa.policy.redislimits.RedisLimits}),
        or L{None} when each instance counts on its own.
    @ivar relay: the queue runner, or L{None} when there is none.
    @ivar accounts: the account store (a database's can be unreachable:
        L{ILiveAccountStore.outage}), or L{None}.
    @ivar audit: the audit log (L{msa.audit.AuditLog}), or L{None} when it
        is off.
    @ivar workers: the other workers this process started
        (L{msa.service.supervisor.Workers}), or L{None}.
    @ivar returnChannel: the return channel
        (L{msa.service.returnchannel.ReturnChannel}), whose
        C{healthProblem()} says why the core cannot deliver return messages
        over LMTP; L{None} in an embedder's own wiring.
    """

    spool: Any
    relay: IRelay | None
    window: float = 900.0
    limits: Any = None
    accounts: ILiveAccountStore | None = None
    audit: AuditLog | None = None
    returnChannel: Any = None
    workers: Any = None
    clock: Callable[[], float] = time.time

    def check(self) -> dict[str, ComponentHealth]:
        return {
            "relay": self.relayHealth(),
            "spool": self.spoolHealth(),
            "limits": self.limitsHealth(),
            "accounts": self.accountsHealth(),
            "audit": self.auditHealth(),
            "returnchannel": self.returnChannelHealth(),
            "workers": self.workersHealth(),
        }

    def workersHealth(self) -> ComponentHealth:
        if self.workers is None:
            return ComponentHealth(OK, "no other worker started by this process")
        missing = self.workers.missing()
        if missing:
            return ComponentHealth(
                DEGRADED,
                f"worker(s) {', '.join(map(str, missing))} of {self.workers.count} "
                "not running steadily (ended, and started again after a delay; "
                "the messages in their spools wait for them)",
            )
        return ComponentHealth(OK, f"{self.workers.count} workers running")

    def returnChannelHealth(self) -> ComponentHealth:
        if self.returnChannel is None:
            return ComponentHealth(OK, "no return channel")
        problem = self.returnChannel.healthProblem()
        if problem:
            return ComponentHealth(FAILING, problem)
        return ComponentHealth(OK, "LMTP listeners up, mailbox store writing")

    def relayHealth(self) -> ComponentHealth:
        last = metrics.lastCoreSuccess()
        # Held messages wait for an operator, not for the core.
        held = metrics.heldMessages(self.spool)
        queued = len(self.spool.pending()) - sum(len(ids) for ids in held.values())
        age = "never" if not last else f"{int(self.clock() - last)}s ago"
        if last and self.clock() - last <= self.window:
            return ComponentHealth(OK, f"core MTA last answered {age}")
        if queued == 0:
            return ComponentHealth(OK, "nothing waiting to be relayed")
        return ComponentHealth(
            FAILING,
            f"core MTA not reached recently (last success {age}); "
            f"{queued} message(s) queued",
        )

    def spoolHealth(self) -> ComponentHealth:
        # A copy: the reactor thread may change it meanwhile.
        unremovable = dict(self.relay.unremovable) if self.relay is not None else {}
        if unremovable:
            reasons = "; ".join(unremovable.values())
            return ComponentHealth(
                FAILING,
                f"spool cannot be changed: {len(unremovable)} message(s) "
                f"delivered but not removed: {reasons}",
            )
        held = metrics.heldMessages(self.spool)["integrity"]
        if held:
            return ComponentHealth(
                DEGRADED,
                f"{len(held)} message(s) held for integrity (their bytes are "
                f"not the ones acknowledged): {', '.join(held)}",
            )
        return ComponentHealth(OK, f"{len(self.spool.pending())} message(s) queued")

    def limitsHealth(self) -> ComponentHealth:
        if self.limits is None:
            return ComponentHealth(OK, "counted by this instance (backend = memory)")
        problem = self.limits.healthProblem()
        if problem is None:
            return ComponentHealth(OK, self.limits.describe())
        if self.limits.fallback == "local":
            return ComponentHealth(DEGRADED, problem)
        return ComponentHealth(FAILING, problem)

    def accountsHealth(self) -> ComponentHealth:
        if self.accounts is None:
            return ComponentHealth(OK, "0 account(s) from the accounts store")
        count = len(self.accounts.accounts())
        outage = self.accounts.outage
        if outage is not None:
            return ComponentHealth(
                DEGRADED,
                f"account database unreachable ({outage}); logins use the "
                f"last good copy ({count} account(s))",
            )
        return ComponentHealth(OK, f"{count} account(s) from {self.accounts.where}")

    def auditHealth(self) -> ComponentHealth:
        if self.audit is None:
            return ComponentHealth(OK, "audit log disabled")
        if self.audit.lastFailure is not None:
            return ComponentHealth(
                FAILING,
                f"audit records cannot be written ({self.audit.lastFailure}); "
                "messages are refused with 451 4.3.0",
            )
        return ComponentHealth(OK, f"writing {self.audit.path}")

    def states(self) -> dict[str, str]:
        """
        Each component's state, for L{msa.metrics.ComponentCollector}.
        """
        return {name: c.status for name, c in self.check().items()}


def healthReport(components: dict[str, ComponentHealth]) -> tuple[int, dict]:
    """
    The HTTP status and the JSON body for C{components}: 503 when one is
    failing.
    """
    states = {c.status for c in components.values()}
    if FAILING in states:
        code, overall = 503, "unhealthy"
    elif DEGRADED in states:
        code, overall = 200, "degraded"
    else:
        code, overall = 200, "ok"
    body = {
        "status": overall,
        "components": {name: attrs.asdict(c) for name, c in components.items()},
    }
    return code, body


class HealthResource(Resource):
    """
    C{/health}: L{Health.check} run in a thread (it reads the spool), its
    report as JSON.
    """

    isLeaf = True

    def __init__(self, health: Health, reactor=None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.health = health
        self.reactor = reactor

    def render_GET(self, request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = runBlocking(self.reactor, self.health.check)

        def answer(components: dict[str, ComponentHealth]) -> None:
            if gone:
                return
            code, body = healthReport(components)
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"application/json")
            request.write(json.dumps(body, indent=2).encode() + b"\n")
            request.finish()

        def failed(failure: Failure) -> None:
            if gone:
                return
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", b"application/json")
            body = {"status": "unhealthy", "error": failure.getErrorMessage()}
            request.write(json.dumps(body).encode() + b"\n")
            request.finish()

        d.addCallbacks(answer, failed)
        return NOT_DONE_YET


def healthSite(health: Health) -> Resource:
    """
    The metrics endpoint's resources: C{/metrics} (Prometheus) and
    C{/health}.
    """
    from prometheus_client.twisted import MetricsResource

    metrics.COMPONENTS.probe = health.states
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.REGISTRY))
    root.putChild(b"health", HealthResource(health))
    return root
