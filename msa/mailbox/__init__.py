# -*- test-case-name: tests.test_mailbox -*-
"""
Where return messages wait for their company (R16): the mailbox store the
LMTP server delivers into and the POP3 server reads from
(L{msa.interfaces.IMailboxStore}).  It never speaks a protocol.
"""

from msa.mailbox.listing import MailboxEntry
from msa.mailbox.maildir import MaildirStore, Quota
from msa.mailbox.names import (
    accountDirectoryName,
    decodeAccountDirectory,
    newUid,
    parseMessageName,
)
from msa.mailbox.session import MaildirMailbox

__all__ = [
    "MailboxEntry",
    "MaildirMailbox",
    "MaildirStore",
    "Quota",
    "accountDirectoryName",
    "decodeAccountDirectory",
    "newUid",
    "parseMessageName",
]
