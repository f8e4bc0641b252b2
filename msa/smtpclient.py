"""
The relay's ESMTP client: a stateful dot-stuffer, a line protocol that turns
commands into L{Deferred} replies, and L{SMTPDownstream}, which delivers one
spooled message to the core MTA over one connection.

Twisted's own C{ESMTPClient} is not used: it dot-stuffs each 16 KiB chunk on
its own and misses a "." that starts a chunk.
"""

from __future__ import annotations

import base64
import functools
from collections import deque
from typing import BinaryIO

import attrs
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import FileSender, LineReceiver

log = Logger()

ACCEPTED = "accepted"
TEMPORARY = "temporary"
PERMANENT = "permanent"

TLS_MODES = ("starttls", "implicit", "none")


class DotStuffer:
    """
    Dot-stuffing (RFC 5321 section 4.5.2) of a CRLF message fed in chunks of
    any size: every line that starts with "." gets one more, wherever the
    chunk boundaries fall.
    """

    def __init__(self) -> None:
        # The last two bytes seen; CRLF at the start means "at a line start".
        self._tail = b"\r\n"

    def feed(self, data: bytes) -> bytes:
        """
        @return: C{data}, stuffed.
        """
        if not data:
            return b""
        out = data.replace(b"\r\n.", b"\r\n..")
        if data[:1] == b"." and self._tail == b"\r\n":
            out = b"." + out
        elif data[:2] == b"\n." and self._tail[-1:] == b"\r":
            out = b"\n." + out[1:]
        self._tail = (self._tail + data)[-2:]
        return out

    def finish(self) -> bytes:
        """
        @return: the end of the data: a CRLF if the message did not end with
            one, and the terminating ".CRLF".
        """
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def dotStuff(data: bytes) -> bytes:
    """
    Stuff a whole message and add the terminator (for tests and small data).
    """
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.finish()


