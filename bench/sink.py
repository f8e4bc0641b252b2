"""
The benchmark's sink: a fast SMTP server with STARTTLS standing in for the
core MTA that every server under test relays to (``bench/run.py``).

Plain asyncio, standalone (it imports nothing from ``msa`` or ``tests``),
one process: it counts messages and keeps nothing (no disk), so that the
sink is never the bottleneck.  It offers ESMTP with STARTTLS, SIZE,
8BITMIME, ENHANCEDSTATUSCODES and PIPELINING (as Postfix, the usual core
MTA, does; ``--no-pipelining`` leaves it out), no AUTH, accepts any
envelope, and answers 250 after the final dot.  Pipelined commands are
read and answered in order; as Postfix's smtpd does, replies are held while
more input is already waiting and written together when the sink would
wait for the client (one TLS record and one send for a pipelined group:
the reply to a message's data and the replies to the next message's
commands behind it).  TLS uses the certificate and
key given (the same ECDSA P-256 certificate as the servers under test, which
trust it through their CA file setting).

    python bench/sink.py --port PORT --cert CERT --key KEY

Prints ``READY`` when listening.  Each line ``count`` read on standard input
is answered with ``COUNT <messages received> <bytes received>`` on standard
output, so that the caller can poll for "the sink has every message".  On
SIGTERM (or end of standard input) it prints ``RECEIVED <n>`` and exits.
"""

import argparse
import asyncio
import os
import signal
import ssl
import sys
import threading

LIMIT = 1 << 27  # the largest message the sink accepts in one DATA


class Counter:
    messages = 0
    octets = 0


async def serve(
    reader, writer, context: ssl.SSLContext, counter: Counter, pipelining: bool
) -> None:
    held: list[bytes] = []

    async def reply(text: str) -> None:
        held.append(text.encode("ascii") + b"\r\n")

    async def flush() -> None:
        if held:
            writer.write(b"".join(held))
            held.clear()
            await writer.drain()

    async def before(end: bytes) -> bytes:
        # What the client sent up to C{end}; the replies held so far go
        # out first unless it is already here (no wait for the client).
        if end not in reader._buffer:  # type: ignore[attr-defined]
            await flush()
        return await reader.readuntil(end)

    tls = False
    try:
        await reply("220 sink.localhost ESMTP bench sink")
        while True:
            line = await before(b"\n")
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                extensions = ["SIZE 134217728", "8BITMIME", "ENHANCEDSTATUSCODES"]
                if pipelining:
                    extensions.append("PIPELINING")
                if not tls:
                    extensions.append("STARTTLS")
                text = "\r\n".join(
                    f"250-{e}" for e in ["sink.localhost"] + extensions[:-1]
                )
                await reply(f"{text}\r\n250 {extensions[-1]}")
            elif verb == b"HELO":
                await reply("250 sink.localhost")
            elif verb == b"STAR" and not tls:
                await reply("220 2.0.0 ready to start TLS")
                await flush()
                await writer.start_tls(context)
                tls = True
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                await reply("250 2.0.0 ok")
            elif verb == b"DATA":
                await reply("354 go ahead")
                data = await before(b"\r\n.\r\n")
                counter.messages += 1
                counter.octets += len(data)
                await reply("250 2.0.0 ok: received")
            elif verb == b"QUIT":
                await reply("221 2.0.0 bye")
                await flush()
                return
            else:
                await reply("502 5.5.2 not implemented")
    except (
        OSError,
        ssl.SSLError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ):
        pass
    finally:
        writer.close()


def answerQueries(counter: Counter, done) -> None:
    for line in sys.stdin:
        if line.strip() == "count":
            print(f"COUNT {counter.messages} {counter.octets}", flush=True)
    done()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--no-pipelining", action="store_true")
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    counter = Counter()
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, context, counter, not args.no_pipelining),
        "127.0.0.1",
        args.port,
        limit=LIMIT,
        backlog=1024,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(
        target=answerQueries,
        args=(counter, lambda: loop.call_soon_threadsafe(stop.set)),
        daemon=True,
    ).start()
    print("READY", flush=True)
    await stop.wait()
    server.close()
    print(f"RECEIVED {counter.messages}", flush=True)
    # Out at once: the relays' idle connections need no goodbye, and
    # asyncio.run would cancel (and report) each of their tasks.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
