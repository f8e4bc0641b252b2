"""
SASL EXTERNAL (RFC 4422 appendix A): the client is who its verified TLS
client certificate says (R13).  The optional message is the authorization
identity: the account to act as, which must be the certificate's own.
"""

from msa.sasl import Authenticate, Challenge, MechanismContext, malformed

MAX_AUTHZID = 255


class ExternalMechanism:
    name = "EXTERNAL"

    def __init__(self, context: MechanismContext) -> None:
        self._identities = tuple(context.peerIdentities)

    def start(self, initialResponse: bytes | None) -> Challenge | Authenticate:
        if initialResponse is None:
            return Challenge(b"")
        return self.respond(initialResponse)

    def respond(self, data: bytes) -> Authenticate:
        from msa.accounts.clientcert import CertificateCredentials

        if len(data) > MAX_AUTHZID:
            raise malformed("EXTERNAL authorization identity too long")
        try:
            authzid = data.decode("utf-8")
        except UnicodeDecodeError:
            raise malformed("EXTERNAL authorization identity must be UTF-8")
        return Authenticate(CertificateCredentials(self._identities, authzid))

    def serverFinal(self) -> None:
        return None
