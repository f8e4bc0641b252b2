# -*- test-case-name: tests.test_headerfrom -*-
"""
L{msa.policy.headerfrom}: the From:/Sender: rule of an account with
C{requireHeaderFrom} (issue 18, R9) through the protocol, with its exact
replies, and the envelope sender beside it; then the second opinion of the
lenient readers on its own.  The generated fields are in
L{tests.test_fromspoofing}, the daemon in L{tests.test_fromspoofing_e2e}.
"""

from twisted.trial import unittest

from msa.policy.headerfrom import _readersAgree
from msa.policy.mailboxes import Mailbox
from tests.helpers import Harness


class ReadersAgreeTests(unittest.TestCase):
    """
    The second opinion of L{msa.policy.headerfrom}: a field the strict
    reader accepts must read the same to the lenient readers.  (The
    generated fields never reach it: the strict reader is stricter.)
    """

    def test_agree(self):
        self.assertTrue(
            _readersAgree(
                '"Ik" <ik@MijnBedrijf.nl>, a@x.nl',
                (Mailbox("Ik", "ik", "mijnbedrijf.nl"), Mailbox("", "a", "x.nl")),
            )
        )

    def test_disagree(self):
        ik = (Mailbox("", "ik", "mijnbedrijf.nl"),)
        # headerregistry reads ceo@belastingdienst.nl (and a defect).
        self.assertFalse(_readersAgree("ceo@belastingdienst.nl ik@mijnbedrijf.nl", ik))
        # Both read another mailbox than the strict reading given.
        self.assertFalse(_readersAgree("jij@mijnbedrijf.nl", ik))
        # A reader that fails counts as disagreeing: getaddresses reads the
        # empty group as an empty address, which has no "@" to split at.
        self.assertFalse(_readersAgree("\udcff", ik))
        self.assertFalse(
            _readersAgree("Niemand:;, c@x.nl", (Mailbox("", "c", "x.nl"),))
        )


