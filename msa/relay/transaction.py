# -*- test-case-name: tests.test_relay_pipelining,tests.test_relay_extensions -*-
"""
One mail transaction with the core MTA on an open, greeted connection:
MAIL, RCPT for each pending recipient, DATA and the message (or BDAT for a
BINARYMIME message: L{msa.relay.chunks}), each reply mapped to a
L{msa.relay.results.RecipientResult}.  The parameters of MAIL and RCPT,
and a message refused before anything is sent because the core lacks an
extension it needs, are L{msa.relay.extensions}'.

When the core offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go
in one write, and the replies are read in order afterwards (DATA is the
last command of the group, section 3.1): one round trip instead of
2 + recipients.  Once the final dot is sent, the connection can carry the
next transaction's group before the reply to the data is read (the
message content may be the first "command" of a group, section 3.1):
C{dataSent}, see L{msa.relay.client}.

Every reply is still looked at on its own: a refused recipient is refused
while the others go on (partial acceptance); a refused MAIL fails every
recipient with its own reply (the RCPT replies, which can only say "MAIL
first", are read and ignored); when no recipient was accepted the body is
never sent, and if the core answers that DATA with 354 anyway, the data is
ended at once with a lone dot, as section 3.1 asks.  Without PIPELINING,
the same transaction in lock-step.

The message file is read and hashed once, as it is sent
(L{msa.relay.protocol.SMTPClientProtocol.sendFile}): the digest is compared
with the acknowledged one before the final dot, and on a mismatch the
final dot is never sent and the connection is dropped, so that the core
discards the unterminated data; the message is held by the relay runner
(L{msa.queue.integrity}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, Literal

import attrs
from twisted.logger import Logger

from msa.queue import integrity
from msa.queue.spool import SpoolEntry
from msa.relay.chunks import sendChunks
from msa.relay.extensions import (
    localRefusal,
    mailFromLine,
    rcptLine,
    usesChunking,
)
from msa.relay.protocol import (
    Reply,
    SMTPClientError,
    SMTPClientProtocol,
    StaleConnection,
)
from msa.relay.results import (
    ACCEPTED,
    TEMPORARY,
    DeliveryResult,
    RecipientResult,
    resultFor,
)

log = Logger()

#: How a transaction over a parked connection to a core that offers
#: PIPELINING learns that the connection is still there, from the first
#: reply to its group: C{"RSET"} sent first (the core's state unknown), or
#: C{"MAIL"} (the connection was parked at the final dot of the message
#: before, and the reply to that data reset the core's state whatever it
#: said, RFC 5321 4.1.1.4: no RSET needed).  L{None}: a new connection, or
#: one that answered RSET already.
Probe = Literal["RSET", "MAIL"] | None

#: Seconds at most for the reply that probes a parked connection (the RSET's,
#: or the MAIL's behind a final dot): a connection the core has silently
#: given up is replaced soon.  A slow core loses nothing by it: nothing of
#: the message was taken, and it goes over a new connection at once, where
#: MAIL has the whole command time-out.
PROBE_TIMEOUT = 30

#: The reply text of a transaction in which the core accepted no recipient.
NO_RECIPIENT = "no recipient accepted"


@attrs.define
class MailTransaction:
    """
    One transaction: C{entry}'s message to its C{pending} recipients over
    C{proto}, the outcome written into C{result}.

    @ivar pipelined: whether the core offered PIPELINING (MAIL, RCPT and
        DATA in one write).
    @ivar downstream: shown in the log line of the reply to the data.
    """

    proto: SMTPClientProtocol
    extensions: dict[str, str]
    entry: SpoolEntry
    pending: list[str]
    result: DeliveryResult
    commandTimeout: float
    dataTimeout: float
    downstream: object = None
    verifiedTLS: bool = True
    #: A parked connection: see L{Probe}.
    probe: Probe = None
    #: Called once the final dot is sent to a core that offers PIPELINING,
    #: the reply to the data not yet read: the connection can carry the
    #: next transaction's commands now (after this one's, RFC 2920 3.1).
    dataSent: Callable[[], None] | None = None

    @property
    def pipelined(self) -> bool:
        return "PIPELINING" in self.extensions

    async def _reply(self, line: bytes) -> Reply:
        """
        The reply to C{line}: sent now in lock-step, already sent with the
        group when pipelining.
        """
        if not self.pipelined:
            self.proto.sendLine(line)
        what = repr(line.split(b" ", 1)[0].decode("ascii", "replace"))
        return await self.proto.readReply(self.commandTimeout, what)

    async def run(self, messageFile: BinaryIO) -> bool:
        """
        Run the transaction, sending C{messageFile} if a recipient was
        accepted.

        @return: whether the connection can be used for another one.
        """
        pending, result = self.pending, self.result
        result.dsnOffered = "DSN" in self.extensions
        refusal = localRefusal(self.entry, self.extensions, self.verifiedTLS)
        if refusal is not None:
            # Nothing was sent: the connection stays good for another.
            self._setAll(pending, resultFor(refusal), refusal)
            return True
        chunking = usesChunking(self.entry, self.extensions)
        mail = mailFromLine(self.entry, self.extensions)
        rcpts = [rcptLine(self.entry, rcpt, self.extensions) for rcpt in pending]
        if self.pipelined:
            # BDAT carries its data at once: it is sent after the replies.
            group = [mail, *rcpts, *([] if chunking else [b"DATA"])]
            reset = self.probe == "RSET"
            self.proto.sendLines([b"RSET", *group] if reset else group)
            if reset:
                await self._resetReply()
        if self.probe == "MAIL":
            reply = await self._probingReply()
        else:
            reply = await self._reply(mail)
        mailRefused = reply.code != 250
        if mailRefused:
            self._setAll(pending, resultFor(reply), reply)
            if reply.code == 421 or not self.pipelined:
                return reply.code != 421

        accepted = []
        for rcpt, line in zip(pending, rcpts, strict=True):
            reply = await self._reply(line)
            if reply.code == 421:
                self._setAll(pending, resultFor(reply), reply)
                return False
            if mailRefused:
                # "MAIL first": the refusal of the MAIL stands.
                continue
            if reply.code in (250, 251):
                accepted.append(rcpt)
                # Tentative: only the reply to the data makes it final.
                result.recipients[rcpt] = RecipientResult(
                    ACCEPTED, reply.code, reply.text
                )
            else:
                result.recipients[rcpt] = resultFor(reply)
        if not accepted:
            if not mailRefused:
                result.reply = NO_RECIPIENT
            if not self.pipelined or chunking:
                return True
            return await self._dataWithoutRecipient()
        if chunking:
            return await self._sendChunks(messageFile, accepted)

        reply = await self._reply(b"DATA")
        if reply.code != 354:
            self._setAll(accepted, resultFor(reply), reply)
            return reply.code != 421
        return await self._sendData(messageFile, accepted)

    async def _probingReply(self) -> Reply:
        """
        The reply to the MAIL that probes a connection parked at the final
        dot of the message before (L{Probe}).

        @raise StaleConnection: no reply (the connection ended with the
            reply to the data before, or the core is silent), or a 421;
            the connection must go.
        """
        try:
            reply = await self.proto.readReply(
                min(self.commandTimeout, PROBE_TIMEOUT), "'MAIL'"
            )
        except SMTPClientError as e:
            raise StaleConnection(str(e)) from e
        if reply.code == 421:
            raise StaleConnection(f"MAIL answered {reply.code} {reply.text}")
        return reply

    async def _resetReply(self) -> None:
        """
        The reply to the RSET of a parked connection, sent first in the
        group.

        @raise StaleConnection: no reply (the core closed the connection
            meanwhile, or is silent), or not a 250; the connection must go
            (what follows the RSET is not to be trusted).
        """
        try:
            reply = await self.proto.readReply(
                min(self.commandTimeout, PROBE_TIMEOUT), "'RSET'"
            )
        except SMTPClientError as e:
            raise StaleConnection(str(e)) from e
        if reply.code != 250:
            raise StaleConnection(f"RSET answered {reply.code} {reply.text}")

    async def _dataWithoutRecipient(self) -> bool:
        """
        Read the reply to the pipelined DATA of a transaction without an
        accepted recipient: normally a refusal (503 or 554); the body is
        not sent either way.
        """
        reply = await self.proto.readReply(self.commandTimeout, "'DATA'")
        if reply.code != 354:
            return reply.code != 421
        # RFC 2920 section 3.1: the core accepted DATA with no recipient;
        # end the data with a lone dot (no message), and do not trust this
        # connection with another transaction.
        log.warn(
            "the core MTA {downstream} answered DATA with 354 although it "
            "refused every recipient of {queueId}: ended with an empty data",
            downstream=self.downstream,
            queueId=self.entry.queueId,
        )
        self.proto.sendLine(b".")
        await self.proto.readReply(self.dataTimeout, "the reply to the empty data")
        return False

    async def _sendData(self, messageFile: BinaryIO, accepted: list[str]) -> bool:
        """
        Stream the message after the 354, hashed as it is read, and read the
        reply to the data.
        """
        return await self._handOver(messageFile, accepted, chunked=False)

    def _dataReplied(self, reply: Reply, accepted: list[str]) -> bool:
        """
        Record the core's reply to the data (or to the last chunk).
        """
        if reply.code == 250:
            self._setAll(accepted, RecipientResult(ACCEPTED, 250, reply.text), reply)
        else:
            self._setAll(accepted, resultFor(reply), reply)
        # The attempt's INFO line, with this reply, is the relay runner's.
        log.debug(
            "{queueId} to {downstream}: {reply}",
            queueId=self.entry.queueId,
            downstream=self.downstream,
            reply=str(reply),
        )
        return reply.code != 421

    async def _sendChunks(self, messageFile: BinaryIO, accepted: list[str]) -> bool:
        """
        Send the message with BDAT (a BINARYMIME message, which DATA
        cannot carry), hashed as it is read; the digest is compared before
        the LAST chunk, which is never sent on a mismatch.
        """
        return await self._handOver(messageFile, accepted, chunked=True)

    async def _handOver(
        self, messageFile: BinaryIO, accepted: list[str], chunked: bool
    ) -> bool:
        """
        Send the message (after the 354, or with BDAT when C{chunked}) and
        read the core's reply to it.  On a digest mismatch, the final dot or
        the LAST chunk was never sent and the connection is dropped: the
        core discards the data, and the message is held.
        """
        digester = integrity.digesterFor(self.entry)
        try:
            if chunked:
                reply = await sendChunks(
                    self.proto, messageFile, self.dataTimeout, digester, self.entry
                )
            else:
                await self.proto.sendFile(
                    messageFile, self.dataTimeout, digester, self.entry
                )
                # This transaction's turn for the next reply is taken
                # before the connection goes to the next one.
                replied = self.proto.readReply(
                    self.dataTimeout, "the reply to the data"
                )
                if self.pipelined and self.dataSent is not None:
                    self.dataSent()
                reply = await replied
        except integrity.IntegrityError as e:
            self.held(accepted, e.mismatch)
            return False
        return self._dataReplied(reply, accepted)

    def held(self, accepted: list[str], mismatch: integrity.Mismatch) -> None:
        """
        Record that the message was not handed over because its bytes are
        not the acknowledged ones: the relay runner holds it.
        """
        held = RecipientResult(TEMPORARY, 0, mismatch.reason)
        for rcpt in accepted:
            self.result.recipients[rcpt] = held
        self.result.reply = mismatch.reason
        self.result.mismatch = mismatch

    def _setAll(
        self, recipients: list[str], outcome: RecipientResult, reply: Reply
    ) -> None:
        for rcpt in recipients:
            self.result.recipients[rcpt] = outcome
        self.result.reply = str(reply)
