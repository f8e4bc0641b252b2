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

Only the balancer may send the header: whoever else can connect could claim
any client address, and so escape the limits per client, the login
throttle and the audit record's address.  A connection from a peer outside
C{[server] proxy_from} (L{ProxyAllowlist}) is closed before a byte of it is
read, and logged (L{RefusalLog}, at most one line a minute per listener).

The wrapper is built on Twisted's public L{ProtocolWrapper}; only the header
parsers are private to Twisted, and come through L{msa._compat}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IHandshakeListener, ILoggingContext
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from msa._compat import InvalidProxyHeader, ProxyInfo, V1Parser, V2Parser

PREFIX = "haproxy:"

log = Logger()

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class ProxyAllowlist:
    """
    The peers that may send a PROXY header (C{[server] proxy_from}):
    addresses and networks, IPv4 and IPv6.  A UNIX socket's peer is always
    allowed: who may connect to it is decided by the socket file's
    permissions.
    """

    networks: tuple[_Network, ...]

    @classmethod
    def parse(cls, entries: Sequence[str]) -> ProxyAllowlist:
        """
        @param entries: addresses (C{"127.0.0.1"}, C{"::1"}) or networks
            (C{"10.0.0.0/24"}).
        @raise ValueError: naming the entry that is neither.
        """
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(str(entry), strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return cls(tuple(networks))

    def allows(self, peer: IAddress) -> bool:
        """
        Whether C{peer} (the connection's own peer, not a header's) may send
        the PROXY header.
        """
        if isinstance(peer, UNIXAddress):
            return True
        internet = internetAddress(peer)
        if internet is None:
            return False
        try:
            address = ipaddress.ip_address(internet[0].split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class RefusalLog:
    """
    The WARNING line for a connection refused for its peer, at most one per
    C{interval} seconds, so that a flood of such connections cannot fill
    the disk; the next line after a quiet interval says how many were
    refused without a line of their own.
    """

    interval = 60.0

    def __init__(self, listener: str, reactor) -> None:
        self.listener = listener
        self.reactor = reactor
        self._lastLogged: float | None = None
        self._unlogged = 0

    def refused(self, peer: IAddress | None) -> None:
        now = self.reactor.seconds()
        if self._lastLogged is not None and now - self._lastLogged < self.interval:
            self._unlogged += 1
            return
        log.warn(
            "PROXY header refused: {peer} is not in [server] proxy_from; "
            "closed its connection to the listener {listener} unread "
            "(and {unlogged} more such connection(s) since the last line)",
            event="proxy-refused",
            peer=_describePeer(peer),
            listener=self.listener,
            unlogged=self._unlogged,
        )
        self._lastLogged = now
        self._unlogged = 0


def internetAddress(peer: IAddress | None) -> tuple[str, int] | None:
    """
    The host and port of an IPv4 or IPv6 peer (the connection's own, or
    the one a PROXY header gave), or L{None} for any other (a UNIX socket).
    """
    if isinstance(peer, (IPv4Address, IPv6Address)):
        return peer.host, peer.port
    return None


def _describePeer(peer: IAddress | None) -> str:
    address = internetAddress(peer)
    if address is None:
        return str(peer)
    return f"{address[0]} port {address[1]}"


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
        self, factory: WrappingFactory[ProxyHeaderWrapper], wrappedProtocol
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
    """
    Wraps each connection from a peer in C{allowlist} in a
    L{ProxyHeaderWrapper}; refuses (closes unread, and logs) the others.
    """

    protocol = ProxyHeaderWrapper

    def __init__(
        self,
        wrappedFactory,
        reactor,
        allowlist: ProxyAllowlist,
        listener: str = "haproxy:",
    ) -> None:
        super().__init__(wrappedFactory)
        self.reactor = reactor
        self.allowlist = allowlist
        self.refusals = RefusalLog(listener, reactor)

    def buildProtocol(self, addr: IAddress | None):
        """
        L{None} for a peer that may not send the header: Twisted then closes
        the connection before reading from it.
        """
        if addr is None or not self.allowlist.allows(addr):
            self.refusals.refused(addr)
            return None
        return super().buildProtocol(addr)

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
