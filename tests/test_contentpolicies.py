# -*- test-case-name: tests.test_contentpolicies -*-
"""
Tests for L{msa.policy.contentpolicies}: the C{headers} policy
(L{HeaderPolicy}) and L{loadPolicies}, which builds the chain from the
C{[[content.policy]]} tables (built-in names with their options, any
importable class, and every error naming the policy at fault), with the
example policy of L{tests.example_policy}.
"""

from twisted.trial import unittest
from zope.interface import implementer

from msa.errors import SMTPReply
from msa.interfaces import IContentPolicy
from msa.policy.content import ContentPolicyChain
from msa.policy.contentpolicies import BUILTIN, HeaderPolicy, loadPolicies, loadPolicy
from msa.policy.mimeparts import MimePartsPolicy
from tests.example_policy import RequireHeader
from tests.test_content import ENVELOPE, GOOD, adding, check, without


def headerRefusal(message: bytes, **options) -> SMTPReply | None:
    return check(ContentPolicyChain([HeaderPolicy(**options)]), message)


class HeaderPolicyTests(unittest.TestCase):
    def assertRefused(self, reply, text, code=550, status="5.6.0"):
        self.assertIsNotNone(reply)
        self.assertEqual((reply.code, reply.status, reply.text), (code, status, text))

    def test_good(self):
        self.assertIsNone(headerRefusal(GOOD))

    def test_headersOnly(self):
        self.assertIsNone(headerRefusal(GOOD.split(b"\r\n\r\n")[0] + b"\r\n"))

    def test_missing(self):
        for name in [b"From", b"Date", b"Message-ID"]:
            self.assertRefused(
                headerRefusal(without(GOOD, name)),
                f"Message refused: exactly one {name.decode()}: header field is "
                "required (RFC 5322 3.6)",
            )

    def test_duplicated(self):
        for line in [
            b"From: other@mijnbedrijf.nl",
            b"DATE: Tue, 1 Jul 2025 10:00:00 +0200",
            b"message-id: <2@mijnbedrijf.nl>",
        ]:
            name = {b"F": "From", b"D": "Date", b"m": "Message-ID"}[line[:1]]
            self.assertRefused(
                headerRefusal(adding(GOOD, line)),
                f"Message refused: exactly one {name}: header field is required "
                "(RFC 5322 3.6)",
            )

    def test_atMostOnce(self):
        for name in ["Sender", "Reply-To", "To", "Cc", "Bcc", "Subject", "References"]:
            message = adding(adding(GOOD, f"{name}: <x@y>".encode()), b"X-Other: 1")
            if name != "To" and name != "Subject":
                message = adding(message, f"{name}: <z@y>".encode())
            self.assertRefused(
                headerRefusal(message),
                f"Message refused: at most one {name}: header field is allowed "
                "(RFC 5322 3.6)",
            )

    def test_optional(self):
        message = without(without(without(GOOD, b"From"), b"Date"), b"Message-ID")
        self.assertIsNone(
            headerRefusal(
                message, requireFrom=False, requireDate=False, requireMessageId=False
            )
        )
        twice = adding(GOOD, b"Message-ID: <2@b>")
        self.assertRefused(
            headerRefusal(twice, requireMessageId=False),
            "Message refused: at most one Message-ID: header field is allowed "
            "(RFC 5322 3.6)",
        )

    def test_badDate(self):
        for date in [b"yesterday", b"", b"Tue, 41 Jul 2025 10:00:00 +0200", b"\xff"]:
            message = adding(without(GOOD, b"Date"), b"Date: " + date)
            self.assertRefused(
                headerRefusal(message),
                "Message refused: the Date: header field is not a valid date-time "
                "(RFC 5322 3.3)",
            )

    def test_badDateNotRequired(self):
        message = adding(without(GOOD, b"Date"), b"Date: soon")
        self.assertRefused(
            headerRefusal(message, requireDate=False),
            "Message refused: the Date: header field is not a valid date-time "
            "(RFC 5322 3.3)",
        )

    def test_dateFormats(self):
        for date in [
            b"1 Jul 2025 10:00 +0200",
            b"Tue, 01 Jul 2025 08:00:00 GMT",
            b"Tue, 1 Jul 2025 10:00:00 +0200 (CEST)",
        ]:
            message = adding(without(GOOD, b"Date"), b"Date: " + date)
            self.assertIsNone(headerRefusal(message), date)

    def test_badMessageId(self):
        for value in [b"1@mijnbedrijf.nl", b"<nodomain>", b"<a b@c>", b"<@c>"]:
            message = adding(without(GOOD, b"Message-ID"), b"Message-ID: " + value)
            self.assertRefused(
                headerRefusal(message),
                "Message refused: the Message-ID: header field is not a valid "
                "msg-id (RFC 5322 3.6.4)",
            )

    def test_malformed(self):
        self.assertRefused(
            headerRefusal(b"From: a@b\r\nnonsense\r\n\r\nbody\r\n"),
            "Message refused: malformed header section: line 2 is neither a "
            "header field nor a continuation line (RFC 5322 2.2)",
        )
        self.assertRefused(
            headerRefusal(b" folded\r\n" + GOOD),
            "Message refused: malformed header section: the first line is a "
            "continuation line (RFC 5322 2.2)",
        )

    def test_singleFrom(self):
        two = adding(without(GOOD, b"From"), b"From: a@mijnbedrijf.nl, b@x.nl")
        text = "Message refused: the From: header field must hold exactly one mailbox"
        self.assertRefused(headerRefusal(two), text)
        self.assertRefused(
            headerRefusal(two, singleFrom=False),
            "Message refused: a Sender: header field is required when From: "
            "holds more than one mailbox (RFC 5322 3.6.2)",
        )
        withSender = adding(two, b"Sender: a@mijnbedrijf.nl")
        self.assertIsNone(headerRefusal(withSender, singleFrom=False))
        for value in [b"garbage", b"", b"a@b c@d", b"x@", b"<>"]:
            bad = adding(without(GOOD, b"From"), b"From: " + value)
            self.assertRefused(headerRefusal(bad), text)
            self.assertRefused(
                headerRefusal(bad, singleFrom=False),
                "Message refused: the From: header field is not a valid mailbox "
                "list (RFC 5322 3.6.2)",
            )

    def test_fromForms(self):
        for value in [
            b"ik@mijnbedrijf.nl",
            b'"Ik, de baas" <ik@mijnbedrijf.nl>',
            b"J\xc3\xb6hn <j@mijnbedrijf.nl>",
            b"=?utf-8?q?J=C3=B6hn?= <j@mijnbedrijf.nl>",
            b"ik@mijnbedrijf.nl (comment)",
        ]:
            message = adding(without(GOOD, b"From"), b"From: " + value)
            self.assertIsNone(headerRefusal(message), value)


