# -*- test-case-name: tests.test_tls,tests.test_tls_daemon -*-
"""
TLS policy for both directions (R2, R14): server contexts for the STARTTLS
and implicit-TLS listeners, the client context for the relay to the core MTA,
and the self-signed certificate made on first start with built-in defaults
(that certificate and the OCSP response file: L{msa.tlsfiles}).

Secure by default, as the Dutch NCSC guidelines and Mozilla's "intermediate"
profile ask: TLS 1.2 and 1.3 only, ECDHE with AEAD ciphers only, groups
X25519, P-256 and P-384, no compression, no client-initiated renegotiation,
the whole certificate chain sent, signature hashes SHA-256 and up, ALPN
ignored (SMTP has no ALPN name), and an OCSP response stapled when the
operator provides one.
"""

import weakref
from collections.abc import Sequence
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISystemHandle
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import Attribute, Interface

from msa import _compat
from msa.tlsfiles import OCSPStaple, ensureSelfSignedCertificate, readOCSPResponse

__all__ = [
    "DEFAULT_CIPHERS",
    "DEFAULT_GROUPS",
    "DEFAULT_SIGALGS",
    "ISessionProtocol",
    "MINIMUM_VERSIONS",
    "TLSConfigurationError",
    "clientCertificateVerified",
    "clientContextFactory",
    "describeTLS",
    "ensureSelfSignedCertificate",
    "readOCSPResponse",
    "serverContextFactory",
    "tlsConnection",
]

log = Logger()


class ISessionProtocol(Interface):
    """
    A server protocol under the TLS layer that names its client session:
    the TLS log lines of its handshake (a client certificate that did not
    verify) carry that session id, as the protocol's own lines do.
    """

    session = Attribute(
        "The session's facts; its C{sessionId} (L{str}) names it in the log."
    )


#: TLS 1.2 suites: ECDHE key exchange, AEAD only.  TLS 1.3 suites are all
#: AEAD and are left to OpenSSL's defaults.
DEFAULT_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
DEFAULT_GROUPS = "X25519:P-256:P-384"
#: Signature algorithms for handshake signatures, both ways: SHA-256 and up
#: only (NCSC phases out SHA-224 and SHA-1).
DEFAULT_SIGALGS = ":".join(
    [
        "ECDSA+SHA256",
        "ECDSA+SHA384",
        "ECDSA+SHA512",
        "ed25519",
        "ed448",
        "rsa_pss_rsae_sha256",
        "rsa_pss_rsae_sha384",
        "rsa_pss_rsae_sha512",
        "rsa_pss_pss_sha256",
        "rsa_pss_pss_sha384",
        "rsa_pss_pss_sha512",
        "RSA+SHA256",
        "RSA+SHA384",
        "RSA+SHA512",
    ]
)
#: The accepted C{[tls] minimum_version} values, as L{ssl.TLSVersion} names.
MINIMUM_VERSIONS = ("TLSv1_2", "TLSv1_3")
#: X509_V_ERR_CERT_REVOKED: a client certificate the CA revoked is refused
#: even with C{request}.
_CERT_REVOKED = 23


class TLSConfigurationError(Exception):
    """
    The operator's TLS settings cannot be used; the message says why.
    """


def _hardenContext(context: SSL.Context, groups: str) -> None:
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    # Twisted (26.10) always installs an ALPN callback that answers a client
    # offering ALPN with nothing, which OpenSSL turns into alert 80.  SMTP
    # has no ALPN name: carry on without selecting one (RFC 7301 3.2).
    context.set_alpn_select_callback(lambda conn, offered: SSL.NO_OVERLAPPING_PROTOCOLS)
    # pyOpenSSL has no API for these two: msa._compat reaches OpenSSL's.
    sigalgsSet = _compat.setSignatureAlgorithms(context, DEFAULT_SIGALGS)
    if sigalgsSet is None:
        log.warn("this cryptography cannot restrict TLS signature algorithms")
    elif not sigalgsSet:
        raise TLSConfigurationError("cannot set the TLS signature algorithms")
    groupsSet = _compat.setGroups(context, groups)
    if groupsSet is None:
        # An old cryptography without the binding: P-256 alone is still
        # within the policy, if narrower than asked.
        context.set_tmp_ecdh(crypto.get_elliptic_curve("prime256v1"))
        log.warn("this cryptography cannot set TLS groups; using P-256 only")
        return
    if not groupsSet:
        raise TLSConfigurationError(f"unsupported TLS groups: {groups!r}")


