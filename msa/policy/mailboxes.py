# -*- test-case-name: tests.test_mailboxes,tests.test_fromspoofing -*-
"""
A strict reader of the mailboxes in a header field (RFC 5322 3.4): the
C{From:} and C{Sender:} of a submission, which must name only the account's
own addresses (R9).

Lenient readers disagree on malformed fields: Python 3.11's
C{email.utils.getaddresses} reads C{ceo@belastingdienst.nl ik@acme.nl} as
C{@acme.nl}, a mail client shows C{ceo@belastingdienst.nl}.  So this reader
accepts only the plain RFC 5322 grammar and reports anything else as a
defect instead of guessing: the obsolete forms (RFC 5322 4.4: routes,
empty list entries, white space or comments inside an address; but a
period in a display name, as in C{Acme B.V.}, is read alike by all), text
after an address, an unterminated quoted string or comment,
encoded words outside a display name (RFC 2047 5), an encoded word that
does not decode or that decodes to angle brackets, quotes or control
characters or is not a whole word followed by white space, angle brackets
in a quoted display name, an C{@} or angle brackets in a comment,
a quoted local part holding specials (C{"a@evil.nl"@acme.nl}: valid, but
naive readers split it), an incomplete or non-ASCII address (R8, no
SMTPUTF8).  What a naive reader could take for an address is thus
refused, except an C{@} in a quoted or encoded display name:
C{"ceo@belastingdienst.nl" <ik@acme.nl>} names the mailbox C{ik@acme.nl}
to every reader, and is accepted for it.

Bytes that were not UTF-8 (the header section is decoded with
C{surrogateescape}) are a defect too.  The module is pure: text in,
mailboxes and defects out.
"""

import base64
import binascii
import re

import attrs
import idna

#: RFC 5322 3.2.3: atext, here ASCII only (addr-spec).
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
DOT_ATOM = rf"{ATEXT}+(?:\.{ATEXT}+)*"
#: RFC 5321 4.1.2 Quoted-string (the envelope form).
QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A fully qualified domain: at least two labels, the last not all digits.
DOMAIN = rf"(?:{LABEL}\.)+(?=[A-Za-z0-9-]*[A-Za-z])(?:{LABEL})"
IPV4 = r"\[(?:\d{1,3}\.){3}\d{1,3}\]"
IPV6 = r"\[IPv6:[0-9A-Fa-f:.]+\]"

MAX_LOCAL_PART = 64

#: A field body longer than this (unfolded) is refused unread: the line
#: limit of RFC 5322 2.1.1, room for some twenty mailboxes.  It bounds the
#: work of the readers compared on the reactor (email.headerregistry takes
#: about 20 ms for 998 characters of one-letter words on this project's
#: 2-core test machine, under a millisecond for a usual From:).
MAX_FIELD_LENGTH = 998
#: Comments nested deeper than this are refused.
MAX_COMMENT_DEPTH = 8

_dotAtom = re.compile(DOT_ATOM + r"\Z")
_domain = re.compile(rf"(?:{DOMAIN}|{IPV4}|{IPV6})\Z")
_atext = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
)
_WSP = " \t"
#: What a quoted local part may hold in a header field: none of the
#: specials (@ , < > ( ) ; : " \\) a naive reader splits an address at.
_quotedLocalPart = re.compile(rf"(?:{ATEXT}|[. ])*\Z")
_encodedWord = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_encodedWordStart = re.compile(r"=\?")


@attrs.frozen
class Mailbox:
    """
    One mailbox named by a header field.

    @ivar displayName: the display name, encoded words decoded; C{""} if none.
    @ivar localPart: the local part, unquoted (a quoted C{"a@b"} is C{a@b}).
    @ivar domain: the domain as written.
    """

    displayName: str
    localPart: str
    domain: str

    @property
    def addrSpec(self) -> str:
        """
        The address in its canonical form: see L{formatAddrSpec}.
        """
        return formatAddrSpec(self.localPart, self.domain)


@attrs.frozen
class MailboxReading:
    """
    What L{readMailboxes} found in one field body.

    @ivar mailboxes: every mailbox named, group members included, in order.
    @ivar groups: how many groups (RFC 5322 3.4 C{group}) the field holds.
    @ivar defects: why the field is not plain RFC 5322, each a short
        sentence; empty when it is.  Mailboxes found before a defect are
        listed, but a field with defects must not be trusted at all.
    """

    mailboxes: tuple[Mailbox, ...]
    groups: int
    defects: tuple[str, ...]


def formatAddrSpec(localPart: str, domain: str) -> str:
    """
    An addr-spec from its parts: the local part bare if it is a dot-atom,
    quoted otherwise (RFC 5322 3.4.1: both forms name the same mailbox).
    """
    if not _dotAtom.match(localPart):
        escaped = localPart.replace("\\", "\\\\").replace('"', '\\"')
        localPart = f'"{escaped}"'
    return f"{localPart}@{domain}"


