# -*- test-case-name: tests.test_sessions -*-
"""
The sessions in progress, and how they end when the MSA stops (SIGTERM):
idle sessions are told 421 at once, a session in the middle of a message may
finish it, and whatever is still open when the grace period ends is told 421
and closed.  A message is never acknowledged and then dropped: a session cut
off in DATA gets no 250, so its client tries again.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from msa.interfaces import ISessionLimiter
from msa.policy.keptlimits import SessionCounts

log = Logger()


class SessionRegistry:
    """
    Every live L{msa.submission.server.SubmissionServer}, across listeners.
    """

    def __init__(self) -> None:
        self.sessions: set = set()
        self.closing = False
        self._emptied: list[defer.Deferred] = []
        #: Per client address, its live sessions: each connection asks
        #: (the per-client limit), so a count, not a scan of every session
        #: (quadratic in a connection storm).
        self._fromAddress: collections.Counter[str] = collections.Counter()

    def add(self, session) -> None:
        if session not in self.sessions:
            self.sessions.add(session)
            self._fromAddress[session.session.clientAddress] += 1

    def sessionsFrom(self, clientAddress: str) -> int:
        return self._fromAddress[clientAddress]

    def sessionsOf(self, account: str) -> int:
        return sum(1 for s in self.sessions if s.session.account == account)

    def remove(self, session) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
            address = session.session.clientAddress
            self._fromAddress[address] -= 1
            if not self._fromAddress[address]:
                del self._fromAddress[address]
        if not self.sessions:
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def shutdown(self, grace: float, reactor=None) -> defer.Deferred:
        """
        Ask every session to end, and wait up to C{grace} seconds for them.

        @return: a L{Deferred} that fires when no session is left.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.closing = True
        if not self.sessions:
            return defer.succeed(None)
        log.info(
            "stopping: {count} session(s) in progress, waiting up to {grace}s",
            count=len(self.sessions),
            grace=grace,
        )
        for session in list(self.sessions):
            session.beginShutdown()
        done: defer.Deferred[None] = defer.Deferred()
        if not self.sessions:
            return defer.succeed(None)
        self._emptied.append(done)

        def forceClose():
            if self.sessions:
                log.warn(
                    "stopping: closing {count} session(s) after the grace period",
                    count=len(self.sessions),
                )
            for session in list(self.sessions):
                session.forceShutdown()

        timer = reactor.callLater(grace, forceClose)

        def cancelTimer(result):
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(cancelTimer)


@implementer(ISessionLimiter)
class MemorySessionLimiter:
    """
    Concurrent sessions per account, counted by this instance alone: the
    logged-in sessions of its L{SessionRegistry} (or, in worker 0 of
    several, those of every worker: L{msa.policy.keptlimits.LimitsKeeper}).
    Nothing to release: a session leaves the registry when its connection
    is gone.
    """

    def __init__(self, registry: SessionRegistry | SessionCounts) -> None:
        self.registry = registry

    def acquire(self, account: str, maximum: int, sessionId: str) -> bool:
        return self.registry.sessionsOf(account) < maximum

    def release(self, account: str, sessionId: str) -> None:
        pass
