# -*- test-case-name: tests.test_fromspoofing_e2e -*-
"""
From: spoofing (issue 18, R9) as the daemon refuses it: the MSA built from
its TOML file, an account with C{requireHeaderFrom} in its accounts file,
messages submitted over STARTTLS with smtplib.  The issue's forged From:
values get C{550} with their enhanced status code and never reach the
outbox; the legitimate forms are queued and delivered byte for byte.
"""

import attrs
from twisted.internet import defer
from twisted.trial import unittest

from msa.accounts.model import makeAccount
from tests.e2e import RunningMSA
from tests.test_content_e2e import send
from tests.test_e2e import splitReceived

BODY = b"To: belastingdienst@overheid.nl\r\nSubject: aangifte\r\n\r\nHallo\r\n"

MALFORMED = b"5.6.0 Message refused: malformed From: header field"

#: Forged or ambiguous author fields, and the reply each gets.
REFUSED = [
    (
        b"From: ceo@belastingdienst.nl ik@mijnbedrijf.nl\r\n",
        MALFORMED + b" (text after an address)",
    ),
    (
        b"From: ceo@belastingdienst.nl\\ ik@mijnbedrijf.nl\r\n",
        MALFORMED + b" (text after an address)",
    ),
    (
        b"From: ik@mijnbedrijf.nl\r\nFrom: ceo@belastingdienst.nl\r\n",
        b"5.6.0 Message refused: more than one From: header field (RFC 5322 3.6)",
    ),
    (
        b"From: ik@mijnbedrijf.nl\r\nSender: ceo@belastingdienst.nl\r\n",
        b"5.7.1 Message refused: Sender: <ceo@belastingdienst.nl> is not an "
        b"address of the authenticated account",
    ),
    (
        b"From: Ik <ik@mijnbedrijf.nl>,\r\n ceo@belastingdienst.nl\r\n",
        b"5.7.1 Message refused: From: <ceo@belastingdienst.nl> is not an "
        b"address of the authenticated account",
    ),
]

#: Legitimate author fields of the account: queued unchanged.
ACCEPTED = [
    b"From: ik@mijnbedrijf.nl\r\n",
    b'From: "ceo@belastingdienst.nl" <ik@mijnbedrijf.nl>\r\n',
    b"From: Mijnbedrijf B.V. <ik@mijnbedrijf.nl>\r\n",
    b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jorg@MijnBedrijf.nl>,\r\n"
    b' "de Vries, Jan" <jan@mijnbedrijf.nl> (afdeling douane)\r\n'
    b"Sender: secretariaat@mijnbedrijf.nl\r\n",
]


class FromSpoofingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_forgedRefusedLegitimateDelivered(self):
        alice = attrs.evolve(
            makeAccount("alice", "wonderland", ["localhost"]),
            extra={"senders": ["@mijnbedrijf.nl"], "requireHeaderFrom": True},
        )
        msa = RunningMSA(self, extraAccounts={"alice": alice})
        for header, reply in REFUSED:
            code, text = yield send(msa, header + BODY)
            self.assertEqual((code, text), (550, reply), header)
        self.assertEqual(msa.outboxFiles(), [])
        queued = {}
        for header in ACCEPTED:
            code, text = yield send(msa, header + BODY)
            self.assertEqual(code, 250, (header, text))
            self.assertTrue(text.startswith(b"2.0.0 Ok: queued as "), text)
            queued[text.split()[-1].decode() + ".eml"] = header + BODY
        files = yield msa.waitForOutbox(len(ACCEPTED))
        self.assertEqual(sorted(files), sorted(queued))
        for name, sent in queued.items():
            _, delivered = splitReceived(msa.readOutbox(name))
            self.assertEqual(delivered, sent)
