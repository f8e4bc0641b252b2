# -*- test-case-name: tests.test_workerlimits,tests.test_workers -*-
"""
The limits of C{[server] workers} > 1 with C{[limits] backend = "memory"}:
kept by worker 0, asked for by the other workers.

Each worker counting on its own would let an account send N times its
limit, hold N times its sessions, and give a password guesser N times the
attempts.  With Redis (C{backend = "redis"}) every process counts in Redis
(L{msa.policy.redislimits}); without it, worker 0's memory limiters
(L{msa.policy.rates.RateLimiter}, L{msa.policy.limits.AuthThrottle}, its
session count) count for every worker, and each other worker asks them over
a socket pair worker 0 gives it at its start (C{--limits FD}): one JSON
object per line each way, the requests that need an answer numbered.

    {"id": 1, "op": "reserve", "account": A, "perMinute": N, "perDay": N}
        -> {"id": 1, "hold": H} or {"id": 1, "refused": [451, "4.7.1", TEXT]}
    {"op": "commit", "hold": H}    {"op": "release", "hold": H}
    {"op": "record", "account": A}
    {"id": 2, "op": "failed", "client": C, "account": A} -> {"id": 2, "delay": D}
    {"op": "succeeded", "client": C, "account": A}
    {"id": 4, "op": "acquire", "account": A, "maximum": N, "session": S}
        -> {"id": 4, "admit": true}
    {"op": "leave", "account": A, "session": S}

Worker 0 keeps what each worker holds (its slots reserved and not yet
settled, its sessions): when the worker's end of the pair closes (it ended,
even killed), its slots are released and its sessions no longer count.
When worker 0's end closes (it has gone, and the worker stops too), a
question still open, and any asked since, fails with L{LimitsUnavailable}:
MAIL gets C{451 4.3.0} and AUTH C{454 4.7.0}, as when Redis is unreachable.
"""

from __future__ import annotations

import itertools
import json
import socket
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger
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
from msa.policy.redislimiters import RATES_UNAVAILABLE

log = Logger()

#: The longest line either side sends (an account name is at most a few
#: hundred bytes).
MAX_LINE = 64 * 1024


class SessionCounts(Protocol):
    """
    Worker 0's sessions (L{msa.submission.sessions.SessionRegistry}).
    """

    def sessionsOf(self, account: str) -> int: ...


@attrs.frozen
class _Rules:
    """
    The part of an account's rules that the rate limiter reads.
    """

    messagesPerMinute: int | None
    messagesPerDay: int | None


class LimitsKeeper:
    """
    Worker 0's limits, for its own sessions and for every worker's.

    @ivar sessions: the session limiter of worker 0's own sessions: its
        registry's sessions of the account plus the other workers'.
    """

    def __init__(
        self, rates: IRateLimiter, throttle: IAuthThrottle, registry: SessionCounts
    ) -> None:
        self.rates = rates
        self.throttle = throttle
        self.registry = registry
        #: account -> the (worker, session id) of the other workers' sessions.
        self.remote: dict[str, set[tuple[int, str]]] = {}
        self.sessions = _KeptSessions(self)

    def sessionsOf(self, account: str) -> int:
        return self.registry.sessionsOf(account) + len(self.remote.get(account, ()))

    def channel(self, worker: int, end: socket.socket, reactor: Any) -> None:
        """
        Serve worker C{worker} on C{end} (worker 0's end of its pair; closed
        here, the reactor keeps its own).
        """
        reactor.adoptStreamConnection(
            end.fileno(), socket.AF_UNIX, _KeeperFactory(self, worker)
        )
        end.close()


@implementer(ISessionLimiter)
class _KeptSessions:
    def __init__(self, keeper: LimitsKeeper) -> None:
        self.keeper = keeper

    def acquire(self, account: str, maximum: int, sessionId: str) -> bool:
        return self.keeper.sessionsOf(account) < maximum

    def release(self, account: str, sessionId: str) -> None:
        pass


class _KeeperProtocol(LineOnlyReceiver):
    """
    Worker 0's end of one worker's channel.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, keeper: LimitsKeeper, worker: int) -> None:
        self.keeper = keeper
        self.worker = worker
        self.holds: dict[int, IRateReservation] = {}
        self.sessions: set[tuple[str, str]] = set()
        self._holdIds = itertools.count(1)

    def connectionMade(self) -> None:
        writeEagerly(self.transport)

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            answer = self.answer(request)
        except (ValueError, KeyError, TypeError) as e:
            log.error(
                "worker {worker}'s limits request not understood: {e}",
                worker=self.worker,
                e=e,
            )
            if self.transport is not None:
                self.transport.loseConnection()
            return
        if answer is not None:
            answer["id"] = request["id"]
            self.sendLine(json.dumps(answer).encode())

    def answer(self, request: dict) -> dict | None:
        op = request["op"]
        keeper = self.keeper
        if op == "reserve":
            rules = _Rules(request["perMinute"], request["perDay"])
            try:
                reservation = keeper.rates.reserve(request["account"], rules)
            except SMTPReply as e:
                return {"refused": [e.code, e.status, e.text]}
            hold = next(self._holdIds)
            self.holds[hold] = reservation
            return {"hold": hold}
        if op in ("commit", "release"):
            reservation = self.holds.pop(request["hold"], None)
            if reservation is not None:
                getattr(reservation, op)()
            return None
        if op == "record":
            keeper.rates.record(request["account"])
            return None
        if op == "failed":
            delay = keeper.throttle.failedLogin(request["client"], request["account"])
            return {"delay": delay}
        if op == "succeeded":
            keeper.throttle.succeededLogin(request["client"], request["account"])
            return None
        if op == "acquire":
            account = request["account"]
            admit = keeper.sessionsOf(account) < request["maximum"]
            if admit:
                keeper.remote.setdefault(account, set()).add(
                    (self.worker, request["session"])
                )
                self.sessions.add((account, request["session"]))
            return {"admit": admit}
        if op == "leave":
            self._leave(request["account"], request["session"])
            return None
        raise ValueError(f"unknown op {op!r}")

    def _leave(self, account: str, sessionId: str) -> None:
        self.sessions.discard((account, sessionId))
        live = self.keeper.remote.get(account)
        if live is not None:
            live.discard((self.worker, sessionId))
            if not live:
                del self.keeper.remote[account]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The worker has gone: what it held is free again.
        holds, self.holds = self.holds, {}
        for reservation in holds.values():
            reservation.release()
        for account, sessionId in list(self.sessions):
            self._leave(account, sessionId)


class _KeeperFactory(protocol.Factory):
    def __init__(self, keeper: LimitsKeeper, worker: int) -> None:
        self.keeper = keeper
        self.worker = worker

    def buildProtocol(self, addr: object) -> _KeeperProtocol:
        return _KeeperProtocol(self.keeper, self.worker)


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
