# -*- test-case-name: tests.test_sasl_external -*-
"""
SASL EXTERNAL (RFC 4422 appendix A): the client is who its verified TLS
client certificate says (R13).  The optional message is the authorization
identity: the account to act as, which must be the certificate's own.

The credentials it yields (L{CertificateCredentials}) only carry the
certificate's identities; which account lists them is for the checker
(L{msa.accounts.clientcert.CertificateChecker}) to decide.
"""

from zope.interface import implementer

from msa.interfaces import ICertificateCredentials, IMechanismCredentials
from msa.sasl.base import Authenticate, Challenge, MechanismContext, malformed

MAX_AUTHZID = 255


@implementer(ICertificateCredentials, IMechanismCredentials)
class CertificateCredentials:
    """
    The identities of the connection's verified client certificate and the
    account the client asked to act as (C{""}: whichever lists them).
    """

    mechanism = "EXTERNAL"

    def __init__(self, identities: tuple[str, ...], authzid: str) -> None:
        self.identities = identities
        self.authzid = authzid
        self.username = authzid


class ExternalMechanism:
    name = "EXTERNAL"

    def __init__(self, context: MechanismContext) -> None:
        self._identities = tuple(context.peerIdentities)

    def start(self, initialResponse: bytes | None) -> Challenge | Authenticate:
        if initialResponse is None:
            return Challenge(b"")
        return self.respond(initialResponse)

    def respond(self, data: bytes) -> Authenticate:
        if len(data) > MAX_AUTHZID:
            raise malformed("EXTERNAL authorization identity too long")
        try:
            authzid = data.decode("utf-8")
        except UnicodeDecodeError:
            raise malformed("EXTERNAL authorization identity must be UTF-8")
        return Authenticate(CertificateCredentials(self._identities, authzid))

    def serverFinal(self) -> None:
        return None
