# -*- test-case-name: tests.test_sasl_scram,tests.test_scram_plus -*-
"""
SASL SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677), server
side, with the C{tls-exporter} channel binding of RFC 9266.

The server never sees the password: the account store keeps the salt, the
iteration count, StoredKey and ServerKey (see L{deriveKeys}); the mechanism
asks L{MechanismContext.scramParameters} for the salt and iteration count
and the cred checker hands StoredKey and ServerKey to
L{ScramCredentials.checkKeys}.

The exchange::

    C: n,,n=user,r=<client nonce>            (may be the initial response)
    S: r=<client nonce><server nonce>,s=<base64 salt>,i=<iterations>
    C: c=biws,r=<both nonces>,p=<base64 ClientProof>
    S: v=<base64 ServerSignature>            (L{ScramSHA256Mechanism.serverFinal})
    C: (empty)

SCRAM-SHA-256-PLUS (L{ScramSHA256PlusMechanism}) binds the exchange to
the TLS connection: the client sends C{p=tls-exporter} in its gs2 header and
C{c=} carries base64(gs2 header + channel binding data), which the server
compares with the data it computed on its own side of the connection
(L{MechanismContext.channelBindings}, filled per session by the SMTP layer,
only on TLS 1.3: see L{msa.submission.auth}).  No other channel binding type is
supported.  Both mechanisms use the same keys (they are per hash function):
the credentials of either report C{mechanism = "SCRAM-SHA-256"}, for the
key look-up and the account's allowed mechanisms alike.

Downgrade protection (RFC 5802 section 6): a SCRAM-SHA-256 client sending
C{y,,} (it can bind but believes the server cannot) fails when the server
offers -PLUS on this connection, that is when the context carries channel
bindings; otherwise C{y,,} is accepted.  A client asking for channel binding
(C{p=...}) with plain SCRAM-SHA-256 fails.

An unknown user (or one without SCRAM secrets) gets a plausible
server-first message with a fake, stable salt and 4096 iterations, so that
the server-first message does not reveal whether the account exists; the
exchange then fails when the checker finds no keys.

User names go through SASLprep (RFC 4013, as a "query": unassigned code
points allowed), built on the standard library's C{stringprep} tables; the
passwords given to L{deriveKeys} go through it as a "stored string".
"""

import base64
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from collections.abc import Callable

from zope.interface import implementer

from msa.interfaces import IMechanismCredentials, IScramCredentials
from msa.sasl.base import (
    Authenticate,
    Challenge,
    MechanismContext,
    authenticationFailed,
    malformed,
)

#: Longest client message accepted.
MAX_MESSAGE = 4096

#: Iteration count reported for unknown users (RFC 7677's minimum).
FAKE_ITERATIONS = 4096

#: Secret from which the fake salts of unknown users are derived: random,
#: until the service sets one that every process serving the same accounts
#: has (L{setFakeSaltSecret}); otherwise an unknown user's salt would
#: differ from one process (worker, instance, restart) to the next, where a
#: real user's stays, and tell a client which names are unknown.
_fakeSaltSecret = secrets.token_bytes(32)

_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_EXTENSION = re.compile(r"[A-Za-z]=.*", re.DOTALL)
_CB_NAME = re.compile(r"[A-Za-z0-9.-]+")

#: The only channel binding type supported (RFC 9266).
TLS_EXPORTER = "tls-exporter"
_HASH = hashlib.sha256


