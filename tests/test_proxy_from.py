# -*- test-case-name: tests.test_proxy_from -*-
"""
Forged PROXY headers: on a C{haproxy:} listener only the peers of
C{[server] proxy_from} may send the header.  Anyone else's connection is
closed before its header is read, and logged (one line a minute per
listener, however many come), so that the address it claims reaches
neither the limits nor the logs nor the audit record.  With the real
HAProxy in front for the normal path.
"""

import json
import os
import re
import smtplib
import socket
import ssl

from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial import unittest

from msa.service.config import ConfigError
from msa.submission.proxyheader import ProxyAllowlist, RefusalLog
from tests.e2e import MESSAGE, RunningMSA, freePort, requireProgram
from tests.haproxyfront import HAProxy
from tests.test_audit import records
from tests.test_hangup import named, observeLog
from tests.test_proxy import proxyV1, proxyV2

FORGED_V1 = "203.0.113.66"
FORGED_V2 = "198.51.100.66"


def forgedConnection(port: int, header: bytes, source: str = "127.0.0.2") -> bytes:
    """
    Blocking: from C{source}, send a PROXY header and an EHLO straight to
    the listener on C{port}; return what the server sent until it closed
    the connection, or until the whole reply to EHLO came.
    """
    with socket.create_connection(
        ("127.0.0.1", port), timeout=30, source_address=(source, 0)
    ) as sock:
        try:
            sock.sendall(header + b"EHLO forged.example\r\n")
        except OSError:
            return b""
        received = b""
        while not re.search(rb"(?m)^250 .*\r\n", received):
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


class AllowlistTests(unittest.TestCase):
    def test_addressesAndNetworks(self):
        allowlist = ProxyAllowlist.parse(["127.0.0.1", "::1", "10.1.2.0/24"])
        for host, allowed in [
            ("127.0.0.1", True),
            ("127.0.0.2", False),
            ("10.1.2.200", True),
            ("10.1.3.1", False),
        ]:
            peer = IPv4Address("TCP", host, 40000)
            self.assertEqual(allowlist.allows(peer), allowed, host)
        self.assertTrue(allowlist.allows(IPv6Address("TCP", "::1", 40000)))
        self.assertFalse(allowlist.allows(IPv6Address("TCP", "::2", 40000)))
        # A dual-stack listener sees IPv4 peers as mapped IPv6 addresses.
        mapped = IPv6Address("TCP", "::ffff:127.0.0.1", 40000)
        self.assertTrue(allowlist.allows(mapped))
        self.assertFalse(
            allowlist.allows(IPv6Address("TCP", "::ffff:127.0.0.2", 40000))
        )

    def test_unixSocketPeer(self):
        """
        A UNIX socket's file permissions decide who connects.
        """
        self.assertTrue(ProxyAllowlist.parse([]).allows(UNIXAddress(None)))

    def test_notAnAddress(self):
        with self.assertRaises(ValueError) as caught:
            ProxyAllowlist.parse(["127.0.0.1", "haproxy.example"])
        self.assertIn("'haproxy.example'", str(caught.exception))

    def test_badEntryStopsTheStart(self):
        with self.assertRaises(ConfigError) as caught:
            RunningMSA(self, server={"proxy_from": ["10.0.0.0/33"]})
        self.assertIn(
            "[server] proxy_from: each item is not an IP address or network "
            "(got '10.0.0.0/33')",
            str(caught.exception),
        )


class RefusalLogTests(unittest.TestCase):
    def test_oneLineAMinute(self):
        """
        A flood gives one line a minute; the next says how many went
        unlogged.
        """
        events = observeLog(self)
        clock = Clock()
        refusals = RefusalLog("haproxy:tcp:10587", clock)
        peer = IPv4Address("TCP", "192.0.2.9", 40000)
        for _ in range(100):
            refusals.refused(peer)
            clock.advance(0.1)
        self.assertEqual(len(named(events, "proxy-refused")), 1)
        clock.advance(60)
        refusals.refused(peer)
        lines = [formatEvent(e) for e in named(events, "proxy-refused")]
        self.assertEqual(len(lines), 2)
        self.assertIn("192.0.2.9", lines[0])
        self.assertIn("haproxy:tcp:10587", lines[0])
        self.assertIn("and 99 more", lines[1])


class ForgedHeaderTests(unittest.TestCase):
    """
    The daemon from TOML with a C{haproxy:} listener, the default
    C{proxy_from} (loopback), the audit log and the JSON log; the real
    HAProxy in front.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_onlyTheBalancerMaySendTheHeader(self):
        requireProgram(self, "haproxy")
        events = observeLog(self)
        port = freePort()
        listener = f"haproxy:tcp:{port}:interface=127.0.0.1"
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        jsonFile = os.path.join(directory, "msa.jsonl")
        msa = RunningMSA(
            self,
            server={
                "starttls_listeners": [listener],
                "implicit_tls_listeners": [],
                "max_connections_per_client": 1,
            },
            logging={"json_file": jsonFile},
        )
        front = HAProxy(self, directory, [port])

        def viaHAProxy():
            client = smtplib.SMTP(
                "localhost", front.port, source_address=("127.0.0.2", 0), timeout=10
            )
            try:
                client.ehlo("mijnbedrijf.nl")
                client.starttls(context=ssl.create_default_context(cafile=msa.certFile))
                client.ehlo("mijnbedrijf.nl")
                client.login("alice", "wonderland")
                return client.sendmail("ik@mijnbedrijf.nl", ["b@overheid.nl"], MESSAGE)
            finally:
                client.close()

        # The normal path: HAProxy (on 127.0.0.1) passes the real client on.
        refused = yield threads.deferToThread(viaHAProxy)
        self.assertEqual(refused, {})
        [accepted] = [
            r
            for r in records(os.path.join(msa.state, "audit", "audit.jsonl"))
            if r["event"] == "accepted"
        ]
        self.assertEqual(accepted["client"], "127.0.0.2")

        # A peer that is not the balancer: closed unread, whatever it sends.
        for header in [proxyV1(FORGED_V1, 40001), proxyV2(FORGED_V2, 40002)] * 3:
            received = yield threads.deferToThread(forgedConnection, port, header)
            self.assertEqual(received, b"")
        # The balancer still gets through after the flood.
        refused = yield threads.deferToThread(viaHAProxy)
        self.assertEqual(refused, {})

        warnings = named(events, "proxy-refused")
        self.assertEqual(len(warnings), 1, [formatEvent(e) for e in warnings])
        text = formatEvent(warnings[0])
        self.assertIn("127.0.0.2", text)
        self.assertIn(listener, text)
        self.assertEqual(warnings[0]["log_level"].name, "warn")
        with open(jsonFile, encoding="utf-8") as f:
            jsonLines = [json.loads(line) for line in f]
        self.assertIn("proxy-refused", [e.get("event") for e in jsonLines])

        # The claimed addresses are nowhere: not in the log, the JSON log,
        # the audit log, nor the sessions counted per client.
        everything = [formatEvent(e) + repr(e) for e in events]
        with open(jsonFile, encoding="utf-8") as f:
            everything.append(f.read())
        auditDirectory = os.path.join(msa.state, "audit")
        for name in os.listdir(auditDirectory):
            with open(os.path.join(auditDirectory, name), encoding="utf-8") as f:
                everything.append(f.read())
        for forged in (FORGED_V1, FORGED_V2):
            self.assertEqual([t for t in everything if forged in t], [], forged)
