# -*- test-case-name: tests.test_lmtp -*-
"""
The LMTP server (RFC 2033) through which the core MTA delivers return
messages into the companies' mailboxes (R16).

It is not SMTP: the client greets with LHLO (HELO and EHLO are refused),
and after the final dot it gets one reply per accepted recipient, in RCPT
order, each saying whether I{that} mailbox has the message: a 250 only
once the message is durably there (L{msa.interfaces.IMailboxStore}).
Which mailbox an address belongs to is account data
(L{msa.accounts.mailboxes}); an address of no account is refused at RCPT
with 550 5.1.1.

The message text goes through the submission side's pure pieces: the
line framer and the DATA filter (L{msa.submission.framing}: dot-unstuffing,
line length, bare CR or LF, size) and the address parser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

from msa import metrics
from msa.errors import SMTPReply
from msa.interfaces import IMailboxStore
from msa.lmtp.access import AddressAllowlist
from msa.lmtp.incoming import (
    TEMPORARY_FAILURE,
    IncomingMessage,
    Recipient,
    deliverToMailboxes,
)
from msa.submission.addresses import parseMailArgument, parseRcptArgument
from msa.submission.framing import END, DataFilter, LineFramer

__all__ = ["LMTPFactory", "LMTPPolicy", "LMTPServer"]

log = Logger()

#: The longest command line, without CRLF (RFC 5321 4.5.3.1.4: 512 with it).
MAX_COMMAND_LINE = 510


@attrs.frozen
class LMTPPolicy:
    """
    The limits of the LMTP listeners.

    @ivar hostname: in the greeting and the LHLO reply.
    @ivar maxMessageSize: SIZE (RFC 1870), in octets as received.
    @ivar maxLineLength: the longest text line, without its CRLF.
    @ivar maxRecipients: recipients per message.
    @ivar idleTimeout: seconds without input before 421 and the close.
    """

    hostname: str = "localhost"
    maxMessageSize: int = 52428800
    maxLineLength: int = 998
    maxRecipients: int = 1000
    idleTimeout: float = 300


class LMTPFactory(protocol.Factory):
    """
    The LMTP listeners' factory.

    @ivar store: where messages go (L{IMailboxStore}).
    @ivar accountFor: recipient address to account name, or L{None}
        (L{msa.accounts.mailboxes.MailboxDirectory.accountFor}).
    @ivar allowlist: the networks TCP clients may come from; a client from
        elsewhere is disconnected at once.  Unix-socket clients are judged
        by the socket's file permissions.
    @ivar temporaryDirectory: where messages wait while they arrive.
    @ivar sessions: the sessions open now (for /health and the metrics).
    @ivar delivered: mailbox deliveries made (one per account per message).
    @ivar storeError: the reply of the last delivery the store failed (a
        disk error), until one succeeds; for C{/health}.
    """

    def __init__(
        self,
        store: IMailboxStore,
        accountFor: Callable[[str], str | None],
        policy: LMTPPolicy = LMTPPolicy(),
        allowlist: AddressAllowlist | None = None,
        temporaryDirectory: str | None = None,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.store = store
        self.accountFor = accountFor
        self.policy = policy
        self.allowlist = allowlist
        self.temporaryDirectory = temporaryDirectory
        self.reactor = reactor
        self.sessions: set[LMTPServer] = set()
        self.delivered = 0
        self.storeError: str | None = None

    def noteDeliveries(
        self, recipients: list[Recipient], replies: list[SMTPReply]
    ) -> None:
        """
        Count one message's mailbox deliveries (one per account) and
        remember whether the store could take it (L{storeError}).
        """
        byAccount = {
            r.account: reply for r, reply in zip(recipients, replies, strict=True)
        }
        for reply in byAccount.values():
            metrics.MAILBOX_DELIVERIES.labels(str(reply.code)).inc()
            if reply.code == 250:
                self.delivered += 1
                self.storeError = None
            elif reply.status in ("4.3.0", "4.3.1"):
                self.storeError = str(reply)

    def buildProtocol(self, addr: Any) -> Any:
        if (
            isinstance(addr, IPv4Address | IPv6Address)
            and self.allowlist is not None
            and not self.allowlist.allows(addr.host)
        ):
            log.warn(
                "LMTP connection from {host} refused: not in [lmtp] allow_from",
                host=addr.host,
            )
            return None
        server = LMTPServer()
        server.factory = self
        return server


class LMTPServer(protocol.Protocol):
    """
    One LMTP session: see the module docstring.

    @ivar framer: the received bytes, cut into lines.
    @ivar sender: the transaction's reverse path (C{""} for C{<>}), or
        L{None} before MAIL.
    @ivar recipients: the accepted recipients, in RCPT order.
    @ivar filter: the DATA filter while message text arrives.
    @ivar message: the temporary file while message text arrives.
    """

    factory: LMTPFactory
    transport: Any

    def __init__(self) -> None:
        self.framer = LineFramer()
        self.greeted = False
        self.sender: str | None = None
        self.recipients: list[Recipient] = []
        self.filter: DataFilter | None = None
        self.message: IncomingMessage | None = None
        self._busy = False
        self._closed = False
        self._timeout: Any = None
        #: The handler of each command, by its upper-case verb.
        self._handlers: dict[bytes, Callable[[bytes], None]] = {
            b"LHLO": self.lmtp_LHLO,
            b"MAIL": self.lmtp_MAIL,
            b"RCPT": self.lmtp_RCPT,
            b"DATA": self.lmtp_DATA,
            b"RSET": self.lmtp_RSET,
            b"NOOP": self.lmtp_NOOP,
            b"QUIT": self.lmtp_QUIT,
        }

    # -- connection ------------------------------------------------------

    @property
    def policy(self) -> LMTPPolicy:
        return self.factory.policy

    def connectionMade(self) -> None:
        self.factory.sessions.add(self)
        self._resetTimeout()
        self.reply(220, None, f"{self.policy.hostname} LMTP ready")

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self.factory.sessions.discard(self)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if self.message is not None and not self._busy:
            # Cut off before the final dot: never acknowledged, gone.
            self.message.discard()
            self.message = None

    def _resetTimeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.reset(self.policy.idleTimeout)
        else:
            self._timeout = self.factory.reactor.callLater(
                self.policy.idleTimeout, self._timedOut
            )

    def _timedOut(self) -> None:
        if self._busy:
            # The client waits for our replies, not idle.
            self._resetTimeout()
            return
        self.reply(421, "4.4.2", f"{self.policy.hostname} Error: timeout exceeded")
        self.hangUp()

    def hangUp(self) -> None:
        """
        Close after the last reply; input from here on is ignored.
        """
        self._closed = True
        self.framer.clear()
        if self.transport is not None:
            self.transport.loseConnection()

    def reply(self, code: int, status: str | None, text: str) -> None:
        line = f"{code} {status} {text}" if status else f"{code} {text}"
        self.transport.write(line.encode("ascii", "replace") + b"\r\n")

    def replyWith(self, error: SMTPReply) -> None:
        self.transport.write(error.line() + b"\r\n")

    # -- input -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._resetTimeout()
        self.framer.feed(data)
        self._processLines()

    def _processLines(self) -> None:
        while not self._busy and not self._closed:
            if self.filter is not None and self._dataBlock():
                continue
            limit = (
                self.filter.framingLimit
                if self.filter is not None
                else MAX_COMMAND_LINE
            )
            item = self.framer.nextLine(limit)
            if item is None:
                return
            line, tooLong = item
            if self.filter is not None:
                self._dataLine(line, tooLong)
            elif tooLong:
                self.reply(500, "5.5.6", "Error: line too long")
            else:
                self._command(line)

    def _wait(self, d: defer.Deferred) -> None:
        """
        Hold back pipelined input until C{d} fires, so that replies go out
        in order; stop reading meanwhile, so that input waits in the
        kernel, not in our memory.
        """
        self._busy = True
        self.transport.pauseProducing()

        def resume(result: object) -> object:
            self._busy = False
            if self._closed:
                return result
            self.transport.resumeProducing()
            self._processLines()
            return result

        d.addBoth(resume)
        d.addErrback(lambda failure: log.failure("LMTP session", failure))

    # -- commands ---------------------------------------------------------

    def _command(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        handler = self._handlers.get(verb.upper())
        if handler is None:
            if verb.upper() in (b"HELO", b"EHLO"):
                self.reply(500, "5.5.1", "This is LMTP (RFC 2033): use LHLO")
            else:
                self.reply(500, "5.5.2", "Error: command not recognized")
            return
        try:
            handler(argument.strip())
        except SMTPReply as e:
            self.replyWith(e)

    def lmtp_LHLO(self, argument: bytes) -> None:
        if not argument:
            raise SMTPReply(501, "5.5.4", "Syntax: LHLO hostname")
        self._resetTransaction()
        self.greeted = True
        size = self.policy.maxMessageSize
        lines = [self.policy.hostname, "PIPELINING", "ENHANCEDSTATUSCODES"]
        lines += ["8BITMIME", f"SIZE {size}"]
        for line in lines[:-1]:
            self.transport.write(f"250-{line}\r\n".encode("ascii"))
        self.reply(250, None, lines[-1])

    def lmtp_MAIL(self, argument: bytes) -> None:
        if not self.greeted:
            raise SMTPReply(503, "5.5.1", "Error: send LHLO first")
        if self.sender is not None:
            raise SMTPReply(503, "5.5.1", "Error: nested MAIL command")
        sender, params = parseMailArgument(argument)
        declared = params.get("SIZE")
        if declared is not None and int(declared) > self.policy.maxMessageSize:
            raise SMTPReply(
                552, "5.3.4", "Message size exceeds fixed maximum message size"
            )
        self.sender = sender
        self.reply(250, "2.1.0", "Ok")

    def lmtp_RCPT(self, argument: bytes) -> None:
        if self.sender is None:
            raise SMTPReply(503, "5.5.1", "Error: need MAIL command")
        address, _ = parseRcptArgument(argument)
        if len(self.recipients) >= self.policy.maxRecipients:
            raise SMTPReply(452, "4.5.3", "Error: too many recipients")
        account = self.factory.accountFor(address)
        if account is None:
            raise SMTPReply(
                550, "5.1.1", f"<{address}>: no mailbox here for this address"
            )
        self.recipients.append(Recipient(address=address, account=account))
        self.reply(250, "2.1.5", "Ok")

    def lmtp_DATA(self, argument: bytes) -> None:
        if self.sender is None:
            raise SMTPReply(503, "5.5.1", "Error: need MAIL command")
        if not self.recipients:
            raise SMTPReply(503, "5.5.1", "Error: no valid recipients")
        d = IncomingMessage.create(
            self.factory.reactor, self.factory.temporaryDirectory
        )

        def created(message: IncomingMessage) -> None:
            if self._closed:
                message.discard()
                return
            self.message = message
            self.filter = DataFilter(
                maxSize=self.policy.maxMessageSize,
                maxLineLength=self.policy.maxLineLength,
            )
            self.reply(354, None, "End data with <CR><LF>.<CR><LF>")

        def failed(failure: Any) -> None:
            log.error("cannot make an LMTP temporary file: {e}", e=failure.value)
            if not self._closed:
                self.replyWith(TEMPORARY_FAILURE)

        self._wait(d.addCallbacks(created, failed))

    def lmtp_RSET(self, argument: bytes) -> None:
        self._resetTransaction()
        self.reply(250, "2.0.0", "Ok")

    def lmtp_NOOP(self, argument: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def lmtp_QUIT(self, argument: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self.hangUp()

    def _resetTransaction(self) -> None:
        self.sender = None
        self.recipients = []
        if self.message is not None:
            self.message.discard()
        self.message = None
        self.filter = None

    # -- message text -------------------------------------------------------

    def _dataBlock(self) -> bool:
        """
        Take the complete lines buffered at once when the DATA filter
        allows it (L{DataFilter.blockReceived}), up to the final dot.
        """
        assert self.filter is not None and self.message is not None
        block = self.framer.completeLines()
        end = (b"\r\n" + block).find(b"\r\n.\r\n")
        if end >= 0:
            block = block[:end]
        if not block:
            return False
        data = self.filter.blockReceived(block)
        if data is None:
            return False
        self.framer.skip(len(block))
        self._write(data)
        return True

    def _dataLine(self, line: bytes, tooLong: bool) -> None:
        assert self.filter is not None
        result = self.filter.lineReceived(line, tooLong)
        if result is END:
            self._endOfData()
        elif isinstance(result, bytes):
            self._write(result + b"\r\n")

    def _write(self, data: bytes) -> None:
        assert self.filter is not None and self.message is not None
        try:
            self.message.write(data)
        except OSError as e:
            log.error("cannot write an LMTP message: {e}", e=e)
            self.filter.refuse(TEMPORARY_FAILURE)

    def _endOfData(self) -> None:
        """
        The final dot: one reply per recipient, in RCPT order, once each
        mailbox has the message (or has refused it).
        """
        assert self.filter is not None and self.message is not None
        message, error = self.message, self.filter.error
        recipients, sender = self.recipients, self.sender or ""
        self.filter = None
        if error is not None:
            message.discard()
            self.message = None
            for _ in recipients:
                self.replyWith(error)
            self._resetTransaction()
            return
        peer = self.transport.getPeer()
        internet = isinstance(peer, IPv4Address | IPv6Address)
        d = deliverToMailboxes(
            self.factory.store,
            message,
            sender,
            recipients,
            # The core's address; a unix socket's peer has none.
            {"client": peer.host if internet else "unix"},
        )

        def replied(replies: list[SMTPReply]) -> None:
            message.discard()
            self.message = None
            self.factory.noteDeliveries(recipients, replies)
            self._resetTransaction()
            for recipient, reply in zip(recipients, replies, strict=True):
                log.info(
                    "LMTP <{sender}> to <{recipient}> (account {account}): {reply}",
                    sender=sender,
                    recipient=recipient.address,
                    account=recipient.account,
                    reply=str(reply),
                )
                if not self._closed:
                    self.replyWith(reply)

        self._wait(d.addCallback(replied))
