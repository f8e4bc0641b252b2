"""
An example of a content policy from another package (R12), as a third party
would write it.  The configuration loads it by its import path, with its
options as keyword arguments::

    [[content.policy]]
    name = "tests.example_policy:RequireHeader"
    header = "X-Digipoort-Berichttype"
    values = ["aangifte", "suppletie"]

It refuses a message that lacks the header field, has it more than once or,
when C{values} is given, has a value outside it.
"""

from zope.interface import implementer

from msa.errors import SMTPReply
from msa.interfaces import IContentPolicy


@implementer(IContentPolicy)
class RequireHeader:
    def __init__(self, header: str, values: list[str] | None = None) -> None:
        if not isinstance(header, str) or not header:
            raise ValueError("header must be a field name")
        self.header = header
        self.values = None if values is None else {v.lower() for v in values}

    def startMessage(self, envelope):
        return _Checker(self)


class _Checker:
    """
    The checker of one message: only the parsed header section matters, so
    body lines are ignored.
    """

    def __init__(self, policy: RequireHeader) -> None:
        self.policy = policy

    def headersReceived(self, headers) -> None:
        values = headers.getAll(self.policy.header)
        if len(values) != 1:
            raise SMTPReply(
                550,
                "5.6.0",
                f"Message refused: exactly one {self.policy.header}: header field "
                "is required",
            )
        if self.policy.values is not None:
            if values[0].lower() not in self.policy.values:
                raise SMTPReply(
                    550,
                    "5.6.0",
                    f"Message refused: unknown {self.policy.header}",
                )

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> None:
        pass
