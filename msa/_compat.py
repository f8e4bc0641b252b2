# -*- test-case-name: tests.test_compat -*-
"""
Every private name of Twisted and pyOpenSSL the MSA relies on, in one place.

These libraries have no public API for what follows; anything else of theirs
the MSA uses is public.  Nothing outside this module imports or touches a
private name of a third-party library, so a new release breaks one module,
and C{tests.test_compat} says which name went missing, by name.  The
versions the tests ran against are pinned in C{constraints.txt} (used by
C{run-tests.sh}) and bounded above in C{setup.cfg}.

pyOpenSSL (through cryptography's OpenSSL binding):
    - C{OpenSSL._util.lib} / C{ffi}: C{SSL_CTX_set1_sigalgs_list},
      C{SSL_CTX_set1_curves_list} and C{X509_verify_cert_error_string}
      (L{PRIVATE_FUNCTIONS}); pyOpenSSL's L{SSL.Context} can neither restrict
      the handshake signature algorithms nor set more than one key-exchange
      group, and names no verify error.
    - C{SSL.Context._context}: the C{SSL_CTX *} those functions take.

Twisted:
    - C{twisted.internet._sslverify.ClientTLSOptions}: hostname verification
      (service-identity) and SNI over any client connection creator.  The
      public L{twisted.internet.ssl.optionsForClientTLS} wraps a plain
      L{CertificateOptions} only, not the MSA's hardened subclass.
    - C{twisted.protocols.haproxy._v1parser.V1Parser},
      C{_v2parser.V2Parser}, C{_exceptions.InvalidProxyHeader}: the PROXY
      header parsers, and C{_info.ProxyInfo}, what they return.  The
      public C{proxyEndpoint} starts the wrapped protocol before the header
      has arrived, which an SMTP server cannot use (see
      L{msa.submission.proxyheader}).
    - C{twisted.internet.abstract.FileDescriptor}'s write buffer
      (C{dataBuffer}, C{offset}, C{_tempDataBuffer}): L{writeEagerly} sends
      a reply at once when nothing is queued before it, as asyncio's
      transports do, instead of arming the socket for writing (an
      C{epoll_ctl}) and disarming it (another) around every reply; Twisted
      has no option for this.
    - C{twisted.protocols.tls.BufferingTLSTransport}'s small-write
      aggregation (its instance attribute C{write}, its C{_aggregator}):
      L{writeTLSAtOnce} has a reply encrypted and sent when it is written,
      instead of from a C{callLater(0)} (a timer per reply, the reply a
      reactor turn later); the MSA already writes the replies of one read
      as one write, which is what the aggregation is for.
    - C{twisted.logger.LogPublisher._observers}: the observers of the global
      log publisher, so that the C{[logging] level} filter can be put in
      front of the ones twistd installed (L{publisherObservers}); Twisted
      has no public way to list them, nor to filter a publisher.
    - C{twisted.logger.LogBeginner._initialBuffer} (its C{_buffer}): the
      events logged before logging began, which C{beginLoggingTo} replays.
      A worker forked from worker 0 (L{msa.service.forked}) drops worker
      0's, which worker 0 logs itself (L{forgetEarlyLogEvents}); Twisted has
      no public way to empty it.
    - The closure of C{twisted.logger.textFileLogObserver}'s formatter (its
      C{timeFormat}): the text log twistd writes is given a faster formatter
      of the same output (L{msa.service.logs.ClassicText}), which needs the
      time format twistd chose (L{textLogTimeFormat}); the observer does not
      say it.
"""

from __future__ import annotations

from collections.abc import Callable

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet import tcp
from twisted.internet._sslverify import ClientTLSOptions
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogBeginner,
    LogPublisher,
    globalLogBeginner,
)
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

__all__ = [
    "PRIVATE_FUNCTIONS",
    "writeTLSAtOnce",
    "ClientTLSOptions",
    "InvalidProxyHeader",
    "ProxyInfo",
    "V1Parser",
    "V2Parser",
    "forgetEarlyLogEvents",
    "opensslFunction",
    "publisherObservers",
    "setGroups",
    "setSignatureAlgorithms",
    "verifyErrorString",
    "writeEagerly",
]

#: OpenSSL functions that pyOpenSSL has no public API for, reached through
#: L{opensslFunction}.
PRIVATE_FUNCTIONS = (
    "SSL_CTX_set1_curves_list",
    "SSL_CTX_set1_sigalgs_list",
    "X509_verify_cert_error_string",
)


def opensslFunction(name: str) -> Callable | None:
    """
    An OpenSSL function from the binding pyOpenSSL uses, or L{None} when
    this cryptography does not bind it.  C{tests.test_compat} fails loudly
    when one of L{PRIVATE_FUNCTIONS} disappears.
    """
    assert name in PRIVATE_FUNCTIONS, name
    return getattr(_lib, name, None)


def _setList(function: str, context: SSL.Context, value: str) -> bool | None:
    """
    Call an OpenSSL C{SSL_CTX_set1_*_list} function on the C{SSL_CTX *}
    under a pyOpenSSL context (its private C{_context}).

    @return: L{None} when this binding lacks the function, else whether
        OpenSSL took the list.
    """
    setter = opensslFunction(function)
    if setter is None:
        return None
    return bool(setter(context._context, value.encode("ascii")))


