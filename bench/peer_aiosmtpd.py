"""
The benchmark's peer: aiosmtpd configured like the MSA, as its own process.

- STARTTLS required before anything else (``require_starttls=True``), or
  implicit TLS from the first byte with ``--implicit``; the same certificate
  and key files as the MSA (ECDSA P-256 self-signed, made by
  ``msa.tls.ensureSelfSignedCertificate``).  TLS 1.2 minimum, like the MSA.
- AUTH required (``auth_required=True``, AUTH only after TLS).  The password
  check costs what the MSA's costs (see L{Accounts}): scrypt with the
  parameters the MSA stores (``msa.accounts.passwords``: n=2**14, r=8, p=1,
  same ``maxmem``, 32-byte digest) in a pool of its own, concurrent identical
  checks sharing one scrypt, and successes cached for ``--auth-cache-ttl``
  seconds (default 300, the MSA's ``[accounts] auth_cache_ttl``; 0 turns it
  off).  With ``--auth-inline`` the check runs in aiosmtpd's synchronous
  ``authenticator`` on the event loop instead (how a plain aiosmtpd set-up
  would do it).
- Each message is written with its envelope (first line) to one file
  ``<dir>/<n>.eml`` via a temporary file, flushed, fsynced, renamed, and the
  directory fsynced, all before the 250 (in the default executor, as the MSA
  runs its spool fsyncs in its thread pool).
- With ``--relay-port`` it relays like the MSA (see L{Relay}): after the 250,
  the message is sent over SMTP+STARTTLS to the sink on that port by one of
  ``--relay-concurrency`` (4, the MSA's ``[relay] concurrency``) workers with
  reused connections, and its spool file removed (directory fsynced) after
  the sink's 250.  Files already in the directory at start are relayed too.
  With ``--relay-held`` nothing is relayed until SIGUSR1.
- SIZE 52428800, as the MSA's default ``max_message_size``.
- Logging at INFO to ``--log``, as much as the MSA logs: one line per
  accepted message and one per relay outcome (the end of a session, with
  its peer, messages and login, at DEBUG: not written, as the MSA's
  session events).  aiosmtpd's own ``mail.log`` logger writes about 18
  INFO lines per session (every command line); it is set to WARNING, so
  that the peer does not pay for a log volume the MSA does not write.

Prints ``READY <port> <the event-loop thread's id>`` on standard output once
it accepts connections; stops
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
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
    """
    The peer's password check, the same cost model as the MSA's
    (C{msa.accounts.passwords.PasswordVerifier}): scrypt with the MSA's
    parameters in a pool of its own (as many threads as cores); identical
    checks running at the same time share one scrypt; and successes are
    remembered for C{ttl} seconds as an HMAC of (user, password) under a key
    made at start (0 turns that cache off).  Wrong passwords are never
    cached, unknown users cost a full scrypt too.
    """

    def __init__(self, user: str, password: str, ttl: float) -> None:
        self.salt = secrets.token_bytes(16)
        self.users = {user.encode("utf-8"): scrypt(password.encode("utf-8"), self.salt)}
        self.ttl = ttl
        self.key = secrets.token_bytes(32)
        self.cache: dict[bytes, tuple[bytes, float]] = {}
        self.running: dict[bytes, asyncio.Future] = {}
        self.pool = ThreadPoolExecutor(os.cpu_count() or 2, "scrypt")

    def _tag(self, login: bytes, password: bytes) -> bytes:
        return hmac.new(self.key, login + b"\0" + password, hashlib.sha256).digest()

    def _slowCheck(self, login: bytes, password: bytes) -> bool:
        stored = self.users.get(login)
        digest = scrypt(password, self.salt)
        return stored is not None and hmac.compare_digest(digest, stored)

    def checkInline(self, login: bytes, password: bytes) -> bool:
        tag = self._tag(login, password)
        cached = self.cache.get(login)
        if cached and cached[1] > time.monotonic():
            if hmac.compare_digest(cached[0], tag):
                return True
        ok = self._slowCheck(login, password)
        if ok and self.ttl > 0:
            self.cache[login] = (tag, time.monotonic() + self.ttl)
        return ok

    async def check(self, login: bytes, password: bytes) -> bool:
        tag = self._tag(login, password)
        cached = self.cache.get(login)
        if cached and cached[1] > time.monotonic():
            if hmac.compare_digest(cached[0], tag):
                return True
        key = login + b"\0" + tag
        running = self.running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, self._slowCheck, login, password)
        self.running[key] = future
        try:
            ok = await future
        finally:
            del self.running[key]
        if ok and self.ttl > 0:
            self.cache[login] = (tag, time.monotonic() + self.ttl)
        return ok

    def authenticator(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword) and self.checkInline(
            auth_data.login, auth_data.password
        ):
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)


def dotStuff(data: bytes) -> bytes:
    """
    The DATA payload for C{data} (CRLF line ends): dot-stuffed, ending in
    CRLF, followed by the final dot.
    """
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


class RelayError(Exception):
    pass


class Relay:
    """
    The peer's relay to the sink, built to do what the MSA's relay does:
    C{concurrency} workers, each with a connection (STARTTLS, the sink's
    certificate verified against C{cafile}, TCP_NODELAY) kept open and
    reused with RSET for up to C{perConnection} messages and closed after
    C{idle} seconds without work.  Each spool file is read (in the
    executor), sent, and after the sink's 250 removed, with the directory
    fsynced (as the MSA's spool removal does).  A failed attempt puts the
    file back in the queue after C{retry} seconds.
    """

    def __init__(self, directory, port, cafile, concurrency, perConnection, held):
        self.directory = directory
        self.port = port
        self.context = ssl.create_default_context(cafile=cafile)
        self.concurrency = concurrency
        self.perConnection = perConnection
        self.idle = 5.0
        self.retry = 1.0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.released = asyncio.Event()
        if not held:
            self.released.set()

    def start(self, loop) -> None:
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".eml"):
                self.queue.put_nowait(os.path.join(self.directory, name))
        self.tasks = [loop.create_task(self.worker()) for _ in range(self.concurrency)]

    def _read(self, path: str) -> tuple[str, list[str], bytes]:
        with open(path, "rb") as f:
            head = f.readline()
            data = f.read()
        sender, recipients = head.decode("utf-8").rstrip("\n").split("\t")
        return sender, recipients.split(","), data

    def _remove(self, path: str) -> None:
        os.unlink(path)
        fsyncDirectory(self.directory)

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        conn = None
        sent = 0
        while True:
            await self.released.wait()
            try:
                path = await asyncio.wait_for(self.queue.get(), self.idle)
            except TimeoutError:
                if conn is not None:
                    await conn.close()
                    conn = None
                continue
            try:
                sender, recipients, data = await loop.run_in_executor(
                    None, self._read, path
                )
                if conn is not None and sent >= self.perConnection:
                    await conn.close()
                    conn = None
                if conn is None:
                    conn = Connection()
                    await conn.open(self.port, self.context)
                    sent = 0
                else:
                    await conn.command("RSET")
                reply = await conn.send(sender, recipients, dotStuff(data))
                sent += 1
                await loop.run_in_executor(None, self._remove, path)
                logging.info(
                    "relayed %s: %s",
                    os.path.basename(path),
                    reply.decode("utf-8", "replace").strip(),
                )
            except (
                RelayError,
                OSError,
                ssl.SSLError,
                asyncio.IncompleteReadError,
            ) as e:
                logging.warning("relay of %s deferred: %s", path, e)
                if conn is not None:
                    conn.abort()
                    conn = None
                loop.call_later(self.retry, self.queue.put_nowait, path)


class Connection:
    """
    One SMTP client connection of the peer's relay.
    """

    writer: asyncio.StreamWriter | None = None

    async def reply(self) -> bytes:
        while True:
            line = await self.reader.readline()
            if not line:
                raise RelayError("connection closed")
            if line[3:4] != b"-":
                break
        if line[:1] not in (b"2", b"3"):
            raise RelayError(line.decode("utf-8", "replace").strip())
        return line

    async def command(self, text: str) -> bytes:
        self.writer.write(text.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def open(self, port: int, context: ssl.SSLContext) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.reply()
        await self.command("EHLO localhost")
        await self.command("STARTTLS")
        await self.writer.start_tls(context, server_hostname="localhost")
        await self.command("EHLO localhost")

    async def send(self, sender: str, recipients: list[str], payload: bytes) -> bytes:
        """
        @return: the reply to the data.
        """
        await self.command(f"MAIL FROM:<{sender}> SIZE={len(payload)}")
        for recipient in recipients:
            await self.command(f"RCPT TO:<{recipient}>")
        await self.command("DATA")
        self.writer.write(payload)
        return await self.reply()

    async def close(self) -> None:
        try:
            await self.command("QUIT")
        except (RelayError, OSError, ssl.SSLError):
            pass
        self.abort()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


class LoggedSMTP(SMTP):
    """
    aiosmtpd's server with one DEBUG line at the end of each session, as
    the MSA's session events (not written at the INFO level).
    """

    messages = 0

    def connection_lost(self, error) -> None:
        login = self.session.auth_data
        logging.debug(
            "connection from %s closed: %d message(s), login %s",
            self.session.peer,
            self.messages,
            getattr(login, "login", b"-").decode("utf-8", "replace"),
        )
        super().connection_lost(error)


class LoggedController(Controller):
    def factory(self):
        return LoggedSMTP(self.handler, **self.SMTP_kwargs)


async def loopThreadId() -> int:
    """
    The kernel's id of the thread running the event loop (where
    C{bench/run.py} splits the CPU between it and the other threads).
    """
    return threading.get_native_id()


def fsyncDirectory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Handler:
    def __init__(
        self, directory: str, accounts: Accounts, inline: bool, relay: Relay | None
    ) -> None:
        self.directory = directory
        self.accounts = accounts
        self.relay = relay
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
        if await self.accounts.check(login, password):
            return AuthResult(success=True, auth_data=LoginPassword(login, password))
        return AuthResult(success=False, handled=False)

    def _write(self, head: bytes, data: bytes) -> str:
        """
        One file per message, the envelope on its first line: written to a
        temporary name, fsynced, renamed, and the directory fsynced.
        """
        with self.lock:
            n = next(self.counter)
        path = os.path.join(self.directory, f"{os.getpid()}-{n:09d}.eml")
        tmp = os.path.join(self.directory, f".{os.getpid()}-{n}.eml.tmp")
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsyncDirectory(self.directory)
        return path

    async def handle_DATA(self, server, session, envelope):
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        loop = asyncio.get_running_loop()
        head = f"{envelope.mail_from}\t{','.join(envelope.rcpt_tos)}\n".encode()
        path = await loop.run_in_executor(
            None, self._write, head, envelope.original_content
        )
        if self.relay is not None:
            self.relay.queue.put_nowait(path)
        server.messages += 1
        logging.info(
            "queued %s: %d bytes from %s",
            os.path.basename(path),
            len(envelope.original_content),
            envelope.mail_from,
        )
        return f"250 2.0.0 Ok: queued as {os.path.basename(path)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--dir", required=True, help="the spool directory")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="bench-password")
    parser.add_argument("--implicit", action="store_true", help="implicit TLS")
    parser.add_argument("--auth-inline", action="store_true")
    parser.add_argument(
        "--auth-cache-ttl",
        type=float,
        default=300,
        help="seconds a successful login is remembered (0: off), as the MSA's "
        "[accounts] auth_cache_ttl",
    )
    parser.add_argument("--relay-port", type=int, default=None, help="the sink")
    parser.add_argument("--relay-ca", default=None, help="CA file for the sink")
    parser.add_argument("--relay-concurrency", type=int, default=4)
    parser.add_argument("--relay-per-connection", type=int, default=100)
    parser.add_argument(
        "--relay-held",
        action="store_true",
        help="queue but do not relay until SIGUSR1 (the drain measurement)",
    )
    parser.add_argument("--log", default=os.devnull)
    args = parser.parse_args()

    logging.basicConfig(
        filename=args.log,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    aiosmtpdLog = logging.getLogger("mail.log")
    aiosmtpdLog.setLevel(logging.WARNING)
    # aiosmtpd's own AUTH code warns about its deprecated login_data once per
    # login: a line per session that the MSA does not write.
    aiosmtpdLog.addFilter(lambda r: "login_data is deprecated" not in r.getMessage())
    os.makedirs(args.dir, exist_ok=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    accounts = Accounts(args.user, args.password, args.auth_cache_ttl)
    relay = None
    if args.relay_port:
        relay = Relay(
            args.dir,
            args.relay_port,
            args.relay_ca,
            args.relay_concurrency,
            args.relay_per_connection,
            args.relay_held,
        )
    handler = Handler(args.dir, accounts, args.auth_inline, relay)
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
        controller = LoggedController(
            handler,
            hostname="127.0.0.1",
            port=args.port,
            ssl_context=context,
            **smtpArgs,
        )
    else:
        controller = LoggedController(
            handler,
            hostname="127.0.0.1",
            port=args.port,
            tls_context=context,
            require_starttls=True,
            **smtpArgs,
        )
    controller.start()
    loopThread = asyncio.run_coroutine_threadsafe(
        loopThreadId(), controller.loop
    ).result(10)
    if relay is not None:
        controller.loop.call_soon_threadsafe(relay.start, controller.loop)
        signal.signal(
            signal.SIGUSR1,
            lambda *a: controller.loop.call_soon_threadsafe(relay.released.set),
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: stop.set())
    print(f"READY {args.port} {loopThread}", flush=True)
    stop.wait()
    controller.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
