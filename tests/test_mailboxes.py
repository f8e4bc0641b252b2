# -*- test-case-name: tests.test_mailboxes -*-
"""
L{msa.policy.mailboxes}: the strict reader of From: and Sender: field
bodies, form by form, and the addr-spec helpers that envelope and header
matching share.
"""

from twisted.trial import unittest

from msa.policy.authorization import AddressList
from msa.policy.mailboxes import (
    MAX_FIELD_LENGTH,
    formatAddrSpec,
    readMailboxes,
    splitAddrSpec,
)


class AcceptedFormTests(unittest.TestCase):
    """
    The plain RFC 5322 forms are read, each mailbox with its display name.
    """

    def assertReads(self, body: str, expected: list[tuple[str, str]]) -> None:
        reading = readMailboxes(body)
        self.assertEqual(reading.defects, (), body)
        self.assertEqual(
            [(m.displayName, m.addrSpec) for m in reading.mailboxes], expected, body
        )

    def test_forms(self):
        for body, expected in [
            ("ik@mijnbedrijf.nl", [("", "ik@mijnbedrijf.nl")]),
            ("<ik@mijnbedrijf.nl>", [("", "ik@mijnbedrijf.nl")]),
            ("Ik <ik@mijnbedrijf.nl>", [("Ik", "ik@mijnbedrijf.nl")]),
            ("Jan  de Vries<jan@x.nl>", [("Jan de Vries", "jan@x.nl")]),
            ('"de Vries, Jan" <jan@x.nl>', [("de Vries, Jan", "jan@x.nl")]),
            ('"J. \\"Jan\\"" <jan@x.nl>', [('J. "Jan"', "jan@x.nl")]),
            ("Jörg Müller <j@x.nl>", [("Jörg Müller", "j@x.nl")]),
            ("=?utf-8?q?J=C3=B6rg?= <j@x.nl>", [("Jörg", "j@x.nl")]),
            ("=?UTF-8?B?SsO2cmc=?= <j@x.nl>", [("Jörg", "j@x.nl")]),
            (
                '"ceo@belastingdienst.nl" <ik@mijnbedrijf.nl>',
                [("ceo@belastingdienst.nl", "ik@mijnbedrijf.nl")],
            ),
            ("ik@x.nl (Ik (zelf))", [("", "ik@x.nl")]),
            ("(c) Ik (d) <ik@x.nl> (e)", [("Ik", "ik@x.nl")]),
            ("a@x.nl, B <b@x.nl>", [("", "a@x.nl"), ("B", "b@x.nl")]),
            ('"jan de vries"@x.nl', [("", '"jan de vries"@x.nl')]),
            ('"ik"@x.nl', [("", "ik@x.nl")]),
            ("first.last+tag@sub.x.nl", [("", "first.last+tag@sub.x.nl")]),
            ("ik@[192.0.2.1]", [("", "ik@[192.0.2.1]")]),
            ("\t ik@x.nl \t", [("", "ik@x.nl")]),
            ("Acme B.V. <ik@acme.nl>", [("Acme B.V.", "ik@acme.nl")]),
            ("J. Smith <j@x.nl>", [("J. Smith", "j@x.nl")]),
            ("J.Smith <j@x.nl>", [("J.Smith", "j@x.nl")]),
        ]:
            self.assertReads(body, expected)

    def test_empty(self):
        self.assertEqual(readMailboxes(""), readMailboxes("  (nothing) "))
        self.assertEqual(readMailboxes("").mailboxes, ())
        self.assertEqual(readMailboxes("").defects, ())

    def test_group(self):
        """
        Groups are read (the policy refuses them): their members and count.
        """
        reading = readMailboxes("Team: a@x.nl, b@x.nl;, c@x.nl")
        self.assertEqual(reading.defects, ())
        self.assertEqual(reading.groups, 1)
        self.assertEqual(
            [m.addrSpec for m in reading.mailboxes], ["a@x.nl", "b@x.nl", "c@x.nl"]
        )
        self.assertEqual(readMailboxes("Niemand:;").groups, 1)

    def test_groupSpacing(self):
        """
        An empty group followed by a mailbox, and comments and spaces around
        the members of a group, are read without a defect.
        """
        for body, expected in [
            ("Niemand:;, c@x.nl", ["c@x.nl"]),
            ("Team: a@x.nl (Jan) , b@x.nl (Piet) ;", ["a@x.nl", "b@x.nl"]),
        ]:
            reading = readMailboxes(body)
            self.assertEqual(reading.defects, (), body)
            self.assertEqual(reading.groups, 1, body)
            self.assertEqual([m.addrSpec for m in reading.mailboxes], expected, body)


