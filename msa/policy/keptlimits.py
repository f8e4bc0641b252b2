# -*- test-case-name: tests.test_workerlimits,tests.test_workers -*-
"""
The limits of C{[server] workers} > 1 with C{[limits] backend = "memory"}:
kept by worker 0 (this module), asked for by the other workers
(L{msa.policy.workerlimits}).

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
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from msa._compat import writeEagerly
from msa.errors import SMTPReply
from msa.interfaces import IAuthThrottle, IRateLimiter, IRateReservation

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
    """

    def __init__(
        self, rates: IRateLimiter, throttle: IAuthThrottle, registry: SessionCounts
    ) -> None:
        self.rates = rates
        self.throttle = throttle
        self.registry = registry
        #: The workers' channels (each knows its worker's sessions).
        self.channels: set[_KeeperProtocol] = set()

    def sessionsOf(self, account: str) -> int:
        """
        The sessions of C{account} in every worker (worker 0's own and those
        the others acquired), so that worker 0's session limiter
        (L{msa.submission.sessions.MemorySessionLimiter} over this) and the
        other workers' questions count them all.
        """
        return self.registry.sessionsOf(account) + sum(
            len(channel.sessions.get(account, ())) for channel in self.channels
        )

    def channel(self, worker: int, end: socket.socket, reactor: Any) -> None:
        """
        Serve worker C{worker} on C{end} (worker 0's end of its pair; closed
        here, the reactor keeps its own).
        """
        reactor.adoptStreamConnection(
            end.fileno(), socket.AF_UNIX, _KeeperFactory(self, worker)
        )
        end.close()


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
        #: account -> the ids of its sessions in this worker.
        self.sessions: dict[str, set[str]] = {}
        self._holdIds = itertools.count(1)

    def connectionMade(self) -> None:
        self.keeper.channels.add(self)
        writeEagerly(self.transport)

    def sendLine(self, line: bytes) -> None:
        # One write, sent at once (writeEagerly): LineOnlyReceiver's
        # writeSequence of the line and its delimiter is two, which
        # writeEagerly leaves to the next turn of the reactor.
        assert self.transport is not None
        self.transport.write(line + self.delimiter)

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
        if op == "commit" or op == "release":
            reservation = self.holds.pop(request["hold"], None)
            if reservation is None:
                pass
            elif op == "commit":
                reservation.commit()
            else:
                reservation.release()
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
                self.sessions.setdefault(account, set()).add(request["session"])
            return {"admit": admit}
        if op == "leave":
            live = self.sessions.get(request["account"], set())
            live.discard(request["session"])
            if not live:
                self.sessions.pop(request["account"], None)
            return None
        raise ValueError(f"unknown op {op!r}")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The worker has gone: what it held is free again.
        self.keeper.channels.discard(self)
        holds, self.holds = self.holds, {}
        for reservation in holds.values():
            reservation.release()


class _KeeperFactory(protocol.Factory):
    def __init__(self, keeper: LimitsKeeper, worker: int) -> None:
        self.keeper = keeper
        self.worker = worker

    def buildProtocol(self, addr: object) -> _KeeperProtocol:
        return _KeeperProtocol(self.keeper, self.worker)
