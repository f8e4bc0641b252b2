# -*- test-case-name: tests.test_proxy -*-
"""
Scale-out behind a load balancer: listeners given as C{haproxy:} endpoint
strings take the PROXY protocol (v1 and v2) header from the balancer, and
everything that keys on the client address (the log, the connection limit
per client, the Received header) uses the real client's address, not the
balancer's.  The PROXY header is sent by the test itself: this is exactly
what HAProxy sends with C{send-proxy} / C{send-proxy-v2}.
"""

import smtplib
import socket
import ssl
import struct

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e import MESSAGE, RunningMSA, freePort
from tests.test_e2e import splitReceived
from tests.waiting import waitUntil


def proxyV1(client: str, port: int) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 2587\r\n".encode()


def proxyV2(client: str, port: int) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton(client) + socket.inet_aton("127.0.0.1")
    addresses += struct.pack("!HH", port, 2587)
    return (
        signature + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses
    )


class ProxiedSMTP(smtplib.SMTP):
    """
    smtplib that first sends a PROXY header, as HAProxy does.
    """

    header = b""

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.header)
        return sock


class ProxiedSMTPSSL(ProxiedSMTP):
    def __init__(self, *args, context, **kwargs):
        self.context = context
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        return self.context.wrap_socket(sock, server_hostname="localhost")


class ProxyProtocolTests(unittest.TestCase):
    def setUp(self):
        self.starttls, self.implicit = freePort(), freePort()
        self.msa = RunningMSA(
            self,
            server={
                "starttls_listeners": [
                    f"haproxy:tcp:{self.starttls}:interface=127.0.0.1"
                ],
                "implicit_tls_listeners": [
                    f"haproxy:tcp:{self.implicit}:interface=127.0.0.1"
                ],
                "max_connections_per_client": 1,
            },
        )

    def submit(self, header: bytes, implicit: bool = False):
        context = self.msa.clientContext()
        ProxiedSMTP.header = header
        if implicit:
            client = ProxiedSMTPSSL("localhost", self.implicit, context=context)
        else:
            client = ProxiedSMTP("localhost", self.starttls)
        try:
            client.ehlo("mijnbedrijf.nl")
            if not implicit:
                client.starttls(context=context)
                client.ehlo("mijnbedrijf.nl")
            client.login("alice", "wonderland")
            return client.sendmail("ik@mijnbedrijf.nl", ["b@overheid.nl"], MESSAGE)
        finally:
            client.close()

    @defer.inlineCallbacks
    def check(self, header, client, implicit=False):
        yield threads.deferToThread(self.submit, header, implicit)
        [name] = yield self.msa.waitForOutbox(1)
        received, body = splitReceived(self.msa.readOutbox(name))
        self.assertEqual(body, MESSAGE)
        self.assertIn(f"([{client}])".encode(), received)
        self.assertNotIn(b"[127.0.0.1]", received)

    def test_v1Starttls(self):
        return self.check(proxyV1("203.0.113.7", 40001), "203.0.113.7")

    def test_v2Implicit(self):
        return self.check(proxyV2("198.51.100.23", 40002), "198.51.100.23", True)

    @defer.inlineCallbacks
    def test_limitsUseRealAddress(self):
        """
        With one connection allowed per client, two clients behind the same
        balancer both get in; a second connection of the same client does
        not.
        """

        def connect(header):
            sock = socket.create_connection(("127.0.0.1", self.starttls))
            sock.sendall(header)
            return sock, sock.recv(200)

        first, greeting1 = yield threads.deferToThread(
            connect, proxyV1("203.0.113.7", 40001)
        )
        other, greeting2 = yield threads.deferToThread(
            connect, proxyV1("203.0.113.8", 40002)
        )
        again, greeting3 = yield threads.deferToThread(
            connect, proxyV1("203.0.113.7", 40003)
        )
        for sock in (first, other, again):
            sock.close()
        self.assertTrue(greeting1.startswith(b"220 "))
        self.assertTrue(greeting2.startswith(b"220 "))
        self.assertTrue(greeting3.startswith(b"421 4.7.0 "), greeting3)

    @defer.inlineCallbacks
    def test_withoutHeaderRefused(self):
        def connect():
            sock = socket.create_connection(("127.0.0.1", self.starttls), timeout=5)
            sock.sendall(b"EHLO direct.example\r\n")
            try:
                return sock.recv(200)
            finally:
                sock.close()

        data = yield threads.deferToThread(connect)
        self.assertEqual(data, b"")


class RealHAProxyTests(unittest.TestCase):
    """
    A real HAProxy (Debian's package) in TCP mode with send-proxy-v2, in
    front of two MSA instances with their own spools.  The client connects
    from 127.0.0.2, so the Received headers prove the real address got
    through, not HAProxy's 127.0.0.1.
    """

    @defer.inlineCallbacks
    def test_twoInstancesBehindHAProxy(self):
        from tests.e2e import requireProgram
        from tests.haproxyfront import HAProxy, proxiedInstances

        requireProgram(self, "haproxy")
        instances = proxiedInstances(self)
        certFile = instances[0][1].certFile
        front = HAProxy(
            self, instances[0][1].directory, [port for port, _ in instances]
        ).port

        def submitFour():
            replies = []
            for _ in range(4):
                client = smtplib.SMTP(
                    "localhost", front, source_address=("127.0.0.2", 0), timeout=10
                )
                try:
                    client.ehlo("mijnbedrijf.nl")
                    client.starttls(context=ssl.create_default_context(cafile=certFile))
                    client.ehlo("mijnbedrijf.nl")
                    client.login("alice", "wonderland")
                    replies.append(
                        client.sendmail("ik@mijnbedrijf.nl", ["b@overheid.nl"], MESSAGE)
                    )
                finally:
                    client.close()
            return replies

        yield threads.deferToThread(submitFour)
        # Round robin: both instances take part (the exact split depends on
        # HAProxy's threads), and every message names the real client.
        for _, msa in instances:
            names = yield msa.waitForOutbox(1)
            for name in names:
                received, body = splitReceived(msa.readOutbox(name))
                self.assertEqual(body, MESSAGE)
                self.assertIn(b"([127.0.0.2])", received)
        yield waitUntil(
            lambda: sum(len(msa.outboxFiles()) for _, msa in instances) == 4,
            what="4 files in the outboxes",
        )
        self.assertEqual(sum(len(msa.outboxFiles()) for _, msa in instances), 4)
