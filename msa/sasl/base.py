# -*- test-case-name: tests.test_sasl -*-
"""
What every SASL mechanism shares: the two steps a mechanism returns
(L{Challenge}, L{Authenticate}), what it may know about the server
(L{MechanismContext}), the replies for a client's mistakes (L{malformed},
L{authenticationFailed}) and the user name and password credentials of
PLAIN and LOGIN (L{UsernamePassword}).

The mechanism modules import this one; none of them imports the package
L{msa.sasl}, which only gathers the public names.
"""

import hmac
from collections.abc import Callable

import attrs
from twisted.cred.credentials import IUsernamePassword
from zope.interface import implementer

from msa.errors import SMTPReply
from msa.interfaces import IMechanismCredentials


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
    #: The GSSAPI service name of the protocol (RFC 2831 digest-uri's
    #: serv-type): C{"smtp"}, or C{"pop"} for POP3.
    serviceType: str = "smtp"


def malformed(text: str = "Malformed authentication data") -> SMTPReply:
    """
    The reply for a client message that breaks the mechanism's syntax: 501
    5.5.2, with C{text} saying what was wrong.
    """
    return SMTPReply(501, "5.5.2", text)


def authenticationFailed() -> SMTPReply:
    """
    The reply for credentials that do not log in: 535 5.7.8.
    """
    # One text for every reason, so that a client cannot tell an unknown user
    # from a wrong password or a mechanism the account may not use.
    return SMTPReply(535, "5.7.8", "Authentication credentials invalid")


@implementer(IUsernamePassword, IMechanismCredentials)
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
        if isinstance(password, str):
            password = password.encode()
        return hmac.compare_digest(self.password.encode(), password)
