# -*- test-case-name: tests.test_extensions -*-
"""
The SMTP service extensions a submission listener offers beyond those of
the spec example (R6), each of which the configuration can switch off
(C{[server] extensions}):

  - C{DSN} (RFC 3461): NOTIFY and ORCPT on RCPT, RET and ENVID on MAIL,
    checked and kept in the envelope;
  - C{SMTPUTF8} (RFC 6531): UTF-8 addresses and header fields for a
    transaction whose MAIL says SMTPUTF8;
  - C{CHUNKING} (RFC 3030): BDAT (L{msa.submission.chunking});
  - C{BINARYMIME} (RFC 3030): BODY=BINARYMIME, only with CHUNKING;
  - C{REQUIRETLS} (RFC 8689): the MAIL parameter, kept in the envelope;
  - C{LIMITS} (RFC 9422): C{RCPTMAX}, the recipients per message: the
    server's, or after AUTH the account's where it is lower (R10).  The
    submission side has no limit of transactions per session nor of
    recipient domains, so C{MAILMAX} and C{RCPTDOMAINMAX} are not sent.

They are advertised over TLS only: before STARTTLS nothing but EHLO,
NOOP, QUIT and STARTTLS is honoured (R3), and the reply there stays the
spec example's.  A keyword switched off is not advertised, and the
parameters it brings are unknown (555 5.5.4,
L{msa.submission.parameters.offeredParameters}).

Whether the Digipoort core speaks SMTPUTF8, BINARYMIME or REQUIRETLS is
not known when a message is accepted: the MSA advertises what it can take
and store, and the relay bounces a message the core cannot take as it was
given (see README.rst).
"""

#: Every extension of this module, the default of C{[server] extensions}.
EXTENSION_NAMES = ("DSN", "SMTPUTF8", "CHUNKING", "BINARYMIME", "LIMITS", "REQUIRETLS")
ALL_EXTENSIONS = frozenset(EXTENSION_NAMES)

#: The order in which EHLO lists them.
_ORDER = ("DSN", "SMTPUTF8", "CHUNKING", "BINARYMIME", "REQUIRETLS")


def offeredExtensions(configured: frozenset[str] | set[str]) -> frozenset[str]:
    """
    The extensions a listener offers when the configuration names
    C{configured}: BINARYMIME only with CHUNKING (RFC 3030 3).
    """
    offered = frozenset(configured) & ALL_EXTENSIONS
    if "CHUNKING" not in offered:
        offered -= {"BINARYMIME"}
    return offered


def extensionKeywords(offered: frozenset[str], maxRecipients: int) -> list[str]:
    """
    The EHLO lines of the extensions offered, over TLS.

    @param maxRecipients: the recipients per message of this session (the
        account's limit after AUTH, where it is lower).
    """
    lines = [keyword for keyword in _ORDER if keyword in offered]
    if "LIMITS" in offered:
        lines.append(f"LIMITS RCPTMAX={maxRecipients}")
    return lines