@attrs.frozen
class Reply:
    """
    One SMTP reply: its code and its text lines (without the code).
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SMTPClientError(Exception):
    """
    The conversation cannot go on: time-out, garbage from the server, a
    requirement (TLS) not met.  Always a temporary failure.
    """


class SMTPClientProtocol(LineReceiver):
    """
    A line protocol for the client side: L{command} sends a line and
    returns a L{Deferred} firing with the next L{Reply}.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._replies: deque[Reply] = deque()
        self._partial: list[str] = []
        self._waiter: defer.Deferred | None = None
        self._timer = None
        self._lost: Exception | None = None

    def lineReceived(self, line: bytes) -> None:
        code, sep = line[:3], line[3:4]
        if len(line) < 3 or not code.isdigit() or sep not in (b"", b" ", b"-"):
            self._fail(SMTPClientError(f"malformed reply line {line[:100]!r}"))
            self.transport.abortConnection()
            return
        self._partial.append(line[4:].decode("utf-8", "replace"))
        if sep == b"-":
            return
        reply = Reply(int(code), tuple(self._partial))
        self._partial = []
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self._cancelTimer()
            waiter.callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(SMTPClientError("reply line too long"))
        self.transport.abortConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fail(self, reason: Exception) -> None:
        if self._lost is None:
            self._lost = reason
        self._cancelTimer()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(reason)

    def _timedOut(self, what: str, timeout: float) -> None:
        self._timer = None
        self._fail(SMTPClientError(f"timed out after {timeout:g}s waiting for {what}"))
        self.transport.abortConnection()

    def readReply(self, timeout: float, what: str = "a reply") -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the next L{Reply}, failing with
            L{SMTPClientError} after C{timeout} seconds or when the
            connection is lost.
        """
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._lost is not None:
            return defer.fail(self._lost)
        assert self._waiter is None, "one command at a time"
        self._waiter = defer.Deferred()
        self._timer = self._reactor.callLater(timeout, self._timedOut, what, timeout)
        return self._waiter

    def command(self, line: bytes, timeout: float) -> defer.Deferred:
        """
        Send one command line and read its reply.
        """
        self.sendLine(line)
        return self.readReply(
            timeout, repr(line.split(b" ", 1)[0].decode("ascii", "replace"))
        )

    def startTLS(self, contextFactory) -> None:
        """
        Switch to TLS after the 220 to STARTTLS.  Anything the server sent
        after that reply (before the handshake) is an injection attempt.
        """
        if self.clearLineBuffer() or self._replies or self._partial:
            self.transport.abortConnection()
            raise SMTPClientError("data after the STARTTLS reply: possible injection")
        self.transport.startTLS(contextFactory)

    def sendFile(self, messageFile: BinaryIO, timeout: float) -> defer.Deferred:
        """
        Stream C{messageFile}, dot-stuffed and terminated, through a pull
        producer, so that only a chunk at a time is in memory.

        @return: a L{Deferred} firing when everything is handed to the
            transport.
        """
        stuffer = DotStuffer()
        d = FileSender().beginFileTransfer(messageFile, self.transport, stuffer.feed)

        def finished(_):
            self.transport.write(stuffer.finish())

        def timedOut(_, __):
            self.transport.abortConnection()
            raise SMTPClientError(f"timed out after {timeout:g}s sending the message")

        d.addCallback(finished)
        d.addTimeout(timeout, self._reactor, onTimeoutCancel=timedOut)
        return d

    def connectionLost(self, reason) -> None:
        self._fail(SMTPClientError(f"connection lost: {reason.getErrorMessage()}"))


@attrs.frozen
class RecipientResult:
    """
    What became of one recipient: L{ACCEPTED}, L{TEMPORARY} or L{PERMANENT},
    with the reply (code and text) that said so.
    """

    status: str
    code: int = 0
    text: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


@attrs.define
class DeliveryResult:
    """
    The outcome of one delivery attempt.

    @ivar recipients: recipient address to L{RecipientResult}.
    @ivar reply: the core's final reply (for a success, with its queue id).
    """

    recipients: dict[str, RecipientResult] = attrs.Factory(dict)
    reply: str = ""

    def _with(self, status: str) -> list[str]:
        return [r for r, res in self.recipients.items() if res.status == status]

    @property
    def accepted(self) -> list[str]:
        return self._with(ACCEPTED)

    @property
    def temporary(self) -> list[str]:
        return self._with(TEMPORARY)

    @property
    def permanent(self) -> list[str]:
        return self._with(PERMANENT)


def _resultFor(reply: Reply) -> RecipientResult:
    status = PERMANENT if reply.code >= 500 else TEMPORARY
    return RecipientResult(status, reply.code, reply.text)


def _address(address: str) -> bytes:
    return address.encode("utf-8")


class SMTPDownstream:
    """
    Delivery to the core MTA over SMTP, one connection per message.

    @param tlsMode: C{"starttls"} (required: a core that does not offer it
        or refuses it is a temporary failure, never a plaintext fallback),
        C{"implicit"} (TLS from the first byte) or C{"none"}.
    @param contextFactory: the client TLS context, normally from
        L{msa.tls.clientContextFactory}; by default one for C{host} with the
        system trust store.
    @param authUsername: AUTH PLAIN after TLS when set.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tlsMode: str = "starttls",
        contextFactory=None,
        heloName: str = "localhost",
        authUsername: str | None = None,
        authPassword: str | None = None,
        reactor=None,
        connectTimeout: float = 30,
        commandTimeout: float = 300,
        dataTimeout: float = 600,
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
        self.heloName = heloName
        self.authUsername = authUsername
        self.authPassword = authPassword
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.dataTimeout = dataTimeout
        if tlsMode == "none":
            log.warn(
                "relay to {host}:{port} WITHOUT TLS, as configured: messages and "
                "credentials cross the network in plaintext",
                host=host,
                port=port,
            )

    def __repr__(self) -> str:
        return f"<SMTPDownstream {self.host}:{self.port} tls={self.tlsMode}>"

    def deliver(self, entry, messageFile: BinaryIO) -> defer.Deferred:
        """
        Deliver C{entry}'s message to its pending recipients.

        @param entry: a L{msa.spool.SpoolEntry}.
        @param messageFile: the message, open for binary reading.
        @return: a L{Deferred} firing with a L{DeliveryResult}; never fails.
        """
        return defer.ensureDeferred(self._deliver(entry, messageFile))

    async def _deliver(self, entry, messageFile: BinaryIO) -> DeliveryResult:
        result = DeliveryResult()
        pending = entry.pendingRecipients()
        proto: SMTPClientProtocol | None = None
        try:
            proto = await self._connect()
            await self._session(proto, entry, pending, messageFile, result)
        except Exception as e:
            text = str(e) or e.__class__.__name__
            if isinstance(e, error.ConnectError | error.TimeoutError):
                text = f"cannot connect to {self.host}:{self.port}: {text}"
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
        finally:
            if proto is not None and proto.transport is not None:
                proto.transport.loseConnection()
        return result

    async def _connect(self) -> SMTPClientProtocol:
        endpoint = HostnameEndpoint(
            self._reactor, self.host, self.port, timeout=self.connectTimeout
        )
        if self.tlsMode == "implicit":
            endpoint = wrapClientTLS(self.contextFactory, endpoint)
        factory = protocol.Factory.forProtocol(
            functools.partial(SMTPClientProtocol, self._reactor)
        )
        return await endpoint.connect(factory)

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

    async def _session(
        self,
        proto: SMTPClientProtocol,
        entry,
        pending: list[str],
        messageFile: BinaryIO,
        result: DeliveryResult,
    ) -> None:
        timeout = self.commandTimeout
        greeting = await proto.readReply(timeout, "the greeting")
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
            except SMTPClientError as e:
                raise SMTPClientError(f"after STARTTLS (TLS handshake?): {e}")
        if self.authUsername is not None:
            await self._auth(proto, extensions)

        reply = await self._mailFrom(proto, entry, extensions)
        if reply.code != 250:
            self._setAll(result, pending, _resultFor(reply), reply)
            await self._quit(proto)
            return

        accepted = []
        for rcpt in pending:
            reply = await proto.command(b"RCPT TO:<" + _address(rcpt) + b">", timeout)
            if reply.code in (250, 251):
                accepted.append(rcpt)
                # Tentative: only the reply to the data makes it final.
                result.recipients[rcpt] = RecipientResult(
                    ACCEPTED, reply.code, reply.text
                )
            else:
                result.recipients[rcpt] = _resultFor(reply)
        if not accepted:
            result.reply = "no recipient accepted"
            await self._quit(proto)
            return

        reply = await proto.command(b"DATA", timeout)
        if reply.code != 354:
            self._setAll(result, accepted, _resultFor(reply), reply)
            await self._quit(proto)
            return
        await proto.sendFile(messageFile, self.dataTimeout)
        reply = await proto.readReply(self.dataTimeout, "the reply to the data")
        if reply.code == 250:
            self._setAll(
                result, accepted, RecipientResult(ACCEPTED, 250, reply.text), reply
            )
        else:
            self._setAll(result, accepted, _resultFor(reply), reply)
        log.info(
            "{queueId} to {downstream}: {reply}",
            queueId=entry.queueId,
            downstream=self,
            reply=str(reply),
        )
        await self._quit(proto)

    @staticmethod
    def _setAll(result, recipients, outcome: RecipientResult, reply: Reply) -> None:
        for rcpt in recipients:
            result.recipients[rcpt] = outcome
        result.reply = str(reply)

    async def _auth(self, proto: SMTPClientProtocol, extensions: dict) -> None:
        if self.tlsMode == "none":
            raise SMTPClientError("refusing to send credentials without TLS")
        if "PLAIN" not in extensions.get("AUTH", "").upper().split():
            raise SMTPClientError("the core MTA does not offer AUTH PLAIN")
        token = b"\0" + (
            self.authUsername.encode("utf-8")
            + b"\0"
            + (self.authPassword or "").encode("utf-8")
        )
        reply = await proto.command(
            b"AUTH PLAIN " + base64.b64encode(token), self.commandTimeout
        )
        if reply.code != 235:
            # A rejected login is a configuration problem: keep the mail.
            log.error("the core MTA refused our AUTH: {reply}", reply=str(reply))
            raise SMTPClientError(f"AUTH refused: {reply}")

    async def _mailFrom(self, proto: SMTPClientProtocol, entry, extensions) -> Reply:
        params = entry.envelope.mailParams or {}
        line = b"MAIL FROM:<" + _address(entry.envelope.sender) + b">"
        body = params.get("BODY")
        if body:
            line += b" BODY=" + body.upper().encode("ascii")
        elif entry.eightBit and "8BITMIME" in extensions:
            line += b" BODY=8BITMIME"
        if "SMTPUTF8" in params:
            line += b" SMTPUTF8"
        if "SIZE" in extensions:
            line += b" SIZE=%d" % (entry.size,)
        if "DSN" in extensions:
            for key in ("RET", "ENVID"):
                if params.get(key):
                    line += b" %s=%s" % (key.encode(), params[key].encode("ascii"))
        return await proto.command(line, self.commandTimeout)

    async def _quit(self, proto: SMTPClientProtocol) -> None:
        try:
            await proto.command(b"QUIT", min(self.commandTimeout, 10))
        except Exception:
            pass
