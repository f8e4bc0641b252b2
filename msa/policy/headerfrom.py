# -*- test-case-name: tests.test_headerfrom,tests.test_fromspoofing -*-
"""
The author fields of a submission, for an account with C{requireHeaderFrom}
(R9): C{From:} and C{Sender:} may name only the account's own addresses,
and must read the same to every reader.

A field is read by the strict reader (L{msa.policy.mailboxes}); one with a
defect is refused (C{550 5.6.0}).  A field it accepts is read again by two
lenient readers, Python's modern one (C{email.headerregistry}) and its
legacy one (C{email.utils.getaddresses}, which on Python 3.11 reads
C{ceo@belastingdienst.nl ik@acme.nl} as C{@acme.nl}); unless both name the
very same mailboxes without complaint, the field is refused as malformed
too: what one reader shows must be what the account was checked for.

A second C{From:} or C{Sender:} field is refused rather than checked:
RFC 5322 3.6 allows one, and readers differ in which one they show.
Groups (RFC 6854) are refused: a submission names its author.
"""

import email.policy
import email.utils
from email import errors
from typing import Protocol

from msa.errors import SMTPReply
from msa.policy.mailboxes import Mailbox, readMailboxes, splitAddrSpec


class AuthorizedSenders(Protocol):
    """
    The addresses issued to an account (L{msa.policy.authorization.AddressList}).
    """

    def matchesMailbox(self, localPart: str, domain: str) -> bool: ...


def _malformed(name: str, why: str | None = None) -> SMTPReply:
    text = f"Message refused: malformed {name}: header field"
    if why is not None:
        text += f" ({why})"
    return SMTPReply(550, "5.6.0", text)


#: What C{email.headerregistry} says of an unquoted period in a display
#: name, and the note that may come with it.
OBS_PHRASE = "period in 'phrase'"
OBS_PHRASE_NOTES = frozenset({OBS_PHRASE, "comment found without atom"})


def _readersAgree(
    value: str, mailboxes: tuple[Mailbox, ...], utf8: bool = False
) -> bool:
    """
    Whether the lenient readers name exactly C{mailboxes}, in order, and
    find nothing wrong (but, with C{utf8}, a non-ASCII local part).
    """
    strict = [(m.localPart, m.domain.lower()) for m in mailboxes]
    try:
        header = email.policy.default.header_factory("From", value)
        defects = [
            str(d)
            for d in header.defects
            if not (utf8 and isinstance(d, errors.NonASCIILocalPartDefect))
        ]
        if OBS_PHRASE in defects:
            # "Acme B.V. <ik@acme.nl>": RFC 5322 4.1 obs-phrase, which the
            # strict reader accepts on purpose (Dutch company names end in
            # "B.V."), and which headerregistry notes (with the period it
            # then takes for a word of its own); the mailboxes must still
            # agree below.
            defects = [d for d in defects if d not in OBS_PHRASE_NOTES]
        if defects:
            return False
        modern = [(a.username, a.domain.lower()) for a in header.addresses]
        legacy = []
        for _, address in email.utils.getaddresses([value]):
            local, domain = splitAddrSpec(address)
            legacy.append((local, domain.lower()))
    except Exception:
        return False
    return strict == modern == legacy


def authorMailboxes(name: str, value: str, utf8: bool = False) -> tuple[Mailbox, ...]:
    """
    The mailboxes of a C{From:} or C{Sender:} field body (C{name} says
    which), read strictly and checked against the lenient readers.  With
    C{utf8} (the message came with SMTPUTF8) they may be UTF-8 addresses.

    @raise SMTPReply: C{550 5.6.0} when the field is malformed, holds a
        group, is a C{Sender:} without exactly one mailbox, or reads
        differently to a lenient reader.
    """
    reading = readMailboxes(value, utf8)
    if reading.defects:
        raise _malformed(name, reading.defects[0])
    if reading.groups:
        raise _malformed(name, "a group is not accepted")
    if name == "Sender" and len(reading.mailboxes) != 1:
        raise _malformed(name, "it must hold exactly one mailbox")
    if reading.mailboxes and not _readersAgree(value, reading.mailboxes, utf8):
        raise _malformed(name)
    return reading.mailboxes


def checkAuthorFields(headers, senders: AuthorizedSenders, utf8: bool = False) -> None:
    """
    Refuse a message whose C{From:} or C{Sender:} names a mailbox outside
    C{senders}, or that cannot be read unambiguously.

    @param headers: L{msa.policy.content.Headers}.
    @raise SMTPReply: C{550 5.6.0} for a malformed or repeated field,
        C{550 5.7.1} for a missing C{From:} or a foreign mailbox.
    """
    fields = {name: headers.getAll(name) for name in ("From", "Sender")}
    for name, values in fields.items():
        if len(values) > 1:
            raise SMTPReply(
                550,
                "5.6.0",
                f"Message refused: more than one {name}: header field (RFC 5322 3.6)",
            )
    named = []
    for name, values in fields.items():
        for mailbox in authorMailboxes(name, values[0], utf8) if values else ():
            named.append((name, mailbox))
    if not any(name == "From" for name, _ in named):
        raise SMTPReply(550, "5.7.1", "Message refused: no From: address")
    for name, mailbox in named:
        if not senders.matchesMailbox(mailbox.localPart, mailbox.domain):
            raise SMTPReply(
                550,
                "5.7.1",
                f"Message refused: {name}: <{mailbox.addrSpec}> is not an "
                "address of the authenticated account",
            )
