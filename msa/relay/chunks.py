# -*- test-case-name: tests.test_relay_extensions -*-
"""
Sending a message to the core with BDAT (RFC 3030 CHUNKING): how the relay
carries a C{BODY=BINARYMIME} message, whose octets DATA cannot carry (no
dot-stuffing, no line rules).

The message file is read one chunk at a time, each sent as C{BDAT n} and
its reply awaited before the next is read, so that only a chunk is in
memory.  One chunk is kept back until the end of the file is seen: it is
the C{LAST} one, and it is sent only after the digest of every byte read
matched the acknowledged one (L{msa.queue.integrity}); on a mismatch the
connection is dropped without it, and the core discards the message.
"""

from __future__ import annotations

from typing import Any, BinaryIO, cast

from twisted.internet.interfaces import ITCPTransport

from msa.queue.integrity import Digester, IntegrityError
from msa.relay.protocol import Reply, SMTPClientProtocol

#: The size of one BDAT chunk.
CHUNK_SIZE = 256 * 1024


async def sendChunks(
    proto: SMTPClientProtocol,
    messageFile: BinaryIO,
    timeout: float,
    digester: Digester,
    entry: Any,
    chunkSize: int = CHUNK_SIZE,
) -> Reply:
    """
    Send C{messageFile} with BDAT commands on C{proto}.

    @param timeout: seconds for the reply to each chunk.
    @param digester: hashes the bytes read, compared with what C{entry}
        recorded before the C{LAST} chunk.
    @return: the core's reply to the last chunk sent: a refusal of an
        earlier chunk ends the transfer (the core discards the message).
    @raise IntegrityError: the bytes are not the acknowledged ones; the
        connection is aborted and no C{LAST} chunk was sent.
    """
    assert proto.transport is not None, "not connected"
    transport = cast(ITCPTransport, proto.transport)
    chunk = messageFile.read(chunkSize)
    digester.update(chunk)
    while True:
        following = messageFile.read(chunkSize)
        if not following:
            break
        digester.update(following)
        transport.write(b"BDAT %d\r\n" % (len(chunk),) + chunk)
        reply = await proto.readReply(timeout, "the reply to a BDAT chunk")
        if reply.code != 250:
            return reply
        chunk = following
    mismatch = digester.mismatch(entry)
    if mismatch is not None:
        transport.abortConnection()
        raise IntegrityError(mismatch)
    transport.write(b"BDAT %d LAST\r\n" % (len(chunk),) + chunk)
    return await proto.readReply(timeout, "the reply to the last BDAT chunk")
