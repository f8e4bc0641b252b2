"""
A POP3 session without sockets: the real L{msa.pop3} server, factory,
realm and cred checker over an in-memory mailbox store
(L{msa.testing.MemoryMailboxStore}), on a string transport that pretends
to start TLS, driven by a L{Clock}.
"""

import base64
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from msa.accounts.checkers import AccountChecker
from msa.accounts.clientcert import CertificateBindingRealm
from msa.accounts.model import Account
from msa.policy.authorization import AuthThrottle
from msa.pop3 import MailboxRealm, POP3Factory, POP3Policy
from msa.sasl import MechanismContext
from msa.testing import MemoryAccountStore, MemoryMailboxStore, TLSStringTransport
from tests.e2e import fixtureAccount

PASSWORDS = {"alice": "wonderland", "bob": "builder pass", "carol": "c4rol"}


def account(name: str) -> Account:
    """
    A test account with its password from L{PASSWORDS}; made once (its
    hashes cost: L{fixtureAccount}).
    """
    return fixtureAccount(name, PASSWORDS[name])


def runAtOnce(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args, **kwargs)


class POP3Harness:
    """
    One POP3 connection to a fresh server.

    @ivar mailboxes: the L{MemoryMailboxStore}; seed it with C{add}.
    @ivar audit: the audit records (event, fields) appended.
    @param checker: the cred checker; by default the real one (scrypt).
    """

    def __init__(
        self,
        mailboxes: MemoryMailboxStore | None = None,
        client: str = "192.0.2.7",
        factory: POP3Factory | None = None,
        checker: Any = None,
        **policy: Any,
    ) -> None:
        self.clock = Clock()
        self.mailboxes = mailboxes if mailboxes is not None else MemoryMailboxStore()
        self.audit: list[tuple[str, dict]] = []
        if factory is None:
            self.accounts = MemoryAccountStore(account(n) for n in PASSWORDS)
            realm = CertificateBindingRealm(
                MailboxRealm(self.accounts, self.mailboxes), self.accounts
            )
            if checker is None:
                checker = AccountChecker(self.accounts, threaded=False)
            portal = Portal(realm, [checker])
            factory = POP3Factory(
                portal,
                POP3Policy(**policy),
                tlsContextFactory=object(),
                mechanismContext=MechanismContext(
                    scramParameters=self.accounts.scramParameters
                ),
                authThrottle=AuthThrottle(clock=self.clock.seconds),
                audit=self,
                reactor=self.clock,
                runBlocking=runAtOnce,
            )
        self.factory = factory
        self.connect(client)

    def append(self, event: str, **fields: Any) -> int:
        """
        The audit log's C{append}, recorded.
        """
        self.audit.append((event, fields))
        return len(self.audit)

    def connect(self, client: str = "192.0.2.7") -> bytes:
        """
        A new connection to the same factory; returns the greeting.
        """
        self.transport = TLSStringTransport(
            peerAddress=IPv4Address("TCP", client, 40000)
        )
        self.server = self.factory.buildProtocol(None)
        self.server.makeConnection(self.transport)
        return self.take()

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, data: bytes, settle: float = 60.0) -> bytes:
        """
        Send raw bytes; let the clock run past any throttle delay; return
        what the server answered.
        """
        self.server.dataReceived(data)
        self.clock.advance(0)
        for _ in range(int(settle)):
            if not self.clock.getDelayedCalls() or self.server._waiting is False:
                break
            self.clock.advance(1)
        return self.take()

    def command(self, line: bytes) -> bytes:
        return self.send(line + b"\r\n")

    def secure(self) -> None:
        assert self.command(b"STLS").startswith(b"+OK")
        assert self.transport.tlsStarted

    def login(self, user: str = "alice", password: str | None = None) -> bytes:
        """
        STLS, USER and PASS; returns the answer to PASS.
        """
        if not self.server.secure:
            self.secure()
        self.command(b"USER " + user.encode())
        pw = PASSWORDS[user] if password is None else password
        return self.command(b"PASS " + pw.encode())

    def authPlain(self, user: str, password: str) -> bytes:
        data = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        return self.command(b"AUTH PLAIN " + data)

    def drop(self) -> None:
        """
        The connection goes away without QUIT.
        """
        self.server.connectionLost(Failure(ConnectionLost()))
