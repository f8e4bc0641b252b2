"""
Messages, envelopes and a fake downstream shared by the relay's test
modules (L{tests.test_relay}, L{tests.test_relay_client},
L{tests.test_outbox}, L{tests.test_queue_control}, L{tests.test_faultunits}).
"""

from twisted.internet import defer, task
from zope.interface import implementer

from msa.envelope import Envelope
from msa.interfaces import IDownstream
from msa.queue.spool import Spool
from msa.relay.results import DeliveryResult, RecipientResult
from msa.relay.runner import RelayRunner

DOTTY = (
    b"Subject: dots\r\n\r\n.\r\n..\r\n.a\r\nb.\r\n\r\n...c\r\nd\r\n.e\r\n"
    + b"x" * 7
    + b"\r\n.f\r\nno final newline."
)


def makeEnvelope(recipients=("bob@example.org",)) -> Envelope:
    return Envelope(sender="alice@example.com", recipients=list(recipients))


def bigMessage() -> bytes:
    """
    A message of a few chunks of the file sender, with lines starting with
    "." exactly at its 16 KiB chunk boundaries and elsewhere.
    """
    body = bytearray(b"Subject: big\r\n\r\n")
    for boundary in (16384, 32768, 49152):
        while len(body) < boundary - 80:
            body += b"y" * 60 + b"\r\n"
        pad = boundary - len(body) - 2
        body += b"z" * pad + b"\r\n"
        assert len(body) == boundary
        body += b"..starts a chunk\r\n"
    body += b".\r\n..\r\n.end\r\n"
    return bytes(body)


@implementer(IDownstream)
class FakeDownstream:
    """
    A downstream whose results the test decides: each deliver() waits on a
    Deferred the test fires.

    @ivar closed: how many times the runner closed it.
    """

    host = ""

    def __init__(self):
        self.calls = []
        #: Each call's C{dataSent}, in the order of L{calls}.
        self.dataSent = []
        self.closed = 0

    def close(self):
        self.closed += 1

    def deliver(self, entry, messageFile, dataSent=None):
        self.dataSent.append(dataSent)
        d = defer.Deferred()
        self.calls.append((entry, messageFile.read(), d))
        return d


def allWith(entry, status, code=0, text=""):
    return DeliveryResult(
        {r: RecipientResult(status, code, text) for r in entry.pendingRecipients()},
        f"{code} {text}",
    )


class RunnerFixture:
    """
    Mixin for a L{twisted.trial.unittest.TestCase}: a L{RelayRunner}
    (C{self.runner}, not started) on a spool (C{self.spool}) with a fake
    clock (C{self.clock}) and a L{FakeDownstream} (C{self.downstream}).
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), reactor=self.clock)
        self.downstream = FakeDownstream()
        self.runner = RelayRunner(self.spool, self.downstream, reactor=self.clock)

    def queue(self, recipients=("bob@example.org",)):
        """
        Commit L{DOTTY} for C{recipients}.

        @return: its queue id.
        """
        writer = self.spool.newMessage(makeEnvelope(recipients))
        writer.write(DOTTY)
        return self.successResultOf(writer.commit())
