# -*- test-case-name: tests.test_compat -*-
"""
L{msa._compat}: every private Twisted and pyOpenSSL name the MSA relies on
is still there and still does what the MSA needs.  A failure names the
private name that changed, so that an upgrade past the versions pinned in
C{constraints.txt} says exactly what to fix.  The public replacements of
former private uses (C{getContext}, C{clientConnectionForTLS},
C{strports.service}, a gauge's C{collect}) are checked here too, since the
policy silently weakens if Twisted stops routing through them.
"""

import ast
import os
import socket

from OpenSSL import SSL
from twisted.application import strports
from twisted.internet import address, defer, endpoints, error, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial import unittest

import msa
from msa import _compat, metrics, tls
from tests.waiting import waitUntil


def _privateName(testCase, module: str, name: str):
    """
    C{module.name}, or a failure naming it.
    """
    import importlib

    try:
        found = importlib.import_module(module)
    except ImportError as e:
        testCase.fail(f"private module {module} is gone ({e}): fix msa._compat")
    if not hasattr(found, name):
        testCase.fail(f"private name {module}.{name} is gone: fix msa._compat")
    return getattr(found, name)


def _hardenedOptions(directory: str) -> tls._HardenedOptions:
    cert, key = tls.ensureSelfSignedCertificate(directory, "localhost")
    options = tls.serverContextFactory(cert, key)
    assert isinstance(options, tls._HardenedOptions)
    return options


