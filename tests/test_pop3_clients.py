# -*- test-case-name: tests.test_pop3_clients -*-
"""
Real POP3 clients against the assembled daemon (R16): each fetches over
STLS and over implicit TLS where it can, logs in with the mechanisms it
has, and the message it stored is compared with the one delivered.
mpop logs in with SCRAM-SHA-256 and DIGEST-MD5 (GNU SASL), fetchmail and
getmail6 and Perl's Net::POP3 with USER/PASS, Jakarta Mail's POP3 provider
(C{tests/JakartaPop3Fetch.java}) with USER/PASS and AUTH PLAIN, and
NeoMutt's fetch-mail (C{pop://} and C{pops://}) in a tmux terminal.
getmail6 has no STLS for POP3, so it fetches over implicit TLS only.

The programs are Debian packages that run-tests.sh installs; under
CI=true a missing one fails (L{tests.e2e.requireProgram}).
"""

import os
import secrets

from twisted.internet import defer
from twisted.trial import unittest

from tests.e2e import USERS, RunningMSA, requireProgram, runProgram
from tests.test_pop3_e2e import MESSAGE, deliver, messageFiles
from tests.waiting import waitUntil

PASSWORD = USERS["alice"]

JAKARTA_SOURCE = os.path.join(os.path.dirname(__file__), "JakartaPop3Fetch.java")
#: Debian's libjakarta-mail-java and the activation jar it needs.
JAKARTA_JARS = [
    "/usr/share/java/jakarta-mail.jar",
    "/usr/share/java/jakarta-activation.jar",
]


def maildir(testCase: unittest.TestCase) -> str:
    """
    An empty Maildir for a client to deliver into.
    """
    path = os.path.abspath(testCase.mktemp())
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(path, sub))
    return path


def fetched(path: str) -> list[bytes]:
    """
    The messages a client delivered into the Maildir C{path}.
    """
    found = []
    for sub in ("new", "cur"):
        for name in sorted(os.listdir(os.path.join(path, sub))):
            with open(os.path.join(path, sub, name), "rb") as f:
                found.append(f.read())
    return found


def withoutAddedHeaders(data: bytes) -> bytes:
    """
    A fetched message without the trace fields clients put on top
    (C{Received:}, C{Return-Path:}, C{Delivered-To:}, C{X-...:} they own),
    with CRLF line ends (clients store LF).
    """
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    start = data.find(b"From: douane@overheid.nl\r\n")
    return data[start:] if start >= 0 else data