class DefectTests(unittest.TestCase):
    """
    Every form a lenient reader could read differently is a defect, named.
    """

    def test_defects(self):
        for body, defect in [
            (
                "ceo@belastingdienst.nl ik@mijnbedrijf.nl",
                "text after an address",
            ),
            (
                "ceo@belastingdienst.nl\\ ik@mijnbedrijf.nl",
                "text after an address",
            ),
            ("a@x.nl; b@x.nl", "text after an address"),
            ("ceo@belastingdienst.nl@x.nl", "text after an address"),
            ("ik@x.nl\x00ceo@y.nl", "text after an address"),
            (". Smith <j@x.nl>", "neither an address nor a display name and <address>"),
            ("a@x.nl,", "an empty entry after a comma"),
            (", a@x.nl", "an empty entry in the list"),
            ("a@x.nl,,b@x.nl", "an empty entry in the list"),
            ("ik @ x.nl", "neither an address nor a display name and <address>"),
            (
                "<@route.nl:ik@x.nl>",
                "an address in angle brackets must be local-part@domain, "
                "without spaces, comments or a route",
            ),
            (
                "< ik@x.nl>",
                "an address in angle brackets must be local-part@domain, "
                "without spaces, comments or a route",
            ),
            ("<ik@x.nl", "an address in angle brackets must end with >"),
            ("Ik <ik@x.nl> <jij@y.nl>", "text after an address"),
            ('"ik@x.nl', "unterminated quoted string"),
            ("ik@x.nl (Ik", "unterminated comment"),
            (
                "ik@x.nl (ceo@belastingdienst.nl)",
                "a comment may not hold @ or angle brackets",
            ),
            ("(<)ik@x.nl(>)", "a comment may not hold @ or angle brackets"),
            ("ik@x.nl " + "(" * 9 + ")" * 9, "comments are nested too deeply"),
            (
                '"x <ceo@belastingdienst.nl>" <ik@x.nl>',
                "a display name may not hold angle brackets",
            ),
            (
                "=?utf-8?q?a_=3Cceo=40y=2Enl=3E?= <ik@x.nl>",
                "an encoded word may not hold angle brackets, quotes or control "
                "characters",
            ),
            (
                "=?utf-8?q?a=00b?= <ik@x.nl>",
                "an encoded word may not hold angle brackets, quotes or control "
                "characters",
            ),
            ("=?utf-8?b?!!!?= <ik@x.nl>", "an encoded word does not decode"),
            ("=?nocharset?q?a?= <ik@x.nl>", "an encoded word does not decode"),
            ("a=?utf-8?q?b?= <ik@x.nl>", "an encoded word must be a whole word"),
            (
                "=?utf-8?q?b?=(c) <ik@x.nl>",
                "an encoded word must be followed by a space",
            ),
            (
                "=?utf-8?q?ceo?=@x.nl",
                "an encoded word is not allowed in an address",
            ),
            (
                '"a@evil.nl"@mijnbedrijf.nl',
                "a quoted local part may hold only letters, digits, spaces and "
                "!#$%&'*+-/=?^_`{|}~.",
            ),
            ('""@x.nl', "a local part must be 1 to 64 octets"),
            ("l" * 65 + "@x.nl", "a local part must be 1 to 64 octets"),
            ("jörg@x.nl", "non-ASCII addresses are not supported (no SMTPUTF8)"),
            (
                "ik@localhost",
                "an address must be complete: local-part@fully.qualified.domain",
            ),
            (
                "ik@[a@b]",
                "an address must be complete: local-part@fully.qualified.domain",
            ),
            ('"\udcff" <ik@x.nl>', "the field is not UTF-8"),
            ('"a\x01" <ik@x.nl>', "control characters are not allowed"),
            ('"a\\\x01" <ik@x.nl>', "a backslash must escape a printable character"),
            ("x" * MAX_FIELD_LENGTH + " <ik@x.nl>", "the field is too long"),
            ("Team: a@x.nl", "a group must end with ;"),
            ("A: B: b@x.nl;;", "neither an address nor a display name and <address>"),
        ]:
            self.assertEqual(readMailboxes(body).defects, (defect,), body)

    def test_localPartOf64Octets(self):
        """
        RFC 5321 4.5.3.1.1: a local part of 64 octets is read; 65 is the
        defect above.
        """
        reading = readMailboxes("l" * 64 + "@x.nl")
        self.assertEqual(reading.defects, ())
        self.assertEqual([m.localPart for m in reading.mailboxes], ["l" * 64])


