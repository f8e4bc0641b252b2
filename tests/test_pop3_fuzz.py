# -*- test-case-name: tests.test_pop3_fuzz -*-
"""
Account isolation under a seeded fuzzer: random POP3 sessions (random
commands, message numbers, other accounts' uids, garbage bytes, pipelined
and split at random) against the real server, realm and checker over an
in-memory store, and a shorter run against the daemon with the real
Maildir store over TLS.  Whatever a session sends: the server raises
nothing, every session ends or answers (no hang), no session's output
holds another account's message, and only the logged-in account's
messages can disappear, and only at QUIT.
"""

import random
import socket
import ssl

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.testing import MemoryChecker
from tests.e2e import USERS, RunningMSA
from tests.pop3harness import PASSWORDS, POP3Harness
from tests.test_pop3_e2e import deliver, messageFiles

SEED = 20261207
VERBS = [
    b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP",
    b"CAPA", b"USER", b"PASS", b"AUTH", b"APOP", b"STLS", b"XTND", b"LAST",
]  # fmt: skip


def secret(account: str, n: int) -> bytes:
    return b"Subject: for %s\r\n\r\nSECRET-%s-%d\r\n" % (
        account.encode(),
        account.encode(),
        n,
    )


def randomArgument(rng: random.Random, uids: list[str]) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return b""
    if choice == 1:
        return str(rng.randrange(-2, 12)).encode()
    if choice == 2:
        return rng.choice(uids).encode()
    if choice == 3:
        return b"%d %d" % (rng.randrange(0, 8), rng.randrange(-1, 5))
    if choice == 4:
        return str(rng.randrange(10**9, 10**12)).encode()
    if choice == 5:
        return rng.choice([b"bob", b"alice", b"carol", b"../bob", b"*", b"="])
    if choice == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    if choice == 7:
        return b"x" * rng.randrange(200, 400)
    return b"1"


def randomLine(rng: random.Random, uids: list[str]) -> bytes:
    verb = rng.choice(VERBS)
    if rng.random() < 0.2:
        verb = verb.lower()
    argument = randomArgument(rng, uids)
    line = verb + (b" " + argument if argument or rng.random() < 0.3 else b"")
    return line.replace(b"\n", b"")


class HarnessFuzzTests(unittest.TestCase):
    def test_isolation(self):
        """
        One server (factory, realm, store) for every session, as in the
        daemon, so that state one session leaves behind meets the next.
        """
        rng = random.Random(SEED)
        # Plain-text passwords: the checker is not what is fuzzed here.
        h = POP3Harness(checker=MemoryChecker(PASSWORDS))
        for session in range(1000):
            self.fuzzSession(h, rng, session)
        self.assertEqual(self.flushLoggedErrors(), [])

    def fuzzSession(self, h: POP3Harness, rng: random.Random, session: int) -> None:
        store = h.mailboxes
        for name in PASSWORDS:
            for n in range(rng.randrange(0, 3)):
                store.add(name, secret(name, n))
        before = {name: dict(box) for name, box in store.mailboxes.items()}
        uids = [u for box in before.values() for u in box] or ["none"]
        user = rng.choice(list(PASSWORDS))
        password = (
            PASSWORDS[user]
            if rng.random() < 0.8
            else rng.choice(list(PASSWORDS.values()))
        )
        h.connect(f"192.0.2.{session % 200 + 1}")
        output = b""
        if rng.random() < 0.9:
            output += h.login(user, password)
        loggedIn = h.server.maildrop is not None
        others = [name for name in PASSWORDS if name != user]
        pending = [randomLine(rng, uids) for _ in range(rng.randrange(1, 30))]
        quit = rng.random() < 0.6
        if quit:
            pending.append(b"QUIT")
        data = b"".join(line + b"\r\n" for line in pending)
        while data and not h.transport.disconnecting:
            cut = rng.randrange(1, len(data) + 1)
            output += h.send(data[:cut])
            data = data[cut:]
            self.assertFalse(
                h.server._waiting, f"session {session} hangs after {pending!r}"
            )
        h.drop()
        for name in others:
            self.assertNotIn(b"SECRET-" + name.encode(), output, session)
            self.assertEqual(store.mailboxes.get(name, {}), before.get(name, {}))
        if not loggedIn or not quit:
            self.assertEqual(store.mailboxes.get(user, {}), before.get(user, {}))
        self.assertEqual(store.locked, set(), session)


class DaemonFuzzTests(unittest.TestCase):
    """
    The same over TLS against the daemon and its Maildir store: fewer
    sessions (each is a TLS connection), the same rules.
    """

    @defer.inlineCallbacks
    def test_isolation(self):
        msa = RunningMSA(self, pop3={"max_errors": 1000})
        rng = random.Random(SEED + 1)
        for name in USERS:
            for n in range(3):
                yield deliver(msa, name, secret(name, n))
        for _ in range(25):
            user = rng.choice(list(USERS))
            files = {name: self.filesOf(msa, name) for name in USERS}
            uids = [f.rsplit("/", 1)[1].split(",")[0] for f in messageFiles(msa)]
            lines = [randomLine(rng, uids) for _ in range(rng.randrange(1, 20))]
            quit = rng.random() < 0.5
            output = yield threads.deferToThread(
                fuzzOverTLS, msa, user, lines + ([b"QUIT"] if quit else [])
            )
            for name in USERS:
                if name != user:
                    self.assertNotIn(b"SECRET-" + name.encode(), output, lines)
                    self.assertEqual(self.filesOf(msa, name), files[name])
            if not quit:
                self.assertEqual(self.filesOf(msa, user), files[user])

    @staticmethod
    def filesOf(msa: RunningMSA, name: str) -> list[str]:
        return [f for f in messageFiles(msa) if f"/{name}/" in f]


def fuzzOverTLS(msa: RunningMSA, user: str, lines: list[bytes]) -> bytes:
    """
    Blocking: log in over implicit TLS, send the lines pipelined, read
    until the server closes or stays quiet; return everything read.
    """
    context = msa.clientContext()
    raw = socket.create_connection(("127.0.0.1", msa.pop3sPort), 10)
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        # A session without QUIT ends when the server has been quiet
        # for a second: what it answered by then is checked.
        s.settimeout(1)
        login = b"USER %s\r\nPASS %s\r\n" % (user.encode(), USERS[user].encode())
        s.sendall(login + b"".join(line + b"\r\n" for line in lines))
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionError):
                return received
            if not chunk:
                return received
            received += chunk
