"""
Protocol unit tests of L{msa.submission.server.SubmissionServer} without sockets: the
TLS gate, AUTH error paths, the transaction replies, limits at and past
their edges, and every Twisted default DESIGN.md lists as wrong for an MSA
(the docstrings of those tests say which default they pin down).
"""

import base64

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.helpers import Harness

GREETING = b"220 msa.example.nl ESMTP"
NOT_TLS = b"530 5.7.0 Must issue a STARTTLS command first"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class GreetingAndEHLOTests(unittest.TestCase):
    def test_greeting(self):
        h = Harness(self)
        self.assertEqual(h.transport.value(), GREETING + b"\r\n")

    def test_ehloBeforeTLS(self):
        """
        Before TLS: STARTTLS offered, AUTH not (Twisted advertises AUTH in
        plaintext).
        """
        h = Harness(self)
        self.assertEqual(
            h.command(b"EHLO client.example.nl"),
            [
                b"250-msa.example.nl",
                b"250-PIPELINING",
                b"250-SIZE 52428800",
                b"250-ENHANCEDSTATUSCODES",
                b"250-8BITMIME",
                b"250 STARTTLS",
            ],
        )

    def test_ehloAfterSTARTTLS(self):
        h = Harness(self)
        h.command(b"STARTTLS")
        reply = h.command(b"EHLO client.example.nl")
        self.assertNotIn(b"250-STARTTLS", reply)
        self.assertNotIn(b"250 STARTTLS", reply)
        self.assertEqual(reply[-1], b"250 AUTH PLAIN LOGIN")

    def test_ehloImplicitTLS(self):
        """
        No STARTTLS on the implicit-TLS listener (Twisted advertises it
        whenever the transport could start TLS).
        """
        h = Harness(self, implicitTLS=True)
        reply = h.command(b"EHLO client.example.nl")
        self.assertFalse([line for line in reply if b"STARTTLS" in line])
        self.assertEqual(reply[-1], b"250 AUTH PLAIN LOGIN")

    def test_ehloNeedsArgument(self):
        h = Harness(self)
        self.assertEqual(h.command(b"EHLO"), [b"501 5.5.4 Syntax: EHLO hostname"])

    def test_sizeConfigured(self):
        h = Harness(self, maxMessageSize=1000)
        self.assertIn(b"250-SIZE 1000", h.command(b"EHLO c.example.nl"))