class AddrSpecTests(unittest.TestCase):
    """
    Splitting an addr-spec at the right C{@}, and its canonical form.
    """

    def test_splitAtTheLastAt(self):
        """
        A quoted local part may hold C{@}; the domain follows the last one.
        """
        self.assertEqual(
            splitAddrSpec('"a@evil.nl"@mijnbedrijf.nl'), ("a@evil.nl", "mijnbedrijf.nl")
        )
        self.assertEqual(splitAddrSpec('"a\\"b"@x.nl'), ('a"b', "x.nl"))
        self.assertEqual(splitAddrSpec("ik@x.nl"), ("ik", "x.nl"))
        self.assertRaises(ValueError, splitAddrSpec, "no-at-sign")

    def test_format(self):
        self.assertEqual(formatAddrSpec("ik", "x.nl"), "ik@x.nl")
        self.assertEqual(formatAddrSpec("a@b", "x.nl"), '"a@b"@x.nl')
        self.assertEqual(formatAddrSpec('a"b\\', "x.nl"), '"a\\"b\\\\"@x.nl')
        self.assertEqual(formatAddrSpec("a..b", "x.nl"), '"a..b"@x.nl')

    def test_addressListDomainAfterTheLastAt(self):
        """
        C{"a@evil.nl"@mijnbedrijf.nl} is a mailbox of mijnbedrijf.nl, and
        C{"x@mijnbedrijf.nl"@evil.nl} one of evil.nl, whatever the quoted
        part holds.
        """
        domain = AddressList.parse(["@mijnbedrijf.nl"])
        self.assertTrue(domain.matches('"a@evil.nl"@mijnbedrijf.nl'))
        self.assertTrue(domain.matches('"a@evil.nl"@MijnBedrijf.NL'))
        self.assertFalse(domain.matches('"x@mijnbedrijf.nl"@evil.nl'))
        self.assertFalse(domain.matches("mijnbedrijf.nl@evil.nl"))
        self.assertFalse(domain.matches("mijnbedrijf.nl"))
        self.assertFalse(domain.matches(""))
        self.assertTrue(domain.matchesMailbox("a@evil.nl", "mijnbedrijf.nl"))
        self.assertFalse(domain.matchesMailbox("x@mijnbedrijf.nl", "evil.nl"))

    def test_addressListQuotedForms(self):
        """
        An issued address and its quoted spelling are one mailbox; a quoted
        local part holding C{@} is matched as a whole.
        """
        one = AddressList.parse(['"ik"@Acme.nl', '"a@b"@acme.nl'])
        self.assertTrue(one.matches("ik@acme.nl"))
        self.assertTrue(one.matches('"IK"@acme.nl'))
        self.assertTrue(one.matchesMailbox("a@b", "acme.nl"))
        self.assertTrue(one.matches('"a@b"@acme.nl'))
        self.assertFalse(one.matches("b@acme.nl"))
        self.assertFalse(one.matches('"ik@acme.nl"@acme.nl'))