class PyOpenSSLPrivateTests(unittest.TestCase):
    """
    C{OpenSSL._util.lib}, C{OpenSSL._util.ffi} and C{SSL.Context._context}.
    """

    def test_functionsBound(self):
        """
        Each of L{_compat.PRIVATE_FUNCTIONS} is in C{OpenSSL._util.lib}.
        Without them the TLS policy silently narrows (groups) or weakens
        (SHA-1 and SHA-224 handshake signatures).
        """
        lib = _privateName(self, "OpenSSL._util", "lib")
        for name in _compat.PRIVATE_FUNCTIONS:
            self.assertTrue(
                hasattr(lib, name), f"OpenSSL._util.lib.{name} is gone: fix msa._compat"
            )
            self.assertIsNotNone(_compat.opensslFunction(name), name)

    def test_ffiString(self):
        """
        C{OpenSSL._util.ffi.string} turns a C string into bytes.
        """
        ffi = _privateName(self, "OpenSSL._util", "ffi")
        self.assertTrue(
            hasattr(ffi, "string"), "OpenSSL._util.ffi.string is gone: fix msa._compat"
        )

    def test_contextPointer(self):
        """
        C{SSL.Context._context} is the C{SSL_CTX *} the functions take.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        self.assertTrue(
            hasattr(context, "_context"),
            "OpenSSL.SSL.Context._context is gone: fix msa._compat",
        )
        ffi = _privateName(self, "OpenSSL._util", "ffi")
        self.assertEqual(
            ffi.typeof(context._context).cname,
            "SSL_CTX *",
            "OpenSSL.SSL.Context._context is no longer an SSL_CTX *",
        )

    def test_setSignatureAlgorithms(self):
        """
        OpenSSL takes the MSA's signature algorithms and refuses nonsense.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        self.assertIs(
            _compat.setSignatureAlgorithms(context, tls.DEFAULT_SIGALGS), True
        )
        self.assertIs(_compat.setSignatureAlgorithms(context, "NOPE+SHA0"), False)

    def test_setGroups(self):
        """
        OpenSSL takes the MSA's groups and refuses an unknown one.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        self.assertIs(_compat.setGroups(context, tls.DEFAULT_GROUPS), True)
        self.assertIs(_compat.setGroups(context, "X25519:no-such-curve"), False)

    def test_verifyErrorString(self):
        """
        X509_V_ERR_CERT_REVOKED (23) reads as OpenSSL's text.
        """
        self.assertEqual(_compat.verifyErrorString(23), "certificate revoked")


def _tlsProtocol(options, isClient: bool) -> TLSMemoryBIOProtocol:
    """
    What Twisted gives a connection creator: a TLS protocol, not connected.
    """
    factory = TLSMemoryBIOFactory(
        options, isClient, protocol.Factory.forProtocol(protocol.Protocol)
    )
    return factory.buildProtocol(None)


class TwistedTLSTests(unittest.TestCase):
    """
    C{twisted.internet._sslverify.ClientTLSOptions}, and the public methods
    through which Twisted builds connections from the hardened context.
    """

    def test_clientTLSOptionsPresent(self):
        """
        C{ClientTLSOptions} is where msa._compat takes it from.
        """
        found = _privateName(self, "twisted.internet._sslverify", "ClientTLSOptions")
        self.assertIs(found, _compat.ClientTLSOptions)

    def test_clientTLSOptionsWrapsCreator(self):
        """
        C{ClientTLSOptions(creator, hostname)} makes its connection with the
        given creator (so the hardened context), sends the host name (SNI)
        and verifies the peer.
        """
        options = _hardenedOptions(self.mktemp())
        made = []

        def creator(tlsProtocol):
            made.append(tlsProtocol)
            return options.clientConnectionForTLS(tlsProtocol)

        creatorProtocol = _tlsProtocol(options, True)
        client = _compat.ClientTLSOptions(creator, "mx.example")
        connection = client.clientConnectionForTLS(creatorProtocol)
        self.assertEqual(
            made, [creatorProtocol], "ClientTLSOptions(createConnection, ...) changed"
        )
        self.assertIs(connection.get_context(), options.getContext())
        self.assertEqual(connection.get_servername(), b"mx.example")
        self.assertEqual(
            connection.get_verify_mode(),
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        )

    def test_connectionsUseHardenedContext(self):
        """
        Twisted makes server and client connections from the public
        C{getContext} that L{tls._HardenedOptions} overrides: the hardened
        context (no renegotiation, no compression), made once.
        """
        options = _hardenedOptions(self.mktemp())
        context = options.getContext()
        self.assertIs(options.getContext(), context)
        for make, isClient in [
            (options.serverConnectionForTLS, False),
            (options.clientConnectionForTLS, True),
        ]:
            connection = make(_tlsProtocol(options, isClient))
            self.assertIs(
                connection.get_context(),
                context,
                "CertificateOptions no longer makes connections from getContext()",
            )
            wanted = SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION
            self.assertEqual(connection.set_options(0) & wanted, wanted)


class HAProxyPrivateTests(unittest.TestCase):
    """
    The PROXY header parsers of C{twisted.protocols.haproxy}.
    """

    def test_namesPresent(self):
        """
        The parser classes, their exception and their result type are where
        msa._compat takes them from.
        """
        for module, name in [
            ("twisted.protocols.haproxy._v1parser", "V1Parser"),
            ("twisted.protocols.haproxy._v2parser", "V2Parser"),
            ("twisted.protocols.haproxy._exceptions", "InvalidProxyHeader"),
            ("twisted.protocols.haproxy._info", "ProxyInfo"),
        ]:
            self.assertIs(_privateName(self, module, name), getattr(_compat, name))

    def test_signatures(self):
        """
        The constants the wrapper recognizes a header by.
        """
        self.assertEqual(_compat.V1Parser.PROXYSTR, b"PROXY", "V1Parser.PROXYSTR")
        self.assertEqual(
            _compat.V2Parser.PREFIX, b"\r\n\r\n\x00\r\nQUIT\n", "V2Parser.PREFIX"
        )

    def test_v1(self):
        """
        C{V1Parser.feed} waits for the whole line, then returns the
        addresses and the bytes after the header.
        """
        parser = _compat.V1Parser()
        self.assertEqual(parser.feed(b"PROXY TCP4 192.0.2.7 127.0.0.1 "), (None, None))
        info, rest = parser.feed(b"40000 2587\r\nEHLO x\r\n")
        self.assertIsInstance(info, _compat.ProxyInfo)
        self.assertEqual(info.source, address.IPv4Address("TCP", "192.0.2.7", 40000))
        self.assertEqual(
            info.destination, address.IPv4Address("TCP", "127.0.0.1", 2587)
        )
        self.assertEqual(rest, b"EHLO x\r\n")

    def test_v2(self):
        """
        C{V2Parser.feed} parses a binary header.
        """
        header = (
            _compat.V2Parser.PREFIX
            + b"\x21\x11\x00\x0c"
            + socket.inet_aton("192.0.2.7")
            + socket.inet_aton("127.0.0.1")
            + (40000).to_bytes(2, "big")
            + (2587).to_bytes(2, "big")
        )
        info, rest = _compat.V2Parser().feed(header + b"EHLO x\r\n")
        self.assertEqual(info.source, address.IPv4Address("TCP", "192.0.2.7", 40000))
        self.assertEqual(rest, b"EHLO x\r\n")

    def test_invalid(self):
        """
        A malformed header raises C{InvalidProxyHeader}.
        """
        self.assertRaises(
            _compat.InvalidProxyHeader,
            _compat.V1Parser().feed,
            b"PROXY NONSENSE\r\n",
        )


class PublicReplacementTests(unittest.TestCase):
    """
    Public APIs that replaced private uses keep their promise.
    """

    def test_listenerFailsStart(self):
        """
        C{strports.service} (formerly C{_raiseSynchronously} set by hand):
        a listener whose port is taken fails the start instead of logging.
        """
        held = socket.socket()
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        service = strports.service(
            f"tcp:{port}:interface=127.0.0.1", protocol.Factory(), reactor
        )
        self.assertRaises(error.CannotListenError, service.privilegedStartService)

    def test_lastCoreSuccess(self):
        """
        The health check reads the gauge through its public C{collect()}
        (formerly prometheus_client's private C{_value}).
        """
        before = metrics.lastCoreSuccess()
        self.addCleanup(metrics.CORE_LAST_SUCCESS.set, before)
        metrics.CORE_LAST_SUCCESS.set(1234.5)
        self.assertEqual(metrics.lastCoreSuccess(), 1234.5)


class OnlyCompatTests(unittest.TestCase):
    """
    No other module of the MSA imports a private name of another package.
    """

    def test_noPrivateImportsElsewhere(self):
        root = os.path.dirname(msa.__file__)
        found = []
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                if not name.endswith(".py") or path.endswith("_compat.py"):
                    continue
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.level == 0:
                        module = node.module or ""
                        if module.split(".")[0] in ("msa", "__future__"):
                            continue
                        names = [a.name for a in node.names]
                        if any(p.startswith("_") for p in module.split(".") + names):
                            found.append(f"{path}:{node.lineno}: {module} {names}")
                    elif isinstance(node, ast.Import):
                        for alias in node.names:
                            parts = alias.name.split(".")
                            if parts[0] != "msa" and any(
                                p.startswith("_") for p in parts
                            ):
                                found.append(f"{path}:{node.lineno}: {alias.name}")
        self.assertEqual(found, [])


class EarlyLogEventsPrivateTests(unittest.TestCase):
    """
    C{LogBeginner._initialBuffer._buffer}, behind
    L{_compat.forgetEarlyLogEvents}.
    """

    def test_forgotten(self):
        """
        Events logged before logging began are replayed by
        C{beginLoggingTo}; once forgotten, none are, and events logged
        after are still observed.
        """
        import io
        import types

        from twisted.logger import LogBeginner, LogPublisher

        def begin(forget):
            publisher = LogPublisher()
            # Its own warnings module: beginLoggingTo replaces showwarning.
            warnings = types.SimpleNamespace(showwarning=None)
            beginner = LogBeginner(publisher, io.StringIO(), None, warnings)
            publisher({"log_format": "early", "n": 1})
            if forget:
                _compat.forgetEarlyLogEvents(beginner)
            seen = []
            beginner.beginLoggingTo([seen.append], redirectStandardIO=False)
            publisher({"log_format": "late", "n": 2})
            return [e["n"] for e in seen]

        self.assertEqual(begin(False), [1, 2])
        self.assertEqual(begin(True), [2])


class LogPublisherPrivateTests(unittest.TestCase):
    """
    C{LogPublisher._observers}, behind L{_compat.publisherObservers}.
    """

    def test_observersListed(self):
        from twisted.logger import LogPublisher

        from msa._compat import publisherObservers

        first, second = [].append, [].append
        publisher = LogPublisher(first)
        publisher.addObserver(second)
        self.assertTrue(
            hasattr(publisher, "_observers"), "LogPublisher._observers is gone"
        )
        self.assertEqual(publisherObservers(publisher), [first, second])


class _Collector(protocol.Protocol):
    """
    Keeps what it receives, and its connection's C{connectionMade} as a
    L{Deferred}.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.made: defer.Deferred[_Collector] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class EagerWriteTests(unittest.TestCase):
    """
    L{_compat.writeEagerly} over a real loopback TCP connection, and
    C{FileDescriptor}'s write-buffer names it reads.
    """

    @defer.inlineCallbacks
    def connectedPair(self):
        """
        A listening collector and a connected one, closed at cleanup.

        @return: a L{Deferred} firing with (server side, client side).
        """
        server = _Collector()
        factory = protocol.Factory.forProtocol(lambda: server)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Collector()
        endpoint = endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port
        )
        yield endpoints.connectProtocol(endpoint, client)
        yield server.made
        self.addCleanup(server.transport.loseConnection)
        self.addCleanup(client.transport.loseConnection)
        return server, client

    @defer.inlineCallbacks
    def test_bufferNamesPresent(self):
        """
        The write buffer's private names are on a TCP connection.
        """
        server, client = yield self.connectedPair()
        for name in ("dataBuffer", "offset", "_tempDataBuffer", "_tempDataLen"):
            if not hasattr(server.transport, name):
                self.fail(f"FileDescriptor.{name} is gone: fix msa._compat")

    @defer.inlineCallbacks
    def test_sentWithoutArming(self):
        """
        A write to an idle connection is sent at once: the socket is never
        handed to the reactor for writing (two C{epoll_ctl} calls saved),
        and the peer receives the bytes.
        """
        server, client = yield self.connectedPair()
        self.assertTrue(_compat.writeEagerly(server.transport))
        server.transport.write(b"250 2.0.0 Ok\r\n")
        self.assertNotIn(server.transport, reactor.getWriters())
        yield waitUntil(
            lambda: bytes(client.received) == b"250 2.0.0 Ok\r\n",
            what="the reply at the peer",
        )

    @defer.inlineCallbacks
    def test_bigWriteKeepsOrder(self):
        """
        What the kernel does not take at once is left to the reactor (the
        socket is armed for writing), all of it arrives, and what is written
        after it goes out after it, in order.
        """
        server, client = yield self.connectedPair()
        _compat.writeEagerly(server.transport)
        big = bytes(range(256)) * (128 * 1024)
        server.transport.write(big)
        self.assertIn(server.transport, reactor.getWriters())
        yield waitUntil(
            lambda: len(client.received) >= len(big),
            timeout=30,
            what="every byte at the peer",
        )
        server.transport.write(b"end")
        yield waitUntil(
            lambda: len(client.received) >= len(big) + 3, what="the last write"
        )
        self.assertEqual(bytes(client.received), big + b"end")

    def test_notTCP(self):
        """
        A transport with no TCP connection under it is left alone.
        """
        self.assertFalse(_compat.writeEagerly(StringTransport()))