@implementer(IContentPolicy)
class Configurable:
    def __init__(self, **options):
        self.options = options

    def startMessage(self, envelope):
        return None


class NotAPolicy:
    def __init__(self, **options):
        pass


def notAClass():
    raise ValueError("boom")


class Nested:
    Inner = Configurable


class LoadPoliciesTests(unittest.TestCase):
    def test_builtins(self):
        chain = loadPolicies(
            [
                {"name": "headers", "require_message_id": False, "single_from": False},
                {"name": "mime-parts", "max_parts": 5, "max_part_size": 10},
                {"name": "headers"},
            ]
        )
        names = [name for name, _ in chain.policies]
        self.assertEqual(names, ["headers", "mime-parts", "headers"])
        headers, mime, default = (p for _, p in chain.policies)
        self.assertIsInstance(headers, HeaderPolicy)
        self.assertEqual(
            headers.required, {"From": True, "Date": True, "Message-ID": False}
        )
        self.assertFalse(headers.singleFrom)
        self.assertEqual((mime.maxParts, mime.maxPartSize, mime.maxDepth), (5, 10, 20))
        self.assertEqual(default.required["Message-ID"], True)

    def test_empty(self):
        self.assertEqual(len(loadPolicies([])), 0)

    def test_headerLimits(self):
        chain = loadPolicies([], maxHeaderSize=100, maxHeaderFields=3)
        self.assertEqual((chain.maxHeaderSize, chain.maxHeaderFields), (100, 3))

    def assertError(self, specs, message):
        e = self.assertRaises(ValueError, loadPolicies, specs)
        self.assertEqual(str(e), message)

    def test_builtinOptionErrors(self):
        self.assertError(
            [{"name": "headers", "require_to": True}],
            "content policy 'headers': unknown option 'require_to' (known: "
            "require_from, require_date, require_message_id, single_from)",
        )
        self.assertError(
            [{"name": "headers", "require_date": "no"}],
            "content policy 'headers': require_date must be a boolean",
        )
        self.assertError(
            [{"name": "mime-parts", "max_parts": True}],
            "content policy 'mime-parts': max_parts must be an integer",
        )
        self.assertError(
            [{"name": "mime-parts", "max_parts": -1}],
            "content policy 'mime-parts': maxParts must not be negative",
        )

    def test_shapeErrors(self):
        self.assertError("headers", "content policies must be a list of tables")
        self.assertError(["headers"], "content policy 'headers': must be a table")
        self.assertError(
            [{"max_parts": 1}], "content policy {'max_parts': 1}: needs a name"
        )

    def test_dottedPath(self):
        chain = loadPolicies(
            [{"name": "tests.test_contentpolicies:Configurable", "a": 1, "b_c": "x"}]
        )
        [(name, policy)] = chain.policies
        self.assertEqual(name, "tests.test_contentpolicies:Configurable")
        self.assertIsInstance(policy, Configurable)
        self.assertEqual(policy.options, {"a": 1, "b_c": "x"})
        [(_, inner)] = loadPolicies(
            [{"name": "tests.test_contentpolicies:Nested.Inner"}]
        ).policies
        self.assertIsInstance(inner, Configurable)

    def test_unknownName(self):
        self.assertError(
            [{"name": "spamassassin"}],
            "unknown content policy 'spamassassin': give a built-in name "
            "(headers, mime-parts) or module:Class",
        )

    def test_importErrors(self):
        e = self.assertRaises(
            ValueError, loadPolicies, [{"name": "no_such_module_xyz:Policy"}]
        )
        self.assertIn(
            "content policy 'no_such_module_xyz:Policy': cannot import "
            "no_such_module_xyz",
            str(e),
        )
        self.assertError(
            [{"name": "tests.test_contentpolicies:Missing"}],
            "content policy 'tests.test_contentpolicies:Missing': "
            "tests.test_contentpolicies has no Missing",
        )

    def test_notAPolicy(self):
        e = self.assertRaises(
            ValueError,
            loadPolicies,
            [{"name": "tests.test_contentpolicies:NotAPolicy"}],
        )
        self.assertIn(
            "content policy 'tests.test_contentpolicies:NotAPolicy': ", str(e)
        )
        self.assertIn("does not provide IContentPolicy", str(e))

    def test_constructorFails(self):
        self.assertError(
            [{"name": "tests.test_contentpolicies:notAClass"}],
            "content policy 'tests.test_contentpolicies:notAClass': "
            "cannot create it: boom",
        )
        e = self.assertRaises(
            ValueError,
            loadPolicies,
            [{"name": "tests.example_policy:RequireHeader", "wrong": 1}],
        )
        self.assertIn("cannot create it", str(e))
        self.assertIn("wrong", str(e))


