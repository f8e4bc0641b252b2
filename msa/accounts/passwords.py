# -*- test-case-name: tests.test_passwordcheck -*-
"""
Passwords for PLAIN and LOGIN: their scrypt hashes (C{scrypt$n$r$p$salt$hash},
never the password), and where they are checked:
off the reactor thread, in a pool of its own no larger than the number of
cores (each scrypt holds 16 MiB while it runs, so a burst of logins must not
fan out to dozens of threads), with a short-lived cache of recent successes,
as Dovecot's auth_cache does.

The cache holds, per account, an HMAC of the password under a random key
made at start (never the password), tied to the account's current hash, for
C{ttl} seconds.  Only successes are cached: every wrong guess still costs a
full scrypt.  A password change or a disabled account takes effect at once,
since the entry is tied to the stored hash and the checker still checks the
account on every login.
"""

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from msa.threadpool import PrivatePool

#: scrypt parameters of new password hashes (RFC 7914: 2**14 is the
#: interactive-login recommendation), salt and hash lengths.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_SALT, _SCRYPT_LEN = 16, 32


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def parseScrypt(text: str) -> tuple[int, int, int, bytes, bytes]:
    """
    @raise ValueError: with the reason when C{text} is not a usable
        C{scrypt$n$r$p$salt$hash} string.
    """
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not of the form scrypt$n$r$p$<salt>$<hash>")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = unb64(parts[4]), unb64(parts[5])
    except (ValueError, binascii.Error):
        raise ValueError("scrypt parameters must be integers and base64")
    if n < 2 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range")
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ValueError("scrypt salt or hash too short")
    return n, r, p, salt, digest


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, size: int):
    maxmem = 128 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=size)


def hashPassword(password: str) -> str:
    """
    @return: C{scrypt$n$r$p$<b64 salt>$<b64 hash>} of the UTF-8 password,
        with a fresh random salt.
    """
    salt = secrets.token_bytes(_SCRYPT_SALT)
    n, r, p = SCRYPT_N, SCRYPT_R, SCRYPT_P
    digest = _scrypt(password.encode("utf-8"), salt, n, r, p, _SCRYPT_LEN)
    return f"scrypt${n}${r}${p}${b64(salt)}${b64(digest)}"


#: Verified against for unknown users, so that they cost the same time.
DUMMY_HASH = "scrypt$%d$%d$%d$%s$%s" % (
    SCRYPT_N,
    SCRYPT_R,
    SCRYPT_P,
    b64(bytes(_SCRYPT_SALT)),
    b64(bytes(_SCRYPT_LEN)),
)


def verifyHash(passwordHash: str, password: bytes) -> bool:
    try:
        n, r, p, salt, digest = parseScrypt(passwordHash)
    except ValueError:
        n, r, p, salt, digest = parseScrypt(DUMMY_HASH)
        _scrypt(password, salt, n, r, p, len(digest))
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


def limitScryptMemory() -> None:
    """
    Make glibc give the memory of each finished scrypt back to the system
    (a fixed mmap threshold instead of glibc's adaptive one, which otherwise
    keeps 16 MiB per thread arena after the first login).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


class PasswordVerifier:
    """
    @param verify: C{(passwordHash, password) -> bool}, the slow check.
    @param ttl: seconds a success is remembered; 0 turns the cache off.
    @param reactor: for the thread pool; L{None} runs the check inline (for
        tests that do not want threads).
    """

    def __init__(
        self,
        verify,
        ttl: float = 300.0,
        reactor=None,
        threads: int | None = None,
        clock=time.monotonic,
    ) -> None:
        self._verify = verify
        self.ttl = ttl
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._cache: dict[str, tuple[bytes, str, float]] = {}
        self._running: dict[tuple, list[defer.Deferred]] = {}
        self._reactor = reactor
        self._pool = None
        if reactor is not None:
            size = threads or os.cpu_count() or 2
            self._pool = PrivatePool(minthreads=0, maxthreads=size, name="scrypt")
            self._pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)

    def _tag(self, name: str, password: bytes) -> bytes:
        return hmac.new(
            self._key, name.encode("utf-8") + b"\0" + password, hashlib.sha256
        ).digest()

    def check(self, name: str | None, passwordHash: str, password: bytes):
        """
        @return: a L{Deferred} firing with whether C{password} matches.
        """
        now = self.clock()
        if name is not None and self.ttl > 0:
            cached = self._cache.get(name)
            if cached is not None:
                tag, hashed, expires = cached
                if (
                    expires > now
                    and hashed == passwordHash
                    and hmac.compare_digest(tag, self._tag(name, password))
                ):
                    return defer.succeed(True)
        # The same check already running (a company opening many sessions at
        # once): wait for its answer instead of paying scrypt again.
        key = (name, passwordHash, self._tag(name or "", password))
        waiting = self._running.get(key)
        if waiting is not None:
            mine: defer.Deferred = defer.Deferred()
            waiting.append(mine)
            return mine
        self._running[key] = []
        if self._pool is None:
            d = defer.maybeDeferred(self._verify, passwordHash, password)
        else:
            d = threads.deferToThreadPool(
                self._reactor, self._pool, self._verify, passwordHash, password
            )

        def share(result):
            for other in self._running.pop(key, []):
                if isinstance(result, Failure):
                    other.errback(result)
                else:
                    other.callback(result)
            return result

        d.addBoth(share)

        def remember(ok: bool) -> bool:
            if ok and name is not None and self.ttl > 0:
                self._cache[name] = (
                    self._tag(name, password),
                    passwordHash,
                    self.clock() + self.ttl,
                )
                if len(self._cache) > 100000:
                    self._expire()
            return ok

        return d.addCallback(remember)

    def _expire(self) -> None:
        now = self.clock()
        for name, (_, _, expires) in list(self._cache.items()):
            if expires <= now:
                del self._cache[name]
