# -*- test-case-name: tests.test_fromspoofing -*-
"""
From: spoofing (issue 18, R9): an account with C{requireHeaderFrom} may
name only its own mailboxes in C{From:} and C{Sender:}, as every reader
reads them.

The property tests generate field bodies (display names, comments, quoted
local parts holding C{@}, encoded words, groups, folding, several
mailboxes, the issue's attack strings) and check each one the policy
accepts against readers independent of it: Python's C{email.headerregistry},
its legacy C{email.utils.getaddresses}, and naive readers (the last token
with an C{@}, the first C{<...>}, decoding encoded words before parsing).
No accepted field may name a mailbox outside the account to any of them.
"""

import email.header
import email.policy
import email.utils
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from msa.errors import SMTPReply
from msa.policy.authorization import AddressList, HeaderFromPolicy
from msa.policy.content import HeaderCollector
from msa.policy.mailboxes import readMailboxes

#: The account: one domain and one address.
ACCOUNT = AddressList.parse(["@mijnbedrijf.nl", "ik@acme.nl"])

#: The exact values of the issue, and variants of them.
ATTACKS = [
    "ceo@belastingdienst.nl ik@mijnbedrijf.nl",
    "ceo@belastingdienst.nl\\ ik@mijnbedrijf.nl",
    "ceo@belastingdienst.nl\tik@mijnbedrijf.nl",
    "ceo@belastingdienst.nl;ik@mijnbedrijf.nl",
    "ceo@belastingdienst.nl <ik@mijnbedrijf.nl>",
    "<ceo@belastingdienst.nl> ik@mijnbedrijf.nl",
    '"ceo@belastingdienst.nl"@mijnbedrijf.nl ceo@belastingdienst.nl',
    "ik@mijnbedrijf.nl (ceo@belastingdienst.nl)",
    '"x <ceo@belastingdienst.nl>" <ik@mijnbedrijf.nl>',
    "=?utf-8?b?Y2VvQGJlbGFzdGluZ2RpZW5zdC5ubCA8Y2VvQGJlbGFzdGluZ2RpZW5zdC5ubD4=?="
    " <ik@mijnbedrijf.nl>",
    "ceo@belastingdienst.nl@mijnbedrijf.nl",
    "ik@mijnbedrijf.nl\x00ceo@belastingdienst.nl",
]

