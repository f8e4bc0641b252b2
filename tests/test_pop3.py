"""
The POP3 server's states, gate, login, commands and UPDATE over a string
transport (L{tests.pop3harness}); the sockets, TLS and real clients are in
L{tests.test_pop3_e2e}.
"""

import base64

from twisted.trial import unittest

from msa.pop3.maildrop import parseNumber
from tests.pop3harness import PASSWORDS, POP3Harness

MESSAGE = b"Subject: retour\r\n\r\n.begins with a dot\r\nline two\r\n"
SECOND = b"Subject: two\r\n\r\nbody\r\n"
TOTAL = len(MESSAGE) + len(SECOND)


class GateTests(unittest.TestCase):
    """
    Before TLS only CAPA, STLS and QUIT (the R3 rule for POP3).
    """

    def test_greeting(self):
        h = POP3Harness()
        h.connect()
        self.assertEqual(h.command(b"QUIT"), b"+OK Bye\r\n")
        self.assertTrue(h.transport.disconnecting)

    def test_capaBeforeTLS(self):
        h = POP3Harness()
        capa = h.command(b"CAPA")
        self.assertEqual(
            capa,
            b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
            b"AUTH-RESP-CODE\r\nPIPELINING\r\nEXPIRE NEVER\r\nSTLS\r\n.\r\n",
        )

    def test_loginBeforeTLSRefused(self):
        """
        USER, PASS, AUTH and APOP before STLS get the same C{-ERR}, which
        says nothing about the account; nothing is looked up.
        """
        h = POP3Harness()
        for line in (
            b"USER alice",
            b"PASS wonderland",
            b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland"),
            b"APOP alice 0123456789abcdef0123456789abcdef",
            b"USER nobody",
        ):
            self.assertEqual(h.command(line), b"-ERR Must issue STLS first\r\n")
        for line in (b"STAT", b"LIST", b"RETR 1", b"NOOP", b"XYZZY"):
            self.assertEqual(h.command(line), b"-ERR Command not available here\r\n")

    def test_stlsDropsPipelinedPlaintext(self):
        """
        What a client (or an attacker in the path) sent after STLS in the
        clear is never run after TLS starts (CVE-2011-0411).
        """
        h = POP3Harness()
        answer = h.send(b"STLS\r\nUSER alice\r\n")
        self.assertEqual(answer, b"+OK Begin TLS negotiation\r\n")
        self.assertTrue(h.transport.tlsStarted)
        self.assertEqual(h.command(b"PASS wonderland"), b"-ERR Send USER first\r\n")

    def test_capaAfterTLS(self):
        h = POP3Harness()
        h.secure()
        capa = h.command(b"CAPA").split(b"\r\n")
        self.assertIn(b"USER", capa)
        self.assertIn(b"SASL SCRAM-SHA-256 DIGEST-MD5 PLAIN LOGIN", capa)
        self.assertNotIn(b"STLS", capa)
        self.assertEqual(h.command(b"STLS"), b"-ERR Command not available here\r\n")

    def test_noTLSConfigured(self):
        """
        An embedder's listener without a TLS context offers no STLS, and
        so no login at all (R3).
        """
        h = POP3Harness()
        h.factory.tlsContextFactory = None
        h.connect()
        self.assertNotIn(b"STLS", h.command(b"CAPA"))
        self.assertEqual(h.command(b"STLS"), b"-ERR STLS not available\r\n")
        self.assertEqual(h.command(b"USER alice"), b"-ERR Must issue STLS first\r\n")

    def test_implicitTLS(self):
        h = POP3Harness(implicitTLS=True)
        self.assertEqual(h.login(), b"+OK Logged in, mailbox locked\r\n")

    def test_expireAdvertised(self):
        h = POP3Harness(expire="30")
        self.assertIn(b"\r\nEXPIRE 30\r\n", h.command(b"CAPA"))