class ThroughProtocolTests(unittest.TestCase):
    """
    The From:/Sender: rule and the envelope sender through the protocol,
    with their exact replies; nothing refused is queued.
    """

    def setUp(self):
        self.h = Harness(
            self,
            realmArgs={
                "extras": {
                    "alice": {"senders": ["@mijnbedrijf.nl"], "requireHeaderFrom": True}
                }
            },
        )
        self.h.login()

    def submit(self, header: bytes, sender: bytes = b"ik@mijnbedrijf.nl") -> bytes:
        replies = self.h.submit(header + b"Subject: x\r\n\r\nbody\r\n", sender=sender)
        return replies[-1]

    def test_issueValueRefused(self):
        self.assertEqual(
            self.submit(b"From: ceo@belastingdienst.nl ik@mijnbedrijf.nl\r\n"),
            b"550 5.6.0 Message refused: malformed From: header field "
            b"(text after an address)",
        )
        self.assertEqual(
            self.submit(b"From: ceo@belastingdienst.nl\\ ik@mijnbedrijf.nl\r\n"),
            b"550 5.6.0 Message refused: malformed From: header field "
            b"(text after an address)",
        )
        self.assertEqual(self.h.spool.committed, [])

    def test_obsoletePhraseQueued(self):
        """
        An unquoted period in a display name (RFC 5322 4.1 obs-phrase: the
        Dutch company suffix "B.V.") is accepted though
        C{email.headerregistry} notes it as obsolete syntax: every reader
        names the same mailbox of the account.
        """
        for value in [
            b"J. Smit <ik@mijnbedrijf.nl>",
            b"Acme B.V. <ik@mijnbedrijf.nl>",
            b'"J. Smit" <ik@mijnbedrijf.nl>',
        ]:
            reply = self.submit(b"From: " + value + b"\r\n")
            self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued as "), reply)

    def test_obsoletePhraseForeignMailboxRefused(self):
        """
        Accepting the obs-phrase excuses nothing else: a foreign mailbox
        behind "Acme B.V." is refused as any other (550 5.7.1), nothing
        queued.
        """
        self.assertEqual(
            self.submit(b"From: Acme B.V. <ceo@belastingdienst.nl>\r\n"),
            b"550 5.7.1 Message refused: From: <ceo@belastingdienst.nl> is not "
            b"an address of the authenticated account",
        )
        self.assertEqual(self.h.spool.committed, [])

    def test_secondFromRefused(self):
        """
        A second From: is refused even when both name the account: RFC 5322
        3.6 allows one, and readers differ in which one they show.  With the
        foreign one second, checking only the first would let it through.
        """
        for header in [
            b"From: ik@mijnbedrijf.nl\r\nFrom: ceo@belastingdienst.nl\r\n",
            b"From: ik@mijnbedrijf.nl\r\nfrom: jij@mijnbedrijf.nl\r\n",
        ]:
            self.assertEqual(
                self.submit(header),
                b"550 5.6.0 Message refused: more than one From: header field "
                b"(RFC 5322 3.6)",
            )
        self.assertEqual(self.h.spool.committed, [])

    def test_sender(self):
        """
        Sender: names one mailbox of the account, once.
        """
        own = b"From: ik@mijnbedrijf.nl\r\n"
        self.assertEqual(
            self.submit(own + b"Sender: ceo@belastingdienst.nl\r\n"),
            b"550 5.7.1 Message refused: Sender: <ceo@belastingdienst.nl> is not "
            b"an address of the authenticated account",
        )
        self.assertEqual(
            self.submit(own + b"Sender: a@mijnbedrijf.nl, b@mijnbedrijf.nl\r\n"),
            b"550 5.6.0 Message refused: malformed Sender: header field "
            b"(it must hold exactly one mailbox)",
        )
        self.assertEqual(
            self.submit(
                own + b"Sender: a@mijnbedrijf.nl\r\nSender: a@mijnbedrijf.nl\r\n"
            ),
            b"550 5.6.0 Message refused: more than one Sender: header field "
            b"(RFC 5322 3.6)",
        )
        self.assertEqual(self.h.spool.committed, [])
        self.assertTrue(
            self.submit(
                own + b"Sender: Ik <secretariaat@mijnbedrijf.nl>\r\n"
            ).startswith(b"250 2.0.0 Ok: queued as ")
        )

    def test_foreignMailboxAmongSeveral(self):
        self.assertEqual(
            self.submit(b"From: ik@mijnbedrijf.nl, Baas <baas@Belastingdienst.nl>\r\n"),
            b"550 5.7.1 Message refused: From: <baas@Belastingdienst.nl> is not an "
            b"address of the authenticated account",
        )

    def test_legitimateFormsQueuedUnchanged(self):
        header = (
            b'From: "ceo@belastingdienst.nl" <ik@mijnbedrijf.nl>,\r\n'
            b" =?utf-8?q?J=C3=B6rg?= <jorg@MijnBedrijf.nl> (afdeling),\r\n"
            b'\t"jan de vries"@mijnbedrijf.nl\r\n'
        )
        reply = self.submit(header)
        self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued as "), reply)
        [data] = self.h.spool.messages()
        self.assertTrue(data.endswith(header + b"Subject: x\r\n\r\nbody\r\n"), data)

    def test_envelopeQuotedLocalPartHoldingAt(self):
        """
        The envelope sender's domain is after the last C{@}:
        C{"a@evil.nl"@mijnbedrijf.nl} is the account's, and
        C{"x@mijnbedrijf.nl"@evil.nl} is not.
        """
        self.assertEqual(
            self.h.command(b'MAIL FROM:<"a@evil.nl"@mijnbedrijf.nl>'),
            [b"250 2.1.0 Ok"],
        )
        self.h.command(b"RSET")
        self.assertEqual(
            self.h.command(b'MAIL FROM:<"x@mijnbedrijf.nl"@evil.nl>'),
            [
                b'553 5.7.1 Sender address <"x@mijnbedrijf.nl"@evil.nl> is not '
                b"owned by the authenticated account"
            ],
        )
