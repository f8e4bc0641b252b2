# -*- test-case-name: tests.test_relay_extensions -*-
"""
The relay side of issue 21 (L{msa.relay.extensions}, L{msa.relay.chunks}):
the assembled daemon, started from its TOML file, takes a message over
STARTTLS and relays it to a core whose EHLO keywords the test sets
(L{tests.downstream.DownstreamServer}, which records the MAIL and RCPT
parameters and the data exactly) or to a real Postfix 3.7 (which offers
SMTPUTF8, DSN and CHUNKING but neither BINARYMIME nor REQUIRETLS, and
passes the parameters on to a recording sink).

What is checked is what a sender relies on: the parameters and the bytes
that reach the core, and, for a message the core cannot take as it is,
the bounce (an RFC 3464 report parsed by Python's C{email} package) with
the status code RFC 6531, RFC 3030 or RFC 8689 names, the original never
sent and gone from the queue.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import os

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.envelope import Envelope
from msa.relay.chunks import CHUNK_SIZE
from msa.relay.protocol import dotStuff
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, RunningMSA
from tests.postfixcore import startPostfixCore
from tests.sessionclient import RawSession
from tests.test_e2e import splitReceived
from tests.test_integrity import tamper
from tests.test_relay_client import DownstreamFixture
from tests.waiting import waitUntil

SENDER = "ik@mijnbedrijf.nl"
RECIPIENT = "belastingdienst@overheid.nl"
UTF8_RECIPIENT = "b\u00e9lasting@overheid.nl"
BINARY = (
    b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: binary\r\n\r\n" + bytes(range(256)) * 4 + b"\n.\n\r"
)


def submit(
    msa: RunningMSA,
    mail: str,
    rcpts: list[str],
    body: bytes = MESSAGE,
    bdat: bool = False,
) -> list[bytes]:
    """
    One transaction over STARTTLS and AUTH (blocking: run it in a thread).

    @param mail: the MAIL command's argument after C{FROM:}.
    @param rcpts: each RCPT command's argument after C{TO:}.
    @param bdat: send C{body} as one C{BDAT LAST} chunk instead of DATA.
    @return: every reply's last line.
    """
    client = RawSession(msa.starttlsPort, msa.clientContext())
    try:
        client.secure()
        client.login()
        replies = [client.command(b"MAIL FROM:" + mail.encode())]
        replies += [client.command(b"RCPT TO:" + r.encode()) for r in rcpts]
        if bdat:
            client.send(b"BDAT %d LAST\r\n" % (len(body),) + body)
            client.reply()
            replies.append(client.replies[-1])
        else:
            replies.append(client.command(b"DATA"))
            client.send(dotStuff(body))
            client.reply()
            replies.append(client.replies[-1])
        return replies
    finally:
        client.close()


def submitted(msa: RunningMSA, *args, **kwargs) -> defer.Deferred:
    """
    L{submit} in a thread, asserting that the message was queued.
    """

    def check(replies: list[bytes]) -> list[bytes]:
        assert replies[-1].startswith(b"250 2.0.0 Ok: queued as "), replies
        return replies

    return threads.deferToThread(submit, msa, *args, **kwargs).addCallback(check)


def queueEmptied(msa: RunningMSA, timeout: float = 20) -> defer.Deferred:
    """
    Wait until the spool has nothing left: the message and any notice
    about it (queued before the message leaves) are handed over.
    """
    spool = msa.service.getServiceNamed("relay").spool
    return waitUntil(lambda: not spool.pending(), timeout, "an empty queue")


def parseReport(data: bytes) -> tuple[email.message.Message, list]:
    """
    A DSN as Python's C{email} package reads it, checked to be an RFC 3464
    report.

    @return: the message and the blocks of its C{message/delivery-status}
        part (the per-message fields first, then one per recipient).
    """
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report", report
    assert report.get_param("report-type") == "delivery-status", report
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status", status
    return report, status.get_payload()


def startCore(testCase, extensions: list[str] = ()) -> DownstreamServer:
    """
    A scripted core offering C{extensions} beside its defaults.
    """
    core = DownstreamServer(os.path.abspath(testCase.mktemp()))
    core.extensions = list(extensions)
    core.start()
    testCase.addCleanup(core.stop)
    return core


class ParametersTests(unittest.TestCase):
    """
    The parameters of MAIL and RCPT as they reach a core that offers the
    extensions.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_passedOnToACoreThatOffersThem(self):
        """
        SMTPUTF8, RET, ENVID (xtext again: "+" is "+2B") and REQUIRETLS on
        MAIL; NOTIFY and ORCPT on RCPT; all in one pipelined group with
        DATA, and the core's DSN support means no notice from us.
        """
        core = startCore(self, ["DSN", "SMTPUTF8", "REQUIRETLS"])
        msa = RunningMSA(self, relay=core.relayConfig())
        yield submitted(
            msa,
            f"<{SENDER}> SMTPUTF8 RET=HDRS ENVID=aangifte+2B1 REQUIRETLS",
            [
                f"<{UTF8_RECIPIENT}> NOTIFY=SUCCESS,FAILURE "
                "ORCPT=rfc822;belasting+2Bdienst@overheid.nl"
            ],
        )
        yield queueEmptied(msa)
        [message] = core.messages
        self.assertEqual(message.sender, SENDER)
        self.assertEqual(message.recipients, [UTF8_RECIPIENT])
        self.assertEqual(splitReceived(message.data)[1], MESSAGE)
        size = len(message.data)
        self.assertEqual(
            message.mailParams,
            # BODY=8BITMIME: the message has an 8-bit line.
            f"BODY=8BITMIME SMTPUTF8 SIZE={size} RET=HDRS ENVID=aangifte+2B1 "
            "REQUIRETLS",
        )
        self.assertEqual(
            message.rcptParams,
            ["NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;belasting+2Bdienst@overheid.nl"],
        )
        [group] = [g for g in core.commandGroups if g[0].startswith(b"MAIL")]
        self.assertEqual(
            [line.split(b" ")[0] for line in group], [b"MAIL", b"RCPT", b"DATA"]
        )

    @defer.inlineCallbacks
    def test_tlsRequiredNoRelaxesNothing(self):
        """
        A message with C{TLS-Required: No} (RFC 8689 5) is relayed as any
        other, over the verified STARTTLS [relay] asks for, its header
        field passed on unchanged.
        """
        core = startCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        body = b"TLS-Required: No\r\n" + MESSAGE
        yield submitted(msa, f"<{SENDER}>", [f"<{RECIPIENT}>"], body)
        yield queueEmptied(msa)
        [message] = core.messages
        self.assertTrue(message.tls)
        self.assertEqual(splitReceived(message.data)[1], body)
        self.assertEqual(
            [c for c in core.plaintextCommands() if c.startswith(b"MAIL")], []
        )

    @defer.inlineCallbacks
    def test_utf8OriginalRecipient(self):
        """
        A utf-8 ORCPT goes on as utf-8-addr-xtext (RFC 6533): its UTF-8 as
        is in an SMTPUTF8 transaction, "+" as "\\x{2B}".
        """
        core = startCore(self, ["DSN", "SMTPUTF8"])
        msa = RunningMSA(self, relay=core.relayConfig())
        yield submitted(
            msa,
            f"<{SENDER}> SMTPUTF8",
            [
                f"<{UTF8_RECIPIENT}> NOTIFY=NEVER "
                "ORCPT=utf-8;b\u00e9\\x{2B}1@overheid.nl"
            ],
        )
        yield queueEmptied(msa)
        [message] = core.messages
        self.assertEqual(
            message.rcptParams,
            ["NOTIFY=NEVER ORCPT=utf-8;b\u00e9\\x{2B}1@overheid.nl"],
        )

    @defer.inlineCallbacks
    def test_binaryMIMEWithBDAT(self):
        """
        A BODY=BINARYMIME message goes to a core that offers CHUNKING and
        BINARYMIME with BDAT: its octets (bare LF, NUL, a bare CR at the
        end) arrive exactly as spooled.
        """
        core = startCore(self, ["CHUNKING", "BINARYMIME"])
        msa = RunningMSA(self, relay=core.relayConfig())
        yield submitted(
            msa, f"<{SENDER}> BODY=BINARYMIME", [f"<{RECIPIENT}>"], BINARY, bdat=True
        )
        yield queueEmptied(msa)
        [message] = core.messages
        self.assertTrue(message.chunked)
        self.assertEqual(splitReceived(message.data)[1], BINARY)
        self.assertEqual(
            message.mailParams, f"BODY=BINARYMIME SIZE={len(message.data)}"
        )
        self.assertNotIn(b"DATA", [line for _, line in core.commands])


