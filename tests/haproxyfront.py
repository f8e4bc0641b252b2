"""
A real HAProxy in front of MSA instances, as README.rst describes it: TCP
mode, round robin, the PROXY protocol v2 to each instance's C{haproxy:}
listener.  The one HAProxy helper of the tests (L{tests.multiinstance},
L{tests.test_accounts_pg}, L{tests.test_proxy}).
"""

import os
import subprocess

from msa.tls import ensureSelfSignedCertificate
from tests.e2e import RunningMSA, freePort, requireProgram
from tests.waiting import listening, waitUntilBlocking


class HAProxy:
    """
    Debian's HAProxy in TCP mode on a free loopback port, round robin over
    C{backends} (ports on 127.0.0.1, C{haproxy:} listeners) with
    C{send-proxy-v2}; one thread, so that consecutive connections go to the
    backends in turn.  Listening when the constructor returns; stopped in
    the test's cleanup.  Skips (or fails under CI=true) without HAProxy.

    @ivar port: the front port clients connect to.
    """

    def __init__(self, testCase, directory: str, backends: list[int]) -> None:
        program = requireProgram(testCase, "haproxy")
        self.port = freePort()
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(
                "global\n  maxconn 200\n  nbthread 1\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 60s\n  timeout server 60s\n"
                f"frontend submission\n  bind 127.0.0.1:{self.port}\n"
                "  default_backend msa\n"
                "backend msa\n  balance roundrobin\n"
                + "".join(
                    f"  server msa{i} 127.0.0.1:{port} send-proxy-v2\n"
                    for i, port in enumerate(backends)
                )
            )
        self.process = subprocess.Popen(
            [program, "-db", "-f", config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        testCase.addCleanup(self.stop)
        waitUntilBlocking(lambda: listening(self.port), what="HAProxy to listen")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def proxiedInstances(
    testCase, count: int = 2, implicit: bool = False, server: dict | None = None, **kw
) -> list[tuple[int, RunningMSA]]:
    """
    C{count} instances sharing one certificate (as README.rst says they
    should), each with one C{haproxy:} listener (STARTTLS, or implicit TLS)
    on a free port.

    @param server: more C{[server]} keys; C{kw}: more L{RunningMSA}
        arguments.
    @return: (port, instance) pairs.
    """
    certFile, keyFile = ensureSelfSignedCertificate(
        os.path.abspath(testCase.mktemp()), "localhost"
    )
    instances = []
    for _ in range(count):
        port = freePort()
        listeners = [f"haproxy:tcp:{port}:interface=127.0.0.1"]
        msa = RunningMSA(
            testCase,
            server={
                "starttls_listeners": [] if implicit else listeners,
                "implicit_tls_listeners": listeners if implicit else [],
                **(server or {}),
            },
            tls={"certificate": certFile, "key": keyFile},
            **kw,
        )
        # What its clients must trust.
        msa.certFile = certFile
        instances.append((port, msa))
    return instances
