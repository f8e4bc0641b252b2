"""
Shared test fixtures: an in-memory portal and spool for protocol unit tests
(no sockets, no disk: the real spool and real sockets are exercised by the
end-to-end tests), and a harness that drives a L{SubmissionServer} over a
L{StringTransport}.
"""

import base64
import io

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from msa.delivery import submissionFactory
from msa.interfaces import ISpool, ISpoolWriter, ISubmission
from msa.server import ServerPolicy, SubmissionFactory

#: What the unit-test account may use as senders.
SENDERS = ["@example.nl", "@mijnbedrijf.nl", "@mijn-bedrijf.nl"]


@attrs.define
class FakeAccount:
    name: str
    extra: dict = attrs.Factory(lambda: {"senders": list(SENDERS)})


@implementer(ISpoolWriter)
class MemoryWriter:
    def __init__(self, spool, envelope):
        self.spool = spool
        self.envelope = envelope
        self.queueId = envelope.queueId
        self.data = io.BytesIO()
        self.aborted = False

    def write(self, data):
        self.data.write(data)

    def commit(self):
        self.spool.committed.append((self.envelope, self.data.getvalue()))
        return defer.succeed(self.queueId)

    def abort(self):
        self.aborted = True


@implementer(ISpool)
class MemorySpool:
    """
    Stands in for L{msa.spool.Spool} where only the protocol is under test.
    """

    def __init__(self):
        self.committed = []
        self.writers = []
        self.counter = 0

    def newMessage(self, envelope):
        self.counter += 1
        envelope.queueId = f"Q{self.counter:04d}"
        writer = MemoryWriter(self, envelope)
        self.writers.append(writer)
        return writer


class SimpleRealm:
    def __init__(
        self, spool, hostname, serverRules=None, extras=None, contentPolicy=None
    ):
        self.makeSubmission = submissionFactory(
            spool, hostname, serverRules, contentPolicy
        )
        self.extras = extras or {}

    def requestAvatar(self, avatarId, mind, *interfaces):
        if ISubmission not in interfaces:
            raise NotImplementedError()
        name = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        account = FakeAccount(name)
        if name in self.extras:
            account.extra = self.extras[name]
        avatar = self.makeSubmission(account)
        return ISubmission, avatar, getattr(avatar, "logout", lambda: None)


@implementer(ICredentialsChecker)
class MemoryChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users):
        self.users = users

    def requestAvatarId(self, credentials):
        password = self.users.get(credentials.username)
        if password is not None and credentials.checkPassword(password):
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin())


def memoryPortal(spool, hostname="msa.example.nl", users=None, **realmArgs):
    checker = MemoryChecker(users or {"alice": "wonderland"})
    return Portal(SimpleRealm(spool, hostname, **realmArgs), [checker])


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A StringTransport that can "start TLS", recording the call.
    """

    tlsStarted = False

    def startTLS(self, contextFactory, *args):
        self.tlsStarted = True


class Harness:
    """
    One server protocol on a string transport, with helpers to talk to it.
    """

    def __init__(
        self,
        testCase,
        implicitTLS=False,
        clock=None,
        factory=None,
        realmArgs=None,
        users=None,
        peer="192.0.2.1",
        **policyArgs,
    ):
        policyArgs.setdefault("hostname", "msa.example.nl")
        self.spool = MemorySpool()
        self.policy = ServerPolicy(implicitTLS=implicitTLS, **policyArgs)
        self.clock = clock if clock is not None else Clock()
        self.factory = factory or SubmissionFactory(
            memoryPortal(self.spool, self.policy.hostname, users, **(realmArgs or {})),
            self.policy,
            tlsContextFactory=object(),
            reactor=self.clock,
        )
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.server = self.factory.buildProtocol(None)
        self.server.callLater = self.clock.callLater
        self.server.makeConnection(self.transport)
        testCase.addCleanup(self.close)

    def close(self):
        if self.server.transport is not None:
            self.server.connectionLost(None)
        self.server.setTimeout(None)

    def send(self, data: bytes) -> list[bytes]:
        """
        Send raw bytes; return the reply lines the server sent since.
        """
        self.transport.clear()
        self.server.dataReceived(data)
        self.settle()
        return self.transport.value().split(b"\r\n")[:-1]

    def settle(self, limit: float = 20.0):
        """
        Let the fake clock run while the server holds back a reply (the
        failed-login delay), up to C{limit} seconds.
        """
        self.clock.advance(0)
        waited = 0.0
        while self.server._waiting and waited < limit:
            self.clock.advance(0.25)
            waited += 0.25
        self.waited = waited

    def command(self, line: bytes) -> list[bytes]:
        return self.send(line + b"\r\n")

    def startTLS(self):
        self.command(b"STARTTLS")
        self.command(b"EHLO client.example.nl")

    def login(self, user=b"alice", password=b"wonderland"):
        if not self.server._tls:
            self.startTLS()
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        return self.command(b"AUTH PLAIN " + token)

    def transaction(self, sender=b"a@example.nl", recipients=(b"b@example.nl",)):
        self.command(b"MAIL FROM:<" + sender + b">")
        for r in recipients:
            self.command(b"RCPT TO:<" + r + b">")
        return self.command(b"DATA")
