# -*- test-case-name: tests.test_relay_extensions,tests.test_relay_pipelining -*-
"""
A real Postfix as the MSA's core MTA (L{tests.postfixserver}): STARTTLS
with a certificate of its own, AUTH PLAIN for the account C{msa}, relaying
everything on to a recording sink (L{tests.downstream.DownstreamServer},
plaintext) so that the test sees what Postfix received: the bytes, and the
parameters Postfix passes on to a next hop that offers them.
"""

import os

import attrs
from twisted.internet import defer, threads

from msa.tls import ensureSelfSignedCertificate
from tests.downstream import DownstreamServer
from tests.e2e import freePort
from tests.postfixserver import ThrowawayPostfix, postfixDirectory


@attrs.frozen
class PostfixCore:
    """
    A started Postfix core and its sink.

    @ivar relay: the MSA's C{[relay]} section for it.
    """

    postfix: ThrowawayPostfix
    sink: DownstreamServer
    relay: dict


@defer.inlineCallbacks
def startPostfixCore(testCase, settings=None, sinkExtensions=()):
    """
    Start a Postfix core for C{testCase} (stopped at its end).

    @param settings: main.cf settings beside the relayhost (the sink).
    @param sinkExtensions: EHLO keywords the sink offers to Postfix.
    @return: a L{Deferred} of the L{PostfixCore}.
    """
    directory = postfixDirectory(testCase)
    sink = DownstreamServer(os.path.join(directory, "down"), "none")
    sink.extensions = list(sinkExtensions)
    sinkPort = sink.start()
    testCase.addCleanup(sink.stop)
    cert, key = ensureSelfSignedCertificate(
        os.path.join(directory, "cert"), "localhost"
    )
    postfix = ThrowawayPostfix(
        os.path.join(directory, "postfix"),
        freePort(),
        cert,
        key,
        settings={
            "relayhost": f"[127.0.0.1]:{sinkPort}",
            "smtp_tls_security_level": "none",
            # No Date header added: the bytes pass through unchanged.
            "local_header_rewrite_clients": "",
            **(settings or {}),
        },
        account=("msa", "relay-secret"),
    )
    testCase.addCleanup(threads.deferToThread, postfix.stop)
    yield threads.deferToThread(postfix.start)
    passwordFile = os.path.join(directory, "relay-password")
    with open(passwordFile, "w") as f:
        f.write("relay-secret\n")
    os.chmod(passwordFile, 0o600)
    relay = {
        "host": "127.0.0.1",
        "port": postfix.port,
        "tls": "starttls",
        "server_name": "localhost",
        "ca_file": cert,
        "auth_username": "msa",
        "auth_password_file": passwordFile,
    }
    return PostfixCore(postfix, sink, relay)
