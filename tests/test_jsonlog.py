# -*- test-case-name: tests.test_jsonlog -*-
"""
C{[logging] json_file} as a log shipper reads it: the daemon, started from
its TOML file with the JSON log and the metrics listener on, takes a
submission (relayed to a core MTA), a failed login, a message whose content
policy breaks, and metrics requests; then every line of the file is one flat
JSON object with the documented fields and nothing of Twisted's internals
or of the metrics listener's HTTP access log.  Also C{twistd --logger
msa.service.logs.jsonLogger}, the same format on standard output.
"""

import hashlib
import io
import json
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import urllib.request

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface import implementer

from msa.accounts.model import makeAccount, writeAccounts
from msa.interfaces import IContentPolicy
from msa.service import logs
from msa.service.config import writeConfig
from tests.downstream import DownstreamServer
from tests.e2e import MESSAGE, SENDERS, RunningMSA, freePort
from tests.test_e2e import ROOT, submit
from tests.waiting import listening, waitUntil, waitUntilBlocking

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")


@implementer(IContentPolicy)
class BrokenPolicy:
    """
    A content policy with a bug: it fails on a message with an C{X-Break}
    header field (the MSA answers 451 and logs the traceback).
    """

    def startMessage(self, envelope):
        return self

    def headersReceived(self, headers):
        if "X-Break" in headers:
            raise ZeroDivisionError("the policy's bug")

    def lineReceived(self, line):
        pass

    def eomReceived(self):
        pass


class JSONFileTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_flatLinesOfADaemon(self):
        core = DownstreamServer(self.mktemp(), tlsMode="none")
        corePort = core.start()
        self.addCleanup(core.stop)
        jsonFile = os.path.abspath(self.mktemp()) + ".json"
        metricsPort = freePort()
        msa = RunningMSA(
            self,
            relay={"host": "127.0.0.1", "port": corePort, "tls": "none"},
            logging={"json_file": jsonFile},
            metrics={"listen": f"tcp:{metricsPort}:interface=127.0.0.1"},
            content=[{"name": "tests.test_jsonlog:BrokenPolicy"}],
        )
        code, text = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250)
        queueId = text.split()[-1].decode()
        yield self.assertFailure(
            threads.deferToThread(
                submit,
                port=msa.implicitPort,
                implicit=True,
                context=msa.clientContext(),
                user="bob",
                password="Guess-Me-123",
            ),
            smtplib.SMTPAuthenticationError,
        )
        code, text = yield threads.deferToThread(
            submit,
            port=msa.starttlsPort,
            context=msa.clientContext(),
            message=b"X-Break: 1\r\n" + MESSAGE,
        )
        self.assertEqual(code, 451)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}{path}") as r:
                return r.status

        for path in ("/metrics", "/health"):
            status = yield threads.deferToThread(get, path)
            self.assertEqual(status, 200)
        yield core.waitForMessages(1)
        lines = yield self.waitForLines(
            jsonFile, lambda e: e["event"] == "relay" and e.get("queue_id") == queueId
        )

        with open(jsonFile, encoding="utf-8") as f:
            raw = f.read()
        for internal in ("__class_uuid__", "log_logger", "unpersistable", "log_"):
            self.assertNotIn(internal, raw)
        self.assertNotIn("GET /metrics", raw)
        self.assertNotIn("GET /health", raw)
        self.assertNotIn("Guess-Me-123", raw)
        for line in lines:
            self.assertTrue(ISO_UTC.match(line["time"]), line)
            self.assertIn(line["level"], ("debug", "info", "warning", "error"), line)
            for key in ("event", "namespace", "text"):
                self.assertIsInstance(line[key], str, line)
            self.assertTrue(
                line["namespace"].startswith("msa") or line["level"] == "error", line
            )
            for value in line.values():
                self.assertFalse(isinstance(value, dict), line)

        def only(event, **match):
            found = [
                e
                for e in lines
                if e["event"] == event and all(e.get(k) == v for k, v in match.items())
            ]
            self.assertEqual(len(found), 1, (event, match, found))
            return found[0]

        accepted = only("accepted", queue_id=queueId)
        session = accepted["session"]
        self.assertEqual(
            {
                k: accepted[k]
                for k in ("level", "account", "client", "size", "recipients")
            },
            {
                "level": "info",
                "account": "alice",
                "client": "127.0.0.1",
                "size": len(MESSAGE),
                "recipients": 1,
            },
        )
        self.assertEqual(accepted["sha256"], hashlib.sha256(MESSAGE).hexdigest())
        self.assertIn(queueId, accepted["text"])
        self.assertEqual(list(accepted)[:9], list(logs.COMMON_FIELDS))

        # At the default level (info) the session's connection, TLS, login
        # and disconnection are DEBUG, not written: the accepted line
        # carries their facts (tests.test_loglines shows them at debug).
        self.assertEqual(
            (accepted["tls"], accepted["mechanism"], type(accepted["port"])),
            ("TLSv1.3", "PLAIN", int),
        )
        self.assertIsInstance(accepted["duration"], float)
        self.assertEqual(
            [e["event"] for e in lines if e.get("session") == session], ["accepted"]
        )
        for event in ("connection", "tls", "disconnected"):
            self.assertEqual([e for e in lines if e["event"] == event], [])
        self.assertEqual(
            [e for e in lines if e["event"] == "auth" and e["outcome"] == "success"],
            [],
        )

        failed = only("auth", outcome="failure")
        self.assertEqual(
            (failed["user"], failed["mechanism"], failed["code"], failed["client"]),
            ("bob", "PLAIN", 535, "127.0.0.1"),
        )
        self.assertNotIn("account", failed)

        relay = only("relay", queue_id=queueId)
        self.assertEqual(
            (relay["outcome"], relay["attempt"], relay["account"], relay["client"]),
            ("delivered", 1, "alice", "127.0.0.1"),
        )
        self.assertNotIn("session", relay)
        self.assertIn("CORE1", relay["reply"])

        [broken] = [e for e in lines if "traceback" in e]
        self.assertEqual((broken["level"], broken["event"]), ("error", "error"))
        self.assertIn("ZeroDivisionError: the policy's bug", broken["traceback"])
        self.assertIn("content policy", broken["text"])
        refused = only("refused")
        self.assertEqual(refused["reply"][:3], "451")
        self.assertEqual(refused["account"], "alice")

    @defer.inlineCallbacks
    def waitForLines(self, path, condition, timeout=10.0):
        """
        The file's lines, parsed, once one of them meets C{condition}.
        """

        def lines():
            with open(path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f]
            return lines if any(condition(e) for e in lines) else None

        return (yield waitUntil(lines, timeout, f"the awaited line in {path}"))


