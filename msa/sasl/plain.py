# -*- test-case-name: tests.test_sasl_plain -*-
"""
SASL PLAIN (RFC 4616): authzid NUL authcid NUL passwd, in one message.
"""

from msa.sasl.base import (
    Authenticate,
    Challenge,
    MechanismContext,
    UsernamePassword,
    authenticationFailed,
    malformed,
)

#: RFC 4616 allows up to 255 octets for each of the three fields.
MAX_FIELD = 255


class PlainMechanism:
    name = "PLAIN"

    def __init__(self, context: MechanismContext | None = None) -> None:
        self._started = False

    def start(self, initialResponse: bytes | None) -> Challenge | Authenticate:
        self._started = True
        if initialResponse is None:
            return Challenge(b"")
        return self.respond(initialResponse)

    def respond(self, data: bytes) -> Authenticate:
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise malformed("PLAIN needs authzid NUL authcid NUL passwd")
        authzid, authcid, passwd = parts
        if not authcid or max(len(p) for p in parts) > MAX_FIELD:
            raise malformed("PLAIN needs authzid NUL authcid NUL passwd")
        try:
            username = authcid.decode("utf-8")
            password = passwd.decode("utf-8")
            authz = authzid.decode("utf-8")
        except UnicodeDecodeError:
            raise malformed("PLAIN fields must be UTF-8")
        if authz and authz != username:
            # Acting for another identity is not offered.
            raise authenticationFailed()
        return Authenticate(UsernamePassword(username, password, self.name))

    def serverFinal(self) -> None:
        return None
