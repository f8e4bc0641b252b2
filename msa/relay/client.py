# -*- test-case-name: tests.test_relay_client,tests.test_relay_pipelining -*-
"""
The SMTP client to the core MTA: L{SMTPDownstream}, the relay runner's
downstream when a core MTA is configured.  It hands spooled messages to the
core over connections it keeps open for a while and reuses: greeting,
EHLO, STARTTLS (required unless configured otherwise, the certificate
verified), AUTH PLAIN, then the mail transaction
(L{msa.relay.transaction}: MAIL, RCPT and the data, pipelined when the core
offers PIPELINING), each reply mapped to a L{msa.relay.results.RecipientResult}.

The SMTP client protocol itself (dot-stuffing, commands and replies) is in
L{msa.relay.protocol}, the result types in L{msa.relay.results}.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any, BinaryIO, cast

from twisted.internet import defer, error, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from msa.interfaces import IDownstream
from msa.queue.spool import SpoolEntry
from msa.relay.connections import Connection, ConnectionPool
from msa.relay.protocol import (
    SMTPClientError,
    SMTPClientProtocol,
    SMTPConnectionLost,
    StaleConnection,
)
from msa.relay.results import ACCEPTED, TEMPORARY, DeliveryResult, RecipientResult
from msa.relay.transaction import PROBE_TIMEOUT, MailTransaction, Probe

log = Logger()

TLS_MODES = ("starttls", "implicit", "none")


class TLSFailure(SMTPClientError):
    """
    The TLS handshake with the core failed: a certificate that does not
    verify (wrong name, unknown CA), no common protocol, or not TLS at all.
    Temporary, and logged loudly: never a fallback to plaintext.
    """


@implementer(IDownstream)
class SMTPDownstream:
    """
    Delivery to the core MTA over SMTP.

    A connection that ends a transaction in good order is kept for
    C{idleTimeout} seconds and reused for the next message (RSET first
    unless the one before reached its final dot),
    up to C{maxTransactions} messages; C{idleTimeout=0} means a connection
    per message (L{msa.relay.connections.ConnectionPool} keeps them).  How
    many deliveries run at once is the caller's business (the relay
    runner's concurrency): each concurrent delivery has a connection of its
    own.

    To a core that offers PIPELINING a connection is parked as soon as a
    message's final dot is sent, before the core's reply to it (the
    caller is told through C{deliver}'s C{dataSent}, and may start the next
    delivery): the next message's MAIL, RCPT and DATA follow the dot
    at once (RFC 2920 section 3.1), and their replies are read after the
    reply to the data.  One round trip per message instead of two.  If
    the reply to the data ends the connection (a 421, a time-out), the
    next message's MAIL goes unanswered and it is sent over a new
    connection (L{StaleConnection}): nothing of it was taken.

    @param tlsMode: C{"starttls"} (required: a core that does not offer it
        or refuses it is a temporary failure, never a plaintext fallback),
        C{"implicit"} (TLS from the first byte) or C{"none"}.
    @param contextFactory: the client TLS context, normally from
        L{msa.tls.clientContextFactory}; by default one for C{host} with the
        system trust store.
    @param verifyCertificate: whether C{contextFactory} verifies the
        core's certificate (L{False} only when the operator said so): a
        REQUIRETLS message goes only over verified TLS.
    @param authUsername: AUTH PLAIN after TLS when set.
    @param connectTimeout: seconds for the TCP connection.
    @param commandTimeout: seconds for each reply (greeting included).
    @param dataTimeout: seconds to send the data, and again for its reply.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tlsMode: str = "starttls",
        contextFactory: Any = None,
        heloName: str = "localhost",
        authUsername: str | None = None,
        authPassword: str | None = None,
        reactor: Any = None,
        connectTimeout: float = 30,
        commandTimeout: float = 300,
        dataTimeout: float = 600,
        idleTimeout: float = 5,
        maxTransactions: int = 100,
        verifyCertificate: bool = True,
    ) -> None:
        if tlsMode not in TLS_MODES:
            raise ValueError(f"tlsMode must be one of {TLS_MODES}, not {tlsMode!r}")
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.host = host
        self.port = port
        self.tlsMode = tlsMode
        if contextFactory is None and tlsMode != "none":
            from msa.tls import clientContextFactory

            contextFactory = clientContextFactory(host)
        self.contextFactory = contextFactory
        self.verifyCertificate = verifyCertificate
        self.heloName = heloName
        self.authUsername = authUsername
        self.authPassword = authPassword
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.dataTimeout = dataTimeout
        self._pool = ConnectionPool(reactor, idleTimeout, maxTransactions)
        if tlsMode == "none":
            log.warn(
                "relay to {host}:{port} WITHOUT TLS, as configured: messages and "
                "credentials cross the network in plaintext",
                host=host,
                port=port,
            )

    def __repr__(self) -> str:
        return f"<SMTPDownstream {self.host}:{self.port} tls={self.tlsMode}>"

    def deliver(
        self,
        entry: SpoolEntry,
        messageFile: BinaryIO,
        dataSent: Callable[[], object] | None = None,
    ) -> defer.Deferred[DeliveryResult]:
        """
        Deliver C{entry}'s message to its pending recipients, over an idle
        connection when there is one.

        @param entry: a L{msa.queue.entry.SpoolEntry}.
        @param messageFile: the message, open for binary reading.
        @param dataSent: see L{msa.interfaces.IDownstream.deliver}.
        @return: a L{Deferred} firing with a L{DeliveryResult}; never fails.
        """
        return defer.ensureDeferred(self._deliver(entry, messageFile, dataSent))

    def close(self) -> defer.Deferred[None]:
        """
        Close the idle connections (QUIT); deliveries in flight keep theirs
        but do not park them afterwards.

        @return: a L{Deferred} firing when the idle connections are closed.
        """
        return self._pool.closeIdle()

    @property
    def idleTimeout(self) -> float:
        """
        Seconds a connection is kept for the next message (0: none is).
        """
        return self._pool.idleTimeout

    @property
    def maxTransactions(self) -> int:
        """
        Messages a connection carries at most.
        """
        return self._pool.maxTransactions

    @property
    def idleConnections(self) -> int:
        return len(self._pool)

    async def _deliver(
        self,
        entry: SpoolEntry,
        messageFile: BinaryIO,
        dataSent: Callable[[], object] | None = None,
    ) -> DeliveryResult:
        result = DeliveryResult()
        pending = entry.pendingRecipients()
        conn: Connection | None = None
        reusable = False
        #: The connection was parked at the final dot (L{_dataSent}).
        parked = False

        def sent() -> None:
            nonlocal parked
            assert conn is not None
            parked = self._pool.dataSent(conn)
            if dataSent is not None:
                dataSent()

        try:
            conn, probe = await self._reuse()
            if conn is None:
                conn = await self._connect()
            try:
                reusable = await self._transaction(
                    conn, probe, entry, pending, result, messageFile, sent
                )
            except StaleConnection as e:
                # The parked connection did not answer the first command of
                # the pipelined group (RSET, or MAIL behind a final dot):
                # nothing of this message can have been taken.  A new
                # connection, once.
                log.info(
                    "{downstream}: a parked connection is gone ({e}); "
                    "{queueId} goes over a new one",
                    downstream=self,
                    e=e,
                    queueId=entry.queueId,
                )
                conn.close(quit=False)
                conn = None
                conn = await self._connect()
                reusable = await self._transaction(
                    conn, None, entry, pending, result, messageFile, sent
                )
        except Exception as e:
            text = str(e) or e.__class__.__name__
            if isinstance(e, error.ConnectError | error.TimeoutError):
                text = f"cannot connect to {self.host}:{self.port}: {text}"
            if isinstance(e, TLSFailure):
                log.critical(
                    "TLS WITH THE CORE MTA {downstream} FAILED for {queueId}: "
                    "{text}.  Is the certificate valid for the configured name "
                    "and issued by the configured CA?  The message stays queued; "
                    "nothing is sent without TLS.",
                    downstream=self,
                    queueId=entry.queueId,
                    text=text,
                )
            else:
                log.info(
                    "delivery of {queueId} to {downstream} failed: {text}",
                    queueId=entry.queueId,
                    downstream=self,
                    text=text,
                )
            for rcpt in pending:
                current = result.recipients.get(rcpt)
                if current is None or current.status == ACCEPTED:
                    result.recipients[rcpt] = RecipientResult(TEMPORARY, 0, text)
            result.reply = result.reply or text
        if conn is not None:
            if parked:
                self._pool.replied(conn, reusable)
            else:
                self._pool.done(conn, reusable)
        return result

    async def _transaction(
        self,
        conn: Connection,
        probe: Probe,
        entry: SpoolEntry,
        pending: list[str],
        result: DeliveryResult,
        messageFile: BinaryIO,
        dataSent: Callable[[], None] | None = None,
    ) -> bool:
        """
        One transaction over C{conn}; C{probe}: a parked connection whose
        first command in the group tells whether it is still there
        (L{MailTransaction} raises L{StaleConnection} when it goes
        unanswered); C{dataSent}: see L{MailTransaction}.

        @return: whether the connection can be used again.
        """
        conn.transactions += 1
        # Until this transaction's final dot, the core's state is its own.
        conn.afterDot = False
        transaction = MailTransaction(
            conn.proto,
            conn.extensions,
            entry,
            pending,
            result,
            self.commandTimeout,
            self.dataTimeout,
            self,
            verifiedTLS=self.tlsMode != "none" and self.verifyCertificate,
            probe=probe,
            dataSent=dataSent,
        )
        return await transaction.run(messageFile)

    async def _reuse(self) -> tuple[Connection | None, Probe]:
        """
        A parked connection, or L{None}, and how the transaction probes it.
        To a core that offers PIPELINING the probe goes with the next
        transaction's group (one round trip less per message): C{"MAIL"}
        behind a final dot, whose reply resets the core's state whatever
        it says (RFC 5321 4.1.1.4), C{"RSET"} first otherwise.  To any
        other core RSET is sent here, and a connection that does not answer
        it is closed.
        """
        while (conn := self._pool.take()) is not None:
            if conn.proto.lost or conn.proto.unsolicited:
                pass
            elif "PIPELINING" in conn.extensions:
                return conn, "MAIL" if conn.afterDot else "RSET"
            else:
                try:
                    reply = await conn.proto.command(
                        b"RSET", min(self.commandTimeout, PROBE_TIMEOUT)
                    )
                except SMTPClientError:
                    reply = None
                if reply is not None and reply.code == 250:
                    return conn, None
            conn.close(quit=False)
        return None, None

    def _endpoint(self) -> IStreamClientEndpoint:
        """
        Where a new connection to the core goes: an address given as such
        is connected to directly (a refused connection fails at once, and
        no resolver runs in a thread for every connection); a name goes
        through L{HostnameEndpoint} (its addresses tried in turn, RFC 8305).
        """
        if isIPAddress(self.host):
            return TCP4ClientEndpoint(
                self._reactor, self.host, self.port, timeout=self.connectTimeout
            )
        if isIPv6Address(self.host):
            return TCP6ClientEndpoint(
                self._reactor, self.host, self.port, timeout=self.connectTimeout
            )
        return HostnameEndpoint(
            self._reactor, self.host, self.port, timeout=self.connectTimeout
        )

    async def _connect(self) -> Connection:
        endpoint = self._endpoint()
        if self.tlsMode == "implicit":
            endpoint = wrapClientTLS(self.contextFactory, endpoint)
        factory = protocol.Factory.forProtocol(
            functools.partial(SMTPClientProtocol, self._reactor)
        )
        # Not a "Starting factory" and "Stopping factory" line at INFO for
        # every connection: the delivery's own lines say what happened.
        factory.noisy = False
        proto = cast(SMTPClientProtocol, await endpoint.connect(factory))
        try:
            extensions = await self._handshake(proto)
        except BaseException:
            if proto.transport is not None:
                proto.transport.loseConnection()
            raise
        return self._pool.new(proto, extensions)

    async def _ehlo(self, proto: SMTPClientProtocol) -> dict[str, str]:
        reply = await proto.command(
            b"EHLO " + self.heloName.encode("ascii"), self.commandTimeout
        )
        if reply.code != 250:
            raise SMTPClientError(f"EHLO refused: {reply}")
        extensions = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.partition(" ")
            extensions[keyword.upper()] = params
        return extensions

    async def _handshake(self, proto: SMTPClientProtocol) -> dict[str, str]:
        """
        Greeting, EHLO, STARTTLS and AUTH.

        @return: the extensions the core offers (after TLS).
        """
        timeout = self.commandTimeout
        try:
            greeting = await proto.readReply(timeout, "the greeting")
        except SMTPConnectionLost as e:
            if self.tlsMode == "implicit":
                raise TLSFailure(f"TLS handshake failed? {e}")
            raise
        if greeting.code != 220:
            raise SMTPClientError(f"greeting: {greeting}")
        extensions = await self._ehlo(proto)
        if self.tlsMode == "starttls":
            if "STARTTLS" not in extensions:
                raise SMTPClientError("the core MTA does not offer STARTTLS")
            reply = await proto.command(b"STARTTLS", timeout)
            if reply.code != 220:
                raise SMTPClientError(f"STARTTLS refused: {reply}")
            proto.startTLS(self.contextFactory)
            try:
                extensions = await self._ehlo(proto)
            except SMTPConnectionLost as e:
                raise TLSFailure(f"after STARTTLS (TLS handshake failed?): {e}")
            except SMTPClientError as e:
                raise SMTPClientError(f"after STARTTLS (TLS handshake?): {e}")
        if self.authUsername is not None:
            await self._auth(proto, extensions, self.authUsername)
        return extensions

    async def _auth(
        self, proto: SMTPClientProtocol, extensions: dict[str, str], username: str
    ) -> None:
        if self.tlsMode == "none":
            raise SMTPClientError("refusing to send credentials without TLS")
        if "PLAIN" not in extensions.get("AUTH", "").upper().split():
            raise SMTPClientError("the core MTA does not offer AUTH PLAIN")
        token = b"\0" + (
            username.encode("utf-8") + b"\0" + (self.authPassword or "").encode("utf-8")
        )
        reply = await proto.command(
            b"AUTH PLAIN " + base64.b64encode(token), self.commandTimeout
        )
        if reply.code != 235:
            # A rejected login is a configuration problem: keep the mail.
            log.error("the core MTA refused our AUTH: {reply}", reply=str(reply))
            raise SMTPClientError(f"AUTH refused: {reply}")
