# -*- test-case-name: tests.test_deadlines -*-
"""
The deadlines of L{msa.deadlines} (issue 9, item 9), on a fake clock: the
TLS handshake, one command line, the login phase and the DATA phase, each at
and just past its edge, and that bytes trickling in do not move any of them.
The same deadlines over real sockets: C{tests/test_slowclients.py}.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.helpers import Harness

HOST = "msa.example.nl"
COMMAND_TIMEOUT = b"421 4.4.2 msa.example.nl Error: timeout exceeded (command line)"
LOGIN_TIMEOUT = b"421 4.4.2 msa.example.nl Error: timeout exceeded (login)"
DATA_TIMEOUT = b"421 4.4.2 msa.example.nl Error: timeout exceeded (DATA)"


def harness(testCase, **policy) -> Harness:
    """
    A session on a fake clock; the deadlines not under test are far away.
    """
    for key, value in (
        ("idleTimeout", 10000),
        ("tlsHandshakeTimeout", 10000),
        ("commandLineTimeout", 10000),
        ("loginTimeout", 10000),
        ("dataTimeout", 10000),
    ):
        policy.setdefault(key, value)
    return Harness(testCase, clock=Clock(), **policy)


def replies(h: Harness) -> list[bytes]:
    value = h.transport.value()
    h.transport.clear()
    return value.split(b"\r\n")[:-1]


class HandshakeDeadlineTests(unittest.TestCase):
    """
    C{tls_handshake_timeout}: from STARTTLS's 220 (or the connection, with
    implicit TLS) to the end of the handshake.  On expiry the connection is
    aborted without a reply: none can be sent in the middle of a handshake.
    """

    def assertAbortedAt(self, h: Harness, seconds: float):
        """
        Still open 0.1 s before C{seconds} from now, aborted at C{seconds}
        without a byte written.
        """
        h.transport.clear()
        h.clock.advance(seconds - 0.1)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertTrue(h.transport.disconnected)
        self.assertEqual(h.transport.value(), b"")

    def test_starttlsAtEdge(self):
        h = harness(self, tlsHandshakeTimeout=30)
        self.assertEqual(h.command(b"STARTTLS"), [b"220 2.0.0 Ready to start TLS"])
        self.assertAbortedAt(h, 30)

    def test_starttlsCompleted(self):
        h = harness(self, tlsHandshakeTimeout=30)
        h.command(b"STARTTLS")
        h.clock.advance(29.9)
        h.server.handshakeCompleted()
        h.clock.advance(100)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.command(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_implicitAtEdge(self):
        h = harness(self, implicitTLS=True, tlsHandshakeTimeout=30)
        self.assertAbortedAt(h, 30)

    def test_implicitCompleted(self):
        h = harness(self, implicitTLS=True, tlsHandshakeTimeout=30)
        h.server.handshakeCompleted()
        h.clock.advance(100)
        self.assertFalse(h.transport.disconnecting)

    def test_implicitRefusedConnection(self):
        """
        A connection over the limit on the implicit-TLS listener gets its
        421 only through TLS; without a handshake it is aborted at the
        deadline instead of waiting for ever.
        """
        h = harness(self, implicitTLS=True, tlsHandshakeTimeout=30, maxConnections=1)
        late = h.factory.buildProtocol(None)
        transport = type(h.transport)()
        late.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"421 4.7.0 "))
        self.assertFalse(transport.disconnected)
        h.clock.advance(30)
        self.assertTrue(transport.disconnected)
        late.connectionLost(None)

    def test_idleTimeoutDuringHandshake(self):
        """
        When the idle timeout comes first, it too aborts: a 421 written
        into an unfinished handshake would never go out, and the close would
        wait for it.
        """
        h = harness(self, idleTimeout=300, tlsHandshakeTimeout=600)
        h.command(b"STARTTLS")
        h.transport.clear()
        h.clock.advance(300)
        self.assertTrue(h.transport.disconnected)
        self.assertEqual(h.transport.value(), b"")

    def test_closedConnection(self):
        h = harness(self, tlsHandshakeTimeout=30)
        h.command(b"STARTTLS")
        h.server.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class CommandLineDeadlineTests(unittest.TestCase):
    """
    C{command_line_timeout}: from the first byte of a line to its CRLF;
    bytes arriving in between do not move it.
    """

    def test_atEdge(self):
        h = harness(self, commandLineTimeout=60)
        h.transport.clear()
        h.send(b"EH")
        h.clock.advance(59)
        h.send(b"L")
        h.clock.advance(0.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertEqual(replies(h), [COMMAND_TIMEOUT])
        self.assertTrue(h.transport.disconnecting)

    def test_trickle(self):
        """
        One byte every 2 seconds, the idle timeout never reached: closed at
        the deadline all the same.
        """
        h = harness(self, commandLineTimeout=60, idleTimeout=300)
        h.transport.clear()
        for byte in b"EHLO " + b"x" * 100:
            h.send(bytes([byte]))
            h.clock.advance(2)
            if h.transport.disconnecting:
                break
        self.assertEqual(h.clock.seconds(), 60)
        self.assertEqual(replies(h), [COMMAND_TIMEOUT])

    def assertCompletedInTime(self, first: bytes, rest: bytes):
        """
        A line sent as C{first}, and C{rest} just before the deadline, is
        answered, and no deadline is left running.
        """
        h = harness(self, commandLineTimeout=60)
        h.send(first)
        h.clock.advance(59.9)
        self.assertEqual(h.send(rest), [b"250 2.0.0 Ok"])
        h.clock.advance(1000)
        self.assertFalse(h.transport.disconnecting)

    def test_lineCompleted(self):
        self.assertCompletedInTime(b"NO", b"OP\r\n")

    def test_nextLineHasItsOwnDeadline(self):
        h = harness(self, commandLineTimeout=60)
        h.send(b"NOOP\r\nNO")
        h.clock.advance(59)
        h.send(b"OP\r\nNO")
        h.clock.advance(59.9)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        h.clock.advance(0.1)
        self.assertEqual(replies(h), [COMMAND_TIMEOUT])

    def test_crlfAcrossPackets(self):
        self.assertCompletedInTime(b"NOOP\r", b"\n")

    def test_bareLineFeedEndsNothing(self):
        """
        Only CRLF ends a line, so a bare LF does not restart the deadline.
        """
        h = harness(self, commandLineTimeout=60)
        h.send(b"EH")
        h.clock.advance(30)
        h.send(b"\n")
        h.clock.advance(30)
        self.assertTrue(h.transport.disconnecting)

    def test_saslResponse(self):
        h = harness(self, commandLineTimeout=60)
        h.startTLS()
        self.assertEqual(h.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        h.transport.clear()
        h.send(b"YWxp")
        h.clock.advance(60)
        self.assertEqual(replies(h), [COMMAND_TIMEOUT])

    def test_notInData(self):
        """
        Message text has the DATA deadline, not this one.
        """
        h = harness(self, commandLineTimeout=60)
        h.login()
        h.transaction()
        h.send(b"Subject: x\r\n\r\npartial")
        h.clock.advance(1000)
        self.assertFalse(h.transport.disconnecting)

    def test_afterSTARTTLS(self):
        """
        Plaintext pipelined after STARTTLS is thrown away, and with it the
        line it started.
        """
        h = harness(self, commandLineTimeout=60)
        h.send(b"STARTTLS\r\nEHLO x")
        h.server.handshakeCompleted()
        h.clock.advance(1000)
        self.assertFalse(h.transport.disconnecting)


class LoginDeadlineTests(unittest.TestCase):
    """
    C{login_timeout}: from the connection to a successful AUTH, whatever
    the client sends meanwhile.
    """

    def test_atEdge(self):
        h = harness(self, loginTimeout=120)
        for _ in range(11):
            h.command(b"NOOP")
            h.clock.advance(10)
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        h.clock.advance(0.1)
        self.assertEqual(replies(h), [LOGIN_TIMEOUT])
        self.assertTrue(h.transport.disconnecting)

    def test_failedLoginsDoNotHelp(self):
        h = harness(self, loginTimeout=120)
        h.startTLS()
        h.login(password=b"wrong")
        h.clock.advance(120 - h.clock.seconds())
        self.assertIn(LOGIN_TIMEOUT, h.transport.value())

    def test_loggedIn(self):
        h = harness(self, loginTimeout=120)
        h.clock.advance(119)
        self.assertEqual(h.login(), [b"235 2.7.0 Authentication successful"])
        for _ in range(10):
            h.clock.advance(100)
            self.assertEqual(h.command(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertFalse(h.transport.disconnecting)


class DataDeadlineTests(unittest.TestCase):
    """
    C{data_timeout} and C{data_min_rate}: from the 354 to the final dot,
    C{data_timeout} seconds plus one per C{data_min_rate} octets received,
    counted up to the message size limit.  On expiry the message is
    aborted: nothing queued.
    """

    def inData(self, **policy) -> Harness:
        policy.setdefault("dataTimeout", 300)
        policy.setdefault("dataMinRate", 1024)
        h = harness(self, **policy)
        h.login()
        self.assertEqual(h.transaction(), [b"354 End data with <CR><LF>.<CR><LF>"])
        h.transport.clear()
        return h

    def assertExpiresIn(self, h: Harness, seconds: float):
        """
        Still open 0.1 s before C{seconds} from now, expired at C{seconds}.
        """
        h.clock.advance(seconds - 0.1)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertExpired(h)

    def assertExpired(self, h: Harness):
        self.assertEqual(replies(h), [DATA_TIMEOUT])
        self.assertTrue(h.transport.disconnecting)
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(h.spool.committed, [])

    def test_silentAtEdge(self):
        h = self.inData()
        self.assertExpiresIn(h, 300)

    def test_octetsExtendIt(self):
        """
        10240 octets at 1024 octets/s buy 10 more seconds.
        """
        h = self.inData()
        h.send(b"x" * 510 + b"\r\n")
        h.clock.advance(100)
        h.send((b"x" * 510 + b"\r\n") * 19)
        self.assertExpiresIn(h, 210)

    def test_trickle(self):
        """
        One byte every 2 seconds is far below the minimum rate: cut off
        just after data_timeout, and the idle timeout never fires.
        """
        h = self.inData(idleTimeout=300)
        while not h.transport.disconnecting and h.clock.seconds() < 1000:
            h.send(b"x")
            h.clock.advance(2)
        self.assertEqual(h.clock.seconds(), 302)
        self.assertExpired(h)

    def test_countedUpToSizeLimit(self):
        """
        Octets past the size limit (the message is refused anyway) buy no
        time: 1024 octets allowed, 1 second at most.
        """
        h = self.inData(maxMessageSize=1024)
        h.send((b"x" * 510 + b"\r\n") * 20)
        self.assertExpiresIn(h, 301)

    def test_finishedInTime(self):
        h = self.inData()
        h.clock.advance(299.9)
        self.assertEqual(
            h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        h.clock.advance(1000)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(len(h.spool.committed), 1)

    def test_secondMessageHasItsOwn(self):
        h = self.inData()
        h.clock.advance(200)
        h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        h.clock.advance(50)
        h.transaction()
        h.transport.clear()
        h.clock.advance(299.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertEqual(replies(h), [DATA_TIMEOUT])
        self.assertEqual(len(h.spool.committed), 1)
        self.assertTrue(h.spool.writers[1].aborted)


class CloseDeadlineTests(unittest.TestCase):
    """
    After the server's last reply it closes its side; a client that never
    completes the close (over TLS: never sends its close_notify) is aborted
    after L{msa.deadlines.CLOSE_TIMEOUT} seconds instead of holding its slot.
    """

    def test_afterQuit(self):
        h = harness(self)
        self.assertEqual(h.command(b"QUIT"), [b"221 2.0.0 Bye"])
        self.assertTrue(h.transport.disconnecting)
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnected)
        h.clock.advance(0.1)
        self.assertTrue(h.transport.disconnected)  # abortConnection()

    def test_afterTimeout(self):
        h = harness(self, commandLineTimeout=60)
        h.send(b"EHLO")
        h.clock.advance(60)
        self.assertEqual(replies(h), [COMMAND_TIMEOUT])
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnected)
        h.clock.advance(0.1)
        self.assertTrue(h.transport.disconnected)  # abortConnection()

    def test_closedInTime(self):
        """
        A connection that closes in time cancels the abort.
        """
        h = harness(self)
        h.command(b"QUIT")
        h.close()
        self.assertEqual(h.clock.getDelayedCalls(), [])
