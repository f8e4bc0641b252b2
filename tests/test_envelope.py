# -*- test-case-name: tests.test_envelope -*-
"""
Tests for L{msa.envelope}: the envelope of one message survives its JSON
form (how the spool stores it), including envelopes written by an older or
newer version of the MSA.
"""

import attrs
from twisted.trial import unittest

from msa.envelope import Envelope, SessionInfo


class EnvelopeTests(unittest.TestCase):
    def test_roundTrip(self):
        """
        Every field comes back from L{Envelope.toJSON} through
        L{Envelope.fromJSON}.
        """
        envelope = Envelope(
            sender="ik@mijnbedrijf.nl",
            recipients=["a@overheid.nl", "b@overheid.nl"],
            account="acme",
            mailParams={"BODY": "8BITMIME", "SMTPUTF8": None},
            clientAddress="192.0.2.1",
            helo="client.example",
            queueId="Q0001",
            receivedAt=1751356800.5,
        )
        self.assertEqual(Envelope.fromJSON(envelope.toJSON()), envelope)

    def test_asAttrsGivesIt(self):
        """
        L{Envelope.toJSON} is C{attrs.asdict}: every field, a field added
        later included, and copies of its containers.
        """
        envelope = Envelope(
            sender="ik@mijnbedrijf.nl",
            recipients=["a@overheid.nl"],
            mailParams={"RET": "HDRS"},
            recipientParams=[{"NOTIFY": "NEVER"}],
            tlsRequiredNo=True,
            receivedAt=2.0,
        )
        data = envelope.toJSON()
        self.assertEqual(data, attrs.asdict(envelope))
        self.assertEqual(list(data), [a.name for a in attrs.fields(Envelope)])
        data["recipients"].append("x@y")
        data["mailParams"]["RET"] = "FULL"
        data["recipientParams"][0]["NOTIFY"] = "SUCCESS"
        self.assertEqual(envelope.recipients, ["a@overheid.nl"])
        self.assertEqual(envelope.mailParams, {"RET": "HDRS"})
        self.assertEqual(envelope.recipientParams, [{"NOTIFY": "NEVER"}])

    def test_nullSender(self):
        """
        The null reverse-path C{<>} is the empty string, kept as such.
        """
        envelope = Envelope(sender="", recipients=["a@overheid.nl"], receivedAt=1.0)
        self.assertEqual(Envelope.fromJSON(envelope.toJSON()).sender, "")

    def test_olderAndNewer(self):
        """
        Keys the class does not know (a newer writer) are ignored; fields
        the JSON lacks (an older writer) take their defaults.
        """
        envelope = Envelope.fromJSON(
            {"sender": "a@b", "recipients": ["c@d"], "receivedAt": 5.0, "new": 1}
        )
        self.assertEqual(
            envelope,
            Envelope(sender="a@b", recipients=["c@d"], receivedAt=5.0),
        )
        self.assertEqual((envelope.account, envelope.mailParams), ("", {}))

    def test_sessionInfoDefaults(self):
        """
        A session starts with no HELO, TLS, account or client certificate.
        """
        info = SessionInfo("S1", "192.0.2.1")
        self.assertEqual(
            (info.clientPort, info.helo, info.tlsVersion, info.account),
            (0, "", "", ""),
        )
        self.assertEqual(info.clientCertificate, ())
