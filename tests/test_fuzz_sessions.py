# -*- test-case-name: tests.test_fuzz_sessions -*-
"""
A seeded whole-session fuzzer over real sockets against the assembled
daemon, relaying to an independent core (aiosmtpd).

Each session is a script drawn from one seed: before TLS, or after STARTTLS
or implicit TLS and AUTH (PLAIN, LOGIN, after a wrong password or bad
base64), a mix of valid transactions, messages the rules refuse (bare LF or
CR, smuggled end-of-data, over-long lines with and without the
transparency dot, too large, a sender not issued to the account), ordinary
commands, and mutated or random input (flipped, cut and inserted bytes,
bare CR/LF, long lines, dots), pipelined in bursts.  The bytes sent depend
on the seed alone, never on the replies.

Transactions go through DATA or, as often, through BDAT (issue 21: one
chunk or several, cut anywhere, the same refusals for the same content,
answered after the chunk that breaks a rule), and the parameters include
those of DSN, SMTPUTF8, REQUIRETLS and BODY=BINARYMIME, valid and
malformed.

On the known path the fuzzer also draws (issue 18): MAIL and RCPT
parameters (Unicode digits such as C{\u00b2} and fullwidth ones, NUL and
other controls, non-ASCII keywords, very long values, many parameters,
duplicates, unknown keywords), AUTH arguments before the login (bad
base64, C{=} alone, huge initial responses and SASL responses, unknown
mechanisms), header fields in the messages (long names, folding, 8-bit
values, no colon, NUL, many fields), and pipelining depth (MAIL, up to
C{max_recipients} + 30 RCPT, NOOP in one write, over TLS).  Each has its
exact replies, so that every command is seen to get exactly one reply, in
order: a session that stays on its known path must end with exactly the
replies to the terminator and nothing else.

While a session is still on its known path, every reply is checked
exactly; after the first mutation the rest is sent without waiting, and
the session is ended by a terminator (CRLF "." CRLF QUIT).  For every
session and for the run:

  - no traceback or error in the log;
  - the stack depth at which a line is dispatched stays within a small
    constant, however deep the pipeline (the input loop is never
    re-entered);
  - every session gets its replies and a close within a bound (a hang
    fails the test, naming the seed and the session);
  - nothing is accepted that the rules refuse: each message the core
    receives has a sender issued to the account, no bare CR or LF, no line
    over 998 octets, a size within the limit; each one is a 250 the client
    saw, and each 250 reaches the core exactly once.

C{FUZZ_SEED} and C{FUZZ_SESSIONS} choose another seed and more sessions
(the default run takes a few seconds).
"""

import base64
import os
import random
import re

import attrs
from twisted.internet import defer, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from tests.e2e import AiosmtpdCore, RunningMSA
from tests.sessionclient import Closed, RawSession
from tests.test_e2e import splitReceived
from tests.test_inputloop import recordDispatchDepth
from tests.waiting import waitUntil

SEED = int(os.environ.get("FUZZ_SEED", "20261201"))
SESSIONS = int(os.environ.get("FUZZ_SESSIONS", "200"))

MAX_SIZE = 30000
MAX_ERRORS = 20
#: The server's max_recipients: above 100, where the recursion of issue 18
#: defect 3 used to end sessions.
MAX_RECIPIENTS = 120
#: How many more frames than the shallowest dispatch the deepest may take.
MAX_EXTRA_FRAMES = 20
#: RFC 5321 4.5.3.1.4: a command line is at most 510 octets without CRLF.
MAX_COMMAND_LINE = 510
#: RFC 4954 4: an AUTH line is at most 12286 octets without CRLF.
MAX_AUTH_LINE = 12286
#: Characters for which str.isdigit() is true but that are not DIGIT.
UNICODE_DIGITS = ["\u00b2", "\u00b3", "\uff11", "\uff19", "\u0663", "\u09e7", "\u2460"]
#: Seconds a session may take for one reply or for its close.
BOUND = 10.0

