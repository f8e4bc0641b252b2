# -*- test-case-name: tests.test_mutants -*-
"""
Tests that kill the mutants C{tools/mutate.py} found surviving (issue 10,
"a mutation check"): each pins down a limit or a step that the existing
tests did not notice being removed.

  - the 256-octet path limit, at 256 and 257 octets, over the protocol;
  - the "no From:" refusal of an account with C{requireHeaderFrom};
  - the directory fsync after the rename of a commit (and after the
    removal; none for an update, written in place);
  - L{Spool.pending} requiring an earlier version's C{.msg} file beside
    its C{.json};
  - smaller edges of the address parser and the line framer.
"""

import json
import os
import stat
import time

from twisted.internet import defer, task
from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.policy.authorization import (
    AccountRules,
    AddressList,
    AuthThrottle,
    RateLimiter,
)
from msa.queue import queuefile, spool
from msa.sasl import MechanismContext, digest_md5
from msa.sasl.digest_md5 import (
    DigestMD5Mechanism,
    parseDirectives,
    responseValue,
    rspauthValue,
)
from msa.submission import addresses
from msa.submission.framing import DataFilter, LineFramer
from tests.helpers import SENDERS, Harness
from tests.test_authorization import FakeTime
from tests.test_spool import MESSAGE, makeEnvelope


def address(length: int, localLength: int = 64) -> str:
    """
    A valid address of C{length} octets: a local part of C{localLength},
    then a domain of labels of at most 63 octets ending in C{.nl}.
    """
    domainLength = length - localLength - 1
    labels, left = [], domainLength - 3
    while left > 0:
        size = min(63, left - 1) if left > 64 else left
        if left - size == 1:
            size -= 1
        labels.append("d" * size)
        left -= size + 1
    domain = ".".join(labels) + ".nl"
    result = "l" * localLength + "@" + domain
    assert len(result) == length and len(domain) == domainLength, result
    return result


class PathLengthProtocolTests(unittest.TestCase):
    """
    RFC 5321 4.5.3.1.3: a path is at most 256 octets.  Over the protocol,
    as RCPT TO (any recipient is served in this harness).
    """

    def setUp(self):
        self.h = Harness(self)
        self.h.login()
        self.assertEqual(
            self.h.command(b"MAIL FROM:<ik@mijnbedrijf.nl>"), [b"250 2.1.0 Ok"]
        )

    def rcpt(self, to: str) -> list[bytes]:
        return self.h.command(b"RCPT TO:<" + to.encode() + b">")

    def test_256Octets(self):
        self.assertEqual(self.rcpt(address(256)), [b"250 2.1.5 Ok"])

    def test_257Octets(self):
        self.assertEqual(
            self.rcpt(address(257)),
            [b"553 5.1.3 Address too long (RFC 5321 4.5.3.1)"],
        )

    def test_localPart64And65(self):
        self.assertEqual(self.rcpt(address(100, 64)), [b"250 2.1.5 Ok"])
        self.assertEqual(
            self.rcpt(address(100, 65)),
            [b"553 5.1.3 Address too long (RFC 5321 4.5.3.1)"],
        )


