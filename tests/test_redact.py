# -*- test-case-name: tests.test_redact -*-
"""
L{msa.redact}: every password form of the connection strings the MSA takes
(PostgreSQL URLs and key/value strings, Redis URLs) is masked by its
structure.  A table of the forms, then random passwords from a hostile
alphabet in each form (checked against libpq's own parser, so that the
forms are the ones it accepts).  The daemon's own output is in
L{tests.test_secrets_e2e}.
"""

import random
import urllib.parse

from twisted.trial import unittest

from msa.redact import maskParseError, maskSecrets

TABLE = [
    # URL userinfo.
    ("postgresql://msa:s3cret@db/msa", "postgresql://msa:***@db/msa"),
    ("postgres://msa:s3%40cr%20et@db:5432/msa", "postgres://msa:***@db:5432/msa"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://default:s3cret@redis/2", "redis://default:***@redis/2"),
    ("postgresql://msa@db/msa", "postgresql://msa@db/msa"),
    # A raw "@" or space in the password: the userinfo runs to the last "@".
    ("postgresql://msa:s3@cret@db/msa", "postgresql://msa:***@db/msa"),
    ("postgresql://msa:s3 cret@db/msa", "postgresql://msa:***@db/msa"),
    # Query parameters: password and sslpassword, not passfile.
    ("postgresql://msa@db/msa?password=s3cret", "postgresql://msa@db/msa?password=***"),
    (
        "postgresql://db/msa?sslmode=require&sslpassword=k3y&passfile=/etc/pgpass",
        "postgresql://db/msa?sslmode=require&sslpassword=***&passfile=/etc/pgpass",
    ),
    (
        "postgresql://db/msa?PASSWORD=s3%26cret&user=msa",
        "postgresql://db/msa?PASSWORD=***&user=msa",
    ),
    ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0?password=***"),
    # libpq key/value strings.
    ("host=db password=s3cret user=msa", "host=db password=*** user=msa"),
    ("host=db password='s3 cret' user=msa", "host=db password=*** user=msa"),
    ("host=db password = 's3 \\' cret' user=msa", "host=db password = *** user=msa"),
    ("host=db password=s3\\ cret user=msa", "host=db password=*** user=msa"),
    ("password='unterminated user=msa", "password=***"),
    ("host=db sslpassword=k3y passfile=/p", "host=db sslpassword=*** passfile=/p"),
    # In running text, and two at once.
    (
        "Loaded 2 account(s) from postgresql://msa:pw@db/msa (version 3)",
        "Loaded 2 account(s) from postgresql://msa:***@db/msa (version 3)",
    ),
    (
        "store postgresql://a:pw1@h/d?password=pw2 and redis://:pw3@r/0.",
        "store postgresql://a:***@h/d?password=*** and redis://:***@r/0.",
    ),
    # A URL in a message that names the form: the userinfo stops at quotes.
    (
        "must be postgresql://user@host:port/database, not 'mysql://u:pw@h/d'",
        "must be postgresql://user@host:port/database, not 'mysql://u:***@h/d'",
    ),
    # Nothing to mask.
    (
        'password authentication failed for user "msa"',
        'password authentication failed for user "msa"',
    ),
    ("unix:///run/redis/redis.sock?db=2", "unix:///run/redis/redis.sock?db=2"),
]

#: Characters a password may have, the awkward ones many times over.
HOSTILE = "aZ9 '\"\\@:/?#&=%;+ \t" + "abcdefgh"


class TableTests(unittest.TestCase):
    def test_forms(self):
        for given, expected in TABLE:
            self.assertEqual(maskSecrets(given), expected, given)

    def test_parseError(self):
        """
        libpq's parse errors quote pieces of the string, which may be half
        a password: they go, except the C{"="} it names.
        """
        self.assertEqual(
            maskParseError(
                'missing "=" after "cret" in connection info string',
                "host=db password=s3 cret",
            ),
            'missing "=" after "***" in connection info string',
        )
        self.assertEqual(
            maskParseError(
                'invalid percent-encoded token: "s3%zzcret"',
                "postgresql://msa:s3%zzcret@db/msa",
            ),
            'invalid percent-encoded token: "***"',
        )

    def test_parseErrorNamesParameters(self):
        """
        A parameter name the string gives stays: it says what is wrong.
        """
        self.assertEqual(
            maskParseError(
                'invalid URI query parameter: "pool"',
                "postgresql://msa@db/msa?password=s3cret&pool=5",
            ),
            'invalid URI query parameter: "pool"',
        )


def _dsnQuoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class RandomPasswordTests(unittest.TestCase):
    """
    Random passwords in every form libpq and Redis take: libpq reads the
    password back from the string, and the masked string holds no trace of
    it, raw or percent-encoded.
    """

    def forms(self, password: str) -> list[tuple[str, bool]]:
        """
        (connection string, whether libpq parses it) for C{password}.
        """
        encoded = urllib.parse.quote(password, safe="")
        return [
            (f"postgresql://msa:{encoded}@db:5432/msa", True),
            (f"postgresql://msa@db/msa?password={encoded}&sslmode=disable", True),
            (f"postgresql://msa@db/msa?sslpassword={encoded}", True),
            (f"host=db user=msa password={_dsnQuoted(password)} dbname=msa", True),
            (f"redis://:{encoded}@127.0.0.1:6379/0", False),
            (f"redis://user:{encoded}@127.0.0.1:6379/0?db=1", False),
        ]

    def test_randomPasswords(self):
        from psycopg import conninfo

        rng = random.Random(18)
        for _ in range(300):
            password = "".join(rng.choice(HOSTILE) for _ in range(rng.randint(6, 20)))
            # A distinctive core, so that a leak is not mistaken for the
            # rest of the string.
            password = password[:3] + "Qx7Zk" + password[3:]
            for text, libpq in self.forms(password):
                if libpq:
                    parsed = conninfo.conninfo_to_dict(text)
                    self.assertIn(
                        password, (parsed.get("password"), parsed.get("sslpassword"))
                    )
                masked = maskSecrets(f"cannot connect to {text}: refused")
                self.assertNotIn("Qx7Zk", masked, (password, text))
                self.assertIn("***", masked)
                self.assertIn("db" if libpq else "127.0.0.1", masked)