class RefusedLocallyTests(unittest.TestCase):
    """
    A message the core cannot take as it is bounces with the status the
    RFC names: nothing of it reaches the core, the sender gets the report,
    the queue is empty.
    """

    timeout = 30

    @defer.inlineCallbacks
    def assertBounced(self, core, msa, mail, rcpt, status, code, **kwargs):
        """
        Submit; the only message the core gets is the bounce naming
        C{rcpt} with C{status}, whose diagnostic is our C{code} reply.
        """
        yield submitted(msa, mail, [f"<{rcpt}>"], **kwargs)
        yield queueEmptied(msa)
        [bounce] = core.messages
        self.assertEqual((bounce.sender, bounce.recipients), ("", [SENDER]))
        report, [perMessage, perRecipient] = parseReport(bounce.data)
        self.assertEqual(perMessage["Reporting-MTA"], "dns; localhost")
        self.assertEqual(perRecipient["Final-Recipient"], f"rfc822; {rcpt}")
        self.assertEqual(perRecipient["Action"], "failed")
        self.assertEqual(perRecipient["Status"], status)
        self.assertTrue(
            perRecipient["Diagnostic-Code"].startswith(f"smtp; {code} {status} "),
            perRecipient["Diagnostic-Code"],
        )
        mails = [line for _, line in core.commands if line.startswith(b"MAIL")]
        self.assertEqual(len(mails), 1)
        self.assertTrue(mails[0].startswith(b"MAIL FROM:<> "), mails)
        return report

    def test_smtputf8WithoutTheCore(self):
        """
        RFC 6531 3.7.5: no silent downgrade; 553 5.6.7.
        """
        core = startCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        return self.assertBounced(
            core, msa, f"<{SENDER}> SMTPUTF8", UTF8_RECIPIENT, "5.6.7", 553
        )

    def test_binaryMIMEWithoutTheCore(self):
        """
        A core with CHUNKING but not BINARYMIME: 554 5.6.3.
        """
        core = startCore(self, ["CHUNKING"])
        msa = RunningMSA(self, relay=core.relayConfig())
        return self.assertBounced(
            core,
            msa,
            f"<{SENDER}> BODY=BINARYMIME",
            RECIPIENT,
            "5.6.3",
            554,
            body=BINARY,
            bdat=True,
        )

    def test_requireTLSWithoutTheCore(self):
        """
        RFC 8689: a core without REQUIRETLS: 550 5.7.10.
        """
        core = startCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        return self.assertBounced(
            core, msa, f"<{SENDER}> REQUIRETLS", RECIPIENT, "5.7.10", 550
        )

    def test_requireTLSUnverified(self):
        """
        A core that offers REQUIRETLS, but [relay] verify_certificate is
        off: not verified TLS, so 550 5.7.10.
        """
        core = startCore(self, ["REQUIRETLS"])
        relay = core.relayConfig(verify_certificate=False)
        del relay["ca_file"]
        msa = RunningMSA(self, relay=relay)
        return self.assertBounced(
            core, msa, f"<{SENDER}> REQUIRETLS", RECIPIENT, "5.7.10", 550
        )