class AddressParserEdgeTests(unittest.TestCase):
    #: (MAIL or RCPT, argument, exact refusal).
    REFUSALS = [
        (
            "RCPT",
            b"TO:<@relay.nl:a@example.nl>",
            (553, "5.1.3", "Source routes are not accepted"),
        ),
        ("MAIL", b"TO:<a@example.nl>", (501, "5.5.4", "Syntax: MAIL FROM:<address>")),
        ("RCPT", b"FROM:<a@example.nl>", (501, "5.5.4", "Syntax: RCPT TO:<address>")),
        (
            "RCPT",
            b"TO:<\xff@example.nl>",
            (553, "5.6.7", "Non-ASCII addresses are not supported (no SMTPUTF8)"),
        ),
        # A backslash escapes only inside a quoted string: outside, the ">"
        # after it closes the path, and the rest is a syntax error.
        (
            "RCPT",
            b"TO:<a\\>b@example.nl>",
            (501, "5.5.4", "Syntax error after the address"),
        ),
        (
            "MAIL",
            b"FROM:<a@example.nl> SIZE=",
            (501, "5.5.4", "Bad parameter syntax: SIZE="),
        ),
        ("MAIL", b"FROM:<a@example.nl> -X", (501, "5.5.4", "Bad parameter syntax: -X")),
        ("MAIL", b"FROM:<a@example.nl> =1", (501, "5.5.4", "Bad parameter syntax: =1")),
        (
            "MAIL",
            b"FROM:<a@example.nl> FOO",
            (555, "5.5.4", "Unsupported parameter: FOO"),
        ),
        (
            "MAIL",
            b"FROM:<a@example.nl> SIZE",
            (501, "5.5.4", "SIZE needs a number of octets"),
        ),
        (
            "MAIL",
            b"FROM:<a@example.nl> BODY",
            (501, "5.5.4", "BODY must be 7BIT or 8BITMIME"),
        ),
    ]

    def test_refusals(self):
        parsers = {
            "MAIL": addresses.parseMailArgument,
            "RCPT": addresses.parseRcptArgument,
        }
        for verb, argument, reply in self.REFUSALS:
            # As a server without the extensions of issue 21 answers them.
            error = self.assertRaises(SMTPReply, parsers[verb], argument, frozenset())
            self.assertEqual((error.code, error.status, error.text), reply, argument)

    def test_accepted(self):
        """
        An escaped quote does not end the quoted string, so the C{>} after
        it is part of the local part, not the end of the path; parameters
        are upper-cased.
        """
        self.assertEqual(
            addresses.parseRcptArgument(b'TO:<"a\\">b"@example.nl>'),
            ('"a\\">b"@example.nl', {}),
        )
        self.assertEqual(
            addresses.parseMailArgument(b"FROM:<a@example.nl> SIZE=10 BODY=8bitmime"),
            ("a@example.nl", {"SIZE": "10", "BODY": "8BITMIME"}),
        )


