# -*- test-case-name: tests.test_workerlimits,tests.test_workers -*-
"""
A worker's limits with C{[server] workers} > 1 and C{[limits] backend =
"memory"}: asked of worker 0, which keeps them for every worker
(L{msa.policy.keptlimits} has the exchange).  Each question waits at most
C{[limits] timeout}; worker 0 gone or silent fails it with
L{LimitsUnavailable}: MAIL gets C{451 4.3.0} and AUTH C{454 4.7.0}, as when
Redis is unreachable.
"""

from __future__ import annotations

import itertools
import json
import socket
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from msa._compat import writeEagerly
from msa.errors import LimitsUnavailable, SMTPReply
from msa.interfaces import (
    IAuthThrottle,
    IRateLimiter,
    IRateReservation,
    ISessionLimiter,
)
from msa.policy.keptlimits import MAX_LINE
from msa.policy.rates import UnlimitedReservation, horizon
from msa.policy.redislimiters import RATES_UNAVAILABLE


class WorkerLimits(service.Service):
    """
    A worker's limits, asked of worker 0 over the descriptor C{fd}: the
    three limiters (L{rates}, L{throttle}, L{sessions}) that
    L{msa.service.tap.buildService} wires in place of its own, as it does
    Redis's.
    """

    fallback = "refuse"

    def __init__(
        self, fd: int, reactor: Any, throttle: IAuthThrottle, timeout: float = 1.0
    ) -> None:
        """
        @param throttle: this worker's own (its delays, which worker 0's
            are too: the same configuration).
        @param timeout: seconds an answer may take (C{[limits] timeout}):
            a busy or stopped worker 0 then fails the question with
            L{LimitsUnavailable}, as an unreachable Redis does, instead of
            holding the session.
        """
        self.fd = fd
        self.reactor = reactor
        self.timeout = timeout
        self.protocol: _AskingProtocol | None = None
        self.gone = False
        self.rates = _RemoteRates(self)
        self.throttle = _RemoteThrottle(self, throttle.base, throttle.maximum)
        self.sessions = _RemoteSessions(self)

    def startService(self) -> None:
        super().startService()
        end = socket.socket(fileno=self.fd)
        self.reactor.adoptStreamConnection(
            end.fileno(), socket.AF_UNIX, _AskingFactory(self)
        )
        end.close()

    def describe(self) -> str:
        return "kept by worker 0"

    def healthProblem(self) -> str | None:
        if self.gone:
            return "limits: worker 0, which keeps them, has gone"
        return None

    def ask(self, request: dict) -> defer.Deferred:
        """
        Send C{request}, numbered: a L{Deferred} of the answer, failing
        with L{LimitsUnavailable} when worker 0 cannot answer.
        """
        if self.protocol is None:
            return defer.fail(LimitsUnavailable("worker 0 keeps the limits: gone"))
        return self.protocol.ask(request)

    def tell(self, request: dict) -> None:
        if self.protocol is not None:
            self.protocol.tell(request)


class _AskingProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, limits: WorkerLimits) -> None:
        self.limits = limits
        #: id -> (the answer's Deferred, its timer).
        self.waiting: dict[int, tuple[defer.Deferred, Any]] = {}
        #: id -> the request given up on (L{_late}).
        self.abandoned: dict[int, dict] = {}
        self._ids = itertools.count(1)

    def connectionMade(self) -> None:
        self.limits.protocol = self
        writeEagerly(self.transport)

    def sendLine(self, line: bytes) -> None:
        # One write, sent at once (writeEagerly): LineOnlyReceiver's
        # writeSequence of the line and its delimiter is two, which
        # writeEagerly leaves to the next turn of the reactor.
        assert self.transport is not None
        self.transport.write(line + self.delimiter)

    def ask(self, request: dict) -> defer.Deferred:
        number = next(self._ids)
        d: defer.Deferred = defer.Deferred()
        timer = self.limits.reactor.callLater(
            self.limits.timeout, self._timedOut, number, request
        )
        self.waiting[number] = (d, timer)
        self.tell({**request, "id": number})
        return d

    def _timedOut(self, number: int, request: dict) -> None:
        d, _ = self.waiting.pop(number)
        self.abandoned[number] = request
        d.errback(
            LimitsUnavailable(
                f"worker 0, which keeps the limits, did not answer within "
                f"{self.limits.timeout:g}s"
            )
        )

    def tell(self, request: dict) -> None:
        self.sendLine(json.dumps(request).encode())

    def lineReceived(self, line: bytes) -> None:
        answer = json.loads(line)
        number = answer.pop("id")
        waiting = self.waiting.pop(number, None)
        if waiting is not None:
            d, timer = waiting
            timer.cancel()
            d.callback(answer)
            return
        request = self.abandoned.pop(number, None)
        if request is not None:
            self._late(request, answer)

    def _late(self, request: dict, answer: dict) -> None:
        """
        Undo what worker 0 granted after the question was given up on: the
        session was told no already.
        """
        if "hold" in answer:
            self.tell({"op": "release", "hold": answer["hold"]})
        elif answer.get("admit"):
            self.tell(
                {
                    "op": "leave",
                    "account": request["account"],
                    "session": request["session"],
                }
            )

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.limits.protocol = None
        self.limits.gone = True
        waiting, self.waiting = self.waiting, {}
        self.abandoned.clear()
        for d, timer in waiting.values():
            timer.cancel()
            d.errback(LimitsUnavailable("worker 0, which keeps the limits, has gone"))


