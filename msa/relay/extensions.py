# -*- test-case-name: tests.test_relay_extensions -*-
"""
What a message's SMTP extensions (issue 21) ask of the core MTA, judged
from the core's EHLO keywords before anything is sent: the parameters of
the MAIL and RCPT commands (L{mailFromLine}, L{rcptLine}), whether the
message goes with BDAT (L{usesChunking}), and the permanent refusal of a
message the core cannot take as it is (L{localRefusal}): never a silent
downgrade.

  - SMTPUTF8 (RFC 6531): passed on to a core that offers it; towards one
    that does not, the message is refused here with 553 5.6.7 (section
    3.7.5) and bounces.
  - BINARYMIME (RFC 3030): sent with BDAT to a core that offers CHUNKING
    and BINARYMIME; otherwise refused here with 554 5.6.3 (conversion
    required but not supported).
  - REQUIRETLS (RFC 8689): passed on over verified TLS to a core that
    offers it; otherwise refused here with 550 5.7.10.
  - DSN (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT, to a
    core that offers DSN, re-encoded from the decoded envelope
    (L{msa.xtext}).
"""

from __future__ import annotations

from msa.queue.dsnparams import encodeOriginalRecipient, recipientParameters
from msa.queue.spool import SpoolEntry
from msa.relay.protocol import Reply
from msa.xtext import encodeXtext

#: Our reply when the core lacks SMTPUTF8 for a message that needs it.
NO_SMTPUTF8 = Reply(
    553, ("5.6.7 the core MTA does not offer SMTPUTF8, which this message needs",)
)
#: Our reply when the core cannot take a BODY=BINARYMIME message.
NO_BINARYMIME = Reply(
    554,
    (
        "5.6.3 the core MTA does not offer BINARYMIME and CHUNKING: conversion "
        "required but not supported",
    ),
)
#: Our reply when REQUIRETLS cannot be honoured.
NO_REQUIRETLS = Reply(
    550, ("5.7.10 REQUIRETLS support required: the core MTA does not offer it",)
)
#: Our reply when REQUIRETLS is asked and the relay runs without TLS.
NO_VERIFIED_TLS = Reply(
    550, ("5.7.10 REQUIRETLS support required: the relay runs without TLS",)
)


def _params(entry: SpoolEntry) -> dict[str, str | None]:
    return entry.envelope.mailParams or {}


def isBinaryMIME(entry: SpoolEntry) -> bool:
    """
    Whether C{entry} was declared C{BODY=BINARYMIME}.
    """
    return (_params(entry).get("BODY") or "").upper() == "BINARYMIME"


def usesChunking(entry: SpoolEntry, extensions: dict[str, str]) -> bool:
    """
    Whether C{entry} goes to the core with BDAT rather than DATA: a
    BINARYMIME message (which DATA cannot carry), to a core that offers
    CHUNKING (and BINARYMIME: L{localRefusal} refused it otherwise).
    """
    return isBinaryMIME(entry) and "CHUNKING" in extensions


def localRefusal(
    entry: SpoolEntry, extensions: dict[str, str], verifiedTLS: bool
) -> Reply | None:
    """
    The permanent refusal of C{entry} by the relay itself, when the core
    (its EHLO keywords C{extensions}) cannot take the message as it is.

    @param verifiedTLS: whether the connection to the core is TLS with a
        verified certificate.
    @return: the reply (5xx) or L{None} when the message can go.
    """
    params = _params(entry)
    if "SMTPUTF8" in params and "SMTPUTF8" not in extensions:
        return NO_SMTPUTF8
    if isBinaryMIME(entry) and not {"BINARYMIME", "CHUNKING"} <= extensions.keys():
        return NO_BINARYMIME
    if "REQUIRETLS" in params:
        if not verifiedTLS:
            return NO_VERIFIED_TLS
        if "REQUIRETLS" not in extensions:
            return NO_REQUIRETLS
    return None


def mailFromLine(entry: SpoolEntry, extensions: dict[str, str]) -> bytes:
    """
    The MAIL command for C{entry}, with the parameters the client declared
    and the core understands (C{extensions}, from its EHLO reply).
    """
    params = _params(entry)
    line = b"MAIL FROM:<" + entry.envelope.sender.encode("utf-8") + b">"
    body = params.get("BODY")
    if body:
        line += b" BODY=" + body.upper().encode("ascii")
    elif entry.eightBit and "8BITMIME" in extensions:
        line += b" BODY=8BITMIME"
    if "SMTPUTF8" in params and "SMTPUTF8" in extensions:
        line += b" SMTPUTF8"
    if "SIZE" in extensions:
        line += b" SIZE=%d" % (entry.size,)
    if "DSN" in extensions:
        ret, envid = params.get("RET"), params.get("ENVID")
        if ret:
            line += b" RET=" + ret.upper().encode("ascii")
        if envid:
            line += b" ENVID=" + encodeXtext(envid).encode("ascii")
    if "REQUIRETLS" in params and "REQUIRETLS" in extensions:
        line += b" REQUIRETLS"
    return line


def rcptLine(entry: SpoolEntry, recipient: str, extensions: dict[str, str]) -> bytes:
    """
    The RCPT command for C{recipient} of C{entry}, with its C{NOTIFY} and
    C{ORCPT} when the core offers DSN.
    """
    line = b"RCPT TO:<" + recipient.encode("utf-8") + b">"
    if "DSN" not in extensions:
        return line
    params = recipientParameters(entry.envelope, recipient)
    notify, orcpt = params.get("NOTIFY"), params.get("ORCPT")
    if notify:
        line += b" NOTIFY=" + notify.upper().encode("ascii")
    if orcpt:
        utf8 = "SMTPUTF8" in _params(entry)
        line += b" ORCPT=" + encodeOriginalRecipient(orcpt, utf8).encode("utf-8")
    return line