class HeaderFromRequiredTests(unittest.TestCase):
    """
    An account with C{requireHeaderFrom}: a message without any From:
    mailbox is refused after the final dot, and nothing is queued.
    """

    def submit(self, message: bytes) -> list[bytes]:
        h = Harness(
            self,
            realmArgs={
                "extras": {
                    "alice": {"senders": list(SENDERS), "requireHeaderFrom": True}
                }
            },
        )
        h.login()
        h.transaction(sender=b"ik@mijnbedrijf.nl")
        self.spool = h.spool
        return h.send(message)

    def test_noFromRefused(self):
        reply = self.submit(b"To: b@example.nl\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(reply, [b"550 5.7.1 Message refused: no From: address"])
        self.assertEqual(self.spool.committed, [])

    def test_emptyFromRefused(self):
        reply = self.submit(b"From: \r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(reply, [b"550 5.7.1 Message refused: no From: address"])
        self.assertEqual(self.spool.committed, [])


class DirectoryFsyncTests(unittest.TestCase):
    """
    After a rename or an unlink in C{queue/}, the directory itself is
    fsynced, or a power loss could forget the new name although the 250
    was sent.  A real power loss cannot be produced in a test (the page
    cache survives anything short of the machine losing power, and no
    unprivileged test can cut it), so these tests observe the fsync calls
    themselves: C{os.fsync} is wrapped, and each call records whether its
    file descriptor is the queue directory and what the directory held at
    that moment.
    """

    def setUp(self):
        clock = task.Clock()
        clock.advance(1_700_000_000)
        self.spool = spool.Spool(self.mktemp(), reactor=clock)
        self.calls = []
        realFsync = os.fsync
        queueDirectory = os.path.realpath(self.spool.queueDirectory)

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target == queueDirectory:
                    self.calls.append(sorted(os.listdir(queueDirectory)))
            return realFsync(fd)

        self.patch(os, "fsync", fsync)

    def commit(self) -> str:
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(MESSAGE)
        return self.successResultOf(writer.commit())

    def test_afterCommitRename(self):
        queueId = self.commit()
        self.assertEqual(self.calls, [[queueId]])

    def test_noneForAnUpdate(self):
        """
        An update writes in place (no directory entry changes): no fsync of
        the directory, but the file's own fdatasync.
        """
        queueId = self.commit()
        entry = self.spool.load(queueId)
        entry.attempts = 2
        del self.calls[:]
        synced = []
        realFdatasync = os.fdatasync

        def fdatasync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            realFdatasync(fd)

        self.patch(os, "fdatasync", fdatasync)
        self.spool.update(entry)
        self.assertEqual(self.calls, [])
        self.assertEqual(synced, [os.path.realpath(self.spool.queuePath(queueId))])

    def test_afterRemoving(self):
        """
        L{Spool.remove}: the directory is fsynced after the queue file is
        gone.
        """
        queueId = self.commit()
        del self.calls[:]
        self.spool.remove(queueId)
        self.assertEqual(self.calls, [[]])

    def test_afterRecover(self):
        queueId = self.commit()
        open(os.path.join(self.spool.queueDirectory, "orphan.msg"), "wb").close()
        del self.calls[:]
        self.assertEqual(self.spool.recover(), [queueId])
        self.assertEqual(self.calls, [[queueId]])


class PendingNeedsMessageTests(unittest.TestCase):
    """
    L{Spool.pending} lists an earlier version's entry only when both its
    files are there: a state file without its message cannot be delivered.
    """

    def test_stateWithoutMessage(self):
        clock = task.Clock()
        s = spool.Spool(self.mktemp(), reactor=clock)
        writer = s.newMessage(makeEnvelope())
        writer.write(MESSAGE)
        queueId = self.successResultOf(writer.commit())
        with open(os.path.join(s.queueDirectory, "lonely.json"), "wb") as f:
            f.write(b"{}")
        open(os.path.join(s.queueDirectory, "other.msg"), "wb").close()
        self.assertEqual(s.pending(), [queueId])
        with open(os.path.join(s.queueDirectory, "other.json"), "wb") as f:
            f.write(b"{}")
        self.assertEqual(s.pending(), [queueId, "other"])


class LineFramerEdgeTests(unittest.TestCase):
    """
    L{LineFramer.completeLines} and L{LineFramer.skip}, the block path's
    view of the buffer.
    """

    def test_completeLines(self):
        framer = LineFramer()
        self.assertEqual(framer.completeLines(), b"")
        framer.feed(b"one\r\ntwo\r\nthr")
        self.assertEqual(framer.completeLines(), b"one\r\ntwo\r\n")
        framer.skip(5)
        self.assertEqual(framer.completeLines(), b"two\r\n")
        self.assertEqual(framer.buffered, 8)
        framer.skip(5)
        self.assertEqual(framer.completeLines(), b"")
        framer.feed(b"ee\r\n")
        self.assertEqual(framer.completeLines(), b"three\r\n")
        self.assertEqual(framer.nextLine(100), (b"three", False))

    def test_noCompleteLinesWhileDiscarding(self):
        framer = LineFramer()
        framer.feed(b"x" * 20)
        self.assertIsNone(framer.nextLine(10))
        framer.feed(b"y\r\nz\r\n")
        self.assertEqual(framer.completeLines(), b"")
        self.assertEqual(framer.nextLine(10), (b"x" * 10, True))
        self.assertEqual(framer.completeLines(), b"z\r\n")

    def test_clear(self):
        framer = LineFramer()
        framer.feed(b"x" * 20)
        framer.nextLine(10)
        framer.feed(b"a\r\nb")
        framer.clear()
        self.assertEqual(framer.buffered, 0)
        framer.feed(b"c\r\n")
        self.assertEqual(framer.nextLine(10), (b"c", False))

    def test_edgeOfTheLimitWithoutCRLF(self):
        """
        Without a CRLF yet, up to C{maxLength + 1} bytes are kept (the line
        and a CR); one more and the line is known to be too long.
        """
        framer = LineFramer()
        framer.feed(b"x" * 11)
        self.assertIsNone(framer.nextLine(10))
        framer.feed(b"\r\n")
        self.assertEqual(framer.nextLine(10), (b"x" * 10, True))
        framer.feed(b"x" * 12)
        self.assertIsNone(framer.nextLine(10))
        framer.feed(b"\r\n")
        self.assertEqual(framer.nextLine(10), (b"x" * 10, True))
        framer.feed(b"x" * 10 + b"\r")
        self.assertIsNone(framer.nextLine(10))
        framer.feed(b"\n")
        self.assertEqual(framer.nextLine(10), (b"x" * 10, False))

    def test_freshFramerIsEmpty(self):
        framer = LineFramer()
        self.assertEqual(framer.buffered, 0)
        self.assertIsNone(framer.nextLine(10))
        framer.feed(b"abc")
        self.assertEqual(framer.completeLines(), b"")
        framer.feed(b"\r\n\r\n")
        self.assertEqual(framer.completeLines(), b"abc\r\n\r\n")

    def test_emptyLineIsComplete(self):
        framer = LineFramer()
        framer.feed(b"\r\n")
        self.assertEqual(framer.completeLines(), b"\r\n")

    def test_overLongLineNotKept(self):
        """
        Memory is bounded: once a line is known to be too long, its bytes
        are dropped from the buffer (only the first C{maxLength} are kept
        aside), and taken lines do not stay in the buffer either.
        """
        framer = LineFramer()
        framer.feed(b"ab\r\n" + b"x" * 12)
        self.assertEqual(framer.nextLine(10), (b"ab", False))
        self.assertIsNone(framer.nextLine(10))
        self.assertEqual(framer.buffered, 0)
        framer.feed(b"x" * 11 + b"\r")
        self.assertIsNone(framer.nextLine(10))
        self.assertEqual(framer.buffered, 1)
        framer.feed(b"\nnext\r\n")
        self.assertEqual(framer.nextLine(10), (b"x" * 10, True))
        self.assertEqual(framer.nextLine(10), (b"next", False))
        framer.feed(b"more\r\n" * 100)
        for _ in range(100):
            framer.nextLine(10)
        framer.feed(b"last")
        self.assertEqual(len(framer._buffer), 4)


class DataBlockEdgeTests(unittest.TestCase):
    """
    L{DataFilter.blockReceived} takes a block only when every line in it is
    ordinary; otherwise it changes nothing and says L{None}.
    """

    def test_ordinaryBlock(self):
        f = DataFilter(maxSize=100)
        self.assertEqual(f.blockReceived(b"a\r\n..b\r\n.c\r\n"), b"a\r\n.b\r\nc\r\n")
        self.assertEqual(f.size, 10)
        self.assertEqual(f.blockReceived(b".\r\n"[1:] + b"d\r\n"), b"\r\nd\r\n")
        self.assertEqual(f.size, 15)

    def test_notAfterARefusal(self):
        f = DataFilter(maxSize=100)
        first = SMTPReply(550, "5.7.1", "first")
        f.refuse(first)
        f.refuse(SMTPReply(552, "5.3.4", "second"))
        self.assertIs(f.error, first)
        self.assertIsNone(f.blockReceived(b"a\r\n"))
        self.assertEqual(f.size, 0)

    def test_finalDot(self):
        f = DataFilter(maxSize=100)
        self.assertIsNone(f.blockReceived(b"a\r\n.\r\n"))
        self.assertIsNone(f.blockReceived(b".\r\n"))
        self.assertEqual(f.size, 0)

    def test_bareCROrLF(self):
        f = DataFilter(maxSize=100)
        self.assertIsNone(f.blockReceived(b"a\rb\r\n"))
        self.assertIsNone(f.blockReceived(b"a\nb\r\n"))
        self.assertEqual(f.size, 0)

    def test_lineLength(self):
        """
        The default limit is 998 octets without the CRLF (RFC 5321
        4.5.3.1.6); a longer line goes the line-by-line way.
        """
        f = DataFilter(maxSize=10000)
        self.assertEqual(f.blockReceived(b"x" * 998 + b"\r\n"), b"x" * 998 + b"\r\n")
        self.assertIsNone(f.blockReceived(b"y\r\n" + b"x" * 999 + b"\r\n"))
        self.assertEqual(f.size, 1000)
        refused = DataFilter(maxSize=10000)
        self.assertIsNone(refused.lineReceived(b"x" * 998, True))
        self.assertIn("longer than 1000 octets", refused.error.text)

    def test_size(self):
        f = DataFilter(maxSize=10)
        self.assertIsNone(f.blockReceived(b"abcdefghi\r\n"))
        self.assertEqual(f.blockReceived(b"abcdefgh\r\n"), b"abcdefgh\r\n")
        self.assertEqual(f.size, 10)
        self.assertIsNone(f.blockReceived(b"\r\n"))
        self.assertEqual(f.size, 10)


class AuthorizationRuleEdgeTests(unittest.TestCase):
    def test_addressListTruth(self):
        self.assertFalse(AddressList())
        self.assertTrue(AddressList.parse(["ik@mijnbedrijf.nl"]))
        self.assertTrue(AddressList.parse(["@mijnbedrijf.nl"]))

    def test_fieldTypes(self):
        for extra, message in [
            (
                {"requireHeaderFrom": "yes"},
                "key 'requireHeaderFrom' must be true or false",
            ),
            ({"senders": "@mijnbedrijf.nl"}, "key 'senders' must be a list"),
            ({"recipients": None}, "key 'recipients' must be a list"),
        ]:
            error = self.assertRaises(ValueError, AccountRules.fromExtra, extra)
            self.assertEqual(str(error), message)

    def test_dayWindowEdge(self):
        """
        A message counts against the day for exactly 86,400 seconds.
        """
        clock = FakeTime()
        limiter = RateLimiter(clock)
        rules = AccountRules(messagesPerDay=1)
        limiter.reserve("acme", rules).commit()
        clock.now += 86399
        error = self.assertRaises(SMTPReply, limiter.reserve, "acme", rules)
        self.assertIn("1 messages per day", error.text)
        self.assertIn("try again in 2 seconds", error.text)
        clock.now += 1
        limiter.reserve("acme", rules).commit()

    def test_minuteWindowEdge(self):
        clock = FakeTime()
        limiter = RateLimiter(clock)
        rules = AccountRules(messagesPerMinute=1)
        limiter.reserve("acme", rules).commit()
        clock.now += 59
        self.assertRaises(SMTPReply, limiter.reserve, "acme", rules)
        clock.now += 1
        limiter.reserve("acme", rules).commit()

    def test_sentTimesForgottenAfterADay(self):
        """
        Memory is bounded: send times older than a day are dropped when the
        next message is counted.
        """
        clock = FakeTime()
        limiter = RateLimiter(clock)
        limiter.record("acme")
        clock.now += 1
        limiter.record("acme")
        clock.now += 86399
        limiter.record("acme")
        sent = limiter._sent["acme"]
        seconds = [second for second, _ in sent.older + sent.recent]
        self.assertEqual(seconds, [clock.now - 86399, clock.now])


def openDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class SpoolEdgeTests(unittest.TestCase):
    """
    The spool's smaller promises: what is fsynced with what on disk,
    descriptors closed, file modes, queue ids, refusals of a closed writer,
    and the cleanup of a failed or aborted commit.
    """

    def setUp(self):
        clock = task.Clock()
        clock.advance(1_700_000_000)
        self.directory = os.path.abspath(self.mktemp())
        self.spool = spool.Spool(self.directory, reactor=clock)

    def writer(self, data: bytes = MESSAGE):
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(data)
        return writer

    def test_fsyncedWithTheirContent(self):
        """
        The queue file is fsynced once it holds all its bytes: the message
        (its buffer flushed first) behind its state.
        """
        fsynced = {}
        realFsync = os.fsync

        def fsync(fd):
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                path = os.readlink(f"/proc/self/fd/{fd}")
                fsynced[os.path.basename(path)] = os.fstat(fd).st_size
            return realFsync(fd)

        self.patch(os, "fsync", fsync)
        writer = self.writer()
        queueId = self.successResultOf(writer.commit())
        entry = self.spool.load(queueId)
        self.assertEqual(fsynced, {queueId: entry.contentOffset + len(MESSAGE)})
        self.assertEqual(os.path.getsize(entry.messagePath), fsynced[queueId])

    def test_descriptorsClosed(self):
        before = openDescriptors()
        writer = self.writer()
        self.successResultOf(writer.commit())
        self.spool.update(self.spool.load(writer.queueId))
        self.spool.remove(writer.queueId)
        aborted = self.writer()
        aborted.abort()
        self.assertEqual(openDescriptors(), before)

    def test_modes(self):
        writer = self.writer()
        queueId = self.successResultOf(writer.commit())
        self.assertEqual(self.spool.directory, self.directory)
        for directory in (
            self.directory,
            self.spool.tmpDirectory,
            self.spool.queueDirectory,
        ):
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        path = self.spool.queuePath(queueId)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_stateFile(self):
        """
        The state in the queue file: version 1, keys sorted; a state
        written without the optional keys loads with their defaults.
        """
        queueId = self.successResultOf(self.writer().commit())
        path = self.spool.queuePath(queueId)
        with open(path, "rb") as f:
            slot = f.read()[queuefile.SLOTS :]
        length = int.from_bytes(slot[8:12], "big")
        text = slot[16 : 16 + length]
        data = json.loads(text)
        self.assertEqual(data["version"], 1)
        self.assertEqual(text, json.dumps(data, sort_keys=True).encode())
        self.assertEqual(
            (data["eightBit"], data["isBounce"], data["held"]), (False, False, False)
        )
        minimal = {k: data[k] for k in ("queueId", "envelope", "recipients")}
        # Its first load, which reads no file (Spool.remember), is gone.
        self.spool.load(queueId)
        with open(path, "r+b") as f:
            f.seek(queuefile.SLOTS)
            slotSize = queuefile.loadEntry(path)[1].slotSize
            f.write(queuefile.encodeSlot(minimal, 2, slotSize))
        entry = self.spool.load(queueId)
        self.assertEqual(
            (entry.attempts, entry.nextAttempt, entry.lastError, entry.createdAt),
            (0, 0.0, "", 0.0),
        )
        self.assertEqual(
            (
                entry.eightBit,
                entry.held,
                entry.isBounce,
                entry.delayWarned,
                entry.errors,
            ),
            (False, False, False, False, {}),
        )
        self.assertEqual(entry.size, len(MESSAGE))

    def test_eightBit(self):
        writer = self.spool.newMessage(makeEnvelope())
        writer.write(b"\xc3\xa9\r\n")
        writer.write(b"ascii\r\n")
        queueId = self.successResultOf(writer.commit())
        self.assertTrue(self.spool.load(queueId).eightBit)
        entry = spool.SpoolEntry(queueId="x", envelope=makeEnvelope(), recipients={})
        self.assertEqual(
            (entry.eightBit, entry.size, entry.isBounce), (False, 0, False)
        )

    def test_queueIds(self):
        """
        13 hex digits of microseconds since the epoch, strictly increasing,
        then 5 random hex digits.
        """
        ids = [spool.newQueueId() for _ in range(2000)]
        stamps = [int(i[:13], 16) for i in ids]
        self.assertEqual({len(i) for i in ids}, {18})
        self.assertEqual(stamps, sorted(set(stamps)))
        self.assertLess(abs(stamps[0] / 1e6 - time.time()), 60)
        self.assertEqual(len({i[13] for i in ids}), 16)

    def test_closedWriterRefuses(self):
        committed = self.writer()
        self.successResultOf(committed.commit())
        self.assertRaises(RuntimeError, committed.write, b"more")
        self.failureResultOf(committed.commit(), RuntimeError)
        aborted = self.writer()
        aborted.abort()
        self.assertRaises(RuntimeError, aborted.write, b"more")
        self.failureResultOf(aborted.commit(), RuntimeError)
        self.assertEqual(os.listdir(self.spool.tmpDirectory), [])

    def test_writeFails(self):
        """
        The disk refuses the data: 452 4.3.1, and the size does not grow.
        """

        class Full:
            def write(self, data):
                raise OSError(28, "No space left on device")

        writer = self.writer()
        writer.write(b"x" * spool.WRITE_BUFFER)  # past the buffer: the file exists
        realFile, writer._file = writer._file, Full()
        self.addCleanup(realFile.close)
        size = writer._size
        error = self.assertRaises(SMTPReply, writer.write, b"x" * 10)
        self.assertEqual(
            (error.code, error.status, error.text),
            (452, "4.3.1", "Insufficient system storage"),
        )
        self.assertEqual(writer._size, size)
        self.flushLoggedErrors()

    def test_commitFails(self):
        """
        The directory's fsync after the rename fails: the commit says 451
        4.3.0 and leaves nothing behind in C{tmp/} or C{queue/}.
        """
        realFsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(5, "Input/output error")
            return realFsync(fd)

        self.patch(os, "fsync", fsync)
        failure = self.failureResultOf(self.writer().commit(), SMTPReply)
        self.assertEqual(
            (failure.value.code, failure.value.status, failure.value.text),
            (451, "4.3.0", "Cannot queue the message, try again later"),
        )
        self.assertEqual(os.listdir(self.spool.tmpDirectory), [])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])
        # Logged (with or without a traceback, depending on the error).
        self.flushLoggedErrors(OSError)

    def test_commitFailsAtTheFirstFsync(self):
        """
        EIO on the message's fsync: 451 4.3.0, the file closed and removed.
        """

        def fsync(fd):
            raise OSError(5, "Input/output error")

        before = openDescriptors()
        writer = self.writer()
        self.patch(os, "fsync", fsync)
        failure = self.failureResultOf(writer.commit(), SMTPReply)
        self.assertEqual((failure.value.code, failure.value.status), (451, "4.3.0"))
        self.assertEqual(os.listdir(self.spool.tmpDirectory), [])
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])
        self.assertEqual(openDescriptors(), before)
        # Logged (with or without a traceback, depending on the error).
        self.flushLoggedErrors(OSError)

    def test_updateFails(self):
        """
        The new state cannot be made durable (EIO on the fdatasync): the
        error propagates, and the old state stays in force, for this process
        and for a new reader, the slot written voided.
        """
        queueId = self.successResultOf(self.writer().commit())
        entry = self.spool.load(queueId)
        entry.attempts = 3

        def fdatasync(fd):
            raise OSError(5, "Input/output error")

        self.patch(os, "fdatasync", fdatasync)
        self.failureResultOf(self.spool.update(entry), OSError)
        self.assertEqual(os.listdir(self.spool.queueDirectory), [queueId])
        self.assertEqual(self.spool.load(queueId).attempts, 0)
        self.assertEqual(spool.Spool(self.directory).load(queueId).attempts, 0)

    def test_closedWhileCommitting(self):
        pending = []

        def runBlocking(f, *args):
            d = defer.Deferred()
            pending.append(lambda: d.callback(f(*args)))
            return d

        self.patch(self.spool, "_runBlocking", runBlocking)
        writer = self.writer()
        d = writer.commit()
        self.assertRaises(RuntimeError, writer.write, b"more")
        self.failureResultOf(writer.commit(), RuntimeError)
        pending.pop()()
        self.assertEqual(self.successResultOf(d), writer.queueId)

    def test_abortedDuringCommit(self):
        """
        The client went away while the fsyncs ran: the committed copy is
        removed, the commit fails with 451 4.3.0, and no listener hears of it.
        """
        pending = []

        def runBlocking(f, *args):
            d = defer.Deferred()
            pending.append(lambda: d.callback(f(*args)))
            return d

        self.patch(self.spool, "_runBlocking", runBlocking)
        rounds = []
        commit = self.spool.commits.commit

        def heldRound(job):
            d = defer.Deferred()
            rounds.append(lambda: commit(job).chainDeferred(d))
            return d

        self.patch(self.spool.commits, "commit", heldRound)
        heard = []
        self.spool.addListener(heard.append)
        writer = self.writer()
        d = writer.commit()
        writer.abort()
        pending.pop()()
        # The 451 only once the removal (a round of the spool's group
        # commit) is done.
        self.assertNoResult(d)
        rounds.pop()()
        failure = self.failureResultOf(d, SMTPReply)
        self.assertEqual(
            (failure.value.code, failure.value.status, failure.value.text),
            (451, "4.3.0", "Message aborted"),
        )
        self.assertEqual(os.listdir(self.spool.queueDirectory), [])
        self.assertEqual(heard, [])

    def test_failingListenerLogged(self):
        heard = []

        def broken(queueId):
            raise ValueError(queueId)

        self.spool.addListener(broken)
        self.spool.addListener(heard.append)
        queueId = self.successResultOf(self.writer().commit())
        self.assertEqual(heard, [queueId])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class DigestDirectiveEdgeTests(unittest.TestCase):
    """
    L{parseDirectives} at the edges of RFC 2831's grammar and its size
    limit; each refusal is C{501 5.5.2} with its own text.
    """

    def refused(self, data: bytes, text: str):
        error = self.assertRaises(SMTPReply, parseDirectives, data)
        self.assertEqual((error.code, error.status, error.text), (501, "5.5.2", text))

    def test_sizeLimit(self):
        self.assertEqual(len(b"a=" + b"x" * 4094), digest_md5.MAX_RESPONSE)
        self.assertEqual(parseDirectives(b"a=" + b"x" * 4094), {"a": b"x" * 4094})
        self.refused(b"a=" + b"x" * 4095, "DIGEST-MD5 response too long")

    def test_tokenAndBareCharacters(self):
        self.assertEqual(parseDirectives(b"!a=!,~b=~"), {"!a": b"!", "~b": b"~"})
        self.assertEqual(parseDirectives(b'c=" "'), {"c": b" "})
        self.refused(b"\x7fa=1", "DIGEST-MD5 directive expected")
        self.refused(b"a=x\x7f", "DIGEST-MD5 comma expected")
        self.refused(b"\x20=1", "DIGEST-MD5 directive expected")

    def test_directiveExpected(self):
        for data in (b"=x", b"abc", b"abc x=1", b"a=1,b"):
            self.refused(data, "DIGEST-MD5 directive expected")

    def test_controlCharacters(self):
        self.assertEqual(parseDirectives(b'a="x\ty"'), {"a": b"x\ty"})
        for data in (b'a="x\x01"', b'a="x\x1f"', b'a="x\x7f"', b'a="x\\\x00"'):
            self.refused(data, "DIGEST-MD5 control character")
        self.refused(b'a="x\\', "DIGEST-MD5 unterminated quoted string")

    def test_valueExpected(self):
        self.refused(b"a=,b=1", "DIGEST-MD5 directive value expected")
        self.refused(b"a=", "DIGEST-MD5 directive value expected")

    def test_commaExpected(self):
        self.refused(b"a=1 b=2", "DIGEST-MD5 comma expected")
        self.refused(b'a="1"b=2', "DIGEST-MD5 comma expected")
        self.assertEqual(parseDirectives(b" a = 1 ,, b=2 "), {"a": b"1", "b": b"2"})

    def test_empty(self):
        for data in (b"", b" , ,\t"):
            self.refused(data, "DIGEST-MD5 empty response")

    def test_nonce(self):
        nonces = {digest_md5._newNonce() for _ in range(10)}
        self.assertEqual(len(nonces), 10)
        for nonce in nonces:
            self.assertRegex(nonce, r"\A[A-Za-z0-9_-]{32}\Z")

    def test_digestUri(self):
        """
        C{smtp/host} or C{smtp/host/host}, where host is one of the server's
        names or its realm.
        """
        mechanism = DigestMD5Mechanism(
            MechanismContext(realm="Realm.Example", serverNames=["smtp.example.org"])
        )
        for uri in (
            "smtp/smtp.example.org",
            "SMTP/realm.example",
            "smtp/smtp.example.org/SMTP.example.org",
        ):
            self.assertTrue(mechanism._acceptableUri(uri), uri)
        for uri in (
            "imap/smtp.example.org",
            "smtp",
            "smtp/",
            "smtp/other.example",
            "smtp/smtp.example.org/other.example",
            "smtp/a/a/a",
        ):
            self.assertFalse(mechanism._acceptableUri(uri), uri)

    def test_authzidInA1(self):
        """
        An authzid is part of A1 (RFC 2831 2.1.2.1), so it changes the
        response.
        """
        args = (
            digest_md5.computeHA1("u", "r", "p"),
            "n",
            "00000001",
            "c",
            "auth",
            "smtp/h",
        )
        self.assertNotEqual(responseValue(*args), responseValue(*args, authzid="other"))
        self.assertNotEqual(rspauthValue(*args), rspauthValue(*args, authzid="other"))


