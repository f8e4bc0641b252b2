# -*- test-case-name: tests.test_public_api -*-
"""
digipoort-msa: the SMTP Message Submission Agent of Digipoort (RFC 6409).

This package's namespace is the public API, what an embedder imports; the
modules behind it (C{msa.submission}, C{msa.queue}, ...) may change.  The
names are loaded on first use (PEP 562), so C{import msa} stays cheap and
the modules below can import C{msa} without a cycle.

The whole daemon, as C{twistd digipoort-msa} runs it:
  - L{loadConfig}: read and check a TOML configuration file.
  - L{buildService}: the assembled MSA, a C{MultiService} to start.
  - L{ConfigError}: a configuration the MSA refuses, naming file and key.

The pieces, to build your own (see README.rst, "Embedding"):
  - L{SubmissionFactory} and L{ServerPolicy}: the SMTP server a client
    talks to (a listener's limits and names).
  - L{serverContextFactory}: the TLS policy of a listener.
  - L{AccountFile}, L{AccountChecker}, L{SubmissionRealm}: the accounts
    file, the cred checker of every SASL mechanism, and the realm.
  - L{Account}, L{makeAccount}, L{readAccounts}, L{writeAccounts}: accounts
    and their file.
  - L{submissionFactory}: the avatar factory the realm takes (envelope
    rules, content policies, the spool).
  - L{ServerRules}, L{AccountRules}, L{ContentPolicyChain}: what the
    server and an account allow, and content policies (R12).
  - L{Spool}: the durable queue.
  - L{RelayRunner}, L{SMTPDownstream}, L{OutboxDownstream}: the queue
    runner and where it hands messages (the core MTA, or a directory).
  - L{SMTPReply}, L{Envelope}: a reply with its enhanced status code; a
    message's envelope.
  - The interfaces every box implements, to swap one: L{ISubmission},
    L{ISpool}, L{ISpoolWriter}, L{IAcceptedMessage}, L{IAccountStore},
    L{IContentPolicy}.

Fakes for testing code that plugs into the MSA: L{msa.testing}.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "loadConfig": "msa.service.config",
    "ConfigError": "msa.service.config",
    "buildService": "msa.service.tap",
    "SubmissionFactory": "msa.submission.server",
    "ServerPolicy": "msa.submission.server",
    "submissionFactory": "msa.submission.avatar",
    "serverContextFactory": "msa.tls",
    "AccountFile": "msa.accounts.filestore",
    "AccountChecker": "msa.accounts.checkers",
    "SubmissionRealm": "msa.accounts.checkers",
    "Account": "msa.accounts.model",
    "makeAccount": "msa.accounts.model",
    "readAccounts": "msa.accounts.model",
    "writeAccounts": "msa.accounts.model",
    "ServerRules": "msa.policy.authorization",
    "AccountRules": "msa.policy.authorization",
    "ContentPolicyChain": "msa.policy.content",
    "Spool": "msa.queue.spool",
    "RelayRunner": "msa.relay.runner",
    "SMTPDownstream": "msa.relay.client",
    "OutboxDownstream": "msa.relay.outbox",
    "SMTPReply": "msa.errors",
    "Envelope": "msa.envelope",
    "ISubmission": "msa.interfaces",
    "ISpool": "msa.interfaces",
    "ISpoolWriter": "msa.interfaces",
    "IAcceptedMessage": "msa.interfaces",
    "IAccountStore": "msa.interfaces",
    "IContentPolicy": "msa.interfaces",
}

__all__ = [
    "__version__",
    "loadConfig",
    "ConfigError",
    "buildService",
    "SubmissionFactory",
    "ServerPolicy",
    "submissionFactory",
    "serverContextFactory",
    "AccountFile",
    "AccountChecker",
    "SubmissionRealm",
    "Account",
    "makeAccount",
    "readAccounts",
    "writeAccounts",
    "ServerRules",
    "AccountRules",
    "ContentPolicyChain",
    "Spool",
    "RelayRunner",
    "SMTPDownstream",
    "OutboxDownstream",
    "SMTPReply",
    "Envelope",
    "ISubmission",
    "ISpool",
    "ISpoolWriter",
    "IAcceptedMessage",
    "IAccountStore",
    "IContentPolicy",
]

if TYPE_CHECKING:
    from msa.accounts.checkers import AccountChecker, SubmissionRealm
    from msa.accounts.filestore import AccountFile
    from msa.accounts.model import Account, makeAccount, readAccounts, writeAccounts
    from msa.envelope import Envelope
    from msa.errors import SMTPReply
    from msa.interfaces import (
        IAcceptedMessage,
        IAccountStore,
        IContentPolicy,
        ISpool,
        ISpoolWriter,
        ISubmission,
    )
    from msa.policy.authorization import AccountRules, ServerRules
    from msa.policy.content import ContentPolicyChain
    from msa.queue.spool import Spool
    from msa.relay.client import SMTPDownstream
    from msa.relay.outbox import OutboxDownstream
    from msa.relay.runner import RelayRunner
    from msa.service.config import ConfigError, loadConfig
    from msa.service.tap import buildService
    from msa.submission.avatar import submissionFactory
    from msa.submission.server import ServerPolicy, SubmissionFactory
    from msa.tls import serverContextFactory


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'msa' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