class PreTLSGateTests(unittest.TestCase):
    """
    R3: before TLS only NOOP, EHLO, QUIT and STARTTLS.
    """

    def test_refused(self):
        for command in [
            b"HELO client.example.nl",
            b"RSET",
            b"AUTH PLAIN " + b64(b"\0alice\0wonderland"),
            b"MAIL FROM:<a@example.nl>",
            b"RCPT TO:<b@example.nl>",
            b"DATA",
            b"VRFY alice",
            b"HELP",
            b"XYZZY",
        ]:
            h = Harness(self)
            h.command(b"EHLO client.example.nl")
            self.assertEqual(h.command(command), [NOT_TLS], command)
            self.assertFalse(h.transport.disconnecting)
            self.assertIsNone(h.server.avatar)

    def test_honoured(self):
        h = Harness(self)
        self.assertEqual(h.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertEqual(h.command(b"EHLO x.example.nl")[0], b"250-msa.example.nl")
        self.assertEqual(h.command(b"QUIT"), [b"221 2.0.0 Bye"])
        self.assertTrue(h.transport.disconnecting)


class STARTTLSTests(unittest.TestCase):
    def test_reply(self):
        h = Harness(self)
        self.assertEqual(h.command(b"STARTTLS"), [b"220 2.0.0 Ready to start TLS"])
        self.assertTrue(h.transport.tlsStarted)

    def test_pipelinedPlaintextDiscarded(self):
        """
        CVE-2011-0411: plaintext after STARTTLS in the same packet is thrown
        away, never executed after the handshake (Twisted executes it).
        """
        h = Harness(self)
        h.command(b"EHLO c.example.nl")
        reply = h.send(b"STARTTLS\r\nNOOP\r\nEHLO evil.example.nl\r\n")
        self.assertEqual(reply, [b"220 2.0.0 Ready to start TLS"])
        self.assertEqual(h.command(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_stateReset(self):
        """
        RFC 3207 4.2: the client must EHLO again after TLS (Twisted keeps
        the HELO state).
        """
        h = Harness(self)
        h.command(b"EHLO c.example.nl")
        h.command(b"STARTTLS")
        token = b64(b"\0alice\0wonderland")
        self.assertEqual(
            h.command(b"AUTH PLAIN " + token), [b"503 5.5.1 Error: send EHLO first"]
        )
        h.command(b"EHLO c.example.nl")
        self.assertEqual(
            h.command(b"AUTH PLAIN " + token),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_argument(self):
        h = Harness(self)
        self.assertEqual(h.command(b"STARTTLS now"), [b"501 5.5.4 Syntax: STARTTLS"])
        self.assertFalse(h.transport.tlsStarted)

    def test_insideTLS(self):
        h = Harness(self)
        h.startTLS()
        self.assertEqual(
            h.command(b"STARTTLS"), [b"554 5.5.1 Error: TLS already active"]
        )

    def test_implicitTLS(self):
        h = Harness(self, implicitTLS=True)
        self.assertEqual(
            h.command(b"STARTTLS"), [b"554 5.5.1 Error: TLS already active"]
        )


class AuthTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness(self)
        self.h.startTLS()

    def assertStillConnected(self):
        self.assertFalse(self.h.transport.disconnecting)

    def test_mailBeforeAuth(self):
        """
        RFC 6409 4.3: 530 (Twisted answers 550 after an anonymous login).
        """
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl>"),
            [b"530 5.7.0 Authentication required"],
        )

    def test_rcptAndDataBeforeAuth(self):
        for command in [b"RCPT TO:<b@example.nl>", b"DATA"]:
            self.assertEqual(
                self.h.command(command), [b"530 5.7.0 Authentication required"]
            )

    def test_plainInitialResponse(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0alice\0wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertEqual(self.h.server.session.account, "alice")

    def test_plainWithoutInitialResponse(self):
        self.assertEqual(self.h.command(b"AUTH PLAIN"), [b"334 "])
        self.assertEqual(
            self.h.command(b64(b"\0alice\0wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_plainAuthzidSameUser(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"alice\0alice\0wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_plainAuthzidOtherUser(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"bob\0alice\0wonderland")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertIsNone(self.h.server.avatar)

    def test_wrongPassword(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0alice\0guess")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertStillConnected()
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl>"),
            [b"530 5.7.0 Authentication required"],
        )

    def test_unknownUser(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0mallory\0wonderland")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )

    def test_invalidBase64(self):
        """
        Twisted answers 501 without an enhanced code; a malformed PLAIN
        raises out of dataReceived there and drops the client.
        """
        self.assertEqual(
            self.h.command(b"AUTH PLAIN !!!notbase64"),
            [b"501 5.5.2 Error: invalid base64 data"],
        )
        self.assertStillConnected()
        self.assertEqual(self.h.command(b"AUTH PLAIN"), [b"334 "])
        self.assertEqual(
            self.h.command(b"%%%"), [b"501 5.5.2 Error: invalid base64 data"]
        )
        self.assertStillConnected()

    def test_malformedPlain(self):
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"alice wonderland")),
            [b"501 5.5.2 PLAIN needs authzid NUL authcid NUL passwd"],
        )
        self.assertStillConnected()

    def test_abort(self):
        self.assertEqual(self.h.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(self.h.command(b"*"), [b"501 5.7.0 Authentication aborted"])
        self.assertEqual(self.h.command(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_unknownMechanism(self):
        self.assertEqual(
            self.h.command(b"AUTH CRAM-MD5"),
            [b"504 5.5.4 Unrecognized authentication type"],
        )

    def test_bareAuth(self):
        """
        A bare AUTH raises IndexError out of Twisted's ext_AUTH.
        """
        self.assertEqual(
            self.h.command(b"AUTH"),
            [b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"],
        )
        self.assertStillConnected()

    def test_alreadyAuthenticated(self):
        self.h.login()
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + b64(b"\0alice\0wonderland")),
            [b"503 5.5.1 Error: already authenticated"],
        )

    def test_login(self):
        self.assertEqual(self.h.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(self.h.command(b64(b"alice")), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(
            self.h.command(b64(b"wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_loginInitialResponse(self):
        self.assertEqual(
            self.h.command(b"AUTH LOGIN " + b64(b"alice")), [b"334 UGFzc3dvcmQ6"]
        )
        self.assertEqual(
            self.h.command(b64(b"wonderland")),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_loginWrongPassword(self):
        self.h.command(b"AUTH LOGIN")
        self.h.command(b64(b"alice"))
        self.assertEqual(
            self.h.command(b64(b"nope")),
            [b"535 5.7.8 Authentication credentials invalid"],
        )

    def test_failureLimit(self):
        """
        At the limit of failed logins the session ends with 421; below it,
        it goes on.
        """
        bad = b"AUTH PLAIN " + b64(b"\0alice\0bad")
        self.h.command(bad)
        self.h.command(bad)
        self.assertStillConnected()
        self.assertEqual(
            self.h.command(bad),
            [
                b"535 5.7.8 Authentication credentials invalid",
                b"421 4.7.0 msa.example.nl Error: too many failed logins",
            ],
        )
        self.assertTrue(self.h.transport.disconnecting)

    def test_longAuthLine(self):
        """
        RFC 4954: AUTH lines may be longer than 512 octets; PLAIN caps each
        field at 255 octets.
        """
        user = b"u" * 255
        token = b64(user + b"\0" + user + b"\0" + b"x" * 255)
        self.assertGreater(len(b"AUTH PLAIN " + token), 1000)
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + token),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        token = b64(b"\0alice\0" + b"x" * 256)
        self.assertEqual(
            self.h.command(b"AUTH PLAIN " + token),
            [b"501 5.5.2 PLAIN needs authzid NUL authcid NUL passwd"],
        )


class TransactionTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness(self)
        self.h.login()

    def test_specExample(self):
        """
        The replies of the spec example (R7), and the spool holds one
        Received header followed by the message byte for byte.
        """
        h = self.h
        self.assertEqual(h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>"), [b"250 2.1.0 Ok"])
        self.assertEqual(
            h.command(b"RCPT TO:<belastingdienst@overheid.nl>"), [b"250 2.1.5 Ok"]
        )
        self.assertEqual(h.command(b"DATA"), [b"354 End data with <CR><LF>.<CR><LF>"])
        body = b"Subject: aangifte\r\n\r\n..dot\r\nline\r\n"
        self.assertEqual(h.send(body + b".\r\n"), [b"250 2.0.0 Ok: queued as Q0001"])
        [(envelope, data)] = h.spool.committed
        self.assertEqual(envelope.sender, "ik@mijnbedrijf.nl")
        self.assertEqual(envelope.recipients, ["belastingdienst@overheid.nl"])
        self.assertEqual(envelope.account, "alice")
        header, _, rest = data.partition(b"\r\n\t")
        self.assertTrue(header.startswith(b"Received: from client.example.nl ("))
        self.assertEqual(data.count(b"Received:"), 1)
        self.assertTrue(
            data.endswith(b"Subject: aangifte\r\n\r\n.dot\r\nline\r\n"), data
        )
        self.assertIn(b"id Q0001 for <belastingdienst@overheid.nl>;", data)
        self.assertEqual(h.command(b"QUIT"), [b"221 2.0.0 Bye"])

    def test_writtenOnceForManyRecipients(self):
        """
        Twisted makes one IMessage per recipient; the spool gets the message
        once, with every recipient in its envelope.
        """
        self.h.transaction(
            recipients=[b"b@example.nl", b"c@example.nl", b"d@example.nl"]
        )
        self.h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(len(self.h.spool.writers), 1)
        [(envelope, data)] = self.h.spool.committed
        self.assertEqual(
            envelope.recipients, ["b@example.nl", "c@example.nl", "d@example.nl"]
        )

    def test_pipelining(self):
        reply = self.h.send(
            b"MAIL FROM:<a@example.nl>\r\nRCPT TO:<b@example.nl>\r\n"
            b"RCPT TO:<nodomain>\r\nRCPT TO:<c@example.nl>\r\nDATA\r\n"
            b"Subject: p\r\n\r\nx\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(reply[0], b"250 2.1.0 Ok")
        self.assertEqual(reply[1], b"250 2.1.5 Ok")
        self.assertTrue(reply[2].startswith(b"553 5.1.3 "))
        self.assertEqual(
            reply[3:],
            [
                b"250 2.1.5 Ok",
                b"354 End data with <CR><LF>.<CR><LF>",
                b"250 2.0.0 Ok: queued as Q0001",
                b"250 2.0.0 Ok",
            ],
        )

    def test_sequenceErrors(self):
        self.assertEqual(
            self.h.command(b"RCPT TO:<b@example.nl>"),
            [b"503 5.5.1 Error: need MAIL command"],
        )
        self.assertEqual(
            self.h.command(b"DATA"), [b"503 5.5.1 Error: need MAIL command"]
        )
        self.h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl>"),
            [b"503 5.5.1 Error: nested MAIL command"],
        )
        self.assertEqual(
            self.h.command(b"DATA"), [b"554 5.5.1 Error: no valid recipients"]
        )
        self.assertEqual(self.h.command(b"RSET"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.h.command(b"MAIL FROM:<a@example.nl>"), [b"250 2.1.0 Ok"])

    def test_incompleteAddresses(self):
        """
        R8: an incomplete address is refused, never completed (Twisted adds
        its own host name).
        """
        for command in [
            b"MAIL FROM:<ik>",
            b"MAIL FROM:<ik@localhost>",
            b"MAIL FROM:<ik@>",
            b"MAIL FROM:<@mijnbedrijf.nl>",
            b"MAIL FROM:<ik@@mijnbedrijf.nl>",
            b"MAIL FROM:<ik@mijnbedrijf..nl>",
            b"MAIL FROM:<ik@-x.nl>",
        ]:
            reply = self.h.command(command)
            self.assertEqual(len(reply), 1)
            self.assertTrue(reply[0].startswith(b"553 5.1.3 "), (command, reply))
        [reply] = self.h.command(b"MAIL FROM:<ik>")
        self.assertIn(b"fully qualified", reply)
        self.h.command(b"MAIL FROM:<a@example.nl>")
        [reply] = self.h.command(b"RCPT TO:<belastingdienst>")
        self.assertTrue(reply.startswith(b"553 5.1.3 <belastingdienst>: address must"))

    def test_addressNotRewritten(self):
        self.h.transaction(
            sender=b'"ik zelf"@Mijn-Bedrijf.NL', recipients=[b"X@[192.0.2.1]"]
        )
        self.h.send(b"Subject: x\r\n\r\n.\r\n")
        [(envelope, data)] = self.h.spool.committed
        self.assertEqual(envelope.sender, '"ik zelf"@Mijn-Bedrijf.NL')
        self.assertEqual(envelope.recipients, ["X@[192.0.2.1]"])

    def test_nonASCIIAddress(self):
        self.assertEqual(
            self.h.command("MAIL FROM:<jos\u00e9@example.nl>".encode()),
            [b"553 5.6.7 Non-ASCII addresses are not supported (no SMTPUTF8)"],
        )

    def test_parameters(self):
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> BODY=8BITMIME"), [b"250 2.1.0 Ok"]
        )
        self.h.command(b"RSET")
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> BODY=7BIT SIZE=100"),
            [b"250 2.1.0 Ok"],
        )
        self.h.command(b"RSET")
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> SMTPUTF8"),
            [b"555 5.5.4 Unsupported parameter: SMTPUTF8"],
        )
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> BODY=BINARYMIME"),
            [b"501 5.5.4 BODY must be 7BIT or 8BITMIME"],
        )
        self.h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(
            self.h.command(b"RCPT TO:<b@example.nl> NOTIFY=NEVER"),
            [b"555 5.5.4 Unsupported parameter: NOTIFY"],
        )

    def test_sizeParameter(self):
        """
        Twisted has no SIZE extension.
        """
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> SIZE=52428801"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(
            self.h.command(b"MAIL FROM:<a@example.nl> SIZE=52428800"), [b"250 2.1.0 Ok"]
        )

    def test_maxRecipients(self):
        h = Harness(self, maxRecipients=2)
        h.login()
        h.command(b"MAIL FROM:<a@example.nl>")
        self.assertEqual(h.command(b"RCPT TO:<b1@example.nl>"), [b"250 2.1.5 Ok"])
        self.assertEqual(h.command(b"RCPT TO:<b2@example.nl>"), [b"250 2.1.5 Ok"])
        self.assertEqual(
            h.command(b"RCPT TO:<b3@example.nl>"),
            [b"452 4.5.3 Error: too many recipients"],
        )

    def test_vrfyExpnHelpUnknown(self):
        self.assertEqual(
            self.h.command(b"VRFY a"), [b"502 5.5.1 VRFY command is disabled"]
        )
        self.assertEqual(
            self.h.command(b"EXPN a"), [b"502 5.5.1 EXPN command is disabled"]
        )
        self.assertEqual(self.h.command(b"HELP")[0][:9], b"214 2.0.0")
        self.assertEqual(
            self.h.command(b"XYZZY"), [b"500 5.5.2 Error: command not recognized"]
        )

    def test_temporarySpoolFailure(self):
        """
        A failing spool is a temporary failure, 451 (Twisted answers 550 for
        any failure of eomReceived).
        """
        self.h.spool.newMessage = _failingCommit(self.h.spool.newMessage)
        self.h.transaction()
        self.assertEqual(
            self.h.send(b"Subject: x\r\n\r\n.\r\n"),
            [b"451 4.3.0 Error: temporary local problem, try again later"],
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


def _failingCommit(newMessage):
    def wrapped(envelope):
        writer = newMessage(envelope)
        writer.commit = lambda: defer.fail(OSError(28, "No space left on device"))
        return writer

    return wrapped


class DataLimitTests(unittest.TestCase):
    def test_messageSizeEdge(self):
        """
        Exactly the limit is accepted; one octet more is refused with 552
        after the final dot, and nothing is queued.  The Received header
        does not count.
        """
        h = Harness(self, maxMessageSize=20)
        h.login()
        h.transaction()
        self.assertEqual(
            h.send(b"x" * 18 + b"\r\n.\r\n"), [b"250 2.0.0 Ok: queued as Q0001"]
        )
        h.transaction()
        self.assertEqual(
            h.send(b"x" * 19 + b"\r\n.\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size (20)"],
        )
        self.assertEqual(len(h.spool.committed), 1)
        self.assertTrue(h.spool.writers[1].aborted)

    def test_lineLengthEdge(self):
        """
        998 octets plus CRLF is the limit; a longer line refuses the message
        after the final dot, and the lines after it are never run as
        commands (Twisted switches back to command mode).
        """
        h = Harness(self)
        h.login()
        h.transaction()
        self.assertEqual(
            h.send(b"a" * 998 + b"\r\n.\r\n"), [b"250 2.0.0 Ok: queued as Q0001"]
        )
        h.transaction()
        self.assertEqual(h.send(b"a" * 999 + b"\r\nRSET\r\nQUIT\r\n"), [])
        self.assertFalse(h.transport.disconnecting)
        [reply] = h.send(b".\r\n")
        self.assertTrue(
            reply.startswith(b"550 5.6.0 Message refused: a line is longer")
        )
        self.assertEqual(len(h.spool.committed), 1)

    def test_hugeLineBoundedMemory(self):
        """
        A line of megabytes without CRLF is not buffered.
        """
        h = Harness(self)
        h.login()
        h.transaction()
        for _ in range(100):
            h.send(b"z" * 65536)
        self.assertLess(h.server.framer.buffered, 2000)
        [reply] = h.send(b"\r\n.\r\n")
        self.assertTrue(reply.startswith(b"550 5.6.0 "))

    def test_commandLineEdge(self):
        """
        512 octets with CRLF is a command line's limit (Twisted: 16384).
        """
        h = Harness(self)
        line = b"NOOP " + b"x" * 505
        self.assertEqual(len(line), 510)
        self.assertEqual(h.command(line), [b"250 2.0.0 Ok"])
        self.assertEqual(h.command(line + b"x"), [b"500 5.5.6 Error: line too long"])
        self.assertEqual(
            h.command(b"NOOP " + b"x" * 20000), [b"500 5.5.6 Error: line too long"]
        )
        self.assertEqual(h.command(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_bareLF(self):
        """
        SMTP smuggling: LF.LF does not end DATA, and a bare LF refuses the
        message.
        """
        h = Harness(self)
        h.login()
        h.transaction()
        reply = h.send(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@example.nl>\r\n")
        self.assertEqual(reply, [])
        self.assertEqual(
            h.send(b".\r\n"),
            [
                b"550 5.5.2 Message refused: bare CR or LF in message text; "
                b"lines must end with CRLF"
            ],
        )
        self.assertEqual(h.spool.committed, [])

    def test_bareCR(self):
        h = Harness(self)
        h.login()
        h.transaction()
        self.assertEqual(h.send(b"a\rb\r\n\r.\r\r\n"), [])
        [reply] = h.send(b".\r\n")
        self.assertTrue(reply.startswith(b"550 5.5.2 "))

    def test_connectionLostMidData(self):
        h = Harness(self)
        h.login()
        h.transaction()
        h.send(b"Subject: x\r\n\r\npartial")
        h.server.connectionLost(None)
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(h.spool.committed, [])


class SessionLimitTests(unittest.TestCase):
    def test_errorLimit(self):
        h = Harness(self, maxErrors=3)
        for _ in range(3):
            self.assertEqual(h.command(b"MAIL FROM:<a@example.nl>"), [NOT_TLS])
        self.assertEqual(
            h.command(b"MAIL FROM:<a@example.nl>"),
            [b"421 4.7.0 msa.example.nl Error: too many errors"],
        )
        self.assertTrue(h.transport.disconnecting)

    def test_idleTimeout(self):
        clock = Clock()
        h = Harness(self, idleTimeout=300, loginTimeout=1000, clock=clock)
        clock.advance(200)
        h.command(b"NOOP")
        clock.advance(299)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        clock.advance(2)
        self.assertEqual(
            h.transport.value(), b"421 4.4.2 msa.example.nl Error: timeout exceeded\r\n"
        )
        self.assertTrue(h.transport.disconnecting)


class ShutdownTests(unittest.TestCase):
    """
    SIGTERM: idle sessions end at once with 421, a message in progress may
    finish, the grace period bounds the wait.
    """

    def shutdown(self, h, clock, grace=30):
        d = h.factory.registry.shutdown(grace, clock)
        fired = []
        d.addCallback(fired.append)
        return fired

    def test_idleSessionTold421(self):
        clock = Clock()
        h = Harness(self)
        h.login()
        h.transport.clear()
        fired = self.shutdown(h, clock)
        self.assertEqual(
            h.transport.value(), b"421 4.3.2 msa.example.nl Service shutting down\r\n"
        )
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(fired, [])
        h.server.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_messageInProgressFinishes(self):
        clock = Clock()
        h = Harness(self)
        h.login()
        h.command(b"MAIL FROM:<a@example.nl>")
        fired = self.shutdown(h, clock)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.command(b"RCPT TO:<b@example.nl>"), [b"250 2.1.5 Ok"])
        h.command(b"DATA")
        self.assertEqual(
            h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n"),
            [
                b"250 2.0.0 Ok: queued as Q0001",
                b"421 4.3.2 msa.example.nl Service shutting down",
            ],
        )
        self.assertEqual(len(h.spool.committed), 1)
        h.server.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_graceExpires(self):
        clock = Clock()
        h = Harness(self)
        h.login()
        h.transaction()
        h.send(b"Subject: x\r\n\r\nslow client")
        fired = self.shutdown(h, clock, grace=30)
        clock.advance(29)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        clock.advance(1)
        self.assertEqual(
            h.transport.value(), b"421 4.3.2 msa.example.nl Service shutting down\r\n"
        )
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(h.spool.committed, [])
        h.server.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_newConnectionWhileClosing(self):
        h = Harness(self)
        h.factory.registry.closing = True
        late = h.factory.buildProtocol(None)
        transport = type(h.transport)()
        late.makeConnection(transport)
        self.assertEqual(
            transport.value(), b"421 4.3.2 msa.example.nl Service shutting down\r\n"
        )
        late.connectionLost(None)

    def test_noSessions(self):
        h = Harness(self)
        h.server.connectionLost(None)
        self.assertEqual(self.shutdown(h, Clock()), [None])


class DataBlockEquivalenceTests(unittest.TestCase):
    """
    The body fast path (whole runs of lines at once) must decide exactly as
    the line-by-line path: same replies, same bytes spooled, for random
    messages with dots, bare CR and LF, over-long lines, 8-bit text and
    size limits, cut into random packets.
    """

    def randomMessage(self, rng) -> bytes:
        lines = []
        # Half the messages are clean text (the fast path's case), half may
        # hold anything the filter refuses.
        clean = rng.random() < 0.5
        for _ in range(rng.randrange(0, 120)):
            kind = rng.random() * (0.7 if clean else 1.0)
            if kind < 0.5:
                line = bytes(
                    rng.choice(b"abc xyz:=-") for _ in range(rng.randrange(80))
                )
            elif kind < 0.7:
                line = b"." * rng.randrange(1, 4) + b"text"
            elif kind < 0.75:
                # With a transparency dot, which does not count.
                line = rng.choice([b"", b"."]) + b"x" * rng.choice(
                    [997, 998, 999, 1200]
                )
            elif kind < 0.78:
                line = b"bare" + rng.choice([b"\n", b"\r", b"\n.\n"]) + b"end"
            elif kind < 0.85:
                line = "\u00e9\u00e9n 8-bit".encode()
            else:
                line = b""
            lines.append(line)
        return b"".join(line + b"\r\n" for line in lines) + b".\r\nNOOP\r\n"

    def feed(self, data, cuts, maxSize, fast):
        h = Harness(self, maxMessageSize=maxSize)
        if not fast:
            h.server.transaction.dataBlock = lambda: False
        else:
            original = h.server.transaction.dataBlock

            def counting():
                taken = original()
                self.blocksTaken += taken
                return taken

            h.server.transaction.dataBlock = counting
        h.login()
        h.transaction()
        replies = []
        last = 0
        for cut in cuts + [len(data)]:
            replies += h.send(data[last:cut])
            last = cut
        return replies, [body for _, body in h.spool.committed]

    def test_sameDecisions(self):
        import random

        rng = random.Random(20261128)
        self.blocksTaken = 0
        for _ in range(300):
            data = self.randomMessage(rng)
            cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(6)))
            maxSize = rng.choice([52428800, 2000, 5000])
            fast = self.feed(data, cuts, maxSize, fast=True)
            slow = self.feed(data, cuts, maxSize, fast=False)
            self.assertEqual(fast, slow, data[:200])
        # Both paths really ran: many messages took blocks.
        self.assertGreater(self.blocksTaken, 100)

    def test_fastPathUsed(self):
        """
        The control: a large ordinary body really goes through the block
        path (so the test above compares two different paths).
        """
        h = Harness(self)
        h.login()
        h.transaction()
        calls = []
        original = h.server.transaction.dataBlock

        def counting():
            taken = original()
            calls.append(taken)
            return taken

        h.server.transaction.dataBlock = counting
        self.assertEqual(
            h.send(b"Subject: x\r\n\r\n" + b"..dot line\r\n" * 200 + b".\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        self.assertIn(True, calls)
        [(_, body)] = h.spool.committed
        self.assertTrue(body.endswith(b"\r\n\r\n" + b".dot line\r\n" * 200))
