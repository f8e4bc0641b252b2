# -*- test-case-name: tests.test_selftest_plain -*-
"""
A plain C{twisted.mail} ESMTP server, with the defaults the MSA exists to
fix (no R3 gate before STARTTLS, AUTH offered in the clear, the STARTTLS
injection, bare LFs taken in the data): the server
the self-test's failing cases run against (L{tests.test_selftest_plain},
L{tests.test_selftest_smuggling}).  It takes every message and discards
it.
"""

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, endpoints, reactor
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from zope.interface import implementer

from tests.e2e import freePort


@implementer(IMessageSMTP)
class DiscardedMessage:
    def lineReceived(self, line):
        pass

    def eomReceived(self):
        return defer.succeed(None)

    def connectionLost(self):
        pass


@implementer(IMessageDelivery)
class AnyDelivery:
    def receivedHeader(self, helo, origin, recipients):
        return b"Received: by a plain twisted.mail server"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return DiscardedMessage


@implementer(IRealm)
class DeliveryRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        return IMessageDelivery, AnyDelivery(), lambda: None


class ESMTPFactory(smtp.SMTPFactory):
    """
    What Twisted's documentation has an ESMTP server do: L{smtp.ESMTP}
    with the LOGIN and PLAIN challengers, a portal, and a context factory
    for STARTTLS; every other setting Twisted's default.
    """

    protocol = smtp.ESMTP
    domain = b"localhost"

    def __init__(self, portal, contextFactory):
        super().__init__(portal)
        self.contextFactory = contextFactory

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.challengers = {
            b"LOGIN": smtp.LOGINCredentials,
            b"PLAIN": PLAINCredentials,
        }
        p.ctx = self.contextFactory
        return p


class BareLFESMTP(smtp.ESMTP):
    """
    An ESMTP server that takes a bare LF for a line end, as some old
    servers did: the smuggling target.
    """

    def dataReceived(self, data):
        super().dataReceived(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def listenPlainTwisted(
    testCase, contextFactory, implicit: bool = False, protocol=None
) -> int:
    """
    Listen on a free loopback port with L{ESMTPFactory} (account alice,
    password wonderland): STARTTLS, or TLS from the first byte, with
    C{contextFactory}; stopped in the test's cleanup.

    @param protocol: instead of L{smtp.ESMTP}, e.g. L{BareLFESMTP}.
    @return: the port.
    """
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(b"alice", b"wonderland")
    factory = ESMTPFactory(Portal(DeliveryRealm(), [checker]), contextFactory)
    if protocol is not None:
        factory.protocol = protocol
    port = freePort()
    if implicit:
        endpoint = endpoints.SSL4ServerEndpoint(
            reactor, port, contextFactory, interface="127.0.0.1"
        )
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    d = endpoint.listen(factory)
    d.addCallback(lambda listening: testCase.addCleanup(listening.stopListening))
    return port
