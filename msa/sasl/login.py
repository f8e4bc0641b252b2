# -*- test-case-name: tests.test_sasl_login -*-
"""
SASL LOGIN (draft-murchison-sasl-login): the user name and the password,
each asked for with a challenge.  Obsolete, but R5 requires it and many
programs still use it.
"""

from msa.sasl.base import (
    Authenticate,
    Challenge,
    MechanismContext,
    UsernamePassword,
    malformed,
)

MAX_FIELD = 255


class LoginMechanism:
    name = "LOGIN"

    def __init__(self, context: MechanismContext | None = None) -> None:
        self._username: str | None = None

    def start(self, initialResponse: bytes | None) -> Challenge | Authenticate:
        if initialResponse is None:
            return Challenge(b"Username:")
        return self.respond(initialResponse)

    def respond(self, data: bytes) -> Challenge | Authenticate:
        if len(data) > MAX_FIELD:
            raise malformed("LOGIN field too long")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise malformed("LOGIN fields must be UTF-8")
        if self._username is None:
            if not text:
                raise malformed("LOGIN needs a user name")
            self._username = text
            return Challenge(b"Password:")
        return Authenticate(UsernamePassword(self._username, text, self.name))

    def serverFinal(self) -> None:
        return None
