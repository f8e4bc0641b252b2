# -*- test-case-name: tests.test_server -*-
"""
Protocol unit tests of L{msa.submission.server.SubmissionServer} without sockets: the
TLS gate, STARTTLS, limits at and past their edges, shutdown, and every
Twisted default DESIGN.md lists as wrong for an MSA (the docstrings of
those tests say which default they pin down).  The AUTH exchange has its
tests in C{tests.test_submission_auth}, the mail transaction in
C{tests.test_transaction}.
"""

import base64

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
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


class CommandTests(unittest.TestCase):
    """
    Commands the submission server answers without a transaction.
    """

    def setUp(self):
        self.h = Harness(self)
        self.h.login()

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

    def test_verbs(self):
        """
        Verbs are matched case-insensitively against the commands the
        server knows, and against nothing else (no attribute of the
        protocol is reachable by naming it).
        """
        self.assertEqual(self.h.command(b"noop"), [b"250 2.0.0 Ok"])
        self.assertEqual(self.h.command(b"Rset"), [b"250 2.0.0 Ok"])
        for verb in (b"smtp_NOOP", b"NOOP_", b"__INIT__", b"LOGGEDIN", b"N\xc3\xb6OP"):
            self.assertEqual(
                self.h.command(verb), [b"500 5.5.2 Error: command not recognized"]
            )


class TCPOptionTests(unittest.TestCase):
    """
    Replies are not held back by Nagle's algorithm on a TCP connection.
    """

    def test_noDelay(self):
        h = Harness(self)
        self.assertTrue(h.transport.tcpNoDelay)

    def test_notTCP(self):
        """
        A transport without TCP options (a UNIX socket behind a local
        proxy) is greeted all the same.
        """
        h = Harness(self)
        server = h.factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        self.addCleanup(server.connectionLost, Failure(ConnectionDone()))
        self.assertEqual(transport.value()[:4], b"220 ")


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