#: Connections whose client certificate did not verify (C{request} mode):
#: L{SSL.Connection} -> why.
_unverified: "weakref.WeakKeyDictionary[SSL.Connection, str]" = (
    weakref.WeakKeyDictionary()
)


def clientCertificateVerified(transport) -> bool:
    """
    Whether the client certificate of a TLS transport, if any, verified.
    With C{request}, a certificate that does not verify leaves the
    connection up but must not identify anyone.
    """
    conn = tlsConnection(transport)
    return conn is not None and conn not in _unverified


def tlsConnection(transport: object) -> SSL.Connection | None:
    """
    The OpenSSL connection of a transport speaking TLS (implicit TLS, or
    after STARTTLS, which makes the TCP transport's C{getHandle} the TLS
    layer's), or L{None} when it does not (yet) speak TLS.
    """
    if not ISystemHandle.providedBy(transport):
        return None
    conn = cast(ISystemHandle, transport).getHandle()
    return conn if isinstance(conn, SSL.Connection) else None


def _requestVerify(conn: SSL.Connection, cert, errno: int, depth: int, ok: int):
    """
    The verify callback for C{client_certificates = "request"}: a client
    certificate that does not verify (an unknown CA, expired, ...) is
    noted and logged, and the handshake goes on without it, so that the
    client can still log in by password.  A revoked one is refused.
    """
    if ok:
        return True
    if errno == _CERT_REVOKED:
        return False
    if conn not in _unverified:
        reason = _verifyErrorString(errno)
        _unverified[conn] = reason
        client, session = _describePeer(conn)
        log.warn(
            "session {session}: client certificate not verified ({reason}; "
            "{subject}, depth {depth}) from {client}: the connection goes on "
            "without a certificate identity",
            event="client_certificate_unverified",
            session=session,
            reason=reason,
            subject=cert.to_cryptography().subject.rfc4514_string(),
            depth=depth,
            client=client,
        )
    return True


def _describePeer(conn: SSL.Connection) -> tuple[str, str]:
    """
    The peer's address and the SMTP session id (when the protocol under
    the TLS layer has one) of a connection in its handshake, for the log.
    """
    protocol = conn.get_app_data()
    if not isinstance(protocol, TLSMemoryBIOProtocol):
        return "?", ""
    peer = protocol.getPeer()
    host = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else "?"
    # Under the TLS layer, maybe under a PROXY header wrapper: the protocol
    # of the session.
    while isinstance(protocol, ProtocolWrapper):
        protocol = protocol.wrappedProtocol
    if ISessionProtocol.providedBy(protocol):
        return host, cast(ISessionProtocol, protocol).session.sessionId
    return host, ""


def _verifyErrorString(errno: int) -> str:
    description = _compat.verifyErrorString(errno)
    if description is None:
        return f"verify error {errno}"
    return description