def splitAddrSpec(address: str) -> tuple[str, str]:
    """
    The local part (unquoted) and domain of an addr-spec such as
    C{ik@acme.nl} or C{"a@evil.nl"@acme.nl}.

    The domain is after the I{last} C{@}: a quoted local part may hold
    C{@}, a domain never does.

    @raise ValueError: when C{address} has no C{@}.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        raise ValueError(f"{address!r} has no @")
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain


class _Defect(Exception):
    """
    The field is not plain RFC 5322; reading stops.
    """


class _Reader:
    """
    A recursive-descent reader of one field body.
    """

    def __init__(self, text: str, utf8: bool = False) -> None:
        self.text = text
        self.utf8 = utf8
        self.pos = 0
        self.mailboxes: list[Mailbox] = []
        self.groups = 0

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def skipCFWS(self) -> None:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in _WSP:
                self.pos += 1
            elif c == "(":
                self.comment()
            else:
                return

    def comment(self) -> None:
        depth = 0
        start = self.pos
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == "(":
                depth += 1
                if depth > MAX_COMMENT_DEPTH:
                    raise _Defect("comments are nested too deeply")
            elif c == ")":
                depth -= 1
                if depth == 0:
                    if any(c in "@<>" for c in self.text[start : self.pos]):
                        raise _Defect("a comment may not hold @ or angle brackets")
                    return
            elif c == "\\":
                self.quotedPair()
            else:
                self.checkText(c)
        raise _Defect("unterminated comment")

    def quotedPair(self) -> str:
        c = self.peek()
        if not c or not (c in _WSP or "\x21" <= c <= "\x7e" or c >= "\x80"):
            raise _Defect("a backslash must escape a printable character")
        self.checkText(c)
        self.pos += 1
        return c

    def checkText(self, c: str) -> None:
        if "\udc80" <= c <= "\udcff":
            raise _Defect("the field is not UTF-8")
        if c < " " and c != "\t" or c == "\x7f":
            raise _Defect("control characters are not allowed")

    def quotedString(self) -> str:
        self.pos += 1
        content: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == '"':
                return "".join(content)
            if c == "\\":
                c = self.quotedPair()
            else:
                self.checkText(c)
            content.append(c)
        raise _Defect("unterminated quoted string")

    def atom(self) -> str:
        start = self.pos
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in _atext:
                self.pos += 1
            elif c >= "\x80":
                self.checkText(c)
                self.pos += 1
            else:
                break
        return self.text[start : self.pos]

    def read(self) -> None:
        if len(self.text) > MAX_FIELD_LENGTH:
            raise _Defect("the field is too long")
        while True:
            self.skipCFWS()
            if self.pos == len(self.text):
                if self.mailboxes or self.groups:
                    raise _Defect("an empty entry after a comma")
                return
            if self.peek() == ",":
                raise _Defect("an empty entry in the list")
            self.address(inGroup=False)
            self.skipCFWS()
            if self.pos == len(self.text):
                return
            if self.peek() != ",":
                raise _Defect("text after an address")
            self.pos += 1

    def address(self, inGroup: bool) -> None:
        """
        A mailbox: a bare addr-spec, or an optional display name and an
        addr-spec in angle brackets; outside a group also a group.
        """
        start = self.pos
        local = self.localPart()
        if local is not None and self.peek() == "@":
            self.pos += 1
            domain = self.domain()
            self.mailboxes.append(Mailbox("", local, domain))
            return
        self.pos = start
        name = self.phrase()
        c = self.peek()
        if c == "<":
            self.pos += 1
            local = self.localPart()
            if local is None or self.peek() != "@":
                raise _Defect(
                    "an address in angle brackets must be local-part@domain, "
                    "without spaces, comments or a route"
                )
            self.pos += 1
            domain = self.domain()
            if self.peek() != ">":
                raise _Defect("an address in angle brackets must end with >")
            self.pos += 1
            self.mailboxes.append(Mailbox(name, local, domain))
        elif c == ":" and name and not inGroup:
            self.pos += 1
            self.groups += 1
            self.groupList()
        else:
            raise _Defect("neither an address nor a display name and <address>")

    def groupList(self) -> None:
        self.skipCFWS()
        if self.peek() == ";":
            self.pos += 1
            return
        while True:
            self.skipCFWS()
            self.address(inGroup=True)
            self.skipCFWS()
            c = self.peek()
            self.pos += 1
            if c == ";":
                return
            if c != ",":
                raise _Defect("a group must end with ;")

    def localPart(self) -> str | None:
        """
        A dot-atom or quoted string standing right before an C{@}, or
        L{None} when the text here is not one.
        """
        c = self.peek()
        if c == '"':
            local = self.quotedString()
            if self.peek() == "@" and not _quotedLocalPart.match(local):
                raise _Defect(
                    "a quoted local part may hold only letters, digits, "
                    "spaces and !#$%&'*+-/=?^_`{|}~."
                )
        elif c in _atext:
            start = self.pos
            # Non-ASCII is read too, to be refused with its own reason.
            while (
                self.peek() in _atext
                or self.peek() >= "\x80"
                or (
                    self.peek() == "."
                    and self.text[self.pos + 1 : self.pos + 2] in _atext
                )
            ):
                self.pos += 1
            local = self.text[start : self.pos]
        else:
            return None
        if self.peek() != "@":
            return local
        if not local.isascii() and not self.utf8:
            raise _Defect("non-ASCII addresses are not supported (no SMTPUTF8)")
        if _encodedWordStart.search(local):
            raise _Defect("an encoded word is not allowed in an address")
        if not local or len(local.encode()) > MAX_LOCAL_PART:
            raise _Defect("a local part must be 1 to 64 octets")
        return local

    def domain(self) -> str:
        start = self.pos
        if self.peek() == "[":
            end = self.text.find("]", self.pos)
            self.pos = len(self.text) if end < 0 else end + 1
        else:
            while self.peek() and (
                self.peek() in _atext
                or self.peek() == "."
                or (self.utf8 and self.peek() >= "\x80")
            ):
                self.checkText(self.peek())
                self.pos += 1
        domain = self.text[start : self.pos]
        if not _domain.match(_aLabels(domain)):
            raise _Defect(
                "an address must be complete: local-part@fully.qualified.domain"
            )
        return domain

    def phrase(self) -> str:
        """
        A display name: words (atoms and quoted strings) and the white space
        between them, encoded words decoded.
        """
        words: list[str] = []
        while True:
            self.skipCFWS()
            c = self.peek()
            if c == '"':
                word = self.quotedString()
                if "<" in word or ">" in word:
                    raise _Defect("a display name may not hold angle brackets")
                words.append(decodeDisplayName(word))
            elif c == "." and words:
                # RFC 5322 4.1 obs-phrase: "Acme B.V." and "J. Smith", as
                # Dutch company names and many programs write them.  Every
                # reader takes the period as part of the display name.
                self.pos += 1
                words[-1] += "."
            elif c in _atext or c >= "\x80":
                glued = bool(words) and self.text[self.pos - 1 : self.pos] == "."
                word = self.atom()
                if glued and not _encodedWordStart.search(word):
                    words[-1] += word
                    continue
                if _encodedWordStart.search(word):
                    if not _encodedWord.fullmatch(word):
                        raise _Defect("an encoded word must be a whole word")
                    if self.peek() not in _WSP:
                        raise _Defect("an encoded word must be followed by a space")
                words.append(decodeDisplayName(word))
            else:
                return " ".join(words)


def decodeDisplayName(word: str) -> str:
    """
    One word of a display name with its RFC 2047 encoded words decoded.
    Encoded words are decoded in quoted strings too, as many readers do.

    @raise _Defect: an encoded word does not decode, or decodes to text a
        reader that decodes before it parses could take for an address
        (angle brackets, quotes) or a line end (control characters).
    """

    def decode(match: re.Match) -> str:
        charset, encoding, text = match.groups()
        try:
            if encoding in "Bb":
                data = base64.b64decode(text, validate=True)
            else:
                data = re.sub(
                    rb"=([0-9A-Fa-f]{2})",
                    lambda m: bytes([int(m.group(1), 16)]),
                    text.replace("_", " ").encode("ascii"),
                )
            decoded = data.decode(charset.partition("*")[0])
        except (binascii.Error, LookupError, UnicodeError, ValueError):
            raise _Defect("an encoded word does not decode") from None
        if any(c in '<>"' or c < " " or c == "\x7f" for c in decoded):
            raise _Defect(
                "an encoded word may not hold angle brackets, quotes or "
                "control characters"
            )
        return decoded

    return _encodedWord.sub(decode, word)


def _aLabels(domain: str) -> str:
    """
    C{domain} with each U-label (IDNA 2008) as its A-label, for the check
    of its form; one that is no U-label is left as it is, and fails it.
    """
    if domain.isascii():
        return domain
    labels = []
    for label in domain.split("."):
        try:
            labels.append(label if label.isascii() else idna.encode(label).decode())
        except idna.IDNAError:
            labels.append(label)
    return ".".join(labels)


def readMailboxes(text: str, utf8: bool = False) -> MailboxReading:
    """
    Read the mailboxes of an address-list field body (unfolded).

    @param utf8: the message came with SMTPUTF8 (RFC 6532 3.2): a local
        part may hold UTF-8, and a domain U-labels.
    """
    reader = _Reader(text, utf8)
    try:
        reader.read()
    except _Defect as defect:
        return MailboxReading(tuple(reader.mailboxes), reader.groups, (str(defect),))
    return MailboxReading(tuple(reader.mailboxes), reader.groups, ())