SETTINGS = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_atom = st.text("abcdefxyzIK0129!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=6)
#: Mostly the account's own domain, so that many fields are accepted.
_domains = st.sampled_from(
    [
        "mijnbedrijf.nl",
        "mijnbedrijf.nl",
        "mijnbedrijf.nl",
        "MijnBedrijf.NL",
        "acme.nl",
        "belastingdienst.nl",
        "sub.mijnbedrijf.nl",
        "mijnbedrijf.nl.evil.nl",
        "localhost",
        "[192.0.2.1]",
    ]
)


def _quoted(content: str) -> str:
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


_quotedText = st.text('ab @.,<>()\\":;ik', max_size=12)
_localParts = st.one_of(
    st.sampled_from(["ik", "Ik", "ceo", "a.b"]),
    st.lists(_atom, min_size=1, max_size=3).map(".".join),
    _quotedText.filter(bool).map(_quoted),
    st.text("ab .ik", min_size=1, max_size=6).map(_quoted),
    st.sampled_from(['"ceo@belastingdienst.nl"', '"a\\@b"', '"\\\\"', '"a@evil.nl"']),
)


def _encodedWord(text: str, encoding: str) -> str:
    data = text.encode("utf-8")
    if encoding == "b":
        return email.header.Header(text, "utf-8").encode()
    encoded = "".join(
        chr(b) if b < 128 and chr(b).isalnum() else f"={b:02X}" for b in data
    ).replace("=20", "_")
    return f"=?utf-8?q?{encoded}?="


_comments = st.recursive(
    st.integers(0, 9).flatmap(
        lambda n: (
            st.just("ceo@belastingdienst.nl")
            if n == 0
            else st.text("ab Ik.<>", max_size=6)
        )
    ),
    lambda inner: st.builds(lambda a, b: f"{a}({b})", inner, inner),
    max_leaves=4,
).map(lambda c: f"({c})")
_spaces = st.sampled_from(["", " ", "  ", "\t", "\r\n ", "\r\n\t"])
_cfws = st.one_of(_spaces, st.builds(lambda a, c: a + c, _spaces, _comments))
_displayNames = st.one_of(
    st.lists(_atom, min_size=1, max_size=3).map(" ".join),
    # obs-phrase: periods between and after words ("Acme B.V.").
    st.lists(_atom, min_size=1, max_size=3).map(lambda w: ". ".join(w) + "."),
    st.lists(_atom, min_size=2, max_size=3).map(".".join),
    _quotedText.map(_quoted),
    st.sampled_from(
        [
            "J. Smith",
            "Acme B.V.",
            "Jörg Müller",
            '"Doe, John"',
            '"ceo@belastingdienst.nl"',
        ]
    ),
    st.builds(
        _encodedWord,
        st.sampled_from(
            ["Jörg", "ceo@belastingdienst.nl", "a <ceo@belastingdienst.nl>"]
        ),
        st.sampled_from(["b", "q"]),
    ),
)


def _mailboxes(domains) -> st.SearchStrategy[str]:
    """
    One mailbox in each of its forms, with a domain from C{domains}.
    """
    addrSpecs = st.builds(
        lambda local, domain: f"{local}@{domain}", _localParts, domains
    )
    return st.one_of(
        addrSpecs,
        st.builds(lambda a, c: a + c, addrSpecs, _cfws),
        st.builds(lambda n, s, a: f"{n}{s}<{a}>", _displayNames, _cfws, addrSpecs),
        addrSpecs.map(lambda a: f"<{a}>"),
    )


_anyMailbox = _mailboxes(_domains)
#: Mailboxes of the account only, in tricky forms: most are accepted.
_ownMailbox = _mailboxes(st.sampled_from(["mijnbedrijf.nl", "MijnBedrijf.NL"]))
_separators = st.sampled_from([",", ", ", " ,", " ", "\\ ", ";", ",\r\n "])


@st.composite
def _fieldBodies(draw) -> str:
    """
    A From: or Sender: field body: an attack from the issue, or one to
    three mailboxes (the account's own, or any) joined by a separator
    (usually a comma), maybe as a group, with CFWS and folding around.
    """
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(ATTACKS))
    mailbox = draw(st.sampled_from([_anyMailbox, _ownMailbox]))
    parts = draw(st.lists(mailbox, min_size=1, max_size=3))
    body = parts[0]
    for part in parts[1:]:
        body += draw(_separators) + part
    if draw(st.integers(0, 7)) == 0:
        body = f"{draw(_displayNames)}:{body};"
    return draw(_cfws) + body + draw(_cfws)


def headersOf(fields: list[tuple[str, str]]):
    """
    The L{msa.policy.content.Headers} the server would parse from these
    fields (folded as given).
    """
    collector = HeaderCollector()
    for name, body in fields:
        for line in f"{name}: {body}".encode("utf-8", "surrogateescape").split(b"\r\n"):
            collector.feed(line)
    return collector.finish()


def _unfold(body: str) -> str:
    return body.replace("\r\n", "")


def _belongs(address: str) -> bool:
    """
    Whether what a reader found is no mailbox outside the account: one of
    its mailboxes, or no address at all.
    """
    return "@" not in address or ACCOUNT.matches(address)


def modernReader(body: str) -> list[str]:
    header = email.policy.default.header_factory("From", body)
    return [a.addr_spec for a in header.addresses if a.addr_spec]


def legacyReader(body: str) -> list[str]:
    return [a for _, a in email.utils.getaddresses([body]) if a]


def lastTokenReader(body: str) -> list[str]:
    """
    What a naive script reads: per comma-separated piece, the last word
    (between white space and parentheses) holding an C{@}, stripped of
    brackets and quotes.
    """
    found = []
    for piece in body.split(","):
        words = [w for w in re.split(r"[\s()]+", piece) if "@" in w]
        if words:
            found.append(words[-1].strip("<>();:\"'"))
    return found


def angleReader(body: str) -> list[str]:
    """
    Another naive reader: the first C{<...>}, else the first word.
    """
    match = re.search(r"<([^>]*)>", body)
    return [match.group(1) if match else re.split(r"[\s,(]+", body.strip())[0]]


