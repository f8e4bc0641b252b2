# -*- test-case-name: tests.test_content_e2e -*-
"""
Content policies (R12) as the daemon applies them: configured in TOML
(C{[[content.policy]]}), loaded by L{msa.tap.buildService}, and refusing
messages over a real socket with TLS with their exact reply, while a
message they accept is queued.  Also etc/digipoort-msa.toml itself, with
only its paths pointed at a temporary directory: the two policies it
enables are applied.
"""

import os
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.tls import ensureSelfSignedCertificate
from tests.e2e import RunningMSA
from tests.test_e2e import ROOT, submit

GOOD_HEADERS = (
    b"From: ik@mijnbedrijf.nl\r\n"
    b"To: belastingdienst@overheid.nl\r\n"
    b"Date: Tue, 1 Dec 2026 12:00:00 +0100\r\n"
    b"Message-ID: <1@mijnbedrijf.nl>\r\n"
    b"Subject: aangifte\r\n"
)


def message(extraHeaders: bytes = b"", body: bytes = b"Hallo\r\n", drop=()) -> bytes:
    """
    A well-formed message, with header fields added or C{drop}ped.
    """
    lines = [
        line
        for line in (GOOD_HEADERS + extraHeaders).split(b"\r\n")
        if line and line.split(b":")[0] not in drop
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def multipart(
    parts: int, boundary: bytes = b"grens", extraHeaders: bytes = b""
) -> bytes:
    """
    A multipart/mixed message with C{parts} text parts.
    """
    body = b"".join(
        b"--" + boundary + b"\r\nContent-Type: text/plain\r\n\r\ndeel %d\r\n" % i
        for i in range(parts)
    )
    body += b"--" + boundary + b"--\r\n"
    return message(
        extraHeaders + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n',
        body,
    )


#: A message without Message-ID, and how the headers policy refuses it.
NO_MESSAGE_ID = (
    message(drop=[b"Message-ID"]),
    (
        550,
        b"5.6.0 Message refused: exactly one Message-ID: header field is "
        b"required (RFC 5322 3.6)",
    ),
)


def send(msa: RunningMSA, data: bytes):
    """
    Submit C{data} over STARTTLS in a thread.

    @return: a L{Deferred} of the C{(code, text)} of the final reply.
    """

    def run():
        try:
            return submit(
                port=msa.starttlsPort, context=msa.clientContext(), message=data
            )
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error

    return threads.deferToThread(run)


@defer.inlineCallbacks
def assertReplies(testCase, msa: RunningMSA, cases):
    """
    Submit each message and compare its final reply; only the accepted ones
    reach the outbox.
    """
    accepted = 0
    for data, expected in cases:
        reply = yield send(msa, data)
        testCase.assertEqual(reply[0], expected[0], reply)
        if expected[0] == 250:
            accepted += 1
            testCase.assertTrue(reply[1].startswith(b"2.0.0 Ok: queued as "), reply)
        else:
            testCase.assertEqual(reply, expected)
    files = yield msa.waitForOutbox(accepted)
    testCase.assertEqual(len(files), accepted)


class ConfiguredPoliciesTests(unittest.TestCase):
    """
    Each kind of policy, configured in the TOML file of the running MSA.
    """

    def test_headersPolicy(self):
        msa = RunningMSA(
            self, content=[{"name": "headers", "require_message_id": True}]
        )
        return assertReplies(
            self,
            msa,
            [
                (message(), (250, None)),
                NO_MESSAGE_ID,
                (
                    message(drop=[b"Date"]),
                    (
                        550,
                        b"5.6.0 Message refused: exactly one Date: header field "
                        b"is required (RFC 5322 3.6)",
                    ),
                ),
            ],
        )

    def test_mimePartsPolicy(self):
        msa = RunningMSA(
            self,
            content=[
                {"name": "mime-parts", "max_parts": 3, "max_part_size": 100},
            ],
        )
        return assertReplies(
            self,
            msa,
            [
                (multipart(3), (250, None)),
                (
                    multipart(4),
                    (552, b"5.3.4 Message refused: more than 3 MIME body parts"),
                ),
                (message(body=b"x" * 100 + b"\r\n"), (250, None)),
                (
                    message(body=b"x" * 101 + b"\r\n"),
                    (552, b"5.3.4 Message refused: a MIME part exceeds 100 octets"),
                ),
            ],
        )

    def test_customPolicyByImportPath(self):
        msa = RunningMSA(
            self,
            content=[
                {
                    "name": "tests.example_policy:RequireHeader",
                    "header": "X-Digipoort-Berichttype",
                    "values": ["aangifte", "suppletie"],
                }
            ],
        )
        return assertReplies(
            self,
            msa,
            [
                (message(b"X-Digipoort-Berichttype: aangifte\r\n"), (250, None)),
                (
                    message(),
                    (
                        550,
                        b"5.6.0 Message refused: exactly one X-Digipoort-"
                        b"Berichttype: header field is required",
                    ),
                ),
                (
                    message(b"X-Digipoort-Berichttype: iets\r\n"),
                    (550, b"5.6.0 Message refused: unknown X-Digipoort-Berichttype"),
                ),
            ],
        )

    def test_chainFirstRefusalWins(self):
        """
        Several policies run in the order configured; the first refusal is
        the reply.
        """
        msa = RunningMSA(
            self,
            content=[
                {"name": "headers"},
                {"name": "tests.example_policy:RequireHeader", "header": "X-Kenmerk"},
            ],
        )
        return assertReplies(
            self,
            msa,
            [
                (message(b"X-Kenmerk: 1\r\n"), (250, None)),
                (
                    message(drop=[b"From"]),
                    (
                        550,
                        b"5.6.0 Message refused: exactly one From: header field "
                        b"is required (RFC 5322 3.6)",
                    ),
                ),
            ],
        )


class ExampleConfigurationTests(unittest.TestCase):
    """
    etc/digipoort-msa.toml as shipped, only its paths, ports and core MTA
    changed: the policies it enables are applied.
    """

    def test_examplePoliciesApplied(self):
        directory = os.path.abspath(self.mktemp())
        certFile, keyFile = ensureSelfSignedCertificate(directory, "localhost")
        msa = RunningMSA(
            self,
            baseConfig=os.path.join(ROOT, "etc", "digipoort-msa.toml"),
            server={"hostname": "localhost"},
            tls={"certificate": certFile, "key": keyFile},
            spool={"directory": os.path.join(directory, "spool")},
            relay={"host": None},
        )
        msa.certFile = certFile
        return assertReplies(
            self,
            msa,
            [
                (message(), (250, None)),
                NO_MESSAGE_ID,
                (multipart(100), (250, None)),
                (
                    multipart(101),
                    (552, b"5.3.4 Message refused: more than 100 MIME body parts"),
                ),
            ],
        )
