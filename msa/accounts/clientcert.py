# -*- test-case-name: tests.test_clientcert,tests.test_external_offer -*-
"""
Client certificates (R13, the scale-up path): what identifies a verified
certificate, SASL EXTERNAL's checker, and the rule that an account marked
C{requireClientCertificate} may log in (by any mechanism) only on a
connection whose verified certificate belongs to it.

An account lists its certificates under C{certificates}, each either
C{"sha256:<hex fingerprint of the DER certificate>"} or
C{"serialNumber:<subject serialNumber>"} (the organisation identifier that
PKIoverheid certificates carry in the subject's serialNumber attribute).
"""

import hashlib
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import implementer

from msa.interfaces import ICertificateCredentials
from msa.tls import clientCertificateVerified, tlsConnection


def certificateIdentities(certificate: x509.Certificate) -> tuple[str, ...]:
    """
    The strings an account's C{certificates} list can name.
    """
    identities = [
        "sha256:" + hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()
    ]
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        value = attribute.value
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        identities.append(f"serialNumber:{value}")
    return tuple(identities)


def peerIdentities(transport) -> tuple[str, ...]:
    """
    The identities of the verified client certificate of a TLS transport,
    or C{()} when there is none.  OpenSSL has verified the chain against
    the listener's client CA before the handshake completed; with
    C{request}, a certificate that did not verify was let through and
    identifies no one.
    """
    conn = tlsConnection(transport)
    if conn is None or not clientCertificateVerified(transport):
        return ()
    peer = conn.get_peer_certificate()
    if peer is None:
        return ()
    return certificateIdentities(peer.to_cryptography())


def _normalise(identity: str) -> str:
    kind, _, value = identity.partition(":")
    if kind.lower() == "sha256":
        return "sha256:" + value.replace(":", "").lower()
    return f"{kind}:{value}"


def accountCertificates(account) -> set[str]:
    return {_normalise(c) for c in account.extra.get("certificates", [])}


@implementer(ICredentialsChecker)
class CertificateChecker:
    """
    Maps a verified client certificate to the account that lists it.
    """

    credentialInterfaces = (ICertificateCredentials,)

    def __init__(self, store) -> None:
        self._store = store

    def requestAvatarId(self, credentials) -> defer.Deferred:
        identities = {_normalise(i) for i in credentials.identities}
        if not identities:
            return defer.fail(UnauthorizedLogin("no client certificate"))
        matches = [
            account
            for account in self._store.accounts()
            if account.enabled
            and "EXTERNAL" in account.mechanisms
            and identities & accountCertificates(account)
        ]
        if credentials.authzid:
            matches = [a for a in matches if a.name == credentials.authzid]
        if len(matches) != 1:
            return defer.fail(UnauthorizedLogin("certificate maps to no one account"))
        return defer.succeed(matches[0].name)


@runtime_checkable
class CertificateSession(Protocol):
    """
    The cred C{mind} a protocol passes to C{Portal.login}: its session
    (L{msa.envelope.SessionInfo}, or the POP3 server's), which carries the
    identities of the connection's verified client certificate.
    """

    clientCertificate: tuple[str, ...]


def _presented(mind: object) -> tuple[str, ...]:
    """
    The client certificate identities the session presented; none for a
    login without a session (C{mind} L{None}).
    """
    if isinstance(mind, CertificateSession):
        return mind.clientCertificate
    return ()


@implementer(IRealm)
class CertificateBindingRealm:
    """
    Wraps the submission realm: an account with C{requireClientCertificate}
    gets its avatar only when the session (the cred C{mind}) presented one
    of its certificates; otherwise the login fails as a wrong password does.
    """

    def __init__(self, realm, store) -> None:
        self._realm = realm
        self._store = store

    def requestAvatar(self, avatarId, mind, *interfaces):
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        account = self._store.getAccount(name)
        if account is not None and account.extra.get("requireClientCertificate"):
            presented = {_normalise(i) for i in _presented(mind)}
            if not presented & accountCertificates(account):
                raise UnauthorizedLogin("client certificate required")
        return self._realm.requestAvatar(avatarId, mind, *interfaces)
