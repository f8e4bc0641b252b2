# -*- test-case-name: tests.test_errors -*-
"""
SMTP replies as exceptions: any layer can refuse with the exact code,
enhanced status code (RFC 3463) and text the client must see.
"""


class SMTPReply(Exception):
    """
    A reply to send to the client instead of the normal one.

    @ivar code: the three-digit reply code, L{int}.
    @ivar status: the enhanced status code, L{str} such as C{"5.7.1"}.
    @ivar text: human-readable text, L{str} (ASCII).
    """

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(code, status, text)
        self.code = code
        self.status = status
        self.text = text

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def line(self) -> bytes:
        """
        The reply as it goes on the wire, without CRLF.
        """
        return f"{self.code} {self.status} {self.text}".encode("ascii", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class LimitsUnavailable(Exception):
    """
    The shared limits store (Redis, C{[limits] backend = "redis"}) cannot
    be reached, or gave no usable answer in time: a limit cannot be
    checked, so the client gets a temporary reply (or, with C{fallback =
    "local"}, the instance counts on its own).
    """


class MailboxInUse(Exception):
    """
    Another POP3 session holds the lock on this mailbox (RFC 2449's
    C{[IN-USE]} response code; Dovecot's C{pop3_lock_session}).
    """