class ClientTests(unittest.TestCase):
    def setUp(self):
        self.msa = RunningMSA(self, pop3={})

    @defer.inlineCallbacks
    def fetchWith(self, program: str, args: list[str], box: str):
        """
        Deliver L{MESSAGE}, run the client, and check it stored the
        message whole and deleted it from the server.

        @return: a L{Deferred} of what the client printed.
        """
        yield deliver(self.msa, "alice", MESSAGE)
        out, err, code = yield runProgram(program, args)
        self.assertEqual(code, 0, (out, err))
        [message] = fetched(box)
        self.assertEqual(withoutAddedHeaders(message), MESSAGE)
        self.assertEqual(messageFiles(self.msa), [])
        return out + err

    # -- mpop (GNU SASL) -------------------------------------------------

    def _mpop(self, mechanism: str, implicit: bool):
        mpop = requireProgram(self, "mpop")
        box = maildir(self)
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write("defaults\n")
        os.chmod(config, 0o600)
        port = self.msa.pop3sPort if implicit else self.msa.pop3Port
        args = [
            "-C",
            config,
            "--host=localhost",
            f"--port={port}",
            "--tls=on",
            f"--tls-starttls={'off' if implicit else 'on'}",
            f"--tls-trust-file={self.msa.certFile}",
            f"--auth={mechanism}",
            "--user=alice",
            f"--passwordeval=echo '{PASSWORD}'",
            f"--delivery=maildir,{box}",
            "--keep=off",
            "--only-new=off",
            "--uidls-file=" + os.path.abspath(self.mktemp()),
        ]
        return self.fetchWith(mpop, args, box)

    def test_mpopScramSTLS(self):
        return self._mpop("scram-sha-256", implicit=False)

    def test_mpopScramImplicit(self):
        return self._mpop("scram-sha-256", implicit=True)

    def test_mpopDigestMD5STLS(self):
        return self._mpop("digest-md5", implicit=False)

    def test_mpopDigestMD5Implicit(self):
        return self._mpop("digest-md5", implicit=True)

    def test_mpopUserImplicit(self):
        return self._mpop("user", implicit=True)

    # -- fetchmail -------------------------------------------------------

    def _fetchmail(self, implicit: bool):
        fetchmail = requireProgram(self, "fetchmail")
        box = maildir(self)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        rc = os.path.join(home, "fetchmailrc")
        port = self.msa.pop3sPort if implicit else self.msa.pop3Port
        tls = "ssl" if implicit else "sslproto 'TLS1.2+'"
        with open(rc, "w") as f:
            f.write(
                f"set no syslog\n"
                f"poll localhost service {port} protocol pop3 auth password "
                f"uidl no envelope\n"
                f"  user alice password '{PASSWORD}' is alice\n"
                f"  {tls} sslcertck sslcertfile {self.msa.certFile}\n"
                f"  nokeep fetchall\n"
                f"  mda \"/bin/sh -c 'cat > {box}/new/message'\"\n"
            )
        os.chmod(rc, 0o600)
        args = [
            "--nodetach",
            "--fetchmailrc",
            rc,
            "--pidfile",
            os.path.join(home, "pid"),
            "--idfile",
            os.path.join(home, "ids"),
        ]
        return self.fetchWith(fetchmail, args, box)

    def test_fetchmailSTLS(self):
        return self._fetchmail(implicit=False)

    def test_fetchmailImplicit(self):
        return self._fetchmail(implicit=True)

    # -- getmail6 --------------------------------------------------------

    def test_getmailImplicit(self):
        getmail = requireProgram(self, "getmail")
        box = maildir(self)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        with open(os.path.join(home, "getmailrc"), "w") as f:
            f.write(
                "[retriever]\n"
                "type = SimplePOP3SSLRetriever\n"
                "server = localhost\n"
                f"port = {self.msa.pop3sPort}\n"
                "username = alice\n"
                f"password = {PASSWORD}\n"
                f"ca_certs = {self.msa.certFile}\n"
                "[destination]\n"
                "type = MDA_external\n"
                "path = /bin/sh\n"
                f"arguments = ('-c', 'cat > {box}/new/message')\n"
                "allow_root_commands = true\n"
                "[options]\n"
                "delete = true\n"
                "read_all = true\n"
                "received = false\n"
                "delivered_to = false\n"
            )
        args = ["--getmaildir", home, "--rcfile", "getmailrc", "--quiet"]
        return self.fetchWith(getmail, args, box)

    # -- Perl Net::POP3 --------------------------------------------------

    def _netPOP3(self, implicit: bool, login: str):
        """
        Net::POP3 with C{login} (USER/PASS).  Its C{auth} is not used:
        given a user and password it sends CAPA's whole SASL line as the
        mechanism, and with an Authen::SASL::Perl object (3.14 here) it
        answers PLAIN's and DIGEST-MD5's challenges with empty lines.
        """
        perl = requireProgram(self, "perl")
        box = maildir(self)
        port = self.msa.pop3sPort if implicit else self.msa.pop3Port
        credentials = f"$pop->{login}('alice', '{PASSWORD}')"
        script = f"""
use strict; use Net::POP3;
my %tls = (SSL_ca_file => '{self.msa.certFile}', SSL_verifycn_name => 'localhost');
my $pop = Net::POP3->new('localhost', Port => {port}, Timeout => 20,
                         {"SSL => 1, %tls" if implicit else ""}) or die "connect: $@";
{"" if implicit else "$pop->starttls(%tls) or die 'starttls: ' . $pop->message;"}
my $n = {credentials};
$n or die 'login: ' . $pop->message;
my $lines = $pop->get(1) or die 'get: ' . $pop->message;
open(my $out, '>', '{box}/new/message') or die;
binmode $out; print $out @$lines; close $out;
$pop->delete(1) or die 'dele';
$pop->quit or die 'quit';
"""
        return self.fetchWith(perl, ["-e", script], box)

    def test_netPOP3UserSTLS(self):
        return self._netPOP3(implicit=False, login="login")

    def test_netPOP3UserImplicit(self):
        return self._netPOP3(implicit=True, login="login")

    # -- Jakarta Mail ----------------------------------------------------

    @defer.inlineCallbacks
    def _jakarta(self, implicit: bool, mechanisms: str | None = None):
        java = requireProgram(self, "java")
        javac = requireProgram(self, "javac")
        for jar in JAKARTA_JARS:
            if not os.path.exists(jar):
                if os.environ.get("CI") == "true":
                    self.fail(f"{jar} missing (run-tests.sh installs it)")
                raise unittest.SkipTest(f"{jar} missing")
        classes = os.path.abspath(self.mktemp())
        os.makedirs(classes)
        classpath = ":".join(JAKARTA_JARS)
        out, err, code = yield runProgram(
            javac, ["-cp", classpath, "-d", classes, JAKARTA_SOURCE]
        )
        self.assertEqual(code, 0, (out, err))
        box = maildir(self)
        port = self.msa.pop3sPort if implicit else self.msa.pop3Port
        args = [
            "-XX:TieredStopAtLevel=1",
            "-cp",
            f"{classes}:{classpath}",
            "JakartaPop3Fetch",
            str(port),
            "implicit" if implicit else "stls",
            self.msa.certFile,
            "alice",
            PASSWORD,
            os.path.join(box, "new", "message"),
            *([mechanisms] if mechanisms else []),
        ]
        transcript = yield self.fetchWith(java, args, box)
        return transcript

    def test_jakartaSTLS(self):
        return self._jakarta(implicit=False)

    def test_jakartaImplicit(self):
        return self._jakarta(implicit=True)

    @defer.inlineCallbacks
    def test_jakartaSaslPlain(self):
        transcript = yield self._jakarta(implicit=True, mechanisms="PLAIN")
        self.assertIn(b"\nDEBUG POP3: AUTH PLAIN succeeded\n", transcript)

    # -- NeoMutt ---------------------------------------------------------

    @defer.inlineCallbacks
    def _neomutt(self, url: str, port: int):
        """
        NeoMutt's fetch-mail (G), in a tmux session (it wants a terminal),
        into a Maildir; the server's certificate is the one it trusts.
        """
        neomutt = requireProgram(self, "neomutt")
        tmux = requireProgram(self, "tmux")
        box = maildir(self)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        rc = os.path.join(home, "neomuttrc")
        with open(rc, "w") as f:
            f.write(
                f'set pop_host = "{url}://alice@localhost:{port}"\n'
                f'set pop_pass = "{PASSWORD}"\n'
                "set pop_delete = yes\n"
                "set ssl_force_tls = yes\n"
                "set ssl_starttls = yes\n"
                f'set certificate_file = "{self.msa.certFile}"\n'
                "set mbox_type = Maildir\n"
                f'set folder = "{home}"\n'
                f'set spoolfile = "{box}"\n'
                "set header_cache = ''\n"
                "set message_cachedir = ''\n"
            )
        yield deliver(self.msa, "alice", MESSAGE)
        # A tmux server of its own (-L): parallel trial workers run these
        # tests at once, and must not share a server or a session name.
        name = "neomutt-" + secrets.token_hex(4)
        self.addCleanup(runProgram, tmux, ["-L", name, "kill-server"])
        out, err, code = yield runProgram(
            tmux,
            [
                "-L", name, "new-session", "-d", "-s", name, "-x", "120", "-y", "40",
                f"{neomutt} -n -F {rc}",
            ],
        )  # fmt: skip
        self.assertEqual(code, 0, (out, err))
        yield waitUntil(
            lambda: self.screen(tmux, name), 20, "NeoMutt to start", interval=0.2
        )
        yield runProgram(tmux, ["-L", name, "send-keys", "-t", name, "G"])
        yield waitUntil(lambda: fetched(box), 20, "NeoMutt to fetch")
        yield waitUntil(
            lambda: messageFiles(self.msa) == [], 20, "the message deleted at QUIT"
        )
        [message] = fetched(box)
        self.assertEqual(withoutAddedHeaders(message), MESSAGE)

    @staticmethod
    def screen(tmux: str, name: str) -> defer.Deferred:
        """
        Whether NeoMutt's index is on the tmux screen.
        """
        d = runProgram(tmux, ["-L", name, "capture-pane", "-p", "-t", name])
        return d.addCallback(lambda result: b"q:Quit" in result[0])

    def test_neomuttSTLS(self):
        return self._neomutt("pop", self.msa.pop3Port)

    def test_neomuttImplicit(self):
        return self._neomutt("pops", self.msa.pop3sPort)