def decodingReader(body: str) -> list[str]:
    """
    A reader that decodes encoded words first, then parses (Mailsploit).
    """
    decoded = str(email.header.make_header(email.header.decode_header(body)))
    return modernReader(decoded) + legacyReader(decoded)


READERS = [modernReader, legacyReader, lastTokenReader, angleReader, decodingReader]


def accepted(fields: list[tuple[str, str]]) -> bool:
    try:
        checker = HeaderFromPolicy(ACCOUNT).startMessage(None)
        checker.headersReceived(headersOf(fields))
    except SMTPReply as e:
        assert e.code == 550 and e.status in ("5.6.0", "5.7.1"), e
        return False
    return True


class FromPropertyTests(unittest.TestCase):
    """
    Generated fields against the readers.
    """

    def assertNoReaderSeesForgery(self, body: str) -> None:
        unfolded = _unfold(body)
        for reader in READERS:
            try:
                found = reader(unfolded)
            except Exception:
                continue
            for address in found:
                self.assertTrue(
                    _belongs(address),
                    f"accepted {body!r}, but {reader.__name__} reads {address!r}",
                )
        self.assertTrue(modernReader(unfolded), body)

    @SETTINGS
    @given(_fieldBodies())
    def test_acceptedFromNamesOnlyTheAccount(self, body):
        """
        Whatever From: the policy accepts names only the account's mailboxes
        to every reader.
        """
        if accepted([("From", body)]):
            self.assertNoReaderSeesForgery(body)

    @SETTINGS
    @given(_fieldBodies())
    def test_acceptedSenderNamesOnlyTheAccount(self, body):
        """
        The same for Sender: beside a legitimate From:.
        """
        if accepted([("From", "ik@mijnbedrijf.nl"), ("Sender", body)]):
            self.assertNoReaderSeesForgery(body)

    @SETTINGS
    @given(_fieldBodies())
    def test_strictReaderAgreesWithHeaderRegistry(self, body):
        """
        Where the strict reader finds no defect and no group, the
        independent C{email.headerregistry} reads the same mailboxes and no
        defect either: the strict reader is no looser than the RFC.
        """
        unfolded = _unfold(body)
        reading = readMailboxes(unfolded)
        if reading.defects or reading.groups:
            return
        header = email.policy.default.header_factory("From", unfolded)
        defects = [str(d) for d in header.defects]
        if "period in 'phrase'" in defects:
            # RFC 5322 4.1 obs-phrase ("Acme B.V."), accepted on purpose:
            # headerregistry notes it (and the period it then reads as a
            # word of its own) but reads the same mailbox.
            obsPhrase = {"period in 'phrase'", "comment found without atom"}
            defects = [d for d in defects if d not in obsPhrase]
        self.assertEqual(defects, [], body)
        self.assertEqual(
            [(m.localPart, m.domain) for m in reading.mailboxes],
            [(a.username, a.domain) for a in header.addresses],
            body,
        )

    @SETTINGS
    @given(
        st.text(
            st.characters(codec="utf-8", exclude_characters="\r\n")
            | st.sampled_from('"\\()<>@,;:.=? \t\udcff'),
            max_size=60,
        )
    )
    def test_anyTextAnswered(self, body):
        """
        Any field body at all is accepted or refused with a 550: the check
        never fails otherwise (which would make the message fail with 451).
        """
        accepted([("From", body)])
        accepted([("From", "ik@mijnbedrijf.nl"), ("Sender", body)])

    def test_generatorReachesBothOutcomes(self):
        """
        The generated fields include accepted and refused ones (else the
        properties above would hold vacuously).
        """
        outcomes = set()

        @SETTINGS
        @given(_fieldBodies())
        def run(body):
            outcomes.add(accepted([("From", body)]))

        run()
        self.assertEqual(outcomes, {True, False})

    def test_attacksRefused(self):
        """
        The issue's exact values, and variants, are refused.
        """
        for body in ATTACKS:
            self.assertFalse(accepted([("From", body)]), body)
            self.assertFalse(
                accepted([("From", "ik@mijnbedrijf.nl"), ("Sender", body)]), body
            )