ALLOWED = ["ik@mijnbedrijf.nl", "aangifte@mijnbedrijf.nl", "X.Y@MIJNBEDRIJF.NL"]
DENIED = ["ik@anderbedrijf.nl", "evil@example.com", "ik@mijnbedrijf.nl.evil.nl"]
RECIPIENTS = ["belastingdienst@overheid.nl", "douane@overheid.nl", "a@b.nl"]
COMMANDS = [
    b"NOOP",
    b"RSET",
    b"EHLO fuzz.example.nl",
    b"HELO fuzz.example.nl",
    b"HELP",
    b"VRFY ik",
    b"EXPN list",
    b"MAIL FROM:<ik@mijnbedrijf.nl>",
    b"MAIL FROM:<ik>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<ik@mijnbedrijf.nl> SIZE=99999999",
    b"MAIL FROM:<ik@mijnbedrijf.nl> BODY=8BITMIME",
    b"MAIL FROM:ik@mijnbedrijf.nl",
    b"RCPT TO:<belastingdienst@overheid.nl>",
    b"RCPT TO:<postmaster>",
    b"DATA",
    b"DATA now",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH CRAM-MD5",
    b"AUTH PLAIN =",
    b"AUTH PLAIN !!!",
    b"STARTTLS",
    b"BDAT 10 LAST",
    b"QUIT now",
    b"QUIT",
    b"",
    b".",
    b"..",
    b" ",
]
PLAINTEXT_COMMANDS = [c for c in COMMANDS if c != b"STARTTLS"]


