# -*- test-case-name: tests.test_loglines -*-
"""
How many log lines one accepted message costs, in the daemon's JSON log:
at C{[logging] level = "info"} the submission side writes one line per
accepted message (C{accepted}, carrying the client, TLS version, account
and session duration); the session's other events (C{connection}, C{tls},
C{auth} success, C{disconnected}) are DEBUG and appear only at
C{level = "debug"}.  A failed login stays at INFO and names its client.
"""

import hashlib
import json
import os
import smtplib

from twisted.internet import defer, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from msa.service import logs
from tests.e2e import MESSAGE, RunningMSA, waitUntil
from tests.test_e2e import submit

#: The own fields of the C{accepted} line, after the common ones.
ACCEPTED_OWN = (
    "mechanism",
    "port",
    "tls",
    "cipher",
    "size",
    "recipients",
    "sha256",
    "duration",
)


class LogLinesPerMessageTests(unittest.TestCase):
    """
    A daemon started from its configuration, one submission over STARTTLS
    with AUTH PLAIN, and the JSON log file it wrote.
    """

    @defer.inlineCallbacks
    def submitAndRead(self, level, failedLogin=False):
        """
        Start a daemon logging at C{level}, submit one message (after a
        failed login on another connection if C{failedLogin}), wait until
        the session is over and the message relayed to the outbox, and
        return the queue id and the JSON lines.
        """
        jsonFile = os.path.abspath(self.mktemp()) + ".json"
        msa = RunningMSA(self, logging={"json_file": jsonFile, "level": level})
        # Added after the start, so not behind the daemon's level filter:
        # it sees every event, whatever the level.
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        if failedLogin:
            yield self.assertFailure(
                threads.deferToThread(
                    submit,
                    port=msa.starttlsPort,
                    context=msa.clientContext(),
                    password="Guess-Me-123",
                ),
                smtplib.SMTPAuthenticationError,
            )
        code, text = yield threads.deferToThread(
            submit, port=msa.starttlsPort, context=msa.clientContext()
        )
        self.assertEqual(code, 250)
        queueId = text.split()[-1].decode()
        # Wait until the session's end and the relay's outcome are logged.
        [session] = yield waitUntil(
            lambda: [
                e["session"]
                for e in events
                if e.get("event") == "accepted" and e.get("queueId") == queueId
            ],
            10.0,
            "the accepted event",
        )
        yield waitUntil(
            lambda: (
                any(
                    e.get("event") == "disconnected" and e.get("session") == session
                    for e in events
                )
                and any(
                    e.get("event") == "relay" and e.get("queueId") == queueId
                    for e in events
                )
            ),
            10.0,
            "the end of the session and the relay",
        )
        with open(jsonFile, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        return queueId, session, lines

    def checkAccepted(self, line, queueId, session, level="info"):
        self.assertEqual(list(line), [*logs.COMMON_FIELDS, *ACCEPTED_OWN])
        expected = {
            "level": level,
            "event": "accepted",
            "session": session,
            "queue_id": queueId,
            "account": "alice",
            "client": "127.0.0.1",
            "namespace": "msa.submission.transaction",
            "mechanism": "PLAIN",
            "tls": "TLSv1.3",
            "size": len(MESSAGE),
            "recipients": 1,
            "sha256": hashlib.sha256(MESSAGE).hexdigest(),
        }
        self.assertEqual({k: line[k] for k in expected}, expected)
        self.assertIsInstance(line["port"], int)
        self.assertGreater(line["port"], 0)
        self.assertTrue(line["cipher"])
        self.assertIsInstance(line["duration"], float)
        self.assertGreaterEqual(line["duration"], 0.0)
        for part in (queueId, "alice", "127.0.0.1", "TLSv1.3", line["sha256"]):
            self.assertIn(part, line["text"])

    @defer.inlineCallbacks
    def test_infoOneLinePerAcceptedMessage(self):
        """
        At C{level = "info"}, the submission side writes exactly one line
        for a successful session: C{accepted}, with all its fields.  Of
        the whole daemon, the message costs two lines: that one and its
        relay outcome.
        """
        queueId, session, lines = yield self.submitAndRead("info")
        submission = [
            e
            for e in lines
            if e["namespace"].startswith(("msa.submission", "msa.queue"))
            and (e.get("session") == session or e.get("queue_id") == queueId)
        ]
        self.assertEqual([e["event"] for e in submission], ["accepted"])
        self.checkAccepted(submission[0], queueId, session)
        self.assertEqual(
            [e for e in lines if e["namespace"].startswith("msa.submission")],
            submission,
        )
        ofTheMessage = [
            e
            for e in lines
            if e.get("session") == session or e.get("queue_id") == queueId
        ]
        self.assertEqual(
            [(e["level"], e["event"]) for e in ofTheMessage],
            [("info", "accepted"), ("info", "relay")],
        )

    @defer.inlineCallbacks
    def test_debugShowsTheSessionEvents(self):
        """
        At C{level = "debug"}, the session's C{connection}, C{tls},
        C{auth} success and C{disconnected} events are written, as DEBUG,
        with their fields; C{accepted} is still INFO.
        """
        queueId, session, lines = yield self.submitAndRead("debug")
        ofSession = [e for e in lines if e.get("session") == session]
        byEvent = {}
        for e in ofSession:
            byEvent.setdefault(e["event"], []).append(e)
        [connection] = byEvent["connection"]
        [tls] = byEvent["tls"]
        [auth] = byEvent["auth"]
        [accepted] = byEvent["accepted"]
        [disconnected] = byEvent["disconnected"]
        self.assertEqual(
            [
                e["event"]
                for e in ofSession
                if e["namespace"] not in ("msa.queue.spool", "msa.queue.writer")
            ],
            ["connection", "tls", "auth", "accepted", "disconnected"],
        )
        self.assertEqual(
            (connection["level"], connection["client"], type(connection["port"])),
            ("debug", "127.0.0.1", int),
        )
        self.assertEqual(connection["port"], accepted["port"])
        self.assertEqual(
            (tls["level"], tls["version"], tls["client"], tls["cipher"]),
            ("debug", "TLSv1.3", "127.0.0.1", accepted["cipher"]),
        )
        self.assertEqual(
            (auth["level"], auth["outcome"], auth["account"], auth["mechanism"]),
            ("debug", "success", "alice", "PLAIN"),
        )
        self.assertEqual(
            (disconnected["level"], disconnected["account"]), ("debug", "alice")
        )
        self.assertIsInstance(disconnected["duration"], float)
        self.assertGreaterEqual(disconnected["duration"], accepted["duration"])
        self.checkAccepted(accepted, queueId, session)

    @defer.inlineCallbacks
    def test_failedLoginStaysInfo(self):
        """
        A failed login is still written at C{level = "info"}, with its
        client's address (no earlier line of its session names it now).
        """
        queueId, session, lines = yield self.submitAndRead("info", failedLogin=True)
        [failed] = [e for e in lines if e["event"] == "auth"]
        self.assertEqual(
            (
                failed["level"],
                failed["outcome"],
                failed["user"],
                failed["code"],
                failed["client"],
            ),
            ("info", "failure", "alice", 535, "127.0.0.1"),
        )
        self.assertNotEqual(failed["session"], session)
        [accepted] = [e for e in lines if e["event"] == "accepted"]
        self.checkAccepted(accepted, queueId, session)