class TLSAtOnceTests(unittest.TestCase):
    """
    L{_compat.writeTLSAtOnce} over a real loopback TLS connection, and the
    names of Twisted's small-write aggregation it relies on.
    """

    @defer.inlineCallbacks
    def connectedPair(self):
        """
        A TLS server side (implicit TLS, the MSA's own server context) and
        a verifying client, the handshake done; closed at cleanup.
        """
        from twisted.internet import ssl

        directory = self.mktemp()
        os.makedirs(directory)
        options = _hardenedOptions(directory)
        certFile, _ = tls.ensureSelfSignedCertificate(directory, "localhost")
        with open(certFile, "rb") as f:
            certPEM = f.read()
        server = _Collector()
        port = reactor.listenSSL(
            0,
            protocol.Factory.forProtocol(lambda: server),
            options,
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        client = _Collector()
        endpoint = endpoints.SSL4ClientEndpoint(
            reactor,
            "127.0.0.1",
            port.getHost().port,
            ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(certPEM)),
        )
        yield endpoints.connectProtocol(endpoint, client)
        yield server.made
        self.addCleanup(server.transport.loseConnection)
        self.addCleanup(client.transport.loseConnection)
        client.transport.write(b"hello")
        yield waitUntil(lambda: server.received == b"hello", what="the handshake")
        return server, client

    @defer.inlineCallbacks
    def test_sentWhenWritten(self):
        """
        A write is encrypted and handed to the socket at once: nothing is
        left in the aggregation buffer and no flush is scheduled; the peer
        gets the bytes.
        """
        server, client = yield self.connectedPair()
        self.assertTrue(_compat.writeTLSAtOnce(server.transport))
        server.transport.write(b"250 2.0.0 Ok\r\n")
        aggregator = server.transport._aggregator
        self.assertEqual((aggregator._buffer, aggregator._scheduled), ([], None))
        yield waitUntil(
            lambda: bytes(client.received) == b"250 2.0.0 Ok\r\n",
            what="the reply at the peer",
        )

    def test_notTLS(self):
        """
        A transport with no TLS layer is left alone.
        """
        self.assertFalse(_compat.writeTLSAtOnce(StringTransport()))