def plainToken(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


def stuff(lines: list[bytes]) -> bytes:
    """
    The lines as they go on the wire in DATA, with the final dot.
    """
    return (
        b"".join((b"." if line[:1] == b"." else b"") + line + b"\r\n" for line in lines)
        + b".\r\n"
    )


@attrs.define
class Step:
    """
    One thing a session sends.

    @ivar data: the bytes, sent at once.
    @ivar expect: the reply codes expected, in order, while the session is
        on its known path; L{None} for mutated or random input.
    @ivar body: the message text (wire form, final dot included) sent after
        a 354, for a transaction; its reply is C{bodyExpect}.
    @ivar bodyExpect: the refusal (code, enhanced status) after the body,
        or L{None} when the message must be accepted.
    @ivar bodyReplies: how many replies the body gets (BDAT: one per
        chunk); all but the last are 250.
    @ivar errors: how many of the replies count towards the error limit.
    @ivar delivered: the message the core must receive, for an accepted one.
    @ivar label: names the step in a failure.
    """

    data: bytes
    expect: list | None = None
    body: bytes | None = None
    bodyExpect: tuple | None = None
    bodyReplies: int = 1
    errors: int = 0
    delivered: bytes | None = None
    label: str = ""


@attrs.define
class Script:
    """
    One session: how it reaches SMTP (before TLS, STARTTLS, implicit TLS),
    then its steps.
    """

    index: int
    mode: str  # "pretls", "starttls", "implicit"
    steps: list[Step]


class Generator:
    """
    Draws the scripts of a run from one seed.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self, length: int) -> bytes:
        rng = self.rng
        alphabet = b"abcdefghij klmnop:;-=,.0123456789"
        line = bytes(rng.choice(alphabet) for _ in range(length))
        if rng.random() < 0.1:
            line += "\u00e9\u00e9n".encode()
        return b"t" + line

    def headerFields(self) -> list[bytes]:
        """
        Header fields as clients send them, odd ones included; none of them
        is a reason to refuse a message (no content policy is configured).
        """
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return [b"X-" + b"h" * rng.randrange(1, 980) + b": v"]
        if kind == 1:
            return [b"X-Folded: a", b"\tfolded " + self.text(20), b" again"]
        if kind == 2:
            return ["Subject: \u00e9\u00e9n \u20ac \u00b2".encode()]
        if kind == 3:
            return [b"NoColonHere " + self.text(10)]
        if kind == 4:
            return [b": empty name", b"X-Empty:"]
        if kind == 5:
            return [b"X-Nul: a\x00b", b"X-Control: \x01\x1b\x7f"]
        if kind == 6:
            return [b"X-Many-%d: v" % n for n in range(rng.randrange(20, 200))]
        if kind == 7:
            return [b"From: evil@example.com", b"Sender: <>"]
        if kind == 8:
            return [b"X-Long: " + b"v" * (998 - 8)]
        return [b'Content-Type: text/plain; charset="utf-8"; x=' + self.text(30)]

    def validLines(self, label: str) -> list[bytes]:
        rng = self.rng
        lines = [
            b"From: ik@mijnbedrijf.nl",
            b"To: belastingdienst@overheid.nl",
            b"Subject: fuzz " + label.encode(),
            b"Message-ID: <" + label.encode() + b"@mijnbedrijf.nl>",
        ]
        if rng.random() < 0.3:
            for _ in range(rng.randrange(1, 4)):
                lines += self.headerFields()
        lines.append(b"")
        for _ in range(rng.randrange(0, 40)):
            kind = rng.random()
            if kind < 0.5:
                lines.append(self.text(rng.randrange(0, 80)))
            elif kind < 0.7:
                lines.append(b"." * rng.randrange(1, 4) + self.text(rng.randrange(10)))
            elif kind < 0.75:
                lines.append(b".")
            elif kind < 0.85:
                # At the line-length edge, with and without the dot.
                prefix = rng.choice([b"", b"."])
                lines.append(prefix + b"w" * (998 - len(prefix)))
            else:
                lines.append(b"")
        return lines

    def envelope(self, sender: str, recipients: list[str]) -> bytes:
        data = b"MAIL FROM:<" + sender.encode() + b">\r\n"
        for r in recipients:
            data += b"RCPT TO:<" + r.encode() + b">\r\n"
        return data + b"DATA\r\n"

    def transaction(self, label: str) -> Step:
        """
        A transaction the rules accept, or one they refuse, with the exact
        replies of the known path.
        """
        rng = self.rng
        recipients = rng.sample(RECIPIENTS, rng.randrange(1, 4))
        rcptCodes = [250] * len(recipients)
        kind = rng.choice(
            ["valid"] * 5
            + ["bareLF", "bareCR", "smuggle", "long", "dotLong", "huge", "denied"]
        )
        lines = self.validLines(label)
        if kind == "denied":
            sender = rng.choice(DENIED)
            return Step(
                self.envelope(sender, recipients),
                expect=[553] + [503] * len(recipients) + [503],
                errors=2 + len(recipients),
                label=f"{label} denied",
            )
        sender = rng.choice(ALLOWED)
        at = rng.randrange(5, len(lines) + 1)
        if kind == "bareLF":
            lines.insert(at, b"bare" + rng.choice([b"\n", b"\n.", b"\nx"]) + b"end")
            refusal = (550, b"5.5.2")
        elif kind == "bareCR":
            lines.insert(at, b"bare" + rng.choice([b"\r", b"\r.", b"x\r"]))
            refusal = (550, b"5.5.2")
        elif kind == "smuggle":
            lines.insert(
                at,
                b"hi\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<x@overheid.nl>\n"
                b"DATA\nsmuggled\n.",
            )
            refusal = (550, b"5.5.2")
        elif kind == "long":
            lines.insert(at, b"l" * rng.choice([999, 1000, 5000, 70000]))
            refusal = (550, b"5.6.0")
        elif kind == "dotLong":
            lines.insert(at, b"." + b"d" * 998)
            refusal = (550, b"5.6.0")
        elif kind == "huge":
            lines += [b"h" * 900] * (MAX_SIZE // 900 + 1)
            refusal = (552, b"5.3.4")
        else:
            refusal = None
        content = b"".join(line + b"\r\n" for line in lines)
        if rng.random() < 0.5:
            if refusal is not None and len(content) > MAX_SIZE:
                # A chunk declares its size first: that refusal comes
                # before any of its lines is judged.
                refusal = (552, b"5.3.4")
            body, replies = self.chunks(content, single=refusal is not None)
            return Step(
                self.envelope(sender, recipients)[: -len(b"DATA\r\n")],
                expect=[250] + rcptCodes,
                body=body,
                bodyExpect=refusal,
                bodyReplies=replies,
                errors=1 if refusal else 0,
                delivered=None if refusal else content,
                label=f"{label} {kind} BDAT",
            )
        return Step(
            self.envelope(sender, recipients),
            expect=[250] + rcptCodes + [354],
            body=stuff(lines),
            bodyExpect=refusal,
            errors=1 if refusal else 0,
            delivered=None if refusal else content,
            label=f"{label} {kind}",
        )

    def chunks(self, content: bytes, single: bool) -> tuple[bytes, int]:
        """
        C{content} as BDAT chunks cut at random (one C{LAST} chunk when
        C{single}, for a message refused at its only reply), sometimes
        with an empty C{BDAT 0 LAST}.

        @return: the bytes and how many replies they get.
        """
        rng = self.rng
        cuts = (
            []
            if single
            else sorted(rng.sample(range(len(content) + 1), rng.randrange(0, 4)))
        )
        ends = zip([0] + cuts, cuts + [len(content)], strict=True)
        pieces = [content[a:b] for a, b in ends]
        if not single and rng.random() < 0.2:
            pieces.append(b"")
        data = b""
        for n, piece in enumerate(pieces):
            last = b" LAST" if n == len(pieces) - 1 else b""
            data += rng.choice([b"BDAT", b"bdat"]) + b" %d%s\r\n" % (len(piece), last)
            data += piece
        return data, len(pieces)

    def parameters(self) -> tuple[bytes, int, int]:
        """
        ESMTP parameters, with the reply each gets after MAIL and after RCPT
        (RFC 5321 4.1.2: first the grammar, 501; then the keyword, 555 when
        the command does not know it, and RCPT knows none; then duplicates,
        501; then the value, 501; SIZE over the limit 552).

        @return: (parameters, MAIL's code, RCPT's code).
        """
        rng = self.rng
        kind = rng.randrange(13)
        if kind == 0:
            parts = [b"SIZE=%d" % rng.randrange(MAX_SIZE + 1)]
            if rng.random() < 0.5:
                parts.append(rng.choice([b"BODY=7BIT", b"body=8bitmime"]))
            if rng.random() < 0.3:
                parts.append(
                    rng.choice(
                        [b"AUTH=<>", b"AUTH=ik+40mijnbedrijf.nl", b"auth=a@b.nl"]
                    )
                )
            rng.shuffle(parts)
            return rng.choice([b" ", b"  ", b"\t"]).join(parts), 250, 555
        if kind == 1:
            return b"SIZE=%d" % rng.randrange(MAX_SIZE + 1, 10**20), 552, 555
        if kind == 2:
            digits = "".join(
                rng.choice(UNICODE_DIGITS + ["1", "0"]) for _ in range(rng.randrange(4))
            )
            digits += rng.choice(UNICODE_DIGITS)
            return ("SIZE=" + digits).encode(), 501, 501
        if kind == 3:
            return b"SIZE=" + b"9" * rng.randrange(21, 60), 501, 555
        if kind == 4:
            control = rng.choice([b"\x00", b"\x01", b"\x0b", b"\x0c", b"\x1b", b"\x7f"])
            word = rng.choice([b"BODY=7B%sIT", b"SIZE=1%s0", b"AUTH=a%sb"])
            return word % control, 501, 501
        if kind == 5:
            return b"AUTH=" + b"a" * rng.randrange(50, 700), 250, 555
        if kind == 6:
            unknown = [b"X-P%d=v" % n for n in range(rng.randrange(2, 80))]
            return b" ".join(unknown), 555, 555
        if kind == 7:
            word = rng.choice([b"BODY=7BIT", b"SIZE=10", b"AUTH=<>"])
            count = rng.randrange(2, 60)
            return b" ".join([word] * count), 501, 555
        if kind == 8:
            # Issue 21: MAIL's and RCPT's own, and each in the wrong command.
            return rng.choice(
                [
                    (b"RET=HDRS", 250, 555),
                    (b"ENVID=x+2By", 250, 555),
                    (b"SMTPUTF8", 250, 555),
                    (b"REQUIRETLS", 250, 555),
                    (b"BODY=BINARYMIME", 250, 555),
                    (b"NOTIFY=NEVER", 555, 250),
                    (b"NOTIFY=success,DELAY", 555, 250),
                    (b"ORCPT=rfc822;a+40b.nl", 555, 250),
                    (b"RET=ALL", 501, 555),
                    (b"ENVID=a+zz", 501, 555),
                    (b"ENVID=" + b"e" * 101, 501, 555),
                    (b"SMTPUTF8=yes", 501, 555),
                    (b"RET=FULL RET=HDRS", 501, 555),
                    (b"NOTIFY=NEVER,DELAY", 555, 501),
                    (b"ORCPT=x;y", 555, 501),
                    (b"ORCPT=rfc822;", 555, 501),
                    ("NOTIFY=N\u00c9VER".encode(), 501, 501),
                ]
            )
        if kind == 9:
            keywords = ["\u017fIZE=1", "\uff33\uff29\uff3a\uff25=1", "BO\u1e0cY=7BIT"]
            return rng.choice(keywords).encode(), 501, 501
        if kind == 10:
            return rng.choice([b"SIZE=", b"BODY=", b"=1", b"-X=1", b"X_Y=1"]), 501, 501
        if kind == 11:
            return rng.choice(["AUTH=\u00e9", "BODY=7B\u0130T"]).encode(), 501, 501
        return (
            rng.choice([b"BODY=BINARY", b"AUTH=a+zz", b"BODY", b"SIZE"]),
            501,
            555,
        )

    def parameterStep(self, label: str) -> Step:
        """
        MAIL, or MAIL and RCPT, with drawn parameters, then RSET.
        """
        params, mailCode, rcptCode = self.parameters()
        label = f"{label} parameters {params[:40]!r}"
        if self.rng.random() < 0.5:
            line = b"MAIL FROM:<ik@mijnbedrijf.nl> " + params
            code = 500 if len(line) > MAX_COMMAND_LINE else mailCode
            return Step(
                line + b"\r\nRSET\r\n",
                expect=[code, 250],
                errors=int(code >= 500),
                label=label,
            )
        line = b"RCPT TO:<belastingdienst@overheid.nl> " + params
        code = 500 if len(line) > MAX_COMMAND_LINE else rcptCode
        return Step(
            b"MAIL FROM:<ik@mijnbedrijf.nl>\r\n" + line + b"\r\nRSET\r\n",
            expect=[250, code, 250],
            errors=int(code >= 500),
            label=label,
        )

    def authArguments(self) -> list[Step]:
        """
        AUTH arguments a login does not get past, each with its reply
        (RFC 4954): bad base64 and a SASL response or initial response
        over 12288 octets end the exchange, an unknown mechanism is 504.
        """
        rng = self.rng
        kind = rng.randrange(7)
        if kind == 0:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
            token = bytearray(base64.b64encode(raw))
            at = rng.randrange(len(token) + 1)
            token[at:at] = rng.choice(
                [b"!", b"*", b"-", b"_", b"\xc3\xa9", b"\x00", b"=A"]
            )
            line = b"AUTH PLAIN " + bytes(token)
            return [Step(line + b"\r\n", expect=[501], errors=1, label="bad base64")]
        if kind == 1:
            line = rng.choice([b"AUTH PLAIN =", b"AUTH LOGIN ="])
            return [Step(line + b"\r\n", expect=[501], errors=1, label="=")]
        if kind == 2:
            token = base64.b64encode(b"\0alice\0" + b"p" * rng.randrange(8900, 9300))
            line = b"AUTH PLAIN " + token
            code = 500 if len(line) > MAX_AUTH_LINE else 501
            return [Step(line + b"\r\n", expect=[code], errors=1, label="huge")]
        if kind == 3:
            response = b"QUFB" * rng.randrange(3072, 5000)
            return [
                Step(
                    b"AUTH LOGIN\r\n" + response + b"\r\n",
                    expect=[334, 500],
                    errors=1,
                    label="huge response",
                )
            ]
        if kind == 4:
            return [
                Step(b"AUTH LOGIN\r\n*\r\n", expect=[334, 501], errors=1, label="*")
            ]
        if kind == 5:
            mechanism = rng.choice(
                [b"FOO", b"CRAM-MD5", b"GSSAPI", "PLA\u0130N".encode(), b"X" * 40]
            )
            return [Step(b"AUTH " + mechanism + b"\r\n", expect=[504], errors=1)]
        line = rng.choice([b"AUTH", b"AUTH PLAIN a b", b"AUTH  "])
        return [Step(line + b"\r\n", expect=[501], errors=1, label="syntax")]

    def deepPipeline(self, label: str) -> Step:
        """
        MAIL, up to C{MAX_RECIPIENTS} + 30 RCPT and NOOP in one write, then
        RSET or DATA and a message: past the limit each RCPT gets 452.
        """
        rng = self.rng
        count = rng.choice(
            [
                rng.randrange(1, MAX_RECIPIENTS + 31),
                rng.randrange(MAX_RECIPIENTS - 2, MAX_RECIPIENTS + 31),
            ]
        )
        accepted = min(count, MAX_RECIPIENTS)
        data = (
            b"MAIL FROM:<ik@mijnbedrijf.nl>\r\n"
            + b"".join(b"RCPT TO:<r%d@overheid.nl>\r\n" % n for n in range(count))
            + b"NOOP\r\n"
        )
        expect = [250] + [250] * accepted + [452] * (count - accepted) + [250]
        label = f"{label} depth {count}"
        if rng.random() < 0.5:
            return Step(data + b"RSET\r\n", expect=expect + [250], label=label)
        lines = self.validLines(label)
        return Step(
            data + b"DATA\r\n",
            expect=expect + [354],
            body=stuff(lines),
            delivered=b"".join(line + b"\r\n" for line in lines),
            label=label,
        )

    def command(self, plaintext: bool = False) -> bytes:
        """
        A command line.  Before TLS never STARTTLS: a client that sends
        plaintext after "220 Ready to start TLS" is a TLS handshake that
        never completes, ended by the handshake deadline, not by SMTP.
        """
        choices = PLAINTEXT_COMMANDS if plaintext else COMMANDS
        return self.rng.choice(choices) + b"\r\n"

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        data = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            op = rng.random()
            at = rng.randrange(len(data) + 1)
            if op < 0.25 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif op < 0.45:
                data[at:at] = rng.choice(
                    [b"\r", b"\n", b"\r\n", b".", b"\r\n.\r\n", b"\x00"]
                )
            elif op < 0.6:
                del data[at : at + rng.randrange(1, 8)]
            elif op < 0.7:
                data = data[:at]
            elif op < 0.8:
                data[at:at] = data[max(0, at - 20) : at]
            else:
                data[at:at] = bytes(
                    rng.randrange(256) for _ in range(rng.randrange(1, 30))
                )
        return bytes(data)

    def garbage(self, plaintext: bool = False) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.3:
            return (
                bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
                + b"\r\n"
            )
        if kind < 0.5:
            return (
                b"NOOP " + b"x" * rng.choice([505, 506, 600, 13000, 100000]) + b"\r\n"
            )
        if kind < 0.65:
            return rng.choice(
                [b"NOOP\n", b"NOOP\r", b"\n", b"\r", b"\r\r\n", b"RSET\nQUIT\n"]
            )
        if kind < 0.8:
            return b"".join(
                self.command(plaintext) for _ in range(rng.randrange(2, 30))
            )
        return b"." * rng.randrange(1, 5) + b"\r\n"

    def auth(self) -> list[Step]:
        rng = self.rng
        steps = []
        if rng.random() < 0.3:
            for _ in range(rng.randrange(1, 3)):
                steps += self.authArguments()
        kind = rng.random()
        if kind < 0.1:
            steps.append(
                Step(
                    b"AUTH PLAIN " + plainToken(b"alice", b"guess") + b"\r\n",
                    expect=[535],
                    errors=1,
                )
            )
        elif kind < 0.2:
            steps.append(Step(b"AUTH PLAIN not*base64\r\n", expect=[501], errors=1))
        if rng.random() < 0.2:
            steps.append(Step(b"AUTH LOGIN\r\n", expect=[334]))
            steps.append(Step(base64.b64encode(b"alice") + b"\r\n", expect=[334]))
            steps.append(Step(base64.b64encode(b"wonderland") + b"\r\n", expect=[235]))
        else:
            steps.append(
                Step(
                    b"AUTH PLAIN " + plainToken(b"alice", b"wonderland") + b"\r\n",
                    expect=[235],
                )
            )
        return steps

    def script(self, index: int) -> Script:
        rng = self.rng
        if rng.random() < 0.1:
            steps = [Step(self.command(True)) for _ in range(rng.randrange(1, 10))]
            if rng.random() < 0.5:
                steps.append(Step(self.garbage(True)))
            return Script(index, "pretls", steps)
        mode = rng.choice(["starttls", "implicit"])
        steps = self.auth()
        for n in range(rng.randrange(1, 9)):
            label = f"{index}.{n}"
            kind = rng.random()
            if kind < 0.1:
                steps.append(self.parameterStep(label))
                continue
            if kind < 0.17:
                steps.append(self.deepPipeline(label))
                continue
            kind = rng.random()
            if kind < 0.45:
                step = self.transaction(label)
                if rng.random() < 0.2:
                    # Mutated: sent whole, without waiting for replies.
                    data = step.data + (step.body or b"")
                    step = Step(self.mutate(data), label=label + " mutated")
                steps.append(step)
            elif kind < 0.65:
                command = self.command()
                steps.append(
                    Step(self.mutate(command) if rng.random() < 0.5 else command)
                )
            elif kind < 0.85:
                steps.append(Step(self.garbage()))
            else:
                # A pipelined burst of anything.
                burst = b"".join(
                    rng.choice(
                        [self.command(), self.garbage(), self.transaction(label).data]
                    )
                    for _ in range(rng.randrange(2, 6))
                )
                steps.append(Step(burst, label=label + " burst"))
        return Script(index, mode, steps)


@attrs.define
class Outcome:
    index: int
    queued: list[str] = attrs.Factory(list)
    expected: dict = attrs.Factory(dict)
    problems: list[str] = attrs.Factory(list)
    replies: list[bytes] = attrs.Factory(list)


#: A BDAT command's size, wherever it is in what a session sent.
BDAT_SIZE = re.compile(rb"(?i)BDAT[ \t]+([0-9]{1,20})")
#: The most octets sent to complete a BDAT chunk that may be pending when
#: a session ends; one declared larger waits for its deadline, and its
#: session is closed by the client.
FILLER = 4 * MAX_SIZE

QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-F]{18})$")


def runScript(msa, script: Script) -> Outcome:
    """
    Run one session (in a thread).  Problems are collected, not raised.
    """
    outcome = Outcome(script.index)
    implicit = script.mode == "implicit"
    port = msa.implicitPort if implicit else msa.starttlsPort
    client = RawSession(port, msa.clientContext(), implicit=implicit)
    client.settimeout(BOUND)
    onPath = True
    errors = 0
    try:
        if script.mode == "pretls":
            client.reply()
            onPath = False
        else:
            client.secure(implicit=implicit)
        for step in script.steps:
            if not onPath or step.expect is None or errors + step.errors > MAX_ERRORS:
                onPath = False
                client.send(step.data + (step.body or b""))
                continue
            client.send(step.data)
            codes = [client.reply()[0] for _ in step.expect]
            if codes != step.expect:
                outcome.problems.append(
                    f"{step.label}: replies {codes}, expected {step.expect}"
                )
                onPath = False
                continue
            errors += step.errors
            if step.body is not None:
                client.send(step.body)
                for _ in range(step.bodyReplies - 1):
                    code, lines = client.reply()
                    if code != 250:
                        outcome.problems.append(
                            f"{step.label}: {client.replies[-1]!r} for a chunk"
                        )
                code, lines = client.reply()
                last = client.replies[-1]
                if step.bodyExpect is None:
                    match = QUEUED.match(last)
                    if match is None:
                        outcome.problems.append(
                            f"{step.label}: {last!r} for a valid message"
                        )
                    else:
                        outcome.expected[match.group(1).decode()] = step.delivered
                elif (code, last[4:9]) != step.bodyExpect:
                    outcome.problems.append(
                        f"{step.label}: {last!r}, expected {step.bodyExpect}"
                    )
        unbounded = False
        if not onPath:
            # A BDAT (mutated, cut, random) may still wait for octets: they
            # are sent, so that the terminator is read as commands.
            sent = b"".join(s.data + (s.body or b"") for s in script.steps)
            pending = [int(n) for n in BDAT_SIZE.findall(sent)]
            if pending:
                unbounded = max(pending) > FILLER
                client.send(b"x" * min(max(pending), FILLER) + b"\r\n")
        client.send(b"\r\n.\r\nQUIT\r\n")
        if onPath:
            # Every command so far had exactly one reply: the next ones are
            # the terminator's, and then the server closes.
            tail = client.readUntilClosed()
            if tail != terminatorReplies(errors):
                outcome.problems.append(
                    f"after the known path: {tail[:5]}, expected "
                    f"{terminatorReplies(errors)}"
                )
    except Closed:
        pass
    except TimeoutError:
        outcome.problems.append(
            f"no reply within {BOUND}s (replies so far {client.replies[-5:]})"
        )
    except OSError:
        # The server closed first (421): what it said is still read below.
        pass
    if not client.eof:
        try:
            client.readUntilClosed()
        except Exception as e:  # noqa: BLE001
            outcome.problems.append(f"reading: {e!r}")
        if not client.eof and not unbounded:
            outcome.problems.append(f"not closed within {BOUND}s after QUIT")
    client.close()
    outcome.replies = client.replies
    for line in client.replies:
        match = QUEUED.match(line)
        if match:
            outcome.queued.append(match.group(1).decode())
        if script.mode == "pretls" and line[:3] in (b"235", b"354", b"334"):
            outcome.problems.append(f"before TLS: {line!r}")
        if script.mode == "pretls" and line.startswith(
            (b"250 2.1", b"250 2.0.0 Ok: queued")
        ):
            outcome.problems.append(f"before TLS: {line!r}")
    return outcome


def terminatorReplies(errors: int) -> list[bytes]:
    """
    The replies to the terminator (an empty line, ".", QUIT) of a session
    that has made C{errors} protocol errors so far.
    """
    replies = []
    for reply in (
        b"500 5.5.2 Error: bad syntax",
        b"500 5.5.2 Error: command not recognized",
    ):
        errors += 1
        if errors > MAX_ERRORS:
            return replies + [b"421 4.7.0 localhost Error: too many errors"]
        replies.append(reply)
    return replies + [b"221 2.0.0 Bye"]


def ruleViolations(sender: str, data: bytes) -> list[str]:
    """
    What is wrong with a message the core received, by the rules (not by
    the MSA's own code).
    """
    problems = []
    local, _, domain = sender.rpartition("@")
    if not local or domain.lower() != "mijnbedrijf.nl":
        problems.append(f"sender {sender!r} not issued to the account")
    _, body = splitReceived(data)
    if body and not body.endswith(b"\r\n"):
        problems.append("does not end in CRLF")
    lines = body.split(b"\r\n")[:-1]
    if any(b"\r" in line or b"\n" in line for line in lines):
        problems.append("bare CR or LF")
    if any(len(line) > 998 for line in lines):
        problems.append("line over 998 octets")
    if len(body) > MAX_SIZE:
        problems.append(f"{len(body)} octets")
    return problems


class SessionFuzzTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_fuzzSessions(self):
        errors = []

        def observe(event):
            if event.get("log_failure") is not None or event.get("isError"):
                errors.append(event)
            elif event.get("log_level") in (
                LogLevel.error,
                LogLevel.critical,
            ):
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        depths = recordDispatchDepth(self)
        core = AiosmtpdCore(self)
        msa = RunningMSA(
            self,
            relay=core.relayConfig(),
            server={
                "max_message_size": MAX_SIZE,
                "max_errors": MAX_ERRORS,
                "max_recipients": MAX_RECIPIENTS,
                "auth_delay_base": 0,
            },
        )
        generator = Generator(SEED)
        where = f"(FUZZ_SEED={SEED}, FUZZ_SESSIONS={SESSIONS})"
        queued: dict[str, int] = {}
        expected: dict[str, bytes] = {}
        for index in range(SESSIONS):
            script = generator.script(index)
            outcome = yield threads.deferToThread(runScript, msa, script)
            if outcome.problems:
                self.fail(
                    f"session {index} {where}: {outcome.problems}; "
                    f"steps {[s.data[:80] for s in script.steps]}; "
                    f"replies {outcome.replies[-10:]}"
                )
            for queueId in outcome.queued:
                self.assertNotIn(queueId, queued, where)
                queued[queueId] = index
            expected.update(outcome.expected)
            if errors:
                self.fail(f"session {index} {where}: error logged: {errors[0]}")
        messages = yield core.waitForMessages(len(queued), timeout=60)
        # Every message the relay took is through: nothing more can arrive.
        queue = os.path.join(msa.state, "spool", "queue")
        yield waitUntil(
            lambda: not os.listdir(queue), 30, lambda: f"an empty queue {where}"
        )
        self.assertEqual(os.listdir(queue), [], where)
        delivered: dict[str, bytes] = {}
        for sender, _recipients, data, _ in core.messages:
            [queueId] = re.findall(rb"\tid ([0-9A-F]{18})[ ;]", data[:1000])
            queueId = queueId.decode()
            self.assertNotIn(queueId, delivered, f"delivered twice {where}")
            delivered[queueId] = data
            problems = ruleViolations(sender, data)
            self.assertEqual(
                problems,
                [],
                f"{queueId} from session {queued.get(queueId)} {where}: {data[:300]!r}",
            )
        self.assertEqual(sorted(delivered), sorted(queued), where)
        for queueId, body in expected.items():
            self.assertEqual(splitReceived(delivered[queueId])[1], body, where)
        self.assertEqual(errors, [], where)
        # However deep the pipeline, no line was dispatched deeper than a
        # few frames below the shallowest one.
        self.assertLessEqual(max(depths) - min(depths), MAX_EXTRA_FRAMES, where)
        # The run exercised what it should.
        self.assertGreater(len(expected), SESSIONS // 10, where)
        self.assertGreater(len(messages), 0)
