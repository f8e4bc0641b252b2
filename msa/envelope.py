# -*- test-case-name: tests.test_envelope -*-
"""
Small value types shared by the protocol, the delivery avatar, the spool and
the relay: what is known about a session, and the envelope of one message.
"""

import time

import attrs


@attrs.define
class SessionInfo:
    """
    What the server knows about one client connection.
    """

    sessionId: str
    clientAddress: str
    clientPort: int = 0
    helo: str = ""
    tlsVersion: str = ""
    tlsCipher: str = ""
    account: str = ""
    mechanism: str = ""
    #: Identities of the verified client certificate (R13), if any.
    clientCertificate: tuple[str, ...] = ()


@attrs.define
class Envelope:
    """
    The envelope of one message as accepted from the client.

    @ivar sender: the reverse-path, complete address or C{""} for C{<>}.
    @ivar recipients: forward-paths, complete addresses, in RCPT order.
    @ivar mailParams: MAIL parameters (upper-case keys), e.g. C{BODY},
        C{SMTPUTF8}, C{REQUIRETLS}, and the DSN's C{RET} and C{ENVID}
        (decoded from xtext: L{msa.xtext}); a keyword without a value maps
        to L{None}.
    @ivar recipientParams: the RCPT parameters of each recipient, in the
        order of C{recipients} (one L{dict} each, C{{}} when it had none):
        the DSN's C{NOTIFY} (C{"NEVER"} or e.g. C{"SUCCESS,FAILURE"}) and
        C{ORCPT} (C{"rfc822;address"} or C{"utf-8;address"}, decoded).
        Use L{parametersOf}: an envelope stored before this field existed
        has none.
    @ivar tlsRequiredNo: the message's header says C{TLS-Required: No}
        (RFC 8689 5) and its MAIL had no REQUIRETLS: the sender asks that
        it be delivered even where TLS cannot be had.
    @ivar queueId: set by the spool when the message is allocated.
    @ivar receivedAt: POSIX time of the DATA command; the server passes its
        reactor's C{seconds()} (one clock for the whole session), the
        default is only for envelopes made outside a session.
    """

    sender: str
    recipients: list[str]
    account: str = ""
    mailParams: dict[str, str | None] = attrs.Factory(dict)
    clientAddress: str = ""
    helo: str = ""
    queueId: str = ""
    receivedAt: float = attrs.Factory(time.time)
    recipientParams: list[dict[str, str | None]] = attrs.Factory(list)
    tlsRequiredNo: bool = False

    def parametersOf(self, index: int) -> dict[str, str | None]:
        """
        The RCPT parameters of the recipient at C{index} in C{recipients}.
        """
        if index < len(self.recipientParams):
            return self.recipientParams[index]
        return {}

    def toJSON(self) -> dict:
        """
        Its fields, as C{attrs.asdict} gives them (its containers copied),
        made directly: C{asdict} walks every value, and the spool asks this
        twice for each message it takes.
        """
        return {
            "sender": self.sender,
            "recipients": list(self.recipients),
            "account": self.account,
            "mailParams": dict(self.mailParams),
            "clientAddress": self.clientAddress,
            "helo": self.helo,
            "queueId": self.queueId,
            "receivedAt": self.receivedAt,
            "recipientParams": [dict(p) for p in self.recipientParams],
            "tlsRequiredNo": self.tlsRequiredNo,
        }

    @classmethod
    def fromJSON(cls, data: dict) -> "Envelope":
        return cls(
            **{a.name: data[a.name] for a in attrs.fields(cls) if a.name in data}
        )


@attrs.frozen
class StoredMessage:
    """
    One message in a company's mailbox (R16), as a POP3 session lists it.

    @ivar uid: the mailbox's unique id for it (POP3 UIDL): printable ASCII
        (0x21-0x7E), at most 70 characters, stable across restarts and never
        reused.
    @ivar size: its length in octets, CRLF line endings, before dot-stuffing.
    """

    uid: str
    size: int
