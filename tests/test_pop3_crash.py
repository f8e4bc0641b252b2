# -*- test-case-name: tests.test_pop3_crash -*-
"""
kill -9 of the real daemon (C{twistd -n digipoort-msa}) while it carries
out a POP3 QUIT that deletes many messages: afterwards each message is on
disk whole (its size and SHA-256 as its name records them) or gone, never
half there, and after a restart POP3 serves exactly the ones left, byte
for byte.
"""

import hashlib
import io
import os
import poplib
import signal

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.trial import unittest

from msa.mailbox import MaildirStore, parseMessageName
from msa.tls import ensureSelfSignedCertificate
from tests.e2e import freePort
from tests.test_crash import PASSWORD, USER, MSAProcess
from tests.waiting import listening, waitUntil, waitUntilBlocking

log = Logger()

#: Enough messages that their removal takes a while, so that the kill,
#: sent when the first file is gone, lands in the middle of it; the checks
#: hold wherever it lands.
COUNT = 300


@attrs.define(slots=False)
class POP3Process(MSAProcess):
    """
    L{MSAProcess} with a POP3 STLS listener.
    """

    pop3Port: int = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.pop3Port = freePort()
        with open(self.configFile, "a", encoding="utf-8") as f:
            f.write(
                f'\n[pop3]\nstarttls_listeners = ["tcp:{self.pop3Port}'
                ':interface=127.0.0.1"]\n'
            )
        self.mailboxes = os.path.join(self.state, "mailboxes")

    async def start(self) -> None:
        await super().start()
        await waitUntil(lambda: listening(self.pop3Port), 20, "POP3 to listen")

    def login(self) -> poplib.POP3:
        client = poplib.POP3("localhost", self.pop3Port, timeout=20)
        client.stls(self.clientContext())
        client.user(USER)
        client.pass_(PASSWORD)
        return client


def message(n: int) -> bytes:
    return b"Subject: retour %d\r\n\r\n" % n + b"regel %d\r\n" % n * 20


def onDisk(mailboxes: str) -> dict[str, bytes]:
    """
    uid -> bytes of every message file, each checked whole against the
    size and digest its name records.
    """
    found = {}
    for top, _, files in os.walk(mailboxes):
        if os.path.basename(top) not in ("new", "cur"):
            continue
        for name in files:
            parsed = parseMessageName(name)
            if parsed is None:
                continue
            with open(os.path.join(top, name), "rb") as f:
                data = f.read()
            assert len(data) == parsed.size, (name, len(data))
            assert hashlib.sha256(data).hexdigest() == parsed.sha256, name
            found[parsed.uid] = data
    return found


class QuitCrashTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_killDuringQuit(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        coreCA, _ = ensureSelfSignedCertificate(os.path.join(directory, "ca"), "x")
        msa = POP3Process(self, directory, freePort(), coreCA)
        yield defer.ensureDeferred(msa.start())
        store = MaildirStore(msa.mailboxes)
        delivered = {}
        for n in range(COUNT):
            data = message(n)
            uid = yield store.deliver(
                USER, io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest()
            )
            delivered[uid] = data

        newDirectory = os.path.dirname(store.listMessages(USER)[0].path)

        def deleteAllAndKill() -> None:
            client = msa.login()
            for n in range(1, COUNT + 1):
                client.dele(n)
            client._putcmd("QUIT")
            # Kill as soon as the removal has begun: the first file gone.
            waitUntilBlocking(
                lambda: len(os.listdir(newDirectory)) < COUNT,
                20,
                "the deletions to begin",
            )
            msa.kill(signal.SIGKILL)
            client.close()

        yield threads.deferToThread(deleteAllAndKill)
        left = onDisk(msa.mailboxes)
        self.assertLessEqual(set(left), set(delivered))
        for uid, data in left.items():
            self.assertEqual(data, delivered[uid])

        yield defer.ensureDeferred(msa.start())

        def fetchAll() -> dict[str, bytes]:
            client = msa.login()
            got = {}
            for line in client.uidl()[1]:
                number, uid = line.split()
                got[uid.decode()] = b"".join(
                    piece + b"\r\n" for piece in client.retr(int(number))[1]
                )
            client.quit()
            return got

        served = yield threads.deferToThread(fetchAll)
        self.assertEqual(served, left)
        msa.kill(signal.SIGKILL)
        # Where the kill landed, for the record (not asserted: timing).
        log.info(
            "{deleted} of {count} deleted at the kill",
            deleted=len(delivered) - len(left),
            count=COUNT,
        )
