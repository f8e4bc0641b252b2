# -*- test-case-name: tests.test_dsn_notify -*-
"""
What a client's DSN parameters (RFC 3461), kept decoded in the envelope,
ask of the MSA's own notifications (L{msa.queue.dsn}) and of the relay
(L{msa.relay.extensions}): which actions a recipient's C{NOTIFY} asks
notices for (L{wantsNotice}), and its C{ORCPT} encoded again
(L{encodeOriginalRecipient}) for a RCPT or an C{Original-Recipient} field.
"""

from msa.envelope import Envelope
from msa.xtext import encodeUtf8AddrXtext, encodeXtext

FAILED = "failed"
DELAYED = "delayed"
#: Handed to a core that does not offer DSN (RFC 3464 2.3.3): the
#: notice for a recipient whose NOTIFY asked for SUCCESS.
RELAYED = "relayed"

#: The NOTIFY keyword that asks for each action's notice.
_NOTIFY_KEYWORDS = {FAILED: "FAILURE", DELAYED: "DELAY", RELAYED: "SUCCESS"}


def recipientParameters(envelope: Envelope, recipient: str) -> dict[str, str | None]:
    """
    The RCPT parameters C{recipient} was given in C{envelope}.
    """
    try:
        return envelope.parametersOf(envelope.recipients.index(recipient))
    except ValueError:
        return {}


def wantsNotice(envelope: Envelope, recipient: str, action: str) -> bool:
    """
    Whether the client asked (RFC 3461 4.1 NOTIFY) for a notice of
    C{action} about C{recipient}: without NOTIFY, yes for L{FAILED} and
    L{DELAYED} (this MSA's default, as before DSN was offered) and no for
    L{RELAYED}.
    """
    notify = recipientParameters(envelope, recipient).get("NOTIFY")
    if not notify:
        return action != RELAYED
    return _NOTIFY_KEYWORDS[action] in notify.upper().split(",")


def encodeOriginalRecipient(orcpt: str, utf8: bool = False) -> str:
    """
    The value of an C{ORCPT} parameter or an C{Original-Recipient} field
    for a decoded C{"addr-type;address"}: the address as xtext, or as
    utf-8-addr-xtext for the C{utf-8} type (RFC 6533 3), its non-ASCII
    characters kept only when C{utf8} (the message goes with SMTPUTF8),
    otherwise written as C{\\x{HEX}}.
    """
    kind, _, address = orcpt.partition(";")
    if kind.lower() != "utf-8":
        return f"{kind};{encodeXtext(address)}"
    encoded = encodeUtf8AddrXtext(address)
    if not utf8:
        encoded = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in encoded)
    return f"{kind};{encoded}"
