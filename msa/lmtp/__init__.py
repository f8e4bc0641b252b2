# -*- test-case-name: tests.test_lmtp -*-
"""
Delivery of return messages from the core MTA over LMTP (RFC 2033, R16)
into the companies' mailboxes (L{msa.interfaces.IMailboxStore}).
"""

from msa.lmtp.access import AddressAllowlist
from msa.lmtp.server import LMTPFactory, LMTPPolicy, LMTPServer

__all__ = ["AddressAllowlist", "LMTPFactory", "LMTPPolicy", "LMTPServer"]
