# -*- test-case-name: tests.test_declaredinterfaces -*-
"""
Every object the MSA calls through one of its seams provides all that the
seam's interface declares (C{zope.interface.verify.verifyObject}): the
protocol calls those methods directly rather than probing for them, so an
implementer that lacks one (the shipped fakes of L{msa.testing} included)
would fail at its first session, not here silently.
"""

import hashlib
import os

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.accounts.filestore import AccountFile
from msa.accounts.model import makeAccount, writeAccounts
from msa.accounts.pgstore import AccountDatabase, describe
from msa.envelope import Envelope
from msa.interfaces import (
    IAcceptedMessage,
    ICertificateCredentials,
    IDigestMD5Credentials,
    IDownstream,
    ILiveAccountStore,
    IMechanismCredentials,
    IRelay,
    IScramCredentials,
    ISpool,
    ISpoolWriter,
    ISubmission,
)
from msa.queue.spool import Spool
from msa.relay.client import SMTPDownstream
from msa.relay.outbox import OutboxDownstream
from msa.relay.runner import RelayRunner
from msa.sasl.base import UsernamePassword
from msa.sasl.digest_md5 import DigestMD5Credentials
from msa.sasl.external import CertificateCredentials
from msa.sasl.scram import ScramCredentials
from msa.service.health import Health
from msa.submission.avatar import SpooledMessage, Submission
from msa.testing import Harness, MemorySpool
from msa.tls import ISessionProtocol
from tests.e2e import freePort
from tests.relaydata import FakeDownstream

MESSAGE = b"Subject: digest\r\n\r\nThe client's bytes only.\r\n"


class SubmissionSeamTests(unittest.TestCase):
    """
    The avatar, its message and the spool writers it writes to.
    """

    def test_avatarAndMessage(self):
        """
        The real avatar provides L{ISubmission} (its limits, C{endTransaction}
        and C{logout} included); the message it starts provides
        L{IAcceptedMessage} (C{acceptsBlocks}, C{blockReceived}, C{sha256}).
        """
        h = Harness(self)
        h.login()
        self.assertEqual(h.transaction()[-1][:4], b"354 ")
        avatar = h.server.avatar
        self.assertIsInstance(avatar, Submission)
        self.assertTrue(verifyObject(ISubmission, avatar))
        message = h.server.transaction.message
        self.assertIsInstance(message, SpooledMessage)
        self.assertTrue(verifyObject(IAcceptedMessage, message))

    def test_spoolWriters(self):
        """
        The spool's writer and L{msa.testing.MemoryWriter} both provide the
        trace header, the digest and the audit notes the avatar uses.
        """
        envelope = Envelope("a@example.nl", ["b@example.nl"])
        for spool in (MemorySpool(), Spool(self.mktemp())):
            self.assertTrue(verifyObject(ISpool, spool), spool)
            writer = spool.newMessage(envelope)
            self.addCleanup(writer.abort)
            self.assertTrue(verifyObject(ISpoolWriter, writer), spool)

    def test_queueDirectory(self):
        """
        A spool names the directory of its committed messages (the held
        messages' count is cached by it, L{msa.metrics.heldMessages}); the
        fake keeps them in memory and names none.
        """
        directory = self.mktemp()
        spool = Spool(directory)
        self.assertEqual(spool.queueDirectory, os.path.join(directory, "queue"))
        self.assertIsNone(MemorySpool().queueDirectory)

    def test_sessionProtocol(self):
        """
        The submission server names its session to the TLS layer's log
        lines (L{msa.tls.ISessionProtocol}).
        """
        h = Harness(self)
        self.assertTrue(verifyObject(ISessionProtocol, h.server))
        self.assertTrue(h.server.session.sessionId)


