# -*- test-case-name: tests.test_server -*-
"""
The phase of a submission session: what the next line from the client is.
The server protocol (L{msa.submission.server.SubmissionServer}) holds one
L{SessionPhase}; the objects it owns (the AUTH exchange, the mail
transaction, the deadlines) read it and ask the server to change it.
"""

import enum


class SessionPhase(enum.Enum):
    """
    What the next line from the client is.

    A TLS handshake in progress is not a phase of its own: the TLS layer
    delivers nothing before it completes, and it may be pending in any
    phase (an implicit-TLS connection refused with 421 is L{CLOSING} while
    its handshake has not finished).  The deadlines track it.
    """

    #: A command, on a connection without TLS yet: only NOOP, EHLO, QUIT
    #: and STARTTLS are honoured (R3).
    BEFORE_TLS = "before TLS"
    #: A command, over TLS.
    COMMAND = "command"
    #: A line of the SASL exchange: the response to a 334 challenge, or the
    #: empty line after the server's final data.
    AUTH_EXCHANGE = "AUTH exchange"
    #: A line of message text, from the 354 to the final dot.
    DATA = "DATA"
    #: The octets of a BDAT chunk (RFC 3030), as they are: not lines.
    CHUNK = "BDAT chunk"
    #: The server has said its last word (421, 221) or the connection is
    #: gone: no input is processed and nothing more is said.  Final.
    CLOSING = "closing"
