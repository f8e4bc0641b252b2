# -*- test-case-name: tests.test_sasl -*-
"""
Server-side SASL mechanisms (RFC 4422) as pure state machines: bytes in,
bytes out, no transport.  The SMTP layer (L{msa.submission.server}) drives them:

    step = mechanism.start(initialResponse)   # None: no initial response
    while isinstance(step, Challenge):
        send 334 base64(step.data); read the client's line; decode it
        step = mechanism.respond(decoded)
    # step is an Authenticate: log in through the cred portal with
    # step.credentials; on success:
    final = mechanism.serverFinal()   # bytes (e.g. rspauth) or None
    if final is not None:
        send 334 base64(final); the client must answer an empty line
    send 235 2.7.0

A mechanism raises L{msa.errors.SMTPReply} (see L{malformed} and
L{authenticationFailed}) for anything the client got wrong; it never raises
anything else for any input.

Where things are: the shared steps, context and credentials in
L{msa.sasl.base}; one module per mechanism (L{msa.sasl.plain},
L{msa.sasl.login}, L{msa.sasl.external}, L{msa.sasl.digest_md5},
L{msa.sasl.scram}); the table of them in L{msa.sasl.registry}.  This
package only gathers their public names; the modules import L{msa.sasl.base},
never this package.
"""

from msa.sasl.base import (
    Authenticate,
    Challenge,
    MechanismContext,
    UsernamePassword,
    authenticationFailed,
    malformed,
)
from msa.sasl.digest_md5 import DigestMD5Credentials, DigestMD5Mechanism
from msa.sasl.external import CertificateCredentials, ExternalMechanism
from msa.sasl.login import LoginMechanism
from msa.sasl.plain import PlainMechanism
from msa.sasl.registry import mechanismFactories
from msa.sasl.scram import (
    ScramCredentials,
    ScramSHA256Mechanism,
    ScramSHA256PlusMechanism,
)

__all__ = [
    "Authenticate",
    "CertificateCredentials",
    "Challenge",
    "DigestMD5Credentials",
    "DigestMD5Mechanism",
    "ExternalMechanism",
    "LoginMechanism",
    "MechanismContext",
    "PlainMechanism",
    "ScramCredentials",
    "ScramSHA256Mechanism",
    "ScramSHA256PlusMechanism",
    "UsernamePassword",
    "authenticationFailed",
    "malformed",
    "mechanismFactories",
]
