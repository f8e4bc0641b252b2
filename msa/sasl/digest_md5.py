# -*- test-case-name: tests.test_sasl_digest_md5,tests.test_digest_nonascii -*-
"""
SASL DIGEST-MD5 (RFC 2831), server side, authentication only (qop=auth).

DIGEST-MD5 is obsolete (RFC 6331) but still spoken by curl, swaks, GNU SASL
and Cyrus clients.  The server never sees the password: the account store
keeps H(A1) = MD5(username:realm:password) (see L{computeHA1}; for non-ASCII
names the few variants real clients compute, L{ha1Variants}) and the cred
checker hands those 16 raw bytes to L{DigestMD5Credentials.checkHA1}.

The exchange::

    S: realm="...",nonce="...",qop="auth",charset=utf-8,algorithm=md5-sess
    C: username="...",realm="...",nonce="...",cnonce="...",nc=00000001,
       qop=auth,digest-uri="smtp/host",response=<32 hex>[,charset=utf-8]
    S: rspauth=<32 hex>           (L{DigestMD5Mechanism.serverFinal})
    C: (empty)

Integrity and confidentiality layers (auth-int, auth-conf) are refused, and
so is re-authentication (nc other than 00000001): every exchange gets a
fresh nonce that is good for exactly one response.
"""

import hashlib
import hmac
import secrets
from collections.abc import Callable

from zope.interface import implementer

from msa.interfaces import IDigestMD5Credentials, IMechanismCredentials
from msa.sasl.base import (
    Authenticate,
    Challenge,
    MechanismContext,
    authenticationFailed,
    malformed,
)

#: RFC 2831 section 2.1.2: "The size of a digest-response is less than 4096
#: bytes."
MAX_RESPONSE = 4096

#: Directives that must appear in every digest-response (qop defaults to auth).
REQUIRED = ("username", "nonce", "cnonce", "nc", "digest-uri", "response")

_SPACE = b" \t"
#: RFC 2616 token characters, for directive names.
_TOKEN = frozenset(c for c in range(0x21, 0x7F) if chr(c) not in '()<>@,;:\\"/[]?={}')
#: Characters of an unquoted directive value (more lenient than a token:
#: clients send digest-uri=smtp/host unquoted).
_BARE = frozenset(c for c in range(0x21, 0x7F) if chr(c) not in '",\\')


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _quote(value: str) -> bytes:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return b'"' + escaped.encode("utf-8") + b'"'


