"""
A real HAProxy in front of MSA instances, as README.rst describes it: TCP
mode, round robin, the PROXY protocol v2 to each instance's C{haproxy:}
listener.
"""

import os
import subprocess

from msa.tls import ensureSelfSignedCertificate
from tests.e2e import RunningMSA, freePort, requireProgram


def startHAProxy(testCase, directory: str, ports: list[int]) -> int:
    """
    Start HAProxy on a free loopback port, balancing over the instances
    listening (with C{haproxy:}) on C{ports}; it is stopped in the test's
    cleanup.  Skips (or fails under CI=true) without HAProxy.

    @param directory: where its configuration file goes.
    @return: the front port (wait until it listens before connecting).
    """
    haproxy = requireProgram(testCase, "haproxy")
    front = freePort()
    config = os.path.join(directory, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(
            "global\n  maxconn 100\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n"
            "  timeout client 30s\n  timeout server 30s\n"
            f"frontend submission\n  bind 127.0.0.1:{front}\n"
            "  default_backend msa\n"
            "backend msa\n  balance roundrobin\n"
            + "".join(
                f"  server msa{i} 127.0.0.1:{port} send-proxy-v2\n"
                for i, port in enumerate(ports)
            )
        )
    process = subprocess.Popen(
        [haproxy, "-db", "-f", config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def stop():
        process.terminate()
        process.wait(10)
        assert process.stderr is not None
        process.stderr.close()

    testCase.addCleanup(stop)
    return front


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
