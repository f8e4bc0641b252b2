# -*- test-case-name: tests.test_admin -*-
"""
Tests for L{msa.admin.command}, the C{digipoort-msa-admin} program.
"""

import io
import os
import stat
import sys
import time

import attrs
from twisted.internet import defer, reactor, task, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from msa.accounts.model import readAccounts, verifyPassword, writeAccounts
from msa.admin import accounts as adminaccounts
from msa.admin import command as admin
from msa.envelope import Envelope
from msa.queue.spool import Spool
from msa.service import controlsocket
from msa.service.controlsocket import ControlService
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, RunningMSA
from tests.test_e2e import submit
from tests.waiting import waitUntil


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class AdminTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")

    def runAdmin(self, *argv, stdin="", base=None):
        """
        Run the program with C{stdin} as standard input.

        @return: the exit code, stdout and stderr.
        """
        if base is None:
            base = ["--accounts", self.path, "--realm", "mail.example.org"]
        stdout, stderr = io.StringIO(), io.StringIO()
        if isinstance(stdin, str):
            stdin = io.StringIO(stdin)
        self.patch(sys, "stdin", stdin)
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        code = admin.main([*base, *argv])
        return code, stdout.getvalue(), stderr.getvalue()

    def test_roundTrip(self):
        """
        add, list, show, passwd, disable, enable and remove work together.
        """
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin="first pw\n")
        self.assertEqual(code, 0)
        self.assertIn("alice has no senders yet", err)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        alice = readAccounts(self.path)["alice"]
        self.assertTrue(verifyPassword(alice, "first pw"))
        self.assertEqual(sorted(alice.digestHA1), ["mail.example.org"])
        bob = ["accounts", "add", "bob", "--mechanisms", "plain,login", "--disabled"]
        code, out, err = self.runAdmin(*bob, stdin="bob pw\n")
        self.assertEqual(code, 0, err)

        code, out, err = self.runAdmin("accounts", "list")
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            [
                "alice\tenabled\tDIGEST-MD5,LOGIN,PLAIN,SCRAM-SHA-256",
                "bob\tdisabled\tLOGIN,PLAIN",
            ],
        )

        code, out, err = self.runAdmin("accounts", "show", "alice")
        self.assertEqual(code, 0)
        self.assertIn("enabled: yes", out)
        self.assertIn("password hash: set", out)
        self.assertIn("DIGEST-MD5 secret: set for realm(s) mail.example.org", out)
        self.assertIn("SCRAM-SHA-256 keys: set (4096 iterations)", out)
        self.assertNotIn("scrypt$", out)
        for [secret] in alice.digestHA1.values():
            self.assertNotIn(secret, out)
        code, out, err = self.runAdmin("accounts", "show", "bob")
        self.assertIn("DIGEST-MD5 secret: not set", out)
        self.assertIn("SCRAM-SHA-256 keys: not set", out)

        code, out, err = self.runAdmin(
            "accounts", "passwd", "alice", stdin="second pw\n"
        )
        self.assertEqual(code, 0, err)
        renewed = readAccounts(self.path)["alice"]
        self.assertTrue(verifyPassword(renewed, "second pw"))
        self.assertFalse(verifyPassword(renewed, "first pw"))
        self.assertNotEqual(renewed.digestHA1, alice.digestHA1)

        self.assertEqual(self.runAdmin("accounts", "disable", "alice")[0], 0)
        self.assertFalse(readAccounts(self.path)["alice"].enabled)
        self.assertEqual(self.runAdmin("accounts", "enable", "alice")[0], 0)
        self.assertTrue(readAccounts(self.path)["alice"].enabled)
        self.assertEqual(self.runAdmin("accounts", "remove", "bob")[0], 0)
        self.assertEqual(list(readAccounts(self.path)), ["alice"])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertNotIn(b"first pw", data)
        self.assertNotIn(b"second pw", data)

    def test_passwordNotAnArgument(self):
        """
        A password on the command line is a usage error and nothing is
        written.
        """
        for argv in [
            ("accounts", "add", "alice", "secret"),
            ("accounts", "add", "alice", "--password", "secret"),
            ("accounts", "add", "alice", "--password=secret"),
            ("accounts", "passwd", "alice", "secret"),
        ]:
            code, out, err = self.runAdmin(*argv, stdin="pw\n")
            self.assertEqual(code, 2, argv)
            self.assertIn("unrecognized arguments", err)
        self.assertFalse(os.path.exists(self.path))

    def test_emptyPassword(self):
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin="\n")
        self.assertEqual(code, 1)
        self.assertIn("empty password", err)
        self.assertFalse(os.path.exists(self.path))

    def test_terminal(self):
        """
        On a terminal the password is asked twice with getpass, and must
        match.
        """
        answers = ["tty pw", "tty pw", "one", "other"]
        self.patch(adminaccounts.getpass, "getpass", lambda prompt: answers.pop(0))
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin=FakeTerminal())
        self.assertEqual(code, 0, err)
        self.assertTrue(verifyPassword(readAccounts(self.path)["alice"], "tty pw"))
        code, out, err = self.runAdmin(
            "accounts", "passwd", "alice", stdin=FakeTerminal()
        )
        self.assertEqual(code, 1)
        self.assertIn("differ", err)
        self.assertTrue(verifyPassword(readAccounts(self.path)["alice"], "tty pw"))

    def test_unknownUser(self):
        self.runAdmin("accounts", "add", "alice", stdin="pw\n")
        for command in ("passwd", "disable", "enable", "remove", "show", "set"):
            extra = ["--mechanisms", "PLAIN"] if command == "set" else []
            code, out, err = self.runAdmin(
                "accounts", command, "bob", *extra, stdin="p\n"
            )
            self.assertEqual(code, 1, command)
            self.assertIn("no account 'bob'", err)

    def test_addExisting(self):
        self.runAdmin("accounts", "add", "alice", stdin="pw\n")
        code, out, err = self.runAdmin("accounts", "add", "alice", stdin="pw2\n")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)
        self.assertTrue(verifyPassword(readAccounts(self.path)["alice"], "pw"))

    def test_unknownMechanism(self):
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", "--mechanisms", "CRAM-MD5", stdin="pw\n"
        )
        self.assertEqual(code, 2)
        self.assertIn("CRAM-MD5", err)

    def test_setKeepsExtra(self):
        """
        C{set --mechanisms} keeps C{extra}, drops secrets of dropped
        mechanisms and warns about mechanisms still without secrets.
        """
        self.runAdmin("accounts", "add", "alice", "--mechanisms", "PLAIN", stdin="pw\n")
        alice = readAccounts(self.path)["alice"]
        extra = {"senders": ["a@example.org"]}
        writeAccounts(self.path, {"alice": attrs.evolve(alice, extra=extra)})
        code, out, err = self.runAdmin(
            "accounts", "set", "alice", "--mechanisms", "PLAIN,SCRAM-SHA-256"
        )
        self.assertEqual(code, 0)
        self.assertIn("SCRAM-SHA-256 has no secret", err)
        self.assertIn("accounts passwd alice", err)
        changed = readAccounts(self.path)["alice"]
        self.assertEqual(changed.extra, {"senders": ["a@example.org"]})
        self.assertEqual(changed.mechanisms, {"PLAIN", "SCRAM-SHA-256"})
        code, out, err = self.runAdmin("accounts", "show", "alice")
        self.assertIn('senders: ["a@example.org"]', out)

    def test_looseModeWarned(self):
        self.runAdmin("accounts", "add", "alice", stdin="pw\n")
        os.chmod(self.path, 0o644)
        code, out, err = self.runAdmin("accounts", "list")
        self.assertEqual(code, 0)
        self.assertIn("chmod 600", err)
        self.runAdmin("accounts", "disable", "alice")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_malformedFile(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("{")
        code, out, err = self.runAdmin("accounts", "list")
        self.assertEqual(code, 1)
        self.assertIn(self.path, err)

    def test_config(self):
        """
        With C{--config} the accounts file and realm come from the server
        configuration.
        """
        base = os.path.dirname(self.path)
        os.makedirs(base)
        config = os.path.join(base, "msa.toml")
        with open(config, "w") as f:
            f.write('[server]\nsasl_realm = "conf.example"\n')
            f.write('[accounts]\nfile = "users.json"\n')
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", stdin="pw\n", base=["--config", config]
        )
        self.assertEqual(code, 0, err)
        alice = readAccounts(os.path.join(base, "users.json"))["alice"]
        self.assertEqual(list(alice.digestHA1), ["conf.example"])

    def test_badConfig(self):
        code, out, err = self.runAdmin(
            "accounts", "list", base=["--config", self.path + ".missing"]
        )
        self.assertEqual(code, 2)
        self.assertIn("--accounts", err)

    def test_defaults(self):
        """
        Without C{--accounts} or C{--config} the built-in configuration is
        used: C{msa-state/accounts.json} in the current directory, realm
        C{localhost}.
        """
        base = os.path.dirname(self.path)
        os.makedirs(base)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(base)
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", stdin="pw\n", base=[]
        )
        self.assertEqual(code, 0, err)
        path = os.path.join(base, "msa-state", "accounts.json")
        self.assertEqual(list(readAccounts(path)["alice"].digestHA1), ["localhost"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_realmFallback(self):
        """
        Without C{--realm} and without a configuration module, the realm is
        the host's fully qualified name.
        """
        self.patch(admin, "_loadConfig", lambda path: None)
        self.patch(adminaccounts.socket, "getfqdn", lambda: "host.example")
        code, out, err = self.runAdmin(
            "accounts", "add", "alice", stdin="pw\n", base=["--accounts", self.path]
        )
        self.assertEqual(code, 0, err)
        alice = readAccounts(self.path)["alice"]
        self.assertEqual(list(alice.digestHA1), ["host.example"])
        self.assertEqual(self.runAdmin("accounts", "list", base=[])[0], 2)


def _subjectMessage(subject: str) -> bytes:
    return MESSAGE.replace(b"Subject: aangifte", b"Subject: " + subject.encode())


def allowSenders(msa) -> None:
    """
    Give the accounts of C{msa} the sender domain of L{MESSAGE} (accounts
    may only use the senders issued to them), and make the running server
    read them again.
    """
    accounts = readAccounts(msa.accountsFile)
    for name, account in accounts.items():
        if "senders" not in account.extra:
            extra = dict(account.extra, senders=["@mijnbedrijf.nl"])
            accounts[name] = attrs.evolve(account, extra=extra)
    writeAccounts(msa.accountsFile, accounts)
    for child in msa.service:
        if hasattr(child, "store"):
            child.store.reload()


class QueueAdminTests(unittest.TestCase):
    """
    C{queue ...} against the running MSA (in this process, its control
    socket served by L{ControlService}), relaying to a core MTA that refuses
    with 451 until told otherwise, so that messages stay queued.
    """

    @defer.inlineCallbacks
    def runAdmin(self, *argv):
        """
        Run the program in a thread (its client blocks) against the MSA's
        configuration.

        @return: a L{Deferred} of the exit code, stdout and stderr.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        code = yield threads.deferToThread(
            admin.main, ["--config", self.msa.configFile, *argv], stdout, stderr
        )
        return code, stdout.getvalue(), stderr.getvalue()

    def startMSA(self):
        self.core = DownstreamServer(os.path.abspath(self.mktemp()))
        port = self.core.start()
        self.addCleanup(self.core.stop)
        self.core.mailReply = (451, "4.3.0 Try again later")
        self.msa = RunningMSA(
            self,
            relay={
                "host": "127.0.0.1",
                "port": port,
                "tls": "starttls",
                "server_name": "localhost",
                "ca_file": self.core.caFile,
                "retry_base": 3600,
                "retry_max": 3600,
            },
        )
        allowSenders(self.msa)
        self.runner = self.msa.service.getServiceNamed("relay")
        try:
            self.msa.service.getServiceNamed("control")
        except KeyError:
            # msa.service.tap does not start the control socket (yet): as it would.
            control = ControlService(
                controlsocket.socketPath(self.msa.state),
                self.runner.control,
                self.runner.spool,
            )
            control.startService()
            self.addCleanup(control.stopService)

    @defer.inlineCallbacks
    def submit(self, subject: str):
        code, text = yield threads.deferToThread(
            submit,
            port=self.msa.starttlsPort,
            context=self.msa.clientContext(),
            message=_subjectMessage(subject),
        )
        self.assertEqual(code, 250)
        return text.split()[-1].decode()

    def waitForAttempts(self, count: int):
        def attempted():
            items = controlsocket.describeSpool(self.runner.spool)
            if len(items) == count and all(i["attempts"] >= 1 for i in items):
                return items

        return waitUntil(
            attempted,
            what=lambda: (
                f"{count} attempted messages, queue: "
                f"{controlsocket.describeSpool(self.runner.spool)}"
            ),
        )

    def subjects(self):
        return [
            line.split(b": ", 1)[1].decode()
            for m in self.core.messages
            for line in m.data.split(b"\r\n")
            if line.startswith(b"Subject: ")
        ]

    @defer.inlineCallbacks
    def test_queueCommands(self):
        """
        list shows the queued messages; show prints the envelope and the
        headers; a held message is not delivered by flush, a released one
        is; a deleted one is gone and never delivered.
        """
        self.startMSA()
        a = yield self.submit("A")
        b = yield self.submit("B")
        c = yield self.submit("C")
        yield self.waitForAttempts(3)

        code, out, err = yield self.runAdmin("queue", "list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[:4], ["ID", "AGE", "SIZE", "SENDER"])
        self.assertIn("LAST ERROR", lines[0])
        self.assertEqual([line.split()[0] for line in lines[1:4]], [a, b, c])
        for line in lines[1:4]:
            self.assertIn("<ik@mijnbedrijf.nl>", line)
            self.assertIn("belastingdienst@overheid.nl", line)
            self.assertIn("451", line)
        self.assertEqual(lines[4], "3 message(s)")

        code, out, err = yield self.runAdmin("queue", "show", c)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"id: {c}\n", out)
        self.assertIn("state: queued\n", out)
        self.assertIn("attempts: 1\n", out)
        self.assertIn("sender: <ik@mijnbedrijf.nl>\n", out)
        self.assertIn("recipient: <belastingdienst@overheid.nl> pending", out)
        self.assertIn("account: alice\n", out)
        self.assertIn("headers:\n", out)
        self.assertIn("  Subject: C\n", out)
        self.assertIn("  Message-ID: <1@mijnbedrijf.nl>\n", out)
        self.assertNotIn("Regel een", out)

        code, out, err = yield self.runAdmin("queue", "delete", c)
        self.assertEqual((code, out, err), (0, f"deleted {c}\n", ""))
        code, out, err = yield self.runAdmin("queue", "show", c)
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"no message {c} in the queue", err)

        # flush ID: one more attempt of that message only (still refused).
        code, out, err = yield self.runAdmin("queue", "flush", b)
        self.assertEqual((code, out, err), (0, f"flushed 1 message(s): {b}\n", ""))

        def attempts():
            return {
                i["id"]: i["attempts"]
                for i in controlsocket.describeSpool(self.runner.spool)
            }

        yield waitUntil(lambda: attempts().get(b) == 2, what=f"a 2nd attempt of {b}")
        self.assertEqual(attempts(), {a: 1, b: 2})

        code, out, err = yield self.runAdmin("queue", "hold", a)
        self.assertEqual((code, out, err), (0, f"held {a}\n", ""))
        code, out, err = yield self.runAdmin("queue", "list")
        [rowA] = [line for line in out.splitlines() if line.startswith(a)]
        self.assertIn(" held ", rowA)
        self.assertEqual(len(out.splitlines()), 4)

        self.core.mailReply = None
        code, out, err = yield self.runAdmin("queue", "flush")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("flushed "), out)
        yield self.core.waitForMessages(1)
        # The held message must stay undelivered: give a wrong delivery of
        # it time to show, then assert it did not happen.
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.subjects(), ["B"])
        self.assertEqual(
            [i["id"] for i in controlsocket.describeSpool(self.runner.spool)], [a]
        )

        # Released, it is attempted at once (no flush needed).
        code, out, err = yield self.runAdmin("queue", "release", a)
        self.assertEqual((code, out, err), (0, f"released {a}\n", ""))
        yield self.core.waitForMessages(2)
        self.assertEqual(self.subjects(), ["B", "A"])
        yield waitUntil(lambda: not self.runner.spool.pending(), what="an empty queue")
        code, out, err = yield self.runAdmin("queue", "list")
        self.assertEqual((code, out, err), (0, "queue is empty\n", ""))
        # Nothing is delivered a second time: wait a moment, then assert.
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.subjects(), ["B", "A"])

    @defer.inlineCallbacks
    def test_unknownId(self):
        self.startMSA()
        for command in ("show", "hold", "release", "delete", "flush"):
            code, out, err = yield self.runAdmin("queue", command, "ABCDEF")
            self.assertEqual((code, out), (1, ""), command)
            self.assertEqual(
                err, "digipoort-msa-admin: no message ABCDEF in the queue\n", command
            )
        code, out, err = yield self.runAdmin("queue", "show", "../accounts")
        self.assertEqual(code, 2)
        self.assertIn("not a queue id", err)


class QueueAdminOfflineTests(unittest.TestCase):
    """
    With the server not running, list and show read the spool files and
    the changing commands refuse.
    """

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.config = os.path.join(self.base, "msa.toml")
        with open(self.config, "w") as f:
            f.write('[server]\nstate_dir = "state"\n')
        clock = Clock()
        clock.advance(time.time() - 90)
        spool = Spool(os.path.join(self.base, "state", "spool"), clock)
        writer = spool.newMessage(Envelope("a@example.org", ["b@example.org"]))
        writer.write(b"Subject: offline\r\n\r\nbody\r\n")
        writer.commit().addBoth(lambda r: setattr(self, "queueId", r))

    def runAdmin(self, *argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        code = admin.main(["--config", self.config, *argv], stdout, stderr)
        return code, stdout.getvalue(), stderr.getvalue()

    def test_listAndShow(self):
        code, out, err = self.runAdmin("queue", "list")
        self.assertEqual(code, 0)
        self.assertIn("not running; read from the spool files", err)
        [header, row, total] = out.splitlines()
        self.assertEqual(row.split()[:4], [self.queueId, "1m", "26", "<a@example.org>"])
        self.assertEqual(total, "1 message(s)")
        code, out, err = self.runAdmin("queue", "show", self.queueId)
        self.assertEqual(code, 0)
        self.assertIn("  Subject: offline\n", out)
        self.assertNotIn("body", out)
        code, out, err = self.runAdmin("queue", "show", "ABC")
        self.assertEqual(code, 1)
        self.assertIn("no message ABC in the queue", err)

    def test_changesNeedServer(self):
        for argv in (["flush"], ["delete", self.queueId], ["hold", self.queueId]):
            code, out, err = self.runAdmin("queue", *argv)
            self.assertEqual((code, out), (1, ""), argv)
            self.assertIn("the MSA is not running", err)
            self.assertIn("needs the running server", err)
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.base, "state", "spool", "queue"))),
            [self.queueId],
        )

    def test_emptyWithoutSpool(self):
        with open(self.config, "w") as f:
            f.write('[server]\nstate_dir = "elsewhere"\n')
        code, out, err = self.runAdmin("queue", "list")
        self.assertEqual((code, out), (0, "queue is empty\n"))
        self.assertFalse(os.path.exists(os.path.join(self.base, "elsewhere")))