class ExamplePolicyTests(unittest.TestCase):
    def setUp(self):
        self.chain = loadPolicies(
            [
                {"name": "headers"},
                {
                    "name": "tests.example_policy:RequireHeader",
                    "header": "X-Digipoort-Berichttype",
                },
            ]
        )

    def test_loaded(self):
        [_, (name, policy)] = self.chain.policies
        self.assertIsInstance(policy, RequireHeader)
        self.assertEqual(policy.header, "X-Digipoort-Berichttype")

    def test_present(self):
        message = adding(GOOD, b"x-digipoort-berichttype: aangifte")
        self.assertIsNone(check(self.chain, message))

    def test_missing(self):
        e = check(self.chain, GOOD)
        self.assertEqual(
            (e.code, e.status, e.text),
            (
                550,
                "5.6.0",
                "Message refused: exactly one X-Digipoort-Berichttype: header "
                "field is required",
            ),
        )

    def test_headerPolicyFirst(self):
        e = check(self.chain, without(GOOD, b"From"))
        self.assertIn("From:", e.text)

    def test_values(self):
        chain = loadPolicies(
            [
                {
                    "name": "tests.example_policy:RequireHeader",
                    "header": "X-Digipoort-Berichttype",
                    "values": ["aangifte", "suppletie"],
                }
            ]
        )
        ok = adding(GOOD, b"X-Digipoort-Berichttype: Suppletie")
        self.assertIsNone(check(chain, ok))
        bad = adding(GOOD, b"X-Digipoort-Berichttype: spam")
        self.assertEqual(
            check(chain, bad).text,
            "Message refused: unknown X-Digipoort-Berichttype",
        )

    def test_badOption(self):
        self.assertRaises(
            ValueError,
            loadPolicies,
            [{"name": "tests.example_policy:RequireHeader", "header": ""}],
        )


