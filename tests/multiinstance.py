"""
Several MSA instances behind a real HAProxy, as README.rst's "Running more
than one instance" describes: each instance a whole daemon from its own TOML
file (L{tests.e2e.RunningMSA}) with its own state directory and spool, all
sharing one certificate and one accounts file (and whatever shared store
the test configures, such as C{[limits] backend = "redis"}), behind
Debian's HAProxy in TCP mode with C{send-proxy-v2}.  Clients connect to
HAProxy from 127.0.0.2, so the instances see that address, not HAProxy's.

A test may also talk to one instance directly (L{Instances.direct}),
sending the PROXY header itself as HAProxy would, to show that a behaviour
holds whichever instance takes the connection.
"""

import json
import os
import smtplib
import ssl

from msa.tls import ensureSelfSignedCertificate
from tests.e2e import RunningMSA, freePort
from tests.haproxyfront import HAProxy

#: The address clients connect from, through HAProxy.
CLIENT_ADDRESS = "127.0.0.2"


def proxyV2Header(client: str, clientPort: int, serverPort: int) -> bytes:
    """
    The PROXY protocol v2 header HAProxy's C{send-proxy-v2} sends (TCP over
    IPv4).
    """
    import socket
    import struct

    addresses = socket.inet_aton(client) + socket.inet_aton("127.0.0.1")
    addresses += struct.pack("!HH", clientPort, serverPort)
    return (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + bytes([0x21, 0x11])
        + struct.pack("!H", len(addresses))
        + addresses
    )


class _ProxiedSMTP(smtplib.SMTP):
    """
    smtplib that first sends a PROXY header, as HAProxy does.
    """

    def __init__(self, header: bytes, *args, **kwargs) -> None:
        self._header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self._header)
        return sock


class Instances:
    """
    C{count} MSA instances behind one HAProxy.

    @ivar msas: the L{RunningMSA}s, in HAProxy's server order.
    @ivar ports: their (PROXY protocol) STARTTLS ports.
    @ivar accountsFile: the accounts file they all read (by default).
    @ivar certFile: the certificate they all present.
    """

    def __init__(
        self,
        testCase,
        count: int = 2,
        extraAccounts: dict | None = None,
        server: dict | None = None,
        limits: dict | None = None,
        metrics: bool = False,
        accounts: dict | None = None,
        relay: dict | None = None,
    ) -> None:
        """
        @param accounts: the C{[accounts]} section of every instance (such as
            C{{"store": "postgresql://..."}}); by default they all read the
            file the first instance writes.
        @param relay: the C{[relay]} section of every instance; by default
            none (messages stay in each outbox).
        """
        self.testCase = testCase
        self.directory = os.path.abspath(testCase.mktemp())
        os.makedirs(self.directory)
        self.certFile, keyFile = ensureSelfSignedCertificate(
            self.directory, "localhost"
        )
        self.msas: list[RunningMSA] = []
        self.ports: list[int] = []
        self.metricsPorts: list[int] = []
        for i in range(count):
            port = freePort()
            metricsPort = freePort()
            msa = RunningMSA(
                testCase,
                server={
                    "starttls_listeners": [f"haproxy:tcp:{port}:interface=127.0.0.1"],
                    "implicit_tls_listeners": [],
                    **(server or {}),
                },
                tls={"certificate": self.certFile, "key": keyFile},
                # The first instance writes the accounts file; all read it
                # (unless the test names another store).
                accounts=(
                    accounts
                    if accounts is not None
                    else {"file": self.msas[0].accountsFile}
                    if self.msas
                    else None
                ),
                relay=relay,
                extraAccounts=extraAccounts,
                logging={"json_file": os.path.join(self.directory, f"events{i}.json")},
                metrics=(
                    {"listen": f"tcp:{metricsPort}:interface=127.0.0.1"}
                    if metrics
                    else None
                ),
                limits=limits,
            )
            self.msas.append(msa)
            self.ports.append(port)
            self.metricsPorts.append(metricsPort)
        self.accountsFile = self.msas[0].accountsFile
        self.haproxy = HAProxy(testCase, self.directory, self.ports)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.certFile)

    def _start(self, client: smtplib.SMTP) -> smtplib.SMTP:
        client.ehlo("mijnbedrijf.nl")
        client.starttls(context=self.context())
        client.ehlo("mijnbedrijf.nl")
        return client

    def client(self) -> smtplib.SMTP:
        """
        A client through HAProxy, after STARTTLS and EHLO (blocking).
        """
        client = smtplib.SMTP(
            "localhost",
            self.haproxy.port,
            source_address=(CLIENT_ADDRESS, 0),
            timeout=30,
        )
        return self._start(client)

    def direct(self, index: int) -> smtplib.SMTP:
        """
        A client of instance C{index} itself, with the PROXY header HAProxy
        would send for L{CLIENT_ADDRESS}, after STARTTLS and EHLO.
        """
        header = proxyV2Header(CLIENT_ADDRESS, 40000 + index, self.ports[index])
        client = _ProxiedSMTP(header, "localhost", self.ports[index], timeout=30)
        return self._start(client)

    def events(self, index: int) -> list[dict]:
        """
        The JSON log lines of instance C{index} so far.
        """
        path = os.path.join(self.directory, f"events{index}.json")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def loggedDelays(self) -> list[float]:
        """
        The failed-login delays logged so far, in order: both instances run
        in this process, so each JSON log has the events of both.
        """
        return [
            line["delay"]
            for line in self.events(0)
            if line.get("outcome") == "failure" and "delay" in line
        ]

    def outboxes(self) -> list[list[str]]:
        return [msa.outboxFiles() for msa in self.msas]
