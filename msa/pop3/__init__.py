# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 server for companies (R16): return messages fetched with the
account, TLS policy and login of submission.
"""

from msa.pop3.factory import POP3Connections, POP3Factory, POP3Policy
from msa.pop3.realm import MailboxRealm
from msa.pop3.server import POP3Server, POP3Session

__all__ = [
    "MailboxRealm",
    "POP3Connections",
    "POP3Factory",
    "POP3Policy",
    "POP3Server",
    "POP3Session",
]