class _HardenedOptions(ssl.CertificateOptions):
    """
    L{CertificateOptions} that also restricts the key-exchange groups and
    signature algorithms, forbids renegotiation, ignores ALPN and, for a
    listener, names the acceptable client CAs, lets an unverifiable client
    certificate through unidentified with C{request}, and staples OCSP.
    """

    def __init__(
        self,
        *args,
        groups: str = DEFAULT_GROUPS,
        crlFile: str | None = None,
        clientCAs: Sequence[crypto.X509] = (),
        requestOnly: bool = False,
        ocsp: "OCSPStaple | None" = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._groups = groups
        self._crlFile = crlFile
        self._clientCAs = list(clientCAs)
        self._requestOnly = requestOnly
        self._ocsp = ocsp
        self._hardened: SSL.Context | None = None

    def getContext(self) -> SSL.Context:
        """
        The context, made once and hardened once.  Twisted makes every
        connection (C{serverConnectionForTLS}, C{clientConnectionForTLS})
        from this public method's context; C{tests.test_compat} checks that
        it still does, since a connection made around it would silently lose
        the policy.
        """
        if self._hardened is None:
            context = super().getContext()
            self._harden(context)
            self._hardened = context
        return self._hardened

    def _harden(self, context: SSL.Context) -> None:
        _hardenContext(context, self._groups)
        for ca in self._clientCAs:
            # The CertificateRequest names them, so that a client holding
            # several certificates can choose.
            context.add_client_ca(ca)
        if self._requestOnly:
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _requestVerify)
        if self._ocsp is not None:
            context.set_ocsp_server_callback(self._ocsp)
        if self._crlFile:
            with open(self._crlFile, "rb") as f:
                data = f.read()
            try:
                crl = x509.load_pem_x509_crl(data)
            except ValueError:
                crl = x509.load_der_x509_crl(data)
            store = context.get_cert_store()
            assert store is not None  # a server context always has one
            store.add_crl(crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


def _readPEMChain(path: str) -> list[crypto.X509]:
    with open(path, "rb") as f:
        data = f.read()
    return [
        crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(data)
    ]


def serverContextFactory(
    certFile: str,
    keyFile: str,
    chainFile: str | None = None,
    ciphers: str = DEFAULT_CIPHERS,
    groups: str = DEFAULT_GROUPS,
    minimumVersion: str = "TLSv1_2",
    clientCertificates: str = "off",
    clientCAFile: str | None = None,
    clientCRLFile: str | None = None,
    ocspResponseFile: str | None = None,
) -> ssl.CertificateOptions:
    """
    Build the context factory for a listener.

    @param certFile: PEM file with the server certificate, optionally
        followed by its intermediate certificates.
    @param keyFile: PEM file with the private key.
    @param chainFile: optional PEM file with more intermediates.
    @param clientCertificates: C{"off"}, C{"request"} (verified when
        offered) or C{"require"} (the handshake fails without one), R13.
    @param clientCAFile: the CAs client certificates must chain to.
    @param clientCRLFile: a CRL (PEM or DER) checked for client certificates.
    @param ocspResponseFile: a DER OCSP response for the certificate, stapled
        when a client asks; re-read when the file changes.
    """
    if minimumVersion not in MINIMUM_VERSIONS:
        raise TLSConfigurationError(
            f"minimum TLS version must be one of {', '.join(MINIMUM_VERSIONS)}, "
            f"not {minimumVersion!r}"
        )
    verifyArgs: dict = {}
    if clientCertificates != "off":
        if clientCertificates not in ("request", "require") or not clientCAFile:
            raise TLSConfigurationError(
                "client certificates need 'request' or 'require' and a CA file"
            )
        try:
            clientCAs = _readPEMChain(clientCAFile)
            verifyArgs = {
                "verify": True,
                "caCerts": clientCAs,
                "clientCAs": clientCAs,
                "requireCertificate": clientCertificates == "require",
                "requestOnly": clientCertificates == "request",
                "crlFile": clientCRLFile,
            }
        except (OSError, ValueError) as e:
            raise TLSConfigurationError(f"cannot load client CA file: {e}") from e
    try:
        chain = _readPEMChain(certFile)
        with open(keyFile, "rb") as f:
            loaded = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{keyFile}: not an ECDSA or RSA private key")
        key = crypto.PKey.from_cryptography_key(loaded)
        if chainFile:
            chain += _readPEMChain(chainFile)
    except (OSError, ValueError) as e:
        raise TLSConfigurationError(f"cannot load certificate or key: {e}") from e
    if not chain:
        raise TLSConfigurationError(f"no certificate in {certFile}")
    staple = None
    if ocspResponseFile:
        try:
            staple = OCSPStaple(ocspResponseFile, chain[0].get_serial_number())
        except (OSError, ValueError) as e:
            raise TLSConfigurationError(f"cannot load the OCSP response: {e}") from e
    options = _HardenedOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.lookupByName(minimumVersion),
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers),
        groups=groups,
        ocsp=staple,
        **verifyArgs,
    )
    # Load it once now, so that a bad key or mismatched certificate stops the
    # start instead of failing every handshake.
    try:
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigurationError(f"certificate and key do not match: {e}") from e
    except (OSError, ValueError) as e:
        raise TLSConfigurationError(f"cannot load the client CRL: {e}") from e
    return options


