"""
The benchmark's peer: aiosmtpd configured like the MSA, as its own process.

- STARTTLS required before anything else (``require_starttls=True``), or
  implicit TLS from the first byte with ``--implicit``; the same certificate
  and key files as the MSA (ECDSA P-256 self-signed, made by
  ``msa.tls.ensureSelfSignedCertificate``).  TLS 1.2 minimum, like the MSA.
- AUTH required (``auth_required=True``, AUTH only after TLS).  The password
  is checked against an scrypt hash with the parameters the MSA stores
  (``msa.accounts.passwords``: n=2**14, r=8, p=1, same ``maxmem``, 32-byte digest), so
  both servers pay the same cost per login.  Like the MSA (whose
  ``AccountChecker`` verifies in the reactor's thread pool) the scrypt runs
  in the event loop's default executor, not on the event loop; with
  ``--auth-inline`` it runs in aiosmtpd's synchronous ``authenticator``
  instead (how a plain aiosmtpd set-up would do it).
- Each message is written to ``<dir>/<n>.eml`` via a temporary file,
  flushed, fsynced, renamed, and the directory fsynced, all before the 250
  (in the default executor, as the MSA runs its spool fsyncs in its thread
  pool).
- SIZE 52428800, as the MSA's default ``max_message_size``.
- Logging at INFO to ``--log`` (the MSA logs each session at INFO too).

Prints ``READY <port>`` on standard output once it accepts connections; stops
on SIGTERM or SIGINT.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import itertools
import logging
import os
import secrets
import signal
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

# The MSA's parameters (msa/accounts/model.py: SCRYPT_N, SCRYPT_R, SCRYPT_P, _scrypt).
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
MAX_MESSAGE_SIZE = 52428800


def scrypt(password: bytes, salt: bytes) -> bytes:
    maxmem = 128 * SCRYPT_R * (SCRYPT_N + SCRYPT_P + 2) + 2**20
    return hashlib.scrypt(
        password,
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=maxmem,
        dklen=SCRYPT_LEN,
    )


class Accounts:
    def __init__(self, user: str, password: str) -> None:
        self.salt = secrets.token_bytes(16)
        self.users = {user.encode("utf-8"): scrypt(password.encode("utf-8"), self.salt)}

    def check(self, login: bytes, password: bytes) -> bool:
        stored = self.users.get(login)
        # Unknown users cost the same scrypt computation, as in the MSA.
        digest = scrypt(password, self.salt)
        return stored is not None and hmac.compare_digest(digest, stored)

    def authenticator(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword) and self.check(
            auth_data.login, auth_data.password
        ):
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)


class Handler:
    def __init__(self, directory: str, accounts: Accounts, inline: bool) -> None:
        self.directory = directory
        self.accounts = accounts
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        if not inline:
            # Overrides aiosmtpd's built-in PLAIN: same parsing, but the scrypt
            # check runs in the executor instead of on the event loop.
            self.auth_PLAIN = self._auth_PLAIN_threaded

    async def _auth_PLAIN_threaded(self, server: SMTP, args):
        if len(args) == 1:
            value = await server.challenge_auth("")
            if value is None or not isinstance(value, bytes):
                return AuthResult(success=False)
        else:
            try:
                value = base64.b64decode(args[1].encode(), validate=True)
            except Exception:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            _, login, password = value.split(b"\x00")
        except ValueError:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, self.accounts.check, login, password)
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(login, password))
        return AuthResult(success=False, handled=False)

    def _write(self, data: bytes) -> str:
        with self.lock:
            n = next(self.counter)
        path = os.path.join(self.directory, f"{os.getpid()}-{n}.eml")
        tmp = os.path.join(self.directory, f".{os.getpid()}-{n}.eml.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    async def handle_DATA(self, server, session, envelope):
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, self._write, envelope.original_content)
        return f"250 2.0.0 Ok: queued as {os.path.basename(path)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--dir", required=True, help="where messages are written")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="bench-password")
    parser.add_argument("--implicit", action="store_true", help="implicit TLS")
    parser.add_argument("--auth-inline", action="store_true")
    parser.add_argument("--log", default=os.devnull)
    args = parser.parse_args()

    logging.basicConfig(
        filename=args.log,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    os.makedirs(args.dir, exist_ok=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    accounts = Accounts(args.user, args.password)
    handler = Handler(args.dir, accounts, args.auth_inline)
    smtpArgs = dict(
        server_hostname="localhost",  # the EHLO name (hostname= is the bind address)
        data_size_limit=MAX_MESSAGE_SIZE,
        auth_required=True,
        # With implicit TLS aiosmtpd does not see the TLS layer (it only
        # tracks STARTTLS), so "AUTH only over TLS" holds by construction.
        auth_require_tls=not args.implicit,
        authenticator=accounts.authenticator,
        decode_data=False,
        timeout=300,
    )
    if args.implicit:
        controller = Controller(
            handler,
            hostname="127.0.0.1",
            port=args.port,
            ssl_context=context,
            **smtpArgs,
        )
    else:
        controller = Controller(
            handler,
            hostname="127.0.0.1",
            port=args.port,
            tls_context=context,
            require_starttls=True,
            **smtpArgs,
        )
    controller.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: stop.set())
    print(f"READY {args.port}", flush=True)
    stop.wait()
    controller.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
