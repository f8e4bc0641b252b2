# -*- test-case-name: tests.test_extensions -*-
"""
The extensions of issue 21 through the protocol (a string transport): what
EHLO offers over TLS, DSN and REQUIRETLS parameters checked and kept in
the envelope, SMTPUTF8 addresses, LIMITS per account, and
C{TLS-Required: No} noted for the relay.  Their pure parts (xtext, the
header scan) too.
"""

from twisted.trial import unittest

from msa.envelope import Envelope
from msa.errors import SMTPReply
from msa.submission.parameters import orcptValue
from msa.submission.tlsrequired import TLSRequiredScan
from msa.xtext import (
    decodeUtf8AddrXtext,
    decodeXtext,
    encodeUtf8AddrXtext,
    encodeXtext,
)
from tests.helpers import Harness

EXTENSION_LINES = [
    b"250-DSN",
    b"250-SMTPUTF8",
    b"250-CHUNKING",
    b"250-BINARYMIME",
    b"250-REQUIRETLS",
    b"250-LIMITS RCPTMAX=100",
]


class EhloTests(unittest.TestCase):
    def test_overTLSOnly(self):
        """
        Over TLS the extensions follow 8BITMIME, before AUTH (before TLS
        the reply is the spec example's:
        L{tests.test_server.GreetingAndEHLOTests.test_ehloBeforeTLS}).
        """
        h = Harness(self)
        after = h.startTLS()
        self.assertEqual(after[4:11], [b"250-8BITMIME"] + EXTENSION_LINES)
        self.assertTrue(after[-1].startswith(b"250 AUTH "), after)

    def test_limitsPerAccount(self):
        """
        After AUTH, LIMITS says the account's own recipient limit where it
        is lower than the server's.
        """
        h = Harness(
            self,
            realmArgs={"extras": {"alice": {"senders": ["@x.nl"], "maxRecipients": 3}}},
        )
        h.login()
        ehlo = h.command(b"EHLO client.example.nl")
        self.assertIn(b"250-LIMITS RCPTMAX=3", ehlo)

    def test_switchedOff(self):
        """
        With no extension configured, none is offered, and their
        parameters are unknown.
        """
        h = Harness(self, extensions=frozenset())
        ehlo = h.startTLS()
        for line in EXTENSION_LINES:
            self.assertNotIn(line, ehlo)
        h.login()
        for params, keyword in [
            (b"REQUIRETLS", b"REQUIRETLS"),
            (b"RET=FULL", b"RET"),
            (b"ENVID=x", b"ENVID"),
        ]:
            self.assertEqual(
                h.command(b"MAIL FROM:<a@example.nl> " + params),
                [b"555 5.5.4 Unsupported parameter: " + keyword],
            )


