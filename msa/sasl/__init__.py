"""
Server-side SASL mechanisms (RFC 4422) as pure state machines: bytes in,
bytes out, no transport.  The SMTP layer (L{msa.server}) drives them:

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
"""

from collections.abc import Callable

import attrs

from msa.errors import SMTPReply


@attrs.frozen
class Challenge:
    """
    Send C{data} to the client in a 334 reply and wait for its response.
    """

    data: bytes


@attrs.frozen
class Authenticate:
    """
    The exchange is complete on the client's side: check C{credentials}
    through the cred portal.
    """

    credentials: object


@attrs.define
class MechanismContext:
    """
    What a mechanism may need to know about the server.

    @ivar realm: the realm offered in DIGEST-MD5 challenges.
    @ivar serverNames: host names a DIGEST-MD5 digest-uri may name.
    @ivar scramParameters: C{(username, mechanism) -> (salt, iterations)}
        or L{None} for an unknown user or a user without SCRAM secrets.
    """

    realm: str = "localhost"
    serverNames: list[str] = attrs.Factory(lambda: ["localhost"])
    scramParameters: Callable[[str, str], tuple[bytes, int] | None] = lambda u, m: None
    #: The verified client certificate's identities, for EXTERNAL; set per
    #: session.
    peerIdentities: tuple[str, ...] = ()
    #: Channel binding type name (C{"tls-exporter"}) -> its data for this
    #: connection; set per session, and only when SCRAM-SHA-256-PLUS is
    #: offered on it.  Non-empty means "the server supports channel binding
    #: here" for SCRAM's downgrade protection (RFC 5802 6).
    channelBindings: dict[str, bytes] = attrs.Factory(dict)


def malformed(text: str = "Malformed authentication data") -> SMTPReply:
    return SMTPReply(501, "5.5.2", text)


def authenticationFailed() -> SMTPReply:
    # One text for every reason, so that a client cannot tell an unknown user
    # from a wrong password or a mechanism the account may not use.
    return SMTPReply(535, "5.7.8", "Authentication credentials invalid")


class UsernamePassword:
    """
    A user name and password from PLAIN or LOGIN: provides twisted.cred's
    L{IUsernamePassword} and says which mechanism produced it.
    """

    def __init__(self, username: str, password: str, mechanism: str) -> None:
        self.username = username
        self.password = password
        self.mechanism = mechanism

    def checkPassword(self, password: bytes | str) -> bool:
        import hmac

        if isinstance(password, str):
            password = password.encode()
        return hmac.compare_digest(self.password.encode(), password)


def _declare() -> None:
    from twisted.cred.credentials import IUsernamePassword
    from zope.interface import classImplements

    from msa.interfaces import IMechanismCredentials

    classImplements(UsernamePassword, IUsernamePassword, IMechanismCredentials)


_declare()


def mechanismFactories() -> dict[str, Callable[[MechanismContext], object]]:
    """
    Every mechanism this package implements, by its SASL name.
    """
    from msa.sasl.external import ExternalMechanism
    from msa.sasl.login import LoginMechanism
    from msa.sasl.plain import PlainMechanism

    factories: dict[str, Callable[[MechanismContext], object]] = {
        "PLAIN": PlainMechanism,
        "LOGIN": LoginMechanism,
        "EXTERNAL": ExternalMechanism,
    }
    try:
        from msa.sasl.digest_md5 import DigestMD5Mechanism

        factories["DIGEST-MD5"] = DigestMD5Mechanism
    except ImportError:
        pass
    try:
        from msa.sasl.scram import ScramSHA256Mechanism, ScramSHA256PlusMechanism

        factories["SCRAM-SHA-256"] = ScramSHA256Mechanism
        factories["SCRAM-SHA-256-PLUS"] = ScramSHA256PlusMechanism
    except ImportError:
        pass
    return factories