class LoginTests(unittest.TestCase):
    def test_userPass(self):
        h = POP3Harness()
        self.assertEqual(h.login(), b"+OK Logged in, mailbox locked\r\n")
        self.assertIn("alice", h.mailboxes.locked)

    def test_wrongPasswordAndUnknownUserAlike(self):
        h = POP3Harness()
        self.assertEqual(
            h.login("alice", "wrong"), b"-ERR [AUTH] Authentication failed\r\n"
        )
        h.command(b"USER nobody")
        self.assertEqual(h.command(b"PASS x"), b"-ERR [AUTH] Authentication failed\r\n")
        self.assertEqual(h.mailboxes.locked, set())

    def test_tooManyFailures(self):
        h = POP3Harness(maxAuthFailures=2)
        h.login("alice", "wrong")
        self.assertEqual(
            h.login("alice", "wrong"), b"-ERR [AUTH] Authentication failed\r\n"
        )
        self.assertTrue(h.transport.disconnecting)

    def test_authPlain(self):
        h = POP3Harness()
        h.secure()
        self.assertEqual(
            h.authPlain("bob", PASSWORDS["bob"]), b"+OK Logged in, mailbox locked\r\n"
        )

    def test_authPlainContinuation(self):
        h = POP3Harness()
        h.secure()
        self.assertEqual(h.command(b"AUTH PLAIN"), b"+ \r\n")
        answer = h.command(base64.b64encode(b"\0alice\0wonderland"))
        self.assertEqual(answer, b"+OK Logged in, mailbox locked\r\n")

    def test_authCancelled(self):
        h = POP3Harness()
        h.secure()
        h.command(b"AUTH LOGIN")
        self.assertEqual(h.command(b"*"), b"-ERR Authentication cancelled\r\n")
        self.assertEqual(h.command(b"STAT"), b"-ERR Command not available here\r\n")

    def test_authBadBase64(self):
        h = POP3Harness()
        h.secure()
        self.assertEqual(h.command(b"AUTH PLAIN !!!"), b"-ERR Invalid base64 data\r\n")

    def test_authUnknownMechanism(self):
        h = POP3Harness()
        h.secure()
        self.assertEqual(
            h.command(b"AUTH CRAM-MD5"), b"-ERR Unrecognized authentication type\r\n"
        )

    def test_authListsMechanisms(self):
        h = POP3Harness()
        h.secure()
        self.assertEqual(
            h.command(b"AUTH"),
            b"+OK\r\nSCRAM-SHA-256\r\nDIGEST-MD5\r\nPLAIN\r\nLOGIN\r\n.\r\n",
        )

    def test_disabledAccount(self):
        import attrs

        h = POP3Harness()
        h.accounts.accounts["alice"] = attrs.evolve(
            h.accounts.accounts["alice"], enabled=False
        )
        self.assertEqual(h.login(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_mechanismPolicy(self):
        """
        USER/PASS counts as PLAIN in the account's mechanism policy: an
        account without PLAIN cannot use it, whatever the password.
        """
        import attrs

        h = POP3Harness()
        h.accounts.accounts["alice"] = attrs.evolve(
            h.accounts.accounts["alice"], mechanisms=frozenset({"SCRAM-SHA-256"})
        )
        self.assertEqual(h.login(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_inUse(self):
        """
        A second session on a locked mailbox gets C{[IN-USE]}; once the
        first ends, the mailbox can be opened again.
        """
        h = POP3Harness()
        h.login()
        first = h.server
        h.connect()
        self.assertEqual(
            h.login(), b"-ERR [IN-USE] Mailbox in use by another session\r\n"
        )
        first.connectionLost(None)
        self.assertEqual(h.login(), b"+OK Logged in, mailbox locked\r\n")

    def test_loginTimeout(self):
        h = POP3Harness(loginTimeout=5, idleTimeout=600)
        h.secure()
        h.clock.advance(4)
        h.command(b"CAPA")
        h.clock.advance(1.5)
        self.assertEqual(h.take(), b"-ERR Login timeout, closing connection\r\n")
        self.assertTrue(h.transport.disconnecting)


class TransactionTests(unittest.TestCase):
    def setUp(self):
        self.h = POP3Harness()
        self.uids = [
            self.h.mailboxes.add("alice", MESSAGE),
            self.h.mailboxes.add("alice", SECOND),
        ]
        self.bobs = self.h.mailboxes.add("bob", b"Subject: bob only\r\n\r\nsecret\r\n")
        self.h.login()

    def test_stat(self):
        size = TOTAL
        self.assertEqual(self.h.command(b"STAT"), b"+OK 2 %d\r\n" % size)

    def test_listAndUidl(self):
        self.assertEqual(
            self.h.command(b"LIST"),
            b"+OK 2 messages\r\n1 %d\r\n2 %d\r\n.\r\n" % (len(MESSAGE), len(SECOND)),
        )
        self.assertEqual(
            self.h.command(b"UIDL 2"), b"+OK 2 " + self.uids[1].encode() + b"\r\n"
        )

    def test_retrDotStuffed(self):
        self.assertEqual(
            self.h.command(b"RETR 1"),
            b"+OK %d octets\r\n" % len(MESSAGE)
            + b"Subject: retour\r\n\r\n..begins with a dot\r\nline two\r\n.\r\n",
        )
        self.assertEqual(
            self.h.audit,
            [
                (
                    "mailbox-retrieved",
                    {
                        "account": "alice",
                        "uid": self.uids[0],
                        "size": len(MESSAGE),
                        "command": "RETR",
                        "session": self.h.server.session.sessionId,
                        "client": "192.0.2.7",
                    },
                )
            ],
        )

    def test_top(self):
        self.assertEqual(
            self.h.command(b"TOP 1 0"),
            b"+OK %d octets\r\nSubject: retour\r\n\r\n.\r\n" % len(MESSAGE),
        )
        self.assertEqual(
            self.h.command(b"TOP 1 1"),
            b"+OK %d octets\r\nSubject: retour\r\n\r\n..begins with a dot\r\n.\r\n"
            % len(MESSAGE),
        )

    def test_badNumbers(self):
        for line in (
            b"RETR 0",
            b"RETR 3",
            b"RETR -1",
            b"RETR +1",
            b"RETR 1 2",
            b"RETR",
            b"DELE 99999999999",
            b"TOP 1 -1",
            b"LIST 01",
        ):
            self.assertTrue(self.h.command(line).startswith(b"-ERR "), line)
        self.assertEqual(self.h.audit, [])

    def test_deleteAtQuit(self):
        self.assertEqual(
            self.h.command(b"DELE 1"), b"+OK Message 1 marked for deletion\r\n"
        )
        self.assertEqual(self.h.command(b"RETR 1"), b"-ERR No such message\r\n")
        self.assertEqual(self.h.command(b"STAT"), b"+OK 1 %d\r\n" % len(SECOND))
        self.assertIn(self.uids[0], self.h.mailboxes.mailboxes["alice"])
        self.assertEqual(self.h.command(b"QUIT"), b"+OK Bye, 1 message(s) deleted\r\n")
        self.assertEqual(list(self.h.mailboxes.mailboxes["alice"]), [self.uids[1]])
        self.assertEqual(self.h.mailboxes.locked, set())

    def test_droppedConnectionDeletesNothing(self):
        self.h.command(b"DELE 1")
        self.h.command(b"DELE 2")
        self.h.drop()
        self.assertEqual(list(self.h.mailboxes.mailboxes["alice"]), self.uids)
        self.assertEqual(self.h.mailboxes.locked, set())

    def test_rset(self):
        self.h.command(b"DELE 1")
        self.assertEqual(self.h.command(b"RSET"), b"+OK 2 %d\r\n" % TOTAL)
        self.h.command(b"QUIT")
        self.assertEqual(list(self.h.mailboxes.mailboxes["alice"]), self.uids)

    def test_commitFails(self):
        """
        When the deletions cannot be made durable the client hears
        C{[SYS/TEMP]}, not C{+OK}, and the messages stay.
        """
        self.h.mailboxes.failNextCommit = True
        self.h.command(b"DELE 1")
        self.assertEqual(
            self.h.command(b"QUIT"),
            b"-ERR [SYS/TEMP] Cannot delete now; what is not deleted is kept\r\n",
        )
        self.assertEqual(list(self.h.mailboxes.mailboxes["alice"]), self.uids)
        self.assertEqual(self.h.mailboxes.locked, set())
        self.flushLoggedErrors(OSError)

    def test_otherAccountUnreachable(self):
        """
        Bob's message is not in Alice's session, by number or by uid.
        """
        listing = self.h.command(b"UIDL")
        self.assertNotIn(self.bobs.encode(), listing)
        self.assertEqual(self.h.command(b"RETR 3"), b"-ERR No such message\r\n")
        self.assertTrue(
            self.h.command(b"RETR " + self.bobs.encode()).startswith(b"-ERR")
        )

    def test_pipelining(self):
        answer = self.h.send(b"STAT\r\nDELE 2\r\nLIST 2\r\nNOOP\r\n")
        self.assertEqual(
            answer,
            b"+OK 2 %d\r\n+OK Message 2 marked for deletion\r\n"
            b"-ERR No such message\r\n+OK\r\n" % TOTAL,
        )

    def test_idleTimeoutReleases(self):
        self.h.clock.advance(600)
        self.assertEqual(self.h.take(), b"-ERR Idle timeout, closing connection\r\n")
        self.h.drop()
        self.assertEqual(self.h.mailboxes.locked, set())

    def test_stalledRetrieval(self):
        """
        A client that stops reading in the middle of a RETR holds its
        session only until the idle deadline: the connection is aborted
        without a C{-ERR} inside the message, the lock is given up and
        nothing is deleted.
        """
        big = self.h.mailboxes.add("alice", b"Subject: big\r\n\r\n" + b"y" * 200000)
        self.h.drop()
        self.h.connect()
        self.h.login()
        transport = self.h.transport
        write = transport.write

        def fullAfterWrite(data):
            write(data)
            if transport.producer is not None:
                transport.producer.pauseProducing()

        transport.write = fullAfterWrite
        self.h.command(b"DELE 1")
        # Not through command(), which lets the clock run while a reply
        # is pending.
        self.h.server.dataReceived(b"RETR 3\r\n")
        self.assertTrue(self.h.take().startswith(b"+OK 200016 octets\r\n"))
        self.h.clock.advance(599)
        self.assertFalse(transport.disconnected)
        self.h.clock.advance(2)
        self.assertTrue(transport.disconnected)
        self.assertNotIn(b"-ERR", self.h.take())
        self.h.drop()
        self.assertEqual(self.h.mailboxes.locked, set())
        self.assertEqual(list(self.h.mailboxes.mailboxes["alice"]), [*self.uids, big])

    def test_noCapaLoginAfterLogin(self):
        capa = self.h.command(b"CAPA")
        self.assertNotIn(b"SASL", capa)
        self.assertNotIn(b"USER", capa)
        self.assertEqual(
            self.h.command(b"USER bob"), b"-ERR Command not available here\r\n"
        )


class LimitTests(unittest.TestCase):
    def test_lineTooLong(self):
        h = POP3Harness()
        self.assertEqual(h.command(b"CAPA " + b"x" * 300), b"-ERR Line too long\r\n")
        self.assertEqual(h.command(b"QUIT"), b"+OK Bye\r\n")

    def test_unendedLineCloses(self):
        h = POP3Harness()
        self.assertEqual(h.send(b"x" * 20000), b"-ERR Line too long\r\n")
        self.assertTrue(h.transport.disconnecting)

    def test_tooManyErrors(self):
        h = POP3Harness(maxErrors=3)
        h.command(b"X")
        h.command(b"X")
        self.assertEqual(
            h.command(b"X"),
            b"-ERR Command not available here; too many errors, closing connection\r\n",
        )
        self.assertTrue(h.transport.disconnecting)

    def test_connectionsPerClient(self):
        h = POP3Harness(maxConnectionsPerClient=1)
        self.assertEqual(h.connect(), b"-ERR [SYS/TEMP] Too many connections\r\n")
        self.assertTrue(h.transport.disconnecting)
        self.assertTrue(h.connect("192.0.2.8").startswith(b"+OK"))

    def test_parseNumber(self):
        self.assertEqual(parseNumber(b"1"), 1)
        self.assertEqual(parseNumber(b"1234567890"), 1234567890)
        for bad in (
            b"",
            b"0",
            b"01",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"12345678901",
            b"\xd9\xa1",
        ):
            self.assertIsNone(parseNumber(bad), bad)


class AbandonedLoginTests(unittest.TestCase):
    def test_droppedBeforeFinalResponse(self):
        """
        SCRAM's login is complete on the server's side (the mailbox is
        locked) when it sends its final message; a client that leaves
        before answering it leaves no lock behind.
        """
        scramp = pytestImport("scramp")
        h = POP3Harness()
        h.secure()
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "wonderland")
        first = base64.b64encode(client.get_client_first().encode())
        challenge = h.command(b"AUTH SCRAM-SHA-256 " + first)
        client.set_server_first(base64.b64decode(challenge[2:]).decode())
        final = h.command(base64.b64encode(client.get_client_final().encode()))
        client.set_server_final(base64.b64decode(final[2:]).decode())
        self.assertEqual(h.mailboxes.locked, {"alice"})
        h.drop()
        self.assertEqual(h.mailboxes.locked, set())


def pytestImport(name: str):
    try:
        return __import__(name)
    except ImportError:  # pragma: no cover
        raise unittest.SkipTest(f"{name} not installed") from None
