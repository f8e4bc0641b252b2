# -*- test-case-name: tests.test_relay_client,tests.test_relay_pipelining -*-
"""
The relay client's kept connections to the core MTA (L{ConnectionPool}):
which connection may carry the next message, for how long one is kept
idle, and which is closed.  The conversations themselves are
L{msa.relay.client.SMTPDownstream}'s.

A connection is parked when its transaction ended in good order
(L{ConnectionPool.done}), or as soon as its final dot is sent to a core
that offers PIPELINING (L{ConnectionPool.dataSent}): the next message's
commands then follow the dot, and the reply to the data is read first
(RFC 2920 section 3.1).  A parked connection waits at most C{idleTimeout}
seconds once nothing is owed on it, and carries at most
C{maxTransactions} messages.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from msa.relay.protocol import SMTPClientProtocol


class Connection:
    """
    One open session with the core, ready for MAIL (greeted, EHLO, TLS and
    AUTH done).
    """

    def __init__(
        self, proto: SMTPClientProtocol, extensions: dict[str, str], generation: int
    ) -> None:
        self.proto = proto
        self.extensions = extensions
        self.generation = generation
        self.transactions = 0
        self.idleTimer: IDelayedCall | None = None
        #: Parked while a transaction still waits for the reply to its data
        #: (L{ConnectionPool.dataSent}): no idle timer meanwhile.
        self.replyOwed = False
        #: L{ConnectionPool.closeIdle} came while the reply was owed: the
        #: connection closes once it has come.
        self.closeWhenDone = False
        #: Parked at the final dot of its last transaction: the reply to the
        #: data resets the core's state, whatever it says, and the next
        #: transaction needs no RSET (L{msa.relay.transaction.Probe}).
        self.afterDot = False

    def cancelIdleTimer(self) -> None:
        if self.idleTimer is not None and self.idleTimer.active():
            self.idleTimer.cancel()
        self.idleTimer = None

    def close(self, quit: bool = True) -> None:
        self.cancelIdleTimer()
        transport = self.proto.transport
        if transport is None:
            return
        lost = self.proto.lost
        # A message that took this connection after the final dot of the
        # one before fails now, before it reads another reply over it: it
        # is sent over a new connection (StaleConnection).
        self.proto.abandon("by the MSA")
        if quit and not lost:
            # No need to wait for the 221: the session is over either way.
            self.proto.sendLine(b"QUIT")
        transport.loseConnection()


class ConnectionPool:
    """
    The parked connections of one L{msa.relay.client.SMTPDownstream}; see
    the module docstring.

    @param idleTimeout: seconds a parked connection waits for a message;
        0: none is kept.
    @param maxTransactions: messages a connection carries at most.
    """

    def __init__(self, reactor: Any, idleTimeout: float, maxTransactions: int) -> None:
        self._reactor = reactor
        self.idleTimeout = idleTimeout
        self.maxTransactions = maxTransactions
        self._idle: list[Connection] = []
        #: Bumped by L{closeIdle}: a connection opened before is not parked.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._idle)

    @property
    def parked(self) -> tuple[Connection, ...]:
        """
        The parked connections, the most recent last.
        """
        return tuple(self._idle)

    def new(self, proto: SMTPClientProtocol, extensions: dict[str, str]) -> Connection:
        """
        A connection just opened (greeted, TLS and AUTH done).
        """
        return Connection(proto, extensions, self._generation)

    def take(self) -> Connection | None:
        """
        The most recently parked connection, out of the pool (its idle
        timer stopped), or L{None}.
        """
        if not self._idle:
            return None
        conn = self._idle.pop()
        conn.cancelIdleTimer()
        return conn

    def _parkable(self, conn: Connection) -> bool:
        """
        Whether C{conn} may carry another message.
        """
        return (
            self.idleTimeout > 0
            and conn.generation == self._generation
            and conn.transactions < self.maxTransactions
            and not conn.proto.lost
            and not conn.closeWhenDone
        )

    def _startIdleTimer(self, conn: Connection) -> None:
        conn.idleTimer = self._reactor.callLater(
            self.idleTimeout, self._idleExpired, conn
        )

    def done(self, conn: Connection, reusable: bool) -> None:
        """
        The transaction over C{conn} is over: park it for the next message,
        or close it.
        """
        if reusable and self._parkable(conn):
            self._startIdleTimer(conn)
            self._idle.append(conn)
            return
        conn.close()

    def dataSent(self, conn: Connection) -> bool:
        """
        The final dot of a message went over C{conn} to a core that offers
        PIPELINING, its reply still owed: park the connection now, for
        the next message's group to follow the dot.  No idle timer yet:
        the reply may take its time (L{replied}).

        @return: whether C{conn} was parked.
        """
        if not self._parkable(conn):
            return False
        conn.replyOwed = True
        conn.afterDot = True
        self._idle.append(conn)
        return True

    def replied(self, conn: Connection, reusable: bool) -> None:
        """
        The transaction that parked C{conn} at its final dot is over.  If
        no other message has taken the connection meanwhile, its idle time
        starts now; a connection that cannot go on (a 421, a time-out, a
        L{closeIdle} meanwhile) is closed, under the message that took it
        too: that message's MAIL goes unanswered and it goes over a new
        connection (L{msa.relay.protocol.StaleConnection}).
        """
        conn.replyOwed = False
        if conn in self._idle:
            if reusable and self._parkable(conn):
                self._startIdleTimer(conn)
                return
            self._idle.remove(conn)
        elif reusable and not conn.proto.lost and not conn.closeWhenDone:
            # The next message has it (and counts it, see _parkable).
            return
        conn.close()

    def _idleExpired(self, conn: Connection) -> None:
        conn.idleTimer = None
        if conn in self._idle:
            self._idle.remove(conn)
        conn.close()

    def closeIdle(self) -> defer.Deferred[None]:
        """
        Close the parked connections (QUIT); those still owed a reply close
        once it has come, and connections in use are not parked again.

        @return: a L{Deferred} firing when they are all closed.
        """
        self._generation += 1
        idle, self._idle = self._idle, []
        waits = []
        for conn in idle:
            waits.append(conn.proto.notifyLost())
            if conn.replyOwed:
                conn.closeWhenDone = True
                continue
            conn.close()
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)