class PostfixCoreTests(unittest.TestCase):
    """
    A real Postfix 3.7 as the core (SMTPUTF8, DSN, CHUNKING offered; no
    BINARYMIME, no REQUIRETLS), relaying on to a recording sink that
    offers DSN and SMTPUTF8, so that what Postfix received is seen.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_throughPostfix(self):
        """
        The DSN parameters and SMTPUTF8 reach Postfix (and through it the
        sink) with the bytes unchanged; a BINARYMIME and a REQUIRETLS
        message bounce (5.6.3, 5.7.10), their reports delivered through
        Postfix to the sender.
        """
        core = yield startPostfixCore(self, sinkExtensions=["DSN", "SMTPUTF8"])
        sink, postfix = core.sink, core.postfix
        msa = RunningMSA(self, relay=core.relay)
        yield submitted(
            msa,
            f"<{SENDER}> SMTPUTF8 RET=HDRS ENVID=aangifte+2B1",
            [
                f"<{UTF8_RECIPIENT}> NOTIFY=SUCCESS,FAILURE "
                "ORCPT=rfc822;belasting+2Bdienst@overheid.nl"
            ],
        )
        yield submitted(
            msa, f"<{SENDER}> BODY=BINARYMIME", [f"<{RECIPIENT}>"], BINARY, bdat=True
        )
        yield submitted(msa, f"<{SENDER}> REQUIRETLS", [f"<{RECIPIENT}>"])
        messages = yield sink.waitForMessages(3, timeout=60)
        [original] = [m for m in messages if m.sender == SENDER]
        self.assertEqual(original.recipients, [UTF8_RECIPIENT])
        self.assertTrue(original.data.endswith(b"\r\n" + MESSAGE), original.data)
        params = original.mailParams.split()
        self.assertIn("SMTPUTF8", params)
        self.assertIn("RET=HDRS", params)
        self.assertIn("ENVID=aangifte+2B1", params)
        self.assertIn("NOTIFY=SUCCESS,FAILURE", original.rcptParams[0].split())
        self.assertIn(
            "ORCPT=rfc822;belasting+2Bdienst@overheid.nl",
            original.rcptParams[0].split(),
        )
        statuses = []
        for bounce in (m for m in messages if m.sender == ""):
            self.assertEqual(bounce.recipients, [SENDER])
            _, [_, perRecipient] = parseReport(bounce.data)
            statuses.append((perRecipient["Action"], perRecipient["Status"]))
        self.assertEqual(sorted(statuses), [("failed", "5.6.3"), ("failed", "5.7.10")])
        with open(postfix.log, encoding="utf-8", errors="replace") as f:
            log = f.read()
        self.assertIn("sasl_username=msa", log)
        self.assertNotIn("improper command pipelining", log)


class ChunksTests(DownstreamFixture, unittest.TestCase):
    """
    L{msa.relay.chunks} over a real socket: a BINARYMIME message larger
    than one chunk, and the digest check before the C{LAST} chunk.
    """

    timeout = 30

    @defer.inlineCallbacks
    def deliverBinary(self, data: bytes, damage: bool = False):
        """
        Spool C{data} as a BINARYMIME message (bit-flipped on disk after
        the commit when C{damage}) and deliver it to a core that offers
        CHUNKING and BINARYMIME.

        @return: the core and the L{DeliveryResult}.
        """
        core = self.startServer()
        core.extensions = ["CHUNKING", "BINARYMIME"]
        envelope = Envelope(SENDER, [RECIPIENT], mailParams={"BODY": "BINARYMIME"})
        entry = yield self.queue(data, envelope=envelope)
        if damage:
            tamper(entry.messagePath)
        result = yield self.deliver(self.downstream(core), entry)
        return core, result

    @defer.inlineCallbacks
    def test_severalChunks(self):
        """
        Three chunks (the last one short) carry the octets exactly.
        """
        data = (BINARY * (2 * CHUNK_SIZE // len(BINARY) + 2))[: 2 * CHUNK_SIZE + 7]
        core, result = yield self.deliverBinary(data)
        self.assertEqual(result.accepted, [RECIPIENT])
        [message] = core.messages
        self.assertEqual(message.data, data)
        self.assertEqual(
            [line for _, line in core.commands if line.startswith(b"BDAT")],
            [b"BDAT %d" % CHUNK_SIZE] * 2 + [b"BDAT 7 LAST"],
        )

    @defer.inlineCallbacks
    def test_mismatchNoLastChunk(self):
        """
        Bytes that are not the acknowledged ones: the chunks read so far
        went out, the C{LAST} one never does, the connection is dropped
        and the result carries the mismatch (the runner holds the message).
        """
        data = (BINARY * (CHUNK_SIZE // len(BINARY) + 2))[: CHUNK_SIZE + 100]
        core, result = yield self.deliverBinary(data, damage=True)
        self.assertIsNotNone(result.mismatch)
        yield waitUntil(lambda: not any(p.connected for p in core._protocols), 10)
        self.assertEqual(core.messages, [])
        self.assertEqual(
            [line for _, line in core.commands if line.startswith(b"BDAT")],
            [b"BDAT %d" % CHUNK_SIZE],
        )