class DigestTests(unittest.TestCase):
    """
    The digest the log and the audit record carry is the client's bytes'
    one, without the MSA's Received header, with the fake spool too.
    """

    def test_harnessDigest(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = Harness(self)
        h.login()
        replies = h.submit(MESSAGE)
        self.assertEqual(replies[-1], b"250 2.0.0 Ok: queued as Q0001")
        [stored] = h.spool.committed
        self.assertTrue(stored.data.startswith(b"Received: "))
        self.assertTrue(stored.data.endswith(MESSAGE))
        expected = hashlib.sha256(MESSAGE).hexdigest()
        [accepted] = [e for e in events if e.get("event") == "accepted"]
        self.assertEqual(accepted["sha256"], expected)
        [writer] = h.spool.writers
        self.assertEqual(writer.audit["sha256"], expected)
        self.assertEqual(writer.audit["size"], len(MESSAGE))
        self.assertEqual(writer.audit["session"], h.server.session.sessionId)


class CredentialsTests(unittest.TestCase):
    """
    Every credential object a SASL mechanism makes names its mechanism and
    the user name the client gave (logged and throttled by).
    """

    def test_credentials(self):
        made = [
            (UsernamePassword("alice", "pw", "PLAIN"), None),
            (
                DigestMD5Credentials(
                    "alice",
                    "realm",
                    b"nonce",
                    b"00000001",
                    b"cnonce",
                    b"auth",
                    b"smtp/msa.example.nl",
                    None,
                    b"0" * 32,
                ),
                IDigestMD5Credentials,
            ),
            (ScramCredentials("alice", b"auth", b"proof"), IScramCredentials),
            (CertificateCredentials(("CN=alice",), "alice"), ICertificateCredentials),
        ]
        for credentials, interface in made:
            self.assertTrue(verifyObject(IMechanismCredentials, credentials))
            self.assertEqual(credentials.username, "alice")
            if interface is not None:
                self.assertTrue(verifyObject(interface, credentials))


class RelaySeamTests(unittest.TestCase):
    """
    The queue runner calls its downstream's C{deliver}, C{close} and
    C{host} directly; C{/health} reads the runner's C{unremovable}.
    """

    def test_downstreams(self):
        """
        Both shipped downstreams and the relay tests' fake provide
        L{IDownstream}: the core's host is named in the notifications, the
        outbox names none and keeps nothing open.
        """
        smtp = SMTPDownstream("core.example.nl", 25, tlsMode="none")
        outbox = OutboxDownstream(self.mktemp())
        for downstream in (smtp, outbox, FakeDownstream()):
            self.assertTrue(verifyObject(IDownstream, downstream), downstream)
        self.assertEqual((smtp.host, outbox.host), ("core.example.nl", ""))
        self.assertIsNone(outbox.close())
        self.assertIsNone(self.successResultOf(smtp.close()))

    def test_runner(self):
        """
        The runner provides L{IRelay}; when it stops, it closes its
        downstream.
        """
        clock = task.Clock()
        downstream = FakeDownstream()
        runner = RelayRunner(Spool(self.mktemp(), reactor=clock), downstream, clock)
        self.assertTrue(verifyObject(IRelay, runner))
        self.assertEqual(runner.unremovable, {})
        runner.startService()
        self.assertEqual(downstream.closed, 0)
        self.successResultOf(runner.stopService())
        self.assertEqual(downstream.closed, 1)


class AccountStoreSeamTests(unittest.TestCase):
    """
    Both live account stores say where their accounts come from and
    whether they can be read now; C{/health} reports it.
    """

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        writeAccounts(self.path, {"alice": makeAccount("alice", "pw", ["localhost"])})

    def test_file(self):
        store = AccountFile(self.path)
        self.assertTrue(verifyObject(ILiveAccountStore, store))
        self.assertEqual((store.where, store.outage), (self.path, None))
        accounts = Health(spool=None, relay=None, accounts=store).accountsHealth()
        self.assertEqual(
            (accounts.status, accounts.detail), ("ok", f"1 account(s) from {self.path}")
        )

    def test_databaseUnreachable(self):
        """
        A database that cannot be reached at the start serves its last good
        copy and says why: C{/health}'s accounts entry is degraded.
        """
        url = f"postgresql://msa@127.0.0.1:{freePort()}/msa"
        store = AccountDatabase(url, cacheFile=self.path)
        self.assertTrue(verifyObject(ILiveAccountStore, store))
        self.assertEqual(store.where, describe(url))
        self.assertIn("cannot connect", store.outage)
        accounts = Health(spool=None, relay=None, accounts=store).accountsHealth()
        self.assertEqual(accounts.status, "degraded")
        self.assertIn("logins use the last good copy (1 account(s))", accounts.detail)

    def test_none(self):
        accounts = Health(spool=None, relay=None).accountsHealth()
        self.assertEqual(
            (accounts.status, accounts.detail),
            ("ok", "0 account(s) from the accounts store"),
        )


class RateReservationSeamTests(unittest.TestCase):
    """
    Every reservation a rate limiter hands the transaction (memory, kept by
    worker 0, Redis, an account without rates) provides L{IRateReservation}.
    """

    def test_reservations(self):
        from msa.interfaces import IRateReservation
        from msa.policy.authorization import AccountRules
        from msa.policy.rates import RateLimiter, RateReservation, UnlimitedReservation
        from msa.policy.redislimiters import RedisReservation
        from msa.policy.workerlimits import _RemoteReservation

        limited = AccountRules(messagesPerMinute=5)
        held = RateLimiter().reserve("acme", limited)
        self.assertIsInstance(held, RateReservation)
        for reservation in (held, UnlimitedReservation("acme")):
            self.assertTrue(verifyObject(IRateReservation, reservation))
        for kind in (RedisReservation, _RemoteReservation):
            self.assertTrue(IRateReservation.implementedBy(kind), kind)
