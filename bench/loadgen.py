"""
The benchmark's load generator: an asyncio SMTP submission client, run as its
own process by ``bench/run.py`` (so that it does not share an interpreter
with either server).

Each session: connect, (STARTTLS, or implicit TLS with ``--implicit``),
EHLO, AUTH PLAIN, then M times MAIL, RCPT, DATA of S bytes, then QUIT.  The
server certificate is verified against ``--cafile`` for the name localhost.
TCP_NODELAY is set on every client socket.  C sessions run concurrently
until N messages have been sent.  Latency per message: from connect to the
250 after DATA for a connection's first message, from MAIL to that 250 for
later ones.  Any reply other than 2xx/3xx is an error.

``--idle K``: instead, open K sessions (C at a time), authenticate them all,
print ``HOLDING K`` and wait for a line on standard input before QUITting
them all (the caller measures the server meanwhile).

The result is one JSON object on the last line of standard output.
"""

import argparse
import asyncio
import base64
import json
import resource
import socket
import ssl
import sys
import time

SENDER = "ik@mijnbedrijf.nl"
RECIPIENT = "belastingdienst@overheid.nl"


class SMTPError(Exception):
    pass


def makeMessage(size: int) -> bytes:
    """
    A message of about C{size} bytes (headers included), 76-octet lines,
    CRLF line ends, terminated by CRLF.CRLF; no line starts with a dot.
    """
    header = (
        f"From: {SENDER}\r\n"
        f"To: {RECIPIENT}\r\n"
        "Subject: benchmark\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "Message-ID: <bench@mijnbedrijf.nl>\r\n"
        "\r\n"
    ).encode("ascii")
    line = b"x" * 74 + b"\r\n"
    body = max(0, size - len(header))
    lines, rest = divmod(body, len(line))
    tail = b"y" * max(0, rest - 2) + b"\r\n" if rest >= 2 else b""
    return header + line * lines + tail + b".\r\n"


class Session:
    def __init__(self, args, context: ssl.SSLContext) -> None:
        self.args = args
        self.context = context
        self.reader = None
        self.writer = None

    async def reply(self, expect: tuple[int, ...] = (2, 3)) -> int:
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPError("connection closed by server")
            if len(line) < 4 or not line[:3].isdigit():
                raise SMTPError(f"bad reply {line!r}")
            if line[3:4] != b"-":
                break
        code = int(line[:3])
        if code // 100 not in expect:
            raise SMTPError(line.decode("utf-8", "replace").strip())
        return code

    async def command(self, text: str) -> int:
        self.writer.write(text.encode("ascii") + b"\r\n")
        return await self.reply()

    async def open(self) -> None:
        args = self.args
        if args.implicit:
            self.reader, self.writer = await asyncio.open_connection(
                args.host, args.port, ssl=self.context, server_hostname="localhost"
            )
        else:
            self.reader, self.writer = await asyncio.open_connection(
                args.host, args.port
            )
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.reply()
        await self.command("EHLO bench.mijnbedrijf.nl")
        if not args.implicit:
            await self.command("STARTTLS")
            await self.writer.start_tls(self.context, server_hostname="localhost")
            await self.command("EHLO bench.mijnbedrijf.nl")
        token = base64.b64encode(
            b"\0" + args.user.encode() + b"\0" + args.password.encode()
        ).decode("ascii")
        await self.command("AUTH PLAIN " + token)

    async def send(self, message: bytes) -> None:
        await self.command(f"MAIL FROM:<{SENDER}> SIZE={len(message)}")
        await self.command(f"RCPT TO:<{RECIPIENT}>")
        await self.command("DATA")
        self.writer.write(message)
        await self.writer.drain()
        await self.reply()

    async def quit(self) -> None:
        try:
            await self.command("QUIT")
        finally:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


async def batch(args, context) -> dict:
    message = makeMessage(args.size)
    perConnection = args.per_connection
    connections = -(-args.messages // perConnection)
    state = {"next": 0, "sent": 0}
    latencies: list[float] = []
    errors: list[str] = []

    async def worker():
        while state["next"] < connections:
            index = state["next"]
            state["next"] += 1
            count = min(perConnection, args.messages - index * perConnection)
            session = Session(args, context)
            try:
                start = time.perf_counter()
                await session.open()
                for i in range(count):
                    if i:
                        start = time.perf_counter()
                    await session.send(message)
                    latencies.append(time.perf_counter() - start)
                    state["sent"] += 1
                await session.quit()
            except (SMTPError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                session.abort()

    start = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), args.timeout)
    except TimeoutError:
        errors.append(f"timeout after {args.timeout} s")
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "sent": state["sent"],
        "latencies": latencies,
        "errors": errors,
    }


async def idle(args, context) -> dict:
    sessions: list[Session] = []
    errors: list[str] = []
    semaphore = asyncio.Semaphore(args.concurrency)

    async def openOne():
        async with semaphore:
            session = Session(args, context)
            try:
                await session.open()
                sessions.append(session)
            except (SMTPError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                session.abort()

    start = time.perf_counter()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(openOne() for _ in range(args.idle))), args.timeout
        )
    except TimeoutError:
        errors.append(f"timeout after {args.timeout} s")
    wall = time.perf_counter() - start
    print(f"HOLDING {len(sessions)}", flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.run_in_executor(None, sys.stdin.readline), args.timeout
        )
    except TimeoutError:
        errors.append("no release from the caller")
    # Still alive after the hold?  A NOOP on each tells.
    alive = 0

    async def closeOne(session):
        nonlocal alive
        try:
            await session.command("NOOP")
            alive += 1
            await session.quit()
        except (SMTPError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            errors.append(f"after hold: {type(e).__name__}: {e}")
            session.abort()

    try:
        await asyncio.wait_for(
            asyncio.gather(*(closeOne(s) for s in sessions)), args.timeout
        )
    except TimeoutError:
        errors.append("timeout closing")
    return {
        "wall": wall,
        "held": len(sessions),
        "alive": alive,
        "sent": 0,
        "latencies": [],
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--messages", type=int, default=1)
    parser.add_argument("-s", "--size", type=int, default=10240)
    parser.add_argument("-m", "--per-connection", type=int, default=1)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(4096, args.idle + 256, args.concurrency + 256)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    context = ssl.create_default_context(cafile=args.cafile)
    if args.idle:
        result = asyncio.run(idle(args, context))
    else:
        result = asyncio.run(batch(args, context))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu"] = usage.ru_utime + usage.ru_stime
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
