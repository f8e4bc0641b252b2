# -*- test-case-name: tests.test_proxy -*-
"""
The PROXY protocol (v1 and v2, as HAProxy sends it) in front of the SMTP
listeners, for running several MSA instances behind a load balancer.

Twisted's own C{haproxy:} endpoint starts the wrapped protocol before the
PROXY header has arrived: an SMTP server would greet, and note the client's
address, too early, and would greet a client that sent no header at all.
This wrapper starts the SMTP session only once the header has been read, so
the greeting, the connection limits, the log and the Received header all see
the real client's address; a connection without a valid header within
C{headerTimeout} seconds is closed without a word.

The wrapper is built on Twisted's public L{ProtocolWrapper}; only the header
parsers are private to Twisted, and come through L{msa._compat}.
"""

from twisted.internet.interfaces import IAddress, IHandshakeListener, ILoggingContext
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from msa._compat import InvalidProxyHeader, ProxyInfo, V1Parser, V2Parser

PREFIX = "haproxy:"


@implementer(IHandshakeListener)
class ProxyHeaderWrapper(ProtocolWrapper):
    """
    Reads the PROXY header, then starts the wrapped protocol with the
    header's addresses as its peer and host.
    """

    headerTimeout = 10.0
    _started = False
    _timer = None

    def __init__(
        self, factory: "WrappingFactory[ProxyHeaderWrapper]", wrappedProtocol
    ) -> None:
        super().__init__(factory, wrappedProtocol)
        #: The parsed header (source, destination), once complete.
        self._proxyInfo: ProxyInfo | None = None
        self._parser: V1Parser | V2Parser | None = None

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        reactor = self.factory.reactor
        self._timer = reactor.callLater(self.headerTimeout, self.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            if data[:12] == V2Parser.PREFIX:
                self._parser = V2Parser()
            elif data[:5] == V1Parser.PROXYSTR:
                self._parser = V1Parser()
            else:
                self.loseConnection()
                return
        try:
            self._proxyInfo, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self.loseConnection()
            return
        if self._proxyInfo is None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._started = True
        # A ProtocolWrapper is its wrapped protocol's transport (as in
        # twisted.protocols.policies); Twisted's stubs do not say so.
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def handshakeCompleted(self) -> None:
        """
        STARTTLS under the PROXY header: TLS wraps this wrapper, so pass the
        end of the handshake on to the SMTP session (its handshake deadline
        and its log of the TLS version depend on it).
        """
        if self._started and IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    def getPeer(self) -> IAddress:
        if self._proxyInfo is not None and self._proxyInfo.source:
            return self._proxyInfo.source
        assert self.transport is not None
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._proxyInfo is not None and self._proxyInfo.destination:
            return self._proxyInfo.destination
        assert self.transport is not None
        return self.transport.getHost()


class ProxyHeaderFactory(WrappingFactory):
    protocol = ProxyHeaderWrapper

    def __init__(self, wrappedFactory, reactor) -> None:
        super().__init__(wrappedFactory)
        self.reactor = reactor

    def logPrefix(self) -> str:
        """
        The wrapped factory's log prefix, marked as behind the PROXY header
        (as Twisted's own C{HAProxyWrappingFactory} does).
        """
        if ILoggingContext.providedBy(self.wrappedFactory):
            logPrefix = self.wrappedFactory.logPrefix()
        else:
            logPrefix = self.wrappedFactory.__class__.__name__
        return f"{logPrefix} (PROXY)"


def splitDescription(description: str) -> tuple[bool, str]:
    """
    @return: whether a listener description asks for the PROXY protocol, and
        the description of the endpoint under it.
    """
    if description.startswith(PREFIX):
        return True, description[len(PREFIX) :]
    return False, description