def clientContextFactory(
    hostname: str,
    caFile: str | None = None,
    clientCertFile: str | None = None,
    clientKeyFile: str | None = None,
    verify: bool = True,
    ciphers: str = DEFAULT_CIPHERS,
    groups: str = DEFAULT_GROUPS,
):
    """
    The context for the relay's connection to the core MTA (R14): the same
    floor as the server side, and the core's certificate verified against
    C{hostname} with service-identity, from C{caFile} or the system trust
    store.

    @param verify: L{False} only when the operator said so explicitly.
    """
    trustRoot = None
    if caFile:
        with open(caFile, "rb") as f:
            trustRoot = ssl.trustRootFromCertificates(
                [
                    ssl.Certificate(c)
                    for c in (
                        crypto.X509.from_cryptography(x)
                        for x in x509.load_pem_x509_certificates(f.read())
                    )
                ]
            )
    clientCertificate = None
    if clientCertFile:
        with open(clientCertFile, "rb") as f:
            certPEM = f.read()
        with open(clientKeyFile or clientCertFile, "rb") as f:
            keyPEM = f.read()
        clientCertificate = ssl.PrivateCertificate.loadPEM(certPEM + b"\n" + keyPEM)
    if not verify:
        log.warn(
            "TLS certificate verification of the core MTA is OFF: the relay "
            "cannot tell the core from an impostor"
        )
    options = _HardenedOptions(
        trustRoot=trustRoot,
        privateKey=clientCertificate.privateKey.original if clientCertificate else None,
        certificate=clientCertificate.original if clientCertificate else None,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers),
        groups=groups,
    )
    if not verify:
        return options
    # Hostname verification and SNI over the hardened options: Twisted's
    # public optionsForClientTLS only wraps options it builds itself.
    return _compat.ClientTLSOptions(options.clientConnectionForTLS, hostname)


def describeTLS(transport) -> tuple[str, str]:
    """
    The protocol version and cipher of an established TLS transport, or
    empty strings when the transport is not (yet) TLS.
    """
    conn = tlsConnection(transport)
    if conn is None:
        return "", ""
    return conn.get_protocol_version_name() or "", conn.get_cipher_name() or ""


def channelBindings(transport: object) -> dict[str, bytes]:
    """
    The channel bindings of a TLS transport for SCRAM-SHA-256-PLUS:
    C{{"tls-exporter": data}} (RFC 9266: the exporter with label
    C{EXPORTER-Channel-Binding}, no context, 32 bytes) on TLS 1.3, else
    nothing.  On TLS 1.2 tls-exporter is safe only with the extended master
    secret, which pyOpenSSL cannot tell us was negotiated, so TLS 1.2 gets
    no channel binding.  Both the submission and the POP3 server's AUTH
    use it.
    """
    conn = tlsConnection(transport)
    if conn is None:
        return {}
    if conn.get_protocol_version_name() != "TLSv1.3":
        return {}
    try:
        data = conn.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    except SSL.Error:
        return {}
    return {"tls-exporter": data}
