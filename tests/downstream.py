"""
A real downstream SMTP server for tests: a small Twisted ESMTP server on
127.0.0.1 that records every message (envelope and the exact data bytes
after unstuffing) and can be told to misbehave.

Usage in a trial test::

    server = DownstreamServer(self.mktemp())
    port = server.start()
    self.addCleanup(server.stop)
    ...
    messages = yield server.waitForMessages(1)
"""

from __future__ import annotations

import base64
import os

import attrs
from twisted.internet import defer, protocol, reactor
from twisted.protocols.basic import LineReceiver

from msa.tls import ensureSelfSignedCertificate, serverContextFactory
from tests.waiting import waitUntil


@attrs.define
class ReceivedMessage:
    """
    One message as the downstream received it.

    @ivar data: the data between DATA and the final dot, unstuffed, with
        its CRLFs.
    """

    sender: str
    recipients: list[str]
    data: bytes
    mailParams: str
    tls: bool
    authenticated: str | None
    #: The parameters of each accepted RCPT (the text after the address).
    rcptParams: list[str] = attrs.Factory(list)
    #: Whether the data came in BDAT chunks (RFC 3030).
    chunked: bool = False


class _ServerProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, server: DownstreamServer) -> None:
        self.server = server
        self.tls = server.tlsMode == "implicit"
        self.authenticated: str | None = None
        self.inData = False
        self.fakeTLS = False
        self.whenLost = defer.Deferred()
        self._group: list[bytes] = []
        #: Replies held behind a late one (L{reply}), or L{None}.
        self._held: list | None = None
        self._reset()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.mailParams = ""
        self.rcptParams: list[str] = []
        self.data: list[bytes] = []
        self.chunked = False
        self._chunkLeft = 0
        self._lastChunk = False

    def reply(self, code: int, text: str, then=None, delay: float = 0.0) -> None:
        """
        Send a reply (late with C{replyDelay}, or C{delay}), then call
        C{then}.
        """
        if self.server.hung:
            return
        line = f"{code} {text}".encode()
        delay = delay or self.server.replyDelay
        if self._held is not None:
            # Replies go in the order of their commands, as SMTP's must.
            self._held.append((line, then))
        elif delay:
            self._held = []
            call = reactor.callLater(delay, self._sendHeld, line, then)
            self.server._delayed.append(call)
        else:
            self._send(line, then)

    def _sendHeld(self, line: bytes, then) -> None:
        """
        A late reply is due: it goes, then those held behind it.
        """
        held, self._held = self._held or [], None
        self._send(line, then)
        for heldLine, heldThen in held:
            self._send(heldLine, heldThen)

    def _send(self, line: bytes, then) -> None:
        if self.transport is not None and self.connected:
            self.server.transcript.append(("R", line))
            self.sendLine(line)
            if then is not None:
                then()

    def dataReceived(self, data: bytes) -> None:
        if self.fakeTLS:
            # Whatever the client's handshake says, the answer is not TLS.
            self.transport.write(b"220 this is not TLS\r\n")
            return
        self._group = []
        super().dataReceived(data)
        if self._group:
            self.server.commandGroups.append(self._group)

    def connectionMade(self) -> None:
        self.server.connections += 1
        if not self.server.silent:
            self.reply(*self.server.greeting)

    def connectionLost(self, reason) -> None:
        self.connected = 0
        if not self.whenLost.called:
            self.whenLost.callback(None)

    def lineReceived(self, line: bytes) -> None:
        server = self.server
        if self.inData:
            if server.dropMidData:
                self.transport.abortConnection()
                return
            if line == b".":
                self.inData = False
                server.transcript.append(("C", line))
                self._endOfData()
            else:
                self.data.append(
                    (line[1:] if line.startswith(b".") else line) + b"\r\n"
                )
            return
        server.commands.append((self.tls, line))
        server.transcript.append(("C", line))
        self._group.append(line)
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if server.hangOn is not None and verb == server.hangOn:
            server.hung = True
        text = arg.decode("utf-8", "replace")
        handler = getattr(self, "do_" + verb.decode("ascii", "replace"), None)
        if handler is None:
            self.reply(502, "5.5.1 Unknown command")
        else:
            handler(text)

    def do_EHLO(self, arg: str) -> None:
        server = self.server
        lines = ["localhost hello", "8BITMIME", "SIZE 100000000", *server.extensions]
        if server.offerPipelining:
            lines.append("PIPELINING")
        if server.tlsMode == "starttls" and not self.tls and server.offerStartTLS:
            lines.append("STARTTLS")
        if server.accounts is not None and self.tls:
            lines.append("AUTH PLAIN")
        self._reset()
        for text in lines[:-1]:
            self.sendLine(f"250-{text}".encode())
        self.reply(250, lines[-1])

    def do_HELO(self, arg: str) -> None:
        self._reset()
        self.reply(250, "localhost")

    def do_STARTTLS(self, arg: str) -> None:
        server = self.server
        if self.tls or server.tlsMode != "starttls":
            self.reply(503, "5.5.1 TLS not available")
        elif server.refuseStartTLS is not None:
            self.reply(*server.refuseStartTLS)
        else:
            if server.breakTLS:
                # Stay in plaintext: the client's handshake meets SMTP.
                self.reply(220, "2.0.0 Ready to start TLS")
                self.fakeTLS = True
                return
            self.reply(220, "2.0.0 Ready to start TLS", self._startTLS)

    def _startTLS(self) -> None:
        self.transport.startTLS(self.server.contextFactory)
        self.tls = True
        self._reset()

    def do_AUTH(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        accounts = self.server.accounts
        if accounts is None or not self.tls or mechanism.upper() != "PLAIN":
            self.reply(504, "5.5.4 Not available")
            return
        try:
            _, user, password = base64.b64decode(initial).decode().split("\0")
        except ValueError:
            self.reply(501, "5.5.2 Bad token")
            return
        if accounts.get(user) == password:
            self.authenticated = user
            self.reply(235, "2.7.0 OK")
        else:
            self.reply(535, "5.7.8 Bad credentials")

    def do_MAIL(self, arg: str) -> None:
        server = self.server
        if server.tlsMode == "starttls" and not self.tls:
            self.reply(530, "5.7.0 Must issue a STARTTLS command first")
        elif server.accounts is not None and self.authenticated is None:
            self.reply(530, "5.7.0 Authentication required")
        elif server.closeOnMail:
            closing, server.closeOnMail = server.closeOnMail, False
            if closing is True:
                self.transport.abortConnection()
            else:
                self.reply(*closing)
                self.transport.loseConnection()
        elif self.sender is not None:
            # As Postfix: the transaction before is still open (no RSET,
            # no final dot since its MAIL).
            self.reply(503, "5.5.1 Error: nested MAIL command")
        elif server.mailReply is not None:
            self.reply(*server.mailReply)
        else:
            path, _, params = arg.partition(" ")
            self.sender = path[path.index("<") + 1 : path.rindex(">")]
            self.mailParams = params
            self.reply(250, "2.1.0 OK")

    def do_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self.reply(503, "5.5.1 MAIL first")
            return
        address = arg[arg.index("<") + 1 : arg.rindex(">")]
        code, text = self.server.rcptReplies.get(address, (250, "2.1.5 OK"))
        if code == 250:
            self.recipients.append(address)
            self.rcptParams.append(arg[arg.rindex(">") + 1 :].strip())
        self.reply(code, text)

    def do_BDAT(self, arg: str) -> None:
        size, _, last = arg.partition(" ")
        if "CHUNKING" not in self.server.extensions or not size.isdigit():
            self.reply(502, "5.5.1 Unknown command")
            return
        self.chunked = True
        self._chunkLeft = int(size)
        self._lastChunk = last.strip().upper() == "LAST"
        self.setRawMode()
        if not self._chunkLeft:
            self.rawDataReceived(b"")

    def rawDataReceived(self, data: bytes) -> None:
        chunk, rest = data[: self._chunkLeft], data[self._chunkLeft :]
        self.data.append(chunk)
        self._chunkLeft -= len(chunk)
        if self._chunkLeft:
            return
        if self._lastChunk:
            self._endOfData()
        else:
            self.reply(250, f"2.0.0 {sum(map(len, self.data))} octets")
        self.setLineMode(rest)

    def do_DATA(self, arg: str) -> None:
        if not self.recipients and not self.server.dataWithoutRecipient:
            self.reply(503, "5.5.1 RCPT first")
        elif self.server.dataReply is not None:
            self.reply(*self.server.dataReply)
        else:
            self.inData = True
            self.reply(354, "End data with <CR><LF>.<CR><LF>")

    def _endOfData(self) -> None:
        server = self.server
        if server.hangOn == b".":
            server.hung = True
        final = server.finalReplies.pop(0) if server.finalReplies else None
        final = final or server.finalReply
        if final is not None:
            code, text, *delay = final
            self.reply(code, text, delay=delay[0] if delay else server.dataReplyDelay)
        else:
            server.messages.append(
                ReceivedMessage(
                    self.sender or "",
                    list(self.recipients),
                    b"".join(self.data),
                    self.mailParams,
                    self.tls,
                    self.authenticated,
                    list(self.rcptParams),
                    self.chunked,
                )
            )
            then = self.transport.loseConnection if server.closeAfterData else None
            self.reply(
                250,
                f"2.0.0 Ok: queued as CORE{len(server.messages)}",
                then,
                delay=server.dataReplyDelay,
            )
        self._reset()

    def do_RSET(self, arg: str) -> None:
        if self.server.closeOnRset:
            self.transport.abortConnection()
            return
        self._reset()
        self.reply(250, "2.0.0 OK")

    def do_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0 OK")

    def do_QUIT(self, arg: str) -> None:
        self.reply(221, "2.0.0 Bye")
        self.transport.loseConnection()


class DownstreamServer:
    """
    The test core MTA.

    @param directory: where its self-signed certificate for C{hostname}
        goes (L{caFile} is that certificate).
    @param tlsMode: C{"starttls"} (offered, and required before MAIL),
        C{"implicit"} (TLS from the first byte) or C{"none"}.

    Misbehaviour, settable any time: C{greeting}, C{silent} (never greet),
    C{offerStartTLS}, C{refuseStartTLS} (a reply), C{mailReply},
    C{rcptReplies} (address to reply), C{dataReply} (instead of 354),
    C{finalReply} (instead of 250 after the data), C{finalReplies} (the
    same for the next messages, one each, first to last; a third item is
    the seconds before that reply), C{dataReplyDelay}
    (seconds before the reply to the data alone), C{accounts} (user to
    password: AUTH PLAIN required after TLS), C{hangOn} (a verb such as
    C{b"MAIL"}, or C{b"."} for the end of the data: from then on the server
    never replies again, on any connection, until C{hung} is reset),
    C{dropMidData} (abort the connection at the first line of data),
    C{replyDelay} (seconds before each reply), C{breakTLS} (answer
    STARTTLS with 220 but stay in plaintext, so the handshake fails),
    C{closeAfterData} (close the connection right after the 250 to the data),
    C{offerPipelining} (PIPELINING in the EHLO reply, by default),
    C{closeOnRset} (abort the connection at an RSET, unanswered: a core
    that timed the idle connection out just then), C{closeOnMail} (the
    same at the next MAIL, once; a (code, text) pair: that reply, then the
    connection closed), a MAIL while a transaction is open is
    refused with 503 (as Postfix does),
    C{dataWithoutRecipient} (answer DATA with 354 even when no recipient
    was accepted, as RFC 2920 section 3.1 says a client must cope with).

    C{extensions}: more EHLO keywords (e.g. C{"DSN"}, C{"SMTPUTF8"},
    C{"CHUNKING"}: then BDAT is taken, the chunks recorded exactly).

    C{commandGroups} has the commands that arrived in one read, one list
    per read: a pipelining client's MAIL, RCPTs and DATA form one group.
    C{transcript} has the conversation in order, over every connection:
    C{("C", line)} for each command and for the final dot, C{("R",
    line)} for each reply sent.
    """

    def __init__(
        self, directory: str, tlsMode: str = "starttls", hostname: str = "localhost"
    ) -> None:
        self.tlsMode = tlsMode
        os.makedirs(directory, exist_ok=True)
        self.caFile, keyFile = ensureSelfSignedCertificate(directory, hostname)
        self.contextFactory = serverContextFactory(self.caFile, keyFile)
        self.greeting = (220, "localhost ESMTP test core")
        self.silent = False
        self.offerStartTLS = True
        self.refuseStartTLS: tuple[int, str] | None = None
        self.mailReply: tuple[int, str] | None = None
        self.closeOnRset = False
        self.closeOnMail: bool | tuple[int, str] = False
        self.rcptReplies: dict[str, tuple[int, str]] = {}
        self.dataReply: tuple[int, str] | None = None
        self.finalReply: tuple[int, str] | None = None
        self.finalReplies: list[tuple] = []
        self.dataReplyDelay = 0.0
        self.transcript: list[tuple[str, bytes]] = []
        self.accounts: dict[str, str] | None = None
        self.hangOn: bytes | None = None
        self.hung = False
        self.dropMidData = False
        self.replyDelay = 0.0
        self.breakTLS = False
        self.closeAfterData = False
        self.offerPipelining = True
        self.dataWithoutRecipient = False
        self.extensions: list[str] = []
        self._delayed: list = []
        self.messages: list[ReceivedMessage] = []
        self.commands: list[tuple[bool, bytes]] = []
        self.commandGroups: list[list[bytes]] = []
        self.connections = 0
        self._port = None
        self._protocols: list[_ServerProtocol] = []

    def start(self, port: int = 0) -> int:
        """
        Listen on 127.0.0.1, on C{port} (by default one the system picks).

        @return: the port number.
        """
        factory = protocol.Factory()

        def build(addr):
            p = _ServerProtocol(self)
            p.factory = factory
            self._protocols.append(p)
            return p

        factory.buildProtocol = build
        if self.tlsMode == "implicit":
            self._port = reactor.listenSSL(
                port, factory, self.contextFactory, interface="127.0.0.1"
            )
        else:
            self._port = reactor.listenTCP(port, factory, interface="127.0.0.1")
        return self._port.getHost().port

    def relayConfig(self, **overrides: object) -> dict:
        """
        The MSA's C{[relay]} section for this (started) core: STARTTLS to
        127.0.0.1, its certificate trusted, with C{overrides}.
        """
        assert self._port is not None, "start() the core first"
        return {
            "host": "127.0.0.1",
            "port": self._port.getHost().port,
            "tls": "starttls",
            "server_name": "localhost",
            "ca_file": self.caFile,
        } | overrides

    def stop(self) -> defer.Deferred:
        """
        Stop listening and drop the open connections.

        @return: a L{Deferred} firing when they are all closed.
        """
        for call in self._delayed:
            if call.active():
                call.cancel()
        waits = [defer.maybeDeferred(self._port.stopListening)]
        for p in self._protocols:
            if p.transport is not None and p.connected:
                waits.append(p.whenLost)
                try:
                    p.transport.abortConnection()
                except AttributeError:
                    # A TLS connection already shutting down.
                    pass
        return defer.DeferredList(waits, consumeErrors=True)

    def dropConnections(self) -> None:
        """
        Close every open connection (as a core restarting would).
        """
        for p in self._protocols:
            if p.transport is not None and p.connected:
                p.transport.abortConnection()

    def plaintextCommands(self) -> list[bytes]:
        """
        The commands received before TLS was in place.
        """
        return [line for tls, line in self.commands if not tls]

    @defer.inlineCallbacks
    def waitForMessages(self, count: int, timeout: float = 5.0):
        """
        Wait without blocking the reactor until C{count} messages arrived.

        @return: a L{Deferred} firing with the list of messages.
        """
        yield waitUntil(
            lambda: len(self.messages) >= count,
            timeout,
            lambda: f"{count} messages (have {len(self.messages)})",
        )
        return list(self.messages)