class ParameterStorageTests(unittest.TestCase):
    """
    The parameters a client gives are kept, decoded, in the envelope the
    spool stores, and survive its JSON form.
    """

    def setUp(self):
        self.h = Harness(self)
        self.h.login()

    def stored(self) -> Envelope:
        [stored] = self.h.spool.committed
        return Envelope.fromJSON(stored.envelope.toJSON())

    def test_dsn(self):
        h = self.h
        replies = h.send(
            b"MAIL FROM:<a@example.nl> RET=hdrs ENVID=QQ+2B1+3D2\r\n"
            b"RCPT TO:<b@example.nl> NOTIFY=failure,DELAY "
            b"ORCPT=rfc822;b+2Bx@example.nl\r\n"
            b"RCPT TO:<c@example.nl>\r\n"
            b"RCPT TO:<d@example.nl> NOTIFY=NEVER ORCPT=utf-8;d\\x{E9}@example.nl\r\n"
            b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
        )
        self.assertEqual(replies[-1], b"250 2.0.0 Ok: queued as Q0001")
        envelope = self.stored()
        self.assertEqual(envelope.mailParams, {"RET": "HDRS", "ENVID": "QQ+1=2"})
        self.assertEqual(
            envelope.recipientParams,
            [
                {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;b+x@example.nl"},
                {},
                {"NOTIFY": "NEVER", "ORCPT": "utf-8;d\u00e9@example.nl"},
            ],
        )
        self.assertEqual(envelope.parametersOf(1), {})
        self.assertEqual(envelope.parametersOf(3), {})

    def test_dsnRefusals(self):
        """
        Malformed DSN values, and a DSN parameter given twice, are
        501 5.5.4 (RFC 3461 4).
        """
        h = self.h
        for params in [
            b"RET=ALL",
            b"RET=FULL RET=HDRS",
            b"ENVID=" + b"e" * 101,
            b"ENVID=a+2b",
            b"ENVID=a+",
        ]:
            reply = h.command(b"MAIL FROM:<a@example.nl> " + params)
            self.assertEqual(reply[0][:9], b"501 5.5.4", params)
        self.assertEqual(
            h.command(b"MAIL FROM:<a@example.nl> ENVID=" + b"e" * 100)[0][:3], b"250"
        )
        for params in [
            b"NOTIFY=NEVER,FAILURE",
            b"NOTIFY=SUCCESS,SUCCESS",
            b"NOTIFY=SOMETIMES",
            b"NOTIFY=",
            b"ORCPT=b@example.nl",
            b"ORCPT=x400;b",
            b"ORCPT=rfc822;",
            b"ORCPT=rfc822;a+zz",
            b"ORCPT=utf-8;a\\x{D800}",
            b"NOTIFY=NEVER NOTIFY=NEVER",
        ]:
            reply = h.command(b"RCPT TO:<b@example.nl> " + params)
            self.assertEqual(reply[0][:9], b"501 5.5.4", params)
        # At most 500 characters (RFC 3461 4.2); a RCPT line of 512 octets
        # cannot carry more than that anyway.
        self.assertEqual(orcptValue("rfc822;" + "o" * 493), "rfc822;" + "o" * 493)
        self.assertRaises(SMTPReply, orcptValue, "rfc822;" + "o" * 494)

    def test_smtputf8(self):
        """
        With SMTPUTF8 on MAIL, UTF-8 addresses (local parts and U-labels)
        are accepted and kept exactly as sent (not normalised); without it
        they are 553 5.6.7.
        """
        h = self.h
        sender = "jose\u0301@example.nl".encode()
        recipient = "b\u00e9lasting@b\u00fccher.example".encode()
        self.assertEqual(
            h.command(b"MAIL FROM:<" + sender + b">"),
            [
                b"553 5.6.7 Non-ASCII addresses require the SMTPUTF8 "
                b"parameter (RFC 6531)"
            ],
        )
        replies = h.send(
            b"MAIL FROM:<" + sender + b"> SMTPUTF8\r\n"
            b"RCPT TO:<" + recipient + b">\r\n"
            b"DATA\r\nSubject: \xc3\xa9\r\n\r\n.\r\n"
        )
        self.assertEqual(replies[-1], b"250 2.0.0 Ok: queued as Q0001")
        envelope = self.stored()
        self.assertEqual(envelope.sender, "jose\u0301@example.nl")
        self.assertEqual(envelope.recipients, ["b\u00e9lasting@b\u00fccher.example"])
        self.assertEqual(envelope.mailParams, {"SMTPUTF8": None})

    def test_smtputf8Refusals(self):
        h = self.h
        for address in [
            "a\u0085b@example.nl",  # a C1 control
            "ab@bu\u0308cher.example",  # not a U-label (not NFC)
            "ab@\u00fc",  # not fully qualified
            "\u00e9" * 33 + "@example.nl",  # 66 octets
        ]:
            reply = h.command(b"MAIL FROM:<" + address.encode() + b"> SMTPUTF8")
            self.assertEqual(reply[0][:9], b"553 5.1.3", address)
        self.assertEqual(
            h.command(b"MAIL FROM:<\xff@example.nl> SMTPUTF8"),
            [b"553 5.6.7 Address is not valid UTF-8"],
        )

    def test_nfcSender(self):
        """
        An account's UTF-8 sender address matches the client's however
        either is normalised (compared after NFC).
        """
        h = Harness(
            self, realmArgs={"extras": {"alice": {"senders": ["jos\u00e9@example.nl"]}}}
        )
        h.login()
        self.assertEqual(
            h.command("MAIL FROM:<JOSE\u0301@example.nl> SMTPUTF8".encode()),
            [b"250 2.1.0 Ok"],
        )

    def test_headerFromUTF8(self):
        """
        For an account with C{requireHeaderFrom}, a UTF-8 mailbox in the
        header C{From:} is read when the message came with SMTPUTF8 (and
        matched after NFC); without SMTPUTF8 it is malformed.
        """
        h = Harness(
            self,
            realmArgs={
                "extras": {
                    "alice": {
                        "senders": ["jos\u00e9@example.nl"],
                        "requireHeaderFrom": True,
                    }
                }
            },
        )
        h.login()
        header = "From: Jos\u00e9 <jose\u0301@example.nl>\r\n\r\nx\r\n.\r\n".encode()
        envelope = "MAIL FROM:<jos\u00e9@example.nl> SMTPUTF8\r\n".encode()
        replies = h.send(envelope + b"RCPT TO:<b@example.nl>\r\nDATA\r\n" + header)
        self.assertEqual(replies[-1], b"250 2.0.0 Ok: queued as Q0001")
        h2 = Harness(
            self,
            realmArgs={
                "extras": {
                    "alice": {"senders": ["@example.nl"], "requireHeaderFrom": True}
                }
            },
        )
        h2.login()
        replies = h2.send(
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\nDATA\r\n" + header
        )
        self.assertEqual(
            replies[-1],
            b"550 5.6.0 Message refused: malformed From: header field "
            b"(non-ASCII addresses are not supported (no SMTPUTF8))",
        )

    def test_requireTLS(self):
        """
        REQUIRETLS is kept; with it, C{TLS-Required: No} is ignored (RFC
        8689 5); without it, it is noted in the envelope.
        """
        message = (
            b"DATA\r\nTLS-Required:  no \r\nSubject: x\r\n\r\nTLS-Required: No\r\n.\r\n"
        )
        self.h.send(
            b"MAIL FROM:<a@example.nl> REQUIRETLS\r\nRCPT TO:<b@example.nl>\r\n"
            + message
        )
        self.h.send(b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n" + message)
        self.h.send(
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
            b"DATA\r\nSubject: x\r\n\r\nTLS-Required: No\r\n.\r\n"
        )
        first, second, third = [s.envelope for s in self.h.spool.committed]
        self.assertEqual(first.mailParams, {"REQUIRETLS": None})
        self.assertFalse(first.tlsRequiredNo)
        self.assertTrue(second.tlsRequiredNo)
        self.assertFalse(third.tlsRequiredNo)
        self.assertTrue(Envelope.fromJSON(second.toJSON()).tlsRequiredNo)

    def test_requireTLSBdat(self):
        """
        The header is seen in BDAT chunks too, cut anywhere.
        """
        content = b"X: y\r\nTLS-Required: No\r\n\r\nbody\r\n"
        self.h.send(
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
            b"BDAT 13\r\n"
            + content[:13]
            + b"BDAT %d LAST\r\n" % (len(content) - 13)
            + content[13:]
        )
        [stored] = self.h.spool.committed
        self.assertTrue(stored.envelope.tlsRequiredNo)


class PureTests(unittest.TestCase):
    def test_xtext(self):
        for text in ["a+b=c", "plain", "\x7f\x01 x", ""]:
            self.assertEqual(decodeXtext(encodeXtext(text)), text)
        self.assertEqual(encodeXtext("a+b=c d"), "a+2Bb+3Dc+20d")

    def test_utf8AddrXtext(self):
        for text in ["j\u00f6s\u00e9@x.nl", "a+b=c\\d@x.nl", "a b@x.nl"]:
            self.assertEqual(decodeUtf8AddrXtext(encodeUtf8AddrXtext(text)), text)
        self.assertEqual(encodeUtf8AddrXtext("a+b"), "a\\x{2B}b")

    def test_scanFolded(self):
        scan = TLSRequiredScan()
        for line in [
            b"Subject: x",
            b"TLS-Required:",
            b"\tNo",
            b"",
            b"TLS-Required: No",
        ]:
            scan.lineReceived(line)
        self.assertTrue(scan.found)
        scan = TLSRequiredScan()
        for line in [b"TLS-Required: Yes", b"X-TLS-Required: No", b""]:
            scan.lineReceived(line)
        self.assertFalse(scan.found)
        scan = TLSRequiredScan()
        data = b"A: b\r\nTLS-Required: No\r\n\r\n"
        for octet in data:
            scan.blockReceived(bytes([octet]))
        self.assertTrue(scan.found)
        self.assertTrue(scan.done)