class _AskingFactory(protocol.Factory):
    def __init__(self, limits: WorkerLimits) -> None:
        self.limits = limits

    def buildProtocol(self, addr: object) -> _AskingProtocol:
        return _AskingProtocol(self.limits)


@implementer(IRateReservation)
class _RemoteReservation:
    def __init__(self, limits: WorkerLimits, account: str, hold: int) -> None:
        self.limits = limits
        self.account = account
        self.hold: int | None = hold

    def _settle(self, op: str) -> None:
        if self.hold is not None:
            self.limits.tell({"op": op, "hold": self.hold})
            self.hold = None

    def commit(self) -> None:
        self._settle("commit")

    def release(self) -> None:
        self._settle("release")


@implementer(IRateLimiter)
class _RemoteRates:
    def __init__(self, limits: WorkerLimits) -> None:
        self.limits = limits

    def reserve(self, account: str, rules: Any) -> defer.Deferred:
        if not horizon(rules):
            # No rates, nothing to count: worker 0 is not asked (nor is Redis).
            return defer.succeed(UnlimitedReservation(account))
        request = {
            "op": "reserve",
            "account": account,
            "perMinute": rules.messagesPerMinute,
            "perDay": rules.messagesPerDay,
        }

        def answered(answer: dict) -> _RemoteReservation:
            if "refused" in answer:
                raise SMTPReply(*answer["refused"])
            return _RemoteReservation(self.limits, account, answer["hold"])

        def unavailable(failure: Failure) -> None:
            failure.trap(LimitsUnavailable)
            raise RATES_UNAVAILABLE

        return self.limits.ask(request).addCallbacks(answered, unavailable)

    def record(self, account: str) -> None:
        self.limits.tell({"op": "record", "account": account})


@implementer(IAuthThrottle)
class _RemoteThrottle:
    def __init__(self, limits: WorkerLimits, base: float, maximum: float) -> None:
        self.limits = limits
        self.base = base
        self.maximum = maximum

    def failedLogin(self, clientAddress: str, account: str) -> defer.Deferred:
        request = {"op": "failed", "client": clientAddress, "account": account}
        return self.limits.ask(request).addCallback(lambda a: float(a["delay"]))

    def succeededLogin(self, clientAddress: str, account: str) -> None:
        # Told, not asked: a round trip less per login.  Worker 0 gone means
        # this worker stops too; the pair's order keeps it before the next
        # question.
        self.limits.tell(
            {"op": "succeeded", "client": clientAddress, "account": account}
        )


@implementer(ISessionLimiter)
class _RemoteSessions:
    #: Never a local fallback: worker 0 gone means this worker stops too.
    local = None

    def __init__(self, limits: WorkerLimits) -> None:
        self.limits = limits

    def acquire(self, account: str, maximum: int, sessionId: str) -> defer.Deferred:
        request = {
            "op": "acquire",
            "account": account,
            "maximum": maximum,
            "session": sessionId,
        }
        return self.limits.ask(request).addCallback(lambda a: bool(a["admit"]))

    def release(self, account: str, sessionId: str) -> None:
        self.limits.tell({"op": "leave", "account": account, "session": sessionId})