def setSignatureAlgorithms(context: SSL.Context, sigalgs: str) -> bool | None:
    """
    Restrict the handshake signature algorithms of C{context}, both ways.

    @param sigalgs: an OpenSSL list, e.g. C{"ECDSA+SHA256:rsa_pss_rsae_sha256"}.
    @return: L{None} when this binding cannot, else whether OpenSSL took the
        list.
    """
    return _setList("SSL_CTX_set1_sigalgs_list", context, sigalgs)


def setGroups(context: SSL.Context, groups: str) -> bool | None:
    """
    Set the key-exchange groups of C{context}.

    @param groups: an OpenSSL list, e.g. C{"X25519:P-256"}.
    @return: L{None} when this binding cannot, else whether OpenSSL took the
        list.
    """
    return _setList("SSL_CTX_set1_curves_list", context, groups)


def verifyErrorString(errno: int) -> str | None:
    """
    OpenSSL's text for an C{X509_V_ERR_*} number, or L{None} when this
    binding has no C{X509_verify_cert_error_string}.
    """
    describe = opensslFunction("X509_verify_cert_error_string")
    if describe is None:
        return None
    return _ffi.string(describe(errno)).decode("ascii", "replace")


def publisherObservers(publisher: LogPublisher) -> list[ILogObserver]:
    """
    The observers of C{publisher}, in the order it calls them (a copy).
    """
    return list(publisher._observers)


def textLogTimeFormat(observer: object) -> str | None:
    """
    The C{timeFormat} that C{twisted.logger.textFileLogObserver} was given
    for C{observer}: a C{strftime} format, or L{None} for no timestamps.

    @raise LookupError: C{observer} was not made by it.
    """
    if not isinstance(observer, FileLogObserver):
        raise LookupError(observer)
    formatter = observer.formatEvent
    code = getattr(formatter, "__code__", None)
    if (
        code is None
        or getattr(formatter, "__qualname__", "")
        != "textFileLogObserver.<locals>.formatEvent"
        or "timeFormat" not in code.co_freevars
    ):
        raise LookupError(observer)
    cells = dict(zip(code.co_freevars, formatter.__closure__ or (), strict=True))
    return cells["timeFormat"].cell_contents


def forgetEarlyLogEvents(beginner: LogBeginner = globalLogBeginner) -> None:
    """
    Drop the events C{beginner} holds from before logging began, so that
    its C{beginLoggingTo} replays none of them.
    """
    beginner._initialBuffer._buffer.clear()


def writeEagerly(transport: object) -> bool:
    """
    Make the TCP connection under C{transport} (under any TLS or other
    protocol wrapper) send what is written to it at once when nothing is
    queued before it, instead of waiting for the reactor to report the
    socket writable.

    Twisted's L{FileDescriptor.write} queues the bytes and arms the socket
    for writing (C{epoll_ctl}); once the reactor has sent them it disarms it
    (C{epoll_ctl} again): two system calls and a reactor turn per reply.
    The socket of an SMTP session is almost always writable, so here the
    arming is replaced by an immediate C{doWrite} when the queue held
    nothing but the new bytes: what the kernel takes is sent, the rest (or
    an error, or a close in progress) is left to the reactor exactly as
    before.  The order of the bytes cannot change: the immediate send only
    happens when nothing was queued.

    @return: whether the connection was found and changed (a TCP or UNIX
        stream connection; not a test's string transport).
    """
    connection = transport
    while isinstance(connection, ProtocolWrapper):
        connection = connection.transport
    if not isinstance(connection, tcp.Connection):
        return False
    armForWriting = connection.startWriting

    def startWriting() -> None:
        if (
            connection.connected
            and not connection.disconnecting
            and connection.producer is None
            and len(connection._tempDataBuffer) == 1
            and connection.offset == len(connection.dataBuffer)
        ):
            if connection.doWrite() is None and not connection._tempDataLen:
                if connection.offset == len(connection.dataBuffer):
                    return
        armForWriting()

    connection.startWriting = startWriting  # type: ignore[method-assign]
    return True


def writeTLSAtOnce(transport: object) -> bool:
    """
    Make the TLS layer under C{transport} (implicit TLS: the transport
    itself or under a protocol wrapper; STARTTLS: the layer the TCP
    connection writes through) encrypt and send each write as it is made,
    without Twisted's aggregation of small writes for the next reactor
    turn.  Call it once TLS is in place (after C{startTLS}).

    The aggregation only ever holds what was written since the last turn;
    here it is never given anything, so nothing can be overtaken.  Bytes
    written through C{writeSequence} still go through it (the MSA does not
    use it on these connections).

    @return: whether a TLS layer was found and changed.
    """
    layer = transport
    while True:
        if isinstance(layer, BufferingTLSTransport):
            break
        if isinstance(layer, tcp.Connection) and getattr(layer, "TLS", False):
            layer = layer.protocol
        elif isinstance(layer, ProtocolWrapper):
            layer = layer.transport
        else:
            return False
    tls = layer

    def write(data: bytes) -> None:
        TLSMemoryBIOProtocol.write(tls, data)

    tls.write = write  # type: ignore[method-assign]
    return True