def saslprep(text: str, allowUnassigned: bool = True) -> str:
    """
    Prepare a string with SASLprep (RFC 4013).

    @param allowUnassigned: L{True} for a query (a user name received from a
        client), L{False} for a stored string (a password being set).
    @raise ValueError: if the string contains prohibited characters or
        breaks the bidirectional rules.
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c
        for c in text
        if not stringprep.in_table_b1(c)
    )
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for c in prepared:
        if any(table(c) for table in prohibited):
            raise ValueError("prohibited character")
        if not allowUnassigned and stringprep.in_table_a1(c):
            raise ValueError("unassigned code point")
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise ValueError("mixed bidirectional text")
        if not (
            stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])
        ):
            raise ValueError("bidirectional text must start and end with R/AL")
    return prepared


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, _HASH).digest()


def deriveKeys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """
    The secrets the account store keeps for SCRAM-SHA-256.

    @return: C{(storedKey, serverKey)}, 32 bytes each.
    @raise ValueError: if the password fails SASLprep.
    """
    prepared = saslprep(password, allowUnassigned=False).encode("utf-8")
    salted = hashlib.pbkdf2_hmac(_HASH().name, prepared, salt, iterations)
    clientKey = _hmac(salted, b"Client Key")
    return _HASH(clientKey).digest(), _hmac(salted, b"Server Key")


def setFakeSaltSecret(material: bytes) -> None:
    """
    Derive the fake salts of unknown users from C{material} (the TLS
    private key's file, which every worker and every instance behind the
    same name has): the same in every process given the same material, and
    across restarts.  The derivation (HMAC-SHA-256 under a label of its own)
    tells nothing about the material.
    """
    global _fakeSaltSecret
    _fakeSaltSecret = _hmac(material, b"digipoort-msa SCRAM fake salts")


def _fakeSalt(username: str) -> bytes:
    return _hmac(_fakeSaltSecret, username.encode("utf-8"))[:16]


def _saslname(value: str) -> str:
    """
    Decode a saslname (C{=2C} is a comma, C{=3D} an equals sign) and apply
    SASLprep.
    """
    if not value:
        raise malformed("SCRAM empty name")
    pieces = value.split("=")
    decoded = [pieces[0]]
    for piece in pieces[1:]:
        if piece.startswith("2C"):
            decoded.append("," + piece[2:])
        elif piece.startswith("3D"):
            decoded.append("=" + piece[2:])
        else:
            raise malformed("SCRAM bad escape in name")
    try:
        name = saslprep("".join(decoded))
    except ValueError:
        raise malformed("SCRAM name fails SASLprep")
    if not name:
        raise malformed("SCRAM empty name")
    return name


def _decodeMessage(data: bytes) -> str:
    if len(data) > MAX_MESSAGE:
        raise malformed("SCRAM message too long")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed("SCRAM message is not UTF-8")


@implementer(IScramCredentials, IMechanismCredentials)
class ScramCredentials:
    """
    A client-final message waiting for the checker to supply the account's
    StoredKey and ServerKey.

    @ivar username: the SASLprepped user name, L{str}.
    @ivar serverSignature: after a successful L{checkKeys}, the raw
        ServerSignature.
    """

    mechanism = "SCRAM-SHA-256"

    def __init__(
        self, username: str, authMessage: bytes, proof: bytes, fake: bool = False
    ) -> None:
        self.username = username
        self._authMessage = authMessage
        self._proof = proof
        self._fake = fake
        self.serverSignature: bytes | None = None

    def checkKeys(self, storedKey: bytes, serverKey: bytes) -> bool:
        """
        @return: L{True} when the client proof was computed from the
            password behind C{storedKey}.  Always L{False} when the exchange
            used the fake salt of an unknown user.
        """
        clientSignature = _hmac(storedKey, self._authMessage)
        clientKey = bytes(
            a ^ b for a, b in zip(self._proof, clientSignature, strict=True)
        )
        valid = hmac.compare_digest(_HASH(clientKey).digest(), storedKey)
        if not valid or self._fake:
            return False
        self.serverSignature = _hmac(serverKey, self._authMessage)
        return True


def _newNonce() -> str:
    return secrets.token_urlsafe(24)


class ScramSHA256Mechanism:
    """
    The server side of one SCRAM-SHA-256 exchange.
    """

    name = "SCRAM-SHA-256"
    #: The name the account store keeps the keys under.
    keyMechanism = "SCRAM-SHA-256"

    def __init__(
        self,
        context: MechanismContext | None = None,
        nonceFactory: Callable[[], str] = _newNonce,
    ) -> None:
        """
        @param nonceFactory: makes the server's part of the nonce (for
            tests): printable ASCII without commas.
        """
        self._context = context if context is not None else MechanismContext()
        self._nonceFactory = nonceFactory
        self._state = "new"
        self._credentials: ScramCredentials | None = None
        self._fake = False
        self._username = ""
        self._gs2Header = b""
        self._cbindInput = b""
        self._clientFirstBare = ""
        self._serverFirst = ""
        self._nonce = ""

    def start(self, initialResponse: bytes | None) -> Challenge | Authenticate:
        """
        Begin: the client-first message may come as the initial response.
        """
        if self._state != "new":
            raise malformed("SCRAM exchange already started")
        self._state = "client-first"
        if initialResponse is None:
            return Challenge(b"")
        return self.respond(initialResponse)

    def respond(self, data: bytes) -> Challenge | Authenticate:
        """
        Take the client-first or client-final message.

        @raise msa.errors.SMTPReply: 501 5.5.2 for malformed messages,
            535 5.7.8 for well-formed but unacceptable ones.
        """
        state, self._state = self._state, "done"
        if state == "client-first":
            return self._clientFirst(_decodeMessage(data))
        if state == "client-final":
            return self._clientFinal(_decodeMessage(data))
        raise malformed("SCRAM message out of sequence")

    def _clientFirst(self, message: str) -> Challenge:
        fields = message.split(",")
        if len(fields) < 4:
            raise malformed("SCRAM client-first message expected")
        flag, authz = fields[0], fields[1]
        bindingData = self._channelBinding(flag)
        if authz and not authz.startswith("a="):
            raise malformed("SCRAM bad authorization identity")
        if fields[2].startswith("m="):
            raise malformed("SCRAM mandatory extensions are not supported")
        if not fields[2].startswith("n=") or not fields[3].startswith("r="):
            raise malformed("SCRAM user name and nonce expected")
        username = _saslname(fields[2][2:])
        if authz and _saslname(authz[2:]) != username:
            raise authenticationFailed()
        clientNonce = fields[3][2:]
        if not _PRINTABLE.fullmatch(clientNonce):
            raise malformed("SCRAM bad nonce")
        for extension in fields[4:]:
            if not _EXTENSION.fullmatch(extension):
                raise malformed("SCRAM bad extension")

        parameters = self._context.scramParameters(username, self.keyMechanism)
        self._fake = parameters is None
        if parameters is None:
            salt, iterations = _fakeSalt(username), FAKE_ITERATIONS
        else:
            salt, iterations = parameters
        self._username = username
        self._gs2Header = (flag + "," + authz + ",").encode("utf-8")
        self._cbindInput = self._gs2Header + bindingData
        self._clientFirstBare = ",".join(fields[2:])
        self._nonce = clientNonce + self._nonceFactory()
        self._serverFirst = "r=%s,s=%s,i=%d" % (
            self._nonce,
            base64.b64encode(salt).decode("ascii"),
            iterations,
        )
        self._state = "client-final"
        return Challenge(self._serverFirst.encode("utf-8"))

    def _channelBinding(self, flag: str) -> bytes:
        """
        Check the gs2 channel binding flag.

        @return: the channel binding data the client must have used (empty
            without channel binding).
        """
        if flag.startswith("p="):
            if not _CB_NAME.fullmatch(flag[2:]):
                raise malformed("SCRAM bad channel binding name")
            # Channel binding requires SCRAM-SHA-256-PLUS.
            raise authenticationFailed()
        if flag not in ("n", "y"):
            raise malformed("SCRAM bad channel binding flag")
        if flag == "y" and self._context.channelBindings:
            # RFC 5802 6: the client could bind and believes the server
            # cannot, but this server offers -PLUS here: a downgrade.
            raise authenticationFailed()
        return b""

    def _clientFinal(self, message: str) -> Authenticate:
        withoutProof, separator, proofText = message.rpartition(",p=")
        fields = withoutProof.split(",")
        if not separator or len(fields) < 2:
            raise malformed("SCRAM client-final message expected")
        if not fields[0].startswith("c=") or not fields[1].startswith("r="):
            raise malformed("SCRAM channel binding and nonce expected")
        for extension in fields[2:]:
            if not _EXTENSION.fullmatch(extension):
                raise malformed("SCRAM bad extension")
        try:
            binding = base64.b64decode(fields[0][2:], validate=True)
            proof = base64.b64decode(proofText, validate=True)
        except ValueError:
            raise malformed("SCRAM bad base64")
        if len(proof) != _HASH().digest_size:
            raise malformed("SCRAM bad proof length")
        if not hmac.compare_digest(binding, self._cbindInput):
            raise authenticationFailed()
        if fields[1][2:] != self._nonce:
            raise authenticationFailed()
        authMessage = ",".join(
            [self._clientFirstBare, self._serverFirst, withoutProof]
        ).encode("utf-8")
        self._credentials = ScramCredentials(
            self._username, authMessage, proof, fake=self._fake
        )
        return Authenticate(self._credentials)

    def serverFinal(self) -> bytes:
        """
        The C{v=...} message proving the server knew ServerKey.

        @raise msa.errors.SMTPReply: 535 5.7.8 if the credentials have not
            been checked successfully (failing closed).
        """
        if self._credentials is None or self._credentials.serverSignature is None:
            raise authenticationFailed()
        return b"v=" + base64.b64encode(self._credentials.serverSignature)


class ScramSHA256PlusMechanism(ScramSHA256Mechanism):
    """
    The server side of one SCRAM-SHA-256-PLUS exchange: SCRAM-SHA-256 bound
    to the TLS connection with C{tls-exporter} (RFC 9266), whose data
    L{MechanismContext.channelBindings} must hold.
    """

    name = "SCRAM-SHA-256-PLUS"

    def _channelBinding(self, flag: str) -> bytes:
        if not flag.startswith("p="):
            if flag not in ("n", "y"):
                raise malformed("SCRAM bad channel binding flag")
            # A -PLUS exchange must bind (RFC 5802 6).
            raise authenticationFailed()
        cbName = flag[2:]
        if not _CB_NAME.fullmatch(cbName):
            raise malformed("SCRAM bad channel binding name")
        data = self._context.channelBindings.get(cbName)
        if cbName != TLS_EXPORTER or not data:
            # Unsupported channel binding type (RFC 5802's
            # e=unsupported-channel-binding-type), or none available: fail
            # closed.
            raise authenticationFailed()
        return data
