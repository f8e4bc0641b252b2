# -*- test-case-name: tests.test_declaredinterfaces -*-
"""
Every object the MSA calls through one of its seams provides all that the
seam's interface declares (C{zope.interface.verify.verifyObject}): the
protocol calls those methods directly rather than probing for them, so an
implementer that lacks one (the shipped fakes of L{msa.testing} included)
would fail at its first session, not here silently.
"""

import hashlib

from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from msa.envelope import Envelope
from msa.interfaces import (
    IAcceptedMessage,
    ICertificateCredentials,
    IDigestMD5Credentials,
    IMechanismCredentials,
    IScramCredentials,
    ISpoolWriter,
    ISubmission,
)
from msa.queue.spool import Spool
from msa.sasl.base import UsernamePassword
from msa.sasl.digest_md5 import DigestMD5Credentials
from msa.sasl.external import CertificateCredentials
from msa.sasl.scram import ScramCredentials
from msa.submission.avatar import SpooledMessage, Submission
from msa.testing import Harness, MemorySpool
from msa.tls import ISessionProtocol

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
            writer = spool.newMessage(envelope)
            self.addCleanup(writer.abort)
            self.assertTrue(verifyObject(ISpoolWriter, writer), spool)

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
