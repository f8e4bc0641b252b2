# -*- test-case-name: tests.test_dsn_notify -*-
"""
Our own delivery status notifications (L{msa.queue.dsn},
L{msa.relay.notices}) honour the client's DSN parameters (RFC 3461): per
recipient, NOTIFY=NEVER means no notice, a failed, delayed or relayed
notice only when NOTIFY names FAILURE, DELAY or SUCCESS (without NOTIFY:
failed and delayed as before, no relayed one); ENVID is echoed in
C{Original-Envelope-Id} and ORCPT in C{Original-Recipient}, xtext again.

Each case through the assembled daemon from TOML over STARTTLS, relaying
to a scripted core (L{tests.downstream.DownstreamServer}) that offers no
DSN; the notices reach that core too, and are read with Python's C{email}
package as RFC 3464 reports.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from msa.queue import dsnparams
from tests.e2e import RunningMSA
from tests.test_relay_extensions import (
    SENDER,
    parseReport,
    queueEmptied,
    startCore,
    submitted,
)

A, B, C = "a@overheid.nl", "b@overheid.nl", "c@overheid.nl"
ENVELOPE_ID = "aangifte+2B1"
ORIGINAL = "rfc822;belasting+2Bdienst@overheid.nl"


class NotifyTests(unittest.TestCase):
    """
    Which recipients a notice names, and what it echoes.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_failedOnlyWhenAsked(self):
        """
        Three recipients refused for good: NOTIFY=NEVER gets nothing,
        NOTIFY=FAILURE (with ORCPT) and no NOTIFY are in the one failed
        notice; ENVID and ORCPT are echoed xtext-encoded, and RET=HDRS
        returns the header only (text/rfc822-headers).
        """
        core = startCore(self)
        core.rcptReplies = {r: (550, "5.1.1 no such user") for r in (A, B, C)}
        msa = RunningMSA(self, relay=core.relayConfig())
        yield submitted(
            msa,
            f"<{SENDER}> RET=HDRS ENVID={ENVELOPE_ID}",
            [f"<{A}> NOTIFY=NEVER", f"<{B}> NOTIFY=FAILURE ORCPT={ORIGINAL}", f"<{C}>"],
        )
        yield queueEmptied(msa)
        [bounce] = core.messages
        self.assertEqual((bounce.sender, bounce.recipients), ("", [SENDER]))
        report, [perMessage, *perRecipient] = parseReport(bounce.data)
        self.assertEqual(perMessage["Original-Envelope-Id"], ENVELOPE_ID)
        self.assertEqual(
            [
                (
                    r["Original-Recipient"],
                    r["Final-Recipient"],
                    r["Action"],
                    r["Status"],
                )
                for r in perRecipient
            ],
            [
                (ORIGINAL, f"rfc822; {B}", "failed", "5.1.1"),
                (None, f"rfc822; {C}", "failed", "5.1.1"),
            ],
        )
        headers = report.get_payload()[2]
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: aangifte", headers.get_content())
        self.assertNotIn("Regel een", headers.get_content())

    @defer.inlineCallbacks
    def test_neverNoBounce(self):
        """
        The only recipient, NOTIFY=NEVER, refused for good: no bounce at
        all, and the message leaves the queue.
        """
        core = startCore(self)
        core.rcptReplies = {A: (550, "5.1.1 no such user")}
        msa = RunningMSA(self, relay=core.relayConfig())
        yield submitted(msa, f"<{SENDER}>", [f"<{A}> NOTIFY=NEVER"])
        yield queueEmptied(msa)
        self.assertEqual(core.messages, [])
        mails = [line for _, line in core.commands if line.startswith(b"MAIL")]
        self.assertEqual(len(mails), 1)

    @defer.inlineCallbacks
    def test_relayedForSuccess(self):
        """
        A core without DSN: after the delivery, a relayed notice (Action:
        relayed, Status: 2.0.0) names the recipient whose NOTIFY has
        SUCCESS, and neither the one without NOTIFY nor FAILURE alone.
        """
        core = startCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        yield submitted(
            msa,
            f"<{SENDER}> ENVID={ENVELOPE_ID}",
            [
                f"<{A}> NOTIFY=SUCCESS,FAILURE ORCPT={ORIGINAL}",
                f"<{B}>",
                f"<{C}> NOTIFY=FAILURE",
            ],
        )
        yield queueEmptied(msa)
        [original, notice] = core.messages
        self.assertEqual(original.recipients, [A, B, C])
        # A core without DSN is given none of its parameters.
        self.assertEqual(original.rcptParams, ["", "", ""])
        self.assertNotIn("ENVID", original.mailParams)
        self.assertEqual((notice.sender, notice.recipients), ("", [SENDER]))
        report, [perMessage, perRecipient] = parseReport(notice.data)
        self.assertEqual(perMessage["Original-Envelope-Id"], ENVELOPE_ID)
        self.assertEqual(perRecipient["Original-Recipient"], ORIGINAL)
        self.assertEqual(perRecipient["Final-Recipient"], f"rfc822; {A}")
        self.assertEqual(perRecipient["Action"], "relayed")
        self.assertEqual(perRecipient["Status"], "2.0.0")
        self.assertEqual(
            perRecipient["Diagnostic-Code"], "smtp; 250 2.0.0 Ok: queued as CORE1"
        )
        self.assertEqual(report["Subject"], "Successful Mail Relay Report")

    @defer.inlineCallbacks
    def test_delayedOnlyWhenAsked(self):
        """
        Three recipients the core keeps deferring: the delay warning names
        the one with NOTIFY=DELAY and the one without NOTIFY (this MSA's
        default), not the one with NOTIFY=FAILURE.
        """
        core = startCore(self)
        core.rcptReplies = {r: (451, "4.3.0 try later") for r in (A, B, C)}
        relay = core.relayConfig(retry_base=0.2, retry_max=0.5, delay_warning_after=1)
        msa = RunningMSA(self, relay=relay)
        yield submitted(
            msa,
            f"<{SENDER}>",
            [f"<{A}> NOTIFY=FAILURE", f"<{B}> NOTIFY=DELAY,FAILURE", f"<{C}>"],
        )
        [warning] = yield core.waitForMessages(1, timeout=20)
        self.assertEqual((warning.sender, warning.recipients), ("", [SENDER]))
        _, [_, *perRecipient] = parseReport(warning.data)
        self.assertEqual(
            [(r["Final-Recipient"], r["Action"], r["Status"]) for r in perRecipient],
            [
                (f"rfc822; {B}", "delayed", "4.3.0"),
                (f"rfc822; {C}", "delayed", "4.3.0"),
            ],
        )


class OriginalRecipientTests(unittest.TestCase):
    """
    L{dsnparams.encodeOriginalRecipient}: the stored (decoded) ORCPT as it goes
    on, in a RCPT or an C{Original-Recipient} field.
    """

    def test_rfc822(self):
        """
        An rfc822 address is xtext: "+" and "=" as "+HH".
        """
        self.assertEqual(
            dsnparams.encodeOriginalRecipient("rfc822;a+b=c@overheid.nl"),
            "rfc822;a+2Bb+3Dc@overheid.nl",
        )

    def test_utf8(self):
        """
        A utf-8 address keeps its UTF-8 only for an SMTPUTF8 transaction;
        otherwise (a DSN's field) each non-ASCII character is "\\x{HEX}".
        """
        orcpt = "utf-8;b\u00e9+1@overheid.nl"
        self.assertEqual(
            dsnparams.encodeOriginalRecipient(orcpt, utf8=True),
            "utf-8;b\u00e9\\x{2B}1@overheid.nl",
        )
        self.assertEqual(
            dsnparams.encodeOriginalRecipient(orcpt),
            "utf-8;b\\x{E9}\\x{2B}1@overheid.nl",
        )