class HeaderPolicyMoreTests(unittest.TestCase):
    """
    The C{headers} policy's behaviours without a test of their own before
    the tests followed the modules.
    """

    def test_inReplyToAtMostOnce(self):
        """
        In-Reply-To, too, may occur at most once.
        """
        message = adding(adding(GOOD, b"In-Reply-To: <a@b>"), b"In-Reply-To: <c@d>")
        reply = headerRefusal(message)
        self.assertEqual(
            reply.text,
            "Message refused: at most one In-Reply-To: header field is allowed "
            "(RFC 5322 3.6)",
        )

    def test_bodyNotCounted(self):
        """
        Only the header section counts: lines of the body that look like
        header fields are content.
        """
        message = GOOD + b"From: someone@else.example\r\nDate: never\r\n"
        self.assertIsNone(headerRefusal(message))

    def test_optionalFieldStillChecked(self):
        """
        A field that is not required is still checked when it is there.
        """
        bad = adding(without(GOOD, b"From"), b"From: garbage")
        self.assertEqual(
            headerRefusal(bad, requireFrom=False).text,
            "Message refused: the From: header field must hold exactly one mailbox",
        )
        badId = adding(without(GOOD, b"Message-ID"), b"Message-ID: nonsense")
        self.assertEqual(
            headerRefusal(badId, requireMessageId=False).text,
            "Message refused: the Message-ID: header field is not a valid msg-id "
            "(RFC 5322 3.6.4)",
        )

    def test_refusedBeforeBody(self):
        """
        The refusal comes as soon as the header section ends, before any
        body line is looked at.
        """
        checker = ContentPolicyChain([HeaderPolicy()]).startMessage(ENVELOPE)
        for line in without(GOOD, b"Date").split(b"\r\n\r\n")[0].split(b"\r\n"):
            checker.lineReceived(line)
        self.assertRaises(SMTPReply, checker.lineReceived, b"")


class LoadPolicyTests(unittest.TestCase):
    """
    L{loadPolicy} and the table of built-in names, and option types checked
    as the configuration gives them.
    """

    def test_builtinNames(self):
        """
        The configuration names two built-in policies.
        """
        self.assertEqual(
            BUILTIN, {"headers": HeaderPolicy, "mime-parts": MimePartsPolicy}
        )

    def test_loadPolicy(self):
        """
        One table gives its name and a new policy made from its options; the
        table itself is left as it was.
        """
        spec = {"name": "mime-parts", "max_depth": 3}
        name, policy = loadPolicy(spec)
        self.assertEqual(name, "mime-parts")
        self.assertIsInstance(policy, MimePartsPolicy)
        self.assertEqual(policy.maxDepth, 3)
        self.assertEqual(spec, {"name": "mime-parts", "max_depth": 3})
        self.assertIsNot(loadPolicy(spec)[1], policy)

    def test_optionTypes(self):
        """
        An integer is not a boolean, a string is not an integer: each is
        refused naming the policy and the option.
        """
        for spec, message in [
            (
                {"name": "headers", "single_from": 1},
                "content policy 'headers': single_from must be a boolean",
            ),
            (
                {"name": "mime-parts", "max_depth": "3"},
                "content policy 'mime-parts': max_depth must be an integer",
            ),
            (
                {"name": "mime-parts", "max_depth": 0},
                "content policy 'mime-parts': maxDepth must be at least 1",
            ),
        ]:
            e = self.assertRaises(ValueError, loadPolicy, spec)
            self.assertEqual(str(e), message)

    def test_optionalIntegerType(self):
        """
        An option that takes an integer (or nothing) names the type it wants
        when given another, as every option does, rather than failing with
        a L{KeyError}.
        """
        e = self.assertRaises(
            ValueError, loadPolicy, {"name": "mime-parts", "max_part_size": "10"}
        )
        self.assertEqual(
            str(e), "content policy 'mime-parts': max_part_size must be an integer"
        )

    def test_nameNotAString(self):
        """
        A name that is not a non-empty string is refused.
        """
        for spec in [{"name": 5}, {"name": ""}]:
            e = self.assertRaises(ValueError, loadPolicy, spec)
            self.assertIn("needs a name", str(e))