class TwistdLoggerTests(unittest.TestCase):
    """
    C{twistd -n --logger msa.service.logs.jsonLogger digipoort-msa}: the same lines
    on standard output, from the real twistd.
    """

    @defer.inlineCallbacks
    def test_jsonOnStandardOutput(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        state = os.path.join(directory, "state")
        port = freePort()
        accountsFile = os.path.join(directory, "accounts.json")
        writeAccounts(
            accountsFile,
            {
                "alice": attrs.evolve(
                    makeAccount("alice", "wonderland", ["localhost"]),
                    extra={"senders": SENDERS},
                )
            },
        )
        configFile = os.path.join(directory, "msa.toml")
        writeConfig(
            configFile,
            {
                "server": {
                    "state_dir": state,
                    "starttls_listeners": [f"tcp:{port}:interface=127.0.0.1"],
                    "implicit_tls_listeners": [],
                },
                "accounts": {"file": accountsFile},
            },
        )
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        outPath = os.path.join(directory, "stdout")
        with open(outPath, "wb") as out, open(outPath + ".err", "wb") as err:
            process = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "--logger", "msa.service.logs.jsonLogger"]
                + ["digipoort-msa", "--config", configFile],
                cwd=directory,
                env=dict(os.environ, PYTHONPATH=ROOT),
                stdout=out,
                stderr=err,
            )

        def stop():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)

        self.addCleanup(stop)

        def waitAndSubmit():
            waitUntilBlocking(lambda: listening(port), what="twistd to listen")
            context = ssl.create_default_context(
                cafile=os.path.join(state, "selfsigned-cert.pem")
            )
            return submit(port, context)

        code, text = yield threads.deferToThread(waitAndSubmit)
        self.assertEqual(code, 250)
        yield threads.deferToThread(stop)
        with open(outPath, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        [accepted] = [e for e in lines if e["event"] == "accepted"]
        self.assertEqual(
            (accepted["queue_id"], accepted["account"], accepted["client"]),
            (text.split()[-1].decode(), "alice", "127.0.0.1"),
        )
        self.assertTrue(all(ISO_UTC.match(e["time"]) for e in lines))


class ObserverTests(unittest.TestCase):
    """
    L{logs.FlatJSONObserver} on its own: which events it writes, and how.
    """

    def write(self, *events):
        out = io.StringIO()
        observer = logs.FlatJSONObserver(out)
        for event in events:
            observer(event)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_twistdLogger(self):
        """
        C{twistd --logger msa.service.logs.jsonLogger} writes the same lines on
        standard output.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = logs.jsonLogger()
        Logger(namespace="msa.server", observer=observer).info(
            "session {session}: x", event="tls", session="S1", cipherName="C"
        )
        [line] = [json.loads(x) for x in out.getvalue().splitlines()]
        self.assertEqual(
            {k: line[k] for k in ("level", "event", "session", "text", "cipher_name")},
            {
                "level": "info",
                "event": "tls",
                "session": "S1",
                "text": "session S1: x",
                "cipher_name": "C",
            },
        )

    def test_onlyMSAEventsAndErrors(self):
        events = []
        for namespace in ("msa.relay", "twisted.web.http", "twisted.internet"):
            Logger(namespace=namespace, observer=events.append).info("hello")
        Logger(namespace="twisted.internet", observer=events.append).error("broken")
        lines = self.write(*events)
        self.assertEqual(
            [(e["namespace"], e["event"], e["level"]) for e in lines],
            [("msa.relay", "log", "info"), ("twisted.internet", "error", "error")],
        )

    def test_valuesNotJSONAndNameClashes(self):
        events = []
        Logger(namespace="msa.x", observer=events.append).warn(
            "{path}", path=b"/tmp", text="own", items=[1, 2], thing=object()
        )
        [line] = self.write(*events)
        self.assertEqual(line["level"], "warning")
        self.assertEqual(line["field_text"], "own")
        self.assertEqual(line["path"], "b'/tmp'")
        self.assertEqual(line["items"], [1, 2])
        self.assertTrue(line["thing"].startswith("<object object"))