class AuthThrottleEdgeTests(unittest.TestCase):
    def test_capIs64Doublings(self):
        for count, delay in ((64, 2.0**63), (65, 2.0**64), (66, 2.0**64)):
            throttle = AuthThrottle(base=1.0, maximum=float("inf"), clock=FakeTime())
            throttle.failed("198.51.100.7", "acme", count)
            self.assertEqual(throttle.delay("198.51.100.7", "acme"), delay)

    def test_perAddressCountsAQuarter(self):
        throttle = AuthThrottle(base=0.5, clock=FakeTime())
        for i in range(12):
            throttle.failed("198.51.100.7", f"user{i}")
        self.assertEqual(throttle.delay("198.51.100.7", "user99"), 2.0)

    def test_forgetEdge(self):
        """
        A count is kept for exactly C{forget} seconds after the last
        failure, then dropped from memory.
        """
        clock = FakeTime()
        throttle = AuthThrottle(base=0.5, forget=900, clock=clock)
        throttle.failed("198.51.100.7", "acme")
        clock.now += 900
        self.assertEqual(throttle.delay("198.51.100.7", "acme"), 0.5)
        clock.now += 0.5
        self.assertEqual(throttle.delay("198.51.100.7", "acme"), 0)
        self.assertEqual(throttle.counters(), 0)

    def test_forgottenDroppedAtTheNextFailure(self):
        """
        Memory is bounded: counters forgotten by now are dropped at the next
        failure, whatever the size of the table, and recent ones are kept.
        """
        clock = FakeTime()
        throttle = AuthThrottle(forget=900, clock=clock)
        for i in range(10):
            throttle.failed(f"192.0.2.{i}", "acme")
        clock.now += 1
        throttle.failed("198.51.100.8", "acme")
        clock.now += 900
        throttle.failed("198.51.100.7", "acme")
        # The ten are 901 s old: gone; the one 900 s old stays.
        self.assertEqual(throttle.counters(), 4)
