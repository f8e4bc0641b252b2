# -*- test-case-name: tests.test_dotline -*-
"""
A 998-octet text line that starts with "." (issue 9 item 2): the dot a
client adds for transparency does not count towards the 1000-octet limit
(RFC 5321 4.5.3.1.6), so the line goes over the wire as 999 octets plus
CRLF and must be accepted; 999 octets after unstuffing are refused with
550 5.6.0.  Through the assembled daemon, with Python's smtplib (which
stuffs) and with nodemailer, the client that found it; the outbox holds
exactly the unstuffed line, and the core receives it stuffed again.
"""

import json
import os

from twisted.internet import defer, threads
from twisted.trial import unittest
from twisted.trial.unittest import SkipTest

from tests.e2e import AiosmtpdCore, RunningMSA, requireProgram, runProgram
from tests.test_e2e import RECIPIENT, SENDER, splitReceived, submit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: 998 octets with the dot: 999 on the wire once stuffed.
LINE998 = b"." + b"x" * 997
#: 999 octets with the dot: one too many.
LINE999 = b"." + b"y" * 998


def message(line: bytes) -> bytes:
    return (
        b"From: ik@mijnbedrijf.nl\r\n"
        b"To: belastingdienst@overheid.nl\r\n"
        b"Subject: punt\r\n"
        b"Message-ID: <dot@mijnbedrijf.nl>\r\n"
        b"\r\n"
        b"voor\r\n" + line + b"\r\nna\r\n"
    )


class DotLineThroughDaemonTests(unittest.TestCase):
    def setUp(self):
        self.msa = RunningMSA(self)

    @defer.inlineCallbacks
    def test_998AfterUnstuffingAccepted(self):
        code, text = yield threads.deferToThread(
            submit,
            port=self.msa.starttlsPort,
            context=self.msa.clientContext(),
            message=message(LINE998),
        )
        self.assertEqual(code, 250)
        [name] = yield self.msa.waitForOutbox(1)
        _, body = splitReceived(self.msa.readOutbox(name))
        self.assertEqual(body, message(LINE998))

    @defer.inlineCallbacks
    def test_999AfterUnstuffingRefused(self):
        reply = yield threads.deferToThread(
            submit,
            port=self.msa.starttlsPort,
            context=self.msa.clientContext(),
            message=message(LINE999),
        )
        self.assertEqual(
            reply,
            (
                550,
                b"5.6.0 Message refused: a line is longer than 1000 octets "
                b"(RFC 5321 4.5.3.1.6); use a MIME content transfer encoding",
            ),
        )
        self.assertEqual(self.msa.outboxFiles(), [])


class DotLineToCoreTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_restuffedToCore(self):
        """
        The core receives the 998-octet line intact: the MSA stuffed it
        again on the wire (aiosmtpd unstuffs, and refuses a line over 1001
        octets with its CRLF).
        """
        core = AiosmtpdCore(self)
        msa = RunningMSA(self, relay=core.relayConfig())
        code, _ = yield threads.deferToThread(
            submit,
            port=msa.implicitPort,
            implicit=True,
            context=msa.clientContext(),
            message=message(LINE998),
        )
        self.assertEqual(code, 250)
        [(sender, recipients, data, _)] = yield core.waitForMessages(1)
        self.assertEqual((sender, recipients), (SENDER, [RECIPIENT]))
        _, body = splitReceived(data)
        self.assertEqual(body, message(LINE998))


NODEMAILER_SCRIPT = r"""
const [modulePath, port, caFile, rawFile] = process.argv.slice(2);
const fs = require("fs");
const nodemailer = require(modulePath);
const transport = nodemailer.createTransport({
  host: "127.0.0.1",
  port: Number(port),
  secure: false,
  requireTLS: true,
  name: "mijnbedrijf.nl",
  tls: { ca: [fs.readFileSync(caFile)], servername: "localhost" },
  auth: { user: "alice", pass: "wonderland" },
  authMethod: "PLAIN",
});
transport
  .sendMail({
    envelope: { from: "ik@mijnbedrijf.nl", to: ["belastingdienst@overheid.nl"] },
    raw: fs.readFileSync(rawFile),
  })
  .then((info) => console.log(JSON.stringify({ response: info.response })))
  .catch((err) => {
    console.error(String(err));
    process.exit(1);
  });
"""


def requireNodemailer(testCase) -> str:
    """
    The nodemailer package run-tests.sh installs from the npm registry, or
    skip; under CI=true its absence fails.
    """
    path = os.path.join(ROOT, ".node-interop", "node_modules", "nodemailer")
    if not os.path.isdir(path):
        if os.environ.get("CI") == "true":
            testCase.fail("nodemailer is not installed (see run-tests.sh)")
        raise SkipTest("nodemailer not installed (run-tests.sh installs it)")
    return path


class NodemailerTests(unittest.TestCase):
    """
    nodemailer (Node.js) over STARTTLS with AUTH PLAIN sends a message
    whose 998-octet line starts with a dot.
    """

    @defer.inlineCallbacks
    def test_dotLine998(self):
        node = requireProgram(self, "node")
        module = requireNodemailer(self)
        msa = RunningMSA(self)
        directory = self.mktemp()
        os.makedirs(directory)
        script = os.path.join(directory, "send.js")
        with open(script, "w") as f:
            f.write(NODEMAILER_SCRIPT)
        raw = os.path.join(directory, "message.eml")
        with open(raw, "wb") as f:
            f.write(message(LINE998))
        out, err, code = yield runProgram(
            node, [script, module, str(msa.starttlsPort), msa.certFile, raw]
        )
        self.assertEqual(code, 0, err)
        response = json.loads(out)["response"]
        self.assertTrue(response.startswith("250 2.0.0 Ok: queued as "), response)
        [name] = yield msa.waitForOutbox(1)
        self.assertEqual(name, response.split()[-1] + ".eml")
        data = msa.readOutbox(name)
        self.assertIn(b"\r\n" + LINE998 + b"\r\n", data)
        _, body = splitReceived(data)
        self.assertEqual(body, message(LINE998))