def _latin1IfPossible(text: str) -> bytes:
    """
    RFC 2831 section 2.1.2.1: a field all of whose characters are in ISO
    8859-1 is hashed as ISO 8859-1, any other as UTF-8.
    """
    try:
        return text.encode("iso-8859-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _ha1(username: bytes, realm: bytes, password: bytes) -> bytes:
    return hashlib.md5(username + b":" + realm + b":" + password).digest()


def computeHA1(username: str, realm: str, password: str) -> bytes:
    """
    The secret the account store keeps for DIGEST-MD5: the 16 raw bytes of
    MD5(username:realm:password), as RFC 2831 section 2.1.2.1 computes it:
    each of the three fields is converted to ISO 8859-1 on its own when all
    its characters fit that charset, and left in UTF-8 otherwise.  That is
    what the JDK (javax.security.sasl) and Cyrus libsasl2 compute; for an
    ASCII account it is the only value any client computes.  Other real
    clients differ for non-ASCII names: see L{ha1Variants}.

    @return: 16 bytes (not hex).
    """
    return _ha1(
        _latin1IfPossible(username),
        _latin1IfPossible(realm),
        _latin1IfPossible(password),
    )


def ha1Variants(username: str, realm: str, password: str) -> list[bytes]:
    """
    Every H(A1) a real client computes for these names and password,
    without repeats, the RFC's first.  They are all password equivalents of
    the same password; they differ only when a field is not ASCII:

      1. RFC 2831 (L{computeHA1}): each field converted to ISO 8859-1 when
         it fits: the JDK, Cyrus libsasl2.
      2. Only the password converted, user name and realm in UTF-8: GNU
         SASL (msmtp, mutt, gsasl).
      3. Nothing converted, all UTF-8: Perl's Authen::SASL::Perl (swaks),
         pure-sasl, curl.

    (The single value this program stored before, MD5 of the whole string
    in ISO 8859-1 if all of it fit and UTF-8 otherwise, is always the first
    or the last of these.)

    @return: one to three 16-byte values; exactly one for ASCII input.
    """
    variants = []
    for ha1 in (
        computeHA1(username, realm, password),
        _ha1(_utf8(username), _utf8(realm), _latin1IfPossible(password)),
        _ha1(_utf8(username), _utf8(realm), _utf8(password)),
    ):
        if ha1 not in variants:
            variants.append(ha1)
    return variants


def _digest(
    ha1: bytes,
    nonce: bytes | str,
    nc: bytes | str,
    cnonce: bytes | str,
    qop: bytes | str,
    a2: bytes,
    authzid: bytes | str | None,
) -> bytes:
    if len(ha1) != 16:
        raise ValueError("H(A1) must be the 16 raw bytes of the MD5, not hex")
    a1 = ha1 + b":" + _bytes(nonce) + b":" + _bytes(cnonce)
    if authzid is not None:
        a1 += b":" + _bytes(authzid)
    kd = b":".join(
        [
            hashlib.md5(a1).hexdigest().encode("ascii"),
            _bytes(nonce),
            _bytes(nc),
            _bytes(cnonce),
            _bytes(qop),
            hashlib.md5(a2).hexdigest().encode("ascii"),
        ]
    )
    return hashlib.md5(kd).hexdigest().encode("ascii")


def responseValue(
    ha1: bytes,
    nonce: bytes | str,
    nc: bytes | str,
    cnonce: bytes | str,
    qop: bytes | str,
    digestUri: bytes | str,
    authzid: bytes | str | None = None,
) -> bytes:
    """
    The C{response} directive a client must send (RFC 2831 section 2.1.2.1)
    for qop=auth.  L{str} arguments are encoded as UTF-8.

    @param ha1: the 16 raw bytes of MD5(username:realm:password).
    @return: 32 lower-case hex digits, as L{bytes}.
    """
    a2 = b"AUTHENTICATE:" + _bytes(digestUri)
    return _digest(ha1, nonce, nc, cnonce, qop, a2, authzid)


def rspauthValue(
    ha1: bytes,
    nonce: bytes | str,
    nc: bytes | str,
    cnonce: bytes | str,
    qop: bytes | str,
    digestUri: bytes | str,
    authzid: bytes | str | None = None,
) -> bytes:
    """
    The C{rspauth} value proving to the client that the server knows H(A1)
    (RFC 2831 section 2.1.3): like L{responseValue} with A2 = ":" digest-uri.
    """
    a2 = b":" + _bytes(digestUri)
    return _digest(ha1, nonce, nc, cnonce, qop, a2, authzid)


def parseDirectives(data: bytes) -> dict[str, bytes]:
    """
    Parse a comma-separated list of C{name=value} directives (RFC 2831
    section 7.1, with null elements and linear white space allowed).

    Names are folded to lower case; quoted values are unescaped.

    @raise msa.errors.SMTPReply: 501 5.5.2 for anything malformed,
        including a duplicated directive.
    """
    if len(data) > MAX_RESPONSE:
        raise malformed("DIGEST-MD5 response too long")
    result: dict[str, bytes] = {}
    end = len(data)
    pos = 0

    def skipSpace(pos: int) -> int:
        while pos < end and data[pos] in _SPACE:
            pos += 1
        return pos

    while True:
        while pos < end and (data[pos] in _SPACE or data[pos] == 0x2C):
            pos += 1
        if pos >= end:
            break
        start = pos
        while pos < end and data[pos] in _TOKEN:
            pos += 1
        name = data[start:pos].decode("ascii").lower()
        pos = skipSpace(pos)
        if not name or pos >= end or data[pos] != 0x3D:  # "="
            raise malformed("DIGEST-MD5 directive expected")
        pos = skipSpace(pos + 1)
        if pos < end and data[pos] == 0x22:  # '"'
            pos += 1
            value = bytearray()
            while True:
                if pos >= end:
                    raise malformed("DIGEST-MD5 unterminated quoted string")
                char = data[pos]
                if char == 0x22:
                    pos += 1
                    break
                if char == 0x5C:  # backslash
                    pos += 1
                    if pos >= end:
                        raise malformed("DIGEST-MD5 unterminated quoted string")
                    char = data[pos]
                if (char < 0x20 and char != 0x09) or char == 0x7F:
                    raise malformed("DIGEST-MD5 control character")
                value.append(char)
                pos += 1
        else:
            start = pos
            while pos < end and data[pos] in _BARE:
                pos += 1
            value = bytearray(data[start:pos])
            if not value:
                raise malformed("DIGEST-MD5 directive value expected")
        pos = skipSpace(pos)
        if pos < end and data[pos] != 0x2C:
            raise malformed("DIGEST-MD5 comma expected")
        if name in result:
            raise malformed("DIGEST-MD5 duplicated directive")
        result[name] = bytes(value)
    if not result:
        raise malformed("DIGEST-MD5 empty response")
    return result


@implementer(IDigestMD5Credentials, IMechanismCredentials)
class DigestMD5Credentials:
    """
    A parsed, syntactically valid DIGEST-MD5 response waiting for the
    checker to supply the account's H(A1).

    @ivar username: the user name, L{str}.
    @ivar realm: the realm, L{str} (always the realm the server offered).
    @ivar rspauth: after a successful L{checkHA1}, the hex rspauth value.
    """

    mechanism = "DIGEST-MD5"

    def __init__(
        self,
        username: str,
        realm: str,
        nonce: bytes,
        nc: bytes,
        cnonce: bytes,
        qop: bytes,
        digestUri: bytes,
        authzid: bytes | None,
        response: bytes,
    ) -> None:
        self.username = username
        self.realm = realm
        self._fields = (nonce, nc, cnonce, qop, digestUri)
        self._authzid = authzid
        self._response = response
        self.rspauth: bytes | None = None

    def checkHA1(self, ha1: bytes) -> bool:
        """
        @param ha1: the 16 raw bytes of MD5(username:realm:password), as
            returned by L{computeHA1} or L{ha1Variants}.
        @raise ValueError: if C{ha1} is not 16 bytes long (a hex digest
            passed by mistake).
        @return: L{True} if the client's response was computed from
            C{ha1}; L{DigestMD5Mechanism.serverFinal} then has its rspauth.
        """
        expected = responseValue(ha1, *self._fields, authzid=self._authzid)
        if not hmac.compare_digest(expected, self._response):
            return False
        self.rspauth = rspauthValue(ha1, *self._fields, authzid=self._authzid)
        return True


def _newNonce() -> str:
    return secrets.token_urlsafe(24)


class DigestMD5Mechanism:
    """
    The server side of one DIGEST-MD5 exchange.

    @ivar name: the SASL mechanism name.
    """

    name = "DIGEST-MD5"

    def __init__(
        self,
        context: MechanismContext | None = None,
        nonceFactory: Callable[[], str] = _newNonce,
    ) -> None:
        """
        @param context: the server's realm and names.
        @param nonceFactory: makes the nonce of each challenge (for tests);
            it must return printable ASCII without C{"} or C{\\}.
        """
        self._context = context if context is not None else MechanismContext()
        self._nonceFactory = nonceFactory
        self._nonce: bytes | None = None
        self._answered = False
        self._credentials: DigestMD5Credentials | None = None

    def start(self, initialResponse: bytes | None) -> Challenge:
        """
        Send the digest-challenge.  DIGEST-MD5 is server-first: an initial
        response (other than an empty one) is malformed.
        """
        if initialResponse or self._nonce is not None:
            raise malformed("DIGEST-MD5 does not take an initial response")
        nonce = self._nonceFactory()
        self._nonce = nonce.encode("ascii")
        return Challenge(
            b"realm="
            + _quote(self._context.realm)
            + b",nonce="
            + _quote(nonce)
            + b',qop="auth",charset=utf-8,algorithm=md5-sess'
        )

    def respond(self, data: bytes) -> Authenticate:
        """
        Check the digest-response and return the credentials for the
        checker.  Only one response is accepted per exchange.

        @raise msa.errors.SMTPReply: 501 5.5.2 when the response cannot be
            parsed; 535 5.7.8 when it is well-formed but not acceptable.
        """
        if self._nonce is None or self._answered:
            raise malformed("DIGEST-MD5 response out of sequence")
        self._answered = True
        directives = parseDirectives(data)
        for required in REQUIRED:
            if required not in directives:
                raise malformed(f"DIGEST-MD5 response lacks {required}")

        charset = directives.get("charset")
        if charset is not None and charset.lower() != b"utf-8":
            raise authenticationFailed()

        def text(raw: bytes) -> str:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                if charset is not None:
                    raise malformed("DIGEST-MD5 response is not valid UTF-8")
            # Without charset the RFC says ISO 8859-1, but Cyrus, pure-sasl
            # and curl send UTF-8 without saying so.  ISO 8859-1 text
            # that happens to be valid UTF-8 is not a plausible name.
            return raw.decode("iso-8859-1")

        username = text(directives["username"])
        realm = text(directives.get("realm", b""))
        digestUri = text(directives["digest-uri"])
        # An empty authzid is no authzid (RFC 2831 2.1.2.1: "If authzid is
        # not specified"; GNU SASL's -z '' sends authzid="" and leaves it
        # out of A1, as it leaves out an absent one).
        rawAuthzid = directives.get("authzid") or None
        authzid = None if rawAuthzid is None else text(rawAuthzid)

        nc = directives["nc"]
        response = directives["response"].lower()
        qop = directives.get("qop", b"auth")
        if not username:
            raise malformed("DIGEST-MD5 empty user name")
        if len(nc) != 8 or not _isHex(nc):
            raise malformed("DIGEST-MD5 nc must be 8 hex digits")
        if len(response) != 32 or not _isHex(response):
            raise malformed("DIGEST-MD5 response must be 32 hex digits")

        if realm != self._context.realm:
            raise authenticationFailed()
        if not hmac.compare_digest(directives["nonce"], self._nonce):
            raise authenticationFailed()
        if nc != b"00000001":
            raise authenticationFailed()
        if qop != b"auth":
            raise authenticationFailed()
        if not self._acceptableUri(digestUri):
            raise authenticationFailed()
        if authzid is not None and authzid != username:
            raise authenticationFailed()

        self._credentials = DigestMD5Credentials(
            username=username,
            realm=realm,
            nonce=directives["nonce"],
            nc=nc,
            cnonce=directives["cnonce"],
            qop=qop,
            digestUri=directives["digest-uri"],
            authzid=rawAuthzid,
            response=response,
        )
        return Authenticate(self._credentials)

    def _acceptableUri(self, digestUri: str) -> bool:
        """
        Is C{digestUri} C{smtp/host} or C{smtp/host/host} (C{pop/...} for
        POP3: the context's C{serviceType}) with a host the server answers
        to (one of its names, or the realm as curl sends)?
        """
        parts = digestUri.split("/")
        if len(parts) not in (2, 3) or parts[0].lower() != self._context.serviceType:
            return False
        host = parts[1].lower()
        if len(parts) == 3 and parts[2].lower() != host:
            return False
        names = [n.lower() for n in self._context.serverNames]
        names.append(self._context.realm.lower())
        return bool(host) and host in names

    def serverFinal(self) -> bytes:
        """
        The C{rspauth=...} message proving the server knew H(A1).

        @raise msa.errors.SMTPReply: 535 5.7.8 if the credentials have not
            been checked successfully: failing closed, so that a server that
            has not verified the client can never send the final message.
        """
        if self._credentials is None or self._credentials.rspauth is None:
            raise authenticationFailed()
        return b"rspauth=" + self._credentials.rspauth


def _isHex(value: bytes) -> bool:
    return all(c in b"0123456789abcdefABCDEF" for c in value)
