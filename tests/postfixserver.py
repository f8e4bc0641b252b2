# -*- test-case-name: tests.test_selftest_smuggling -*-
"""
A throwaway Postfix for tests and the benchmark: Debian's C{postfix -c DIR
start-fg} with its own main.cf and master.cf, queue, data directory and log
under a temp directory; smtpd on one loopback port with a certificate of
the caller's (STARTTLS required, or TLS from the first byte), AUTH only
over TLS through a Cyrus sasldb in that directory, nothing delivered
locally.  The one Postfix helper of the project (L{tests.test_selftest_smuggling},
C{bench/run.py}); never the system's Postfix, whose configuration it does
not read.

A throwaway instance needs root (Postfix's master runs as root) and the
C{postfix} user the package creates.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
from unittest import SkipTest

from tests.waiting import listening, waitUntilBlocking

POSTFIX = "/usr/sbin/postfix"

#: The services a submission-and-relay Postfix needs; C{{listen}} is the
#: smtpd line's address, C{{options}} its C{-o} overrides.
MASTER_CF = """\
{listen} inet n - n - - smtpd{options}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfixMissing(cyrus: bool = True) -> str | None:
    """
    Why a throwaway Postfix cannot run here, or L{None}.

    @param cyrus: its SASL is a Cyrus sasldb (made with C{saslpasswd2}).
    """
    if not os.path.exists(POSTFIX):
        return f"{POSTFIX} is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a throwaway Postfix instance needs root (its master runs as root)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user (the package creates it)"
    if cyrus and not shutil.which("saslpasswd2"):
        return "saslpasswd2 missing (apt-get install sasl2-bin libsasl2-modules)"
    return None


class ThrowawayPostfix:
    """
    One Postfix instance in C{directory}.

    @param settings: main.cf settings over the defaults of L{mainSettings}
        (a relayhost, limits, TLS policy, C{smtpd_forbid_bare_newline} ...).
    @param account: (user, password) put in the sasldb, or L{None} when the
        caller sets up SASL itself (C{smtpd_sasl_type} in C{settings}).
    @param implicit: smtpd speaks TLS from the first byte
        (C{smtpd_tls_wrappermode}) instead of offering STARTTLS.

    @ivar etc: its C{config_directory}; @ivar log: its mail log.
    """

    def __init__(
        self,
        directory: str,
        port: int,
        certFile: str,
        keyFile: str,
        settings: dict[str, str] | None = None,
        account: tuple[str, str] | None = None,
        implicit: bool = False,
    ) -> None:
        self.directory = directory
        self.port = port
        self.etc = os.path.join(directory, "etc")
        self.log = os.path.join(directory, "maillog")
        self.process: subprocess.Popen | None = None
        _checkSearchable(os.path.dirname(os.path.abspath(directory)))
        # Its daemons talk over UNIX sockets in queue/private and queue/public
        # (public/postlog the longest): sun_path holds 107 bytes.
        if len(os.path.join(directory, "queue/public/postlog")) > 107:
            raise ValueError(f"{directory} is too long for Postfix's sockets")
        self._write(certFile, keyFile, settings or {}, account, implicit)

    def mainSettings(self, chain: str) -> dict[str, str]:
        """
        The main.cf every instance has: its own directories and log, no
        local delivery, submission only after STARTTLS and AUTH.
        """
        return {
            "compatibility_level": "3.6",
            "queue_directory": os.path.join(self.directory, "queue"),
            "data_directory": os.path.join(self.directory, "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "localhost",
            "mydomain": "localhost",
            "myorigin": "localhost",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:no local delivery",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "",
            "maillog_file": self.log,
            "maillog_file_prefixes": self.directory,
            "smtpd_tls_chain_files": chain,
            "smtpd_tls_security_level": "encrypt",
            "smtpd_tls_auth_only": "yes",
            "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
            "smtpd_tls_protocols": ">=TLSv1.2",
            "smtpd_tls_loglevel": "0",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_local_domain": "localhost",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": os.path.join(self.etc, "sasl"),
            "disable_dns_lookups": "yes",
            "smtp_host_lookup": "native",
            "biff": "no",
            "alternate_config_directories": self.etc,
        }

    def _write(self, certFile, keyFile, settings, account, implicit) -> None:
        # Debian's smtpd reads smtpd.conf from $config_directory/sasl (strace:
        # it does not look in cyrus_sasl_config_path), so it goes there.
        sasl = os.path.join(self.etc, "sasl")
        queue = os.path.join(self.directory, "queue")
        data = os.path.join(self.directory, "data")
        for d in (self.etc, queue, data, sasl):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.directory, 0o755)
        postfixUser = pwd.getpwnam("postfix")
        os.chown(data, postfixUser.pw_uid, postfixUser.pw_gid)
        # The certificate must be readable by smtpd (it runs as postfix).
        chain = os.path.join(self.etc, "chain.pem")
        with open(chain, "w") as out:
            for path in (keyFile, certFile):
                with open(path) as f:
                    out.write(f.read())
        os.chmod(chain, 0o640)
        os.chown(chain, 0, postfixUser.pw_gid)
        if account is not None:
            user, password = account
            sasldb = os.path.join(sasl, "sasldb2")
            subprocess.run(
                ["saslpasswd2", "-f", sasldb, "-c", "-p", "-u", "localhost", user],
                input=password,
                text=True,
                check=True,
            )
            os.chmod(sasldb, 0o640)
            os.chown(sasldb, 0, postfixUser.pw_gid)
            with open(os.path.join(sasl, "smtpd.conf"), "w") as f:
                f.write(
                    "pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                    f"mech_list: PLAIN LOGIN\nsasldb_path: {sasldb}\n"
                )
        main = {**self.mainSettings(chain), **settings}
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            for k, v in main.items():
                f.write(f"{k} = {v}\n")
        options = " -o smtpd_tls_wrappermode=yes" if implicit else ""
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(listen=f"127.0.0.1:{self.port}", options=options))
        subprocess.run(
            [POSTFIX, "-c", self.etc, "set-permissions"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        subprocess.run([POSTFIX, "-c", self.etc, "check"], check=True)

    def start(self, env: dict[str, str] | None = None) -> None:
        """
        Start the master in the foreground and wait until smtpd listens
        (blocking: call it from a thread, or before the reactor has work).
        """
        self.process = subprocess.Popen(
            [POSTFIX, "-c", self.etc, "start-fg"],
            cwd=self.directory,
            env=dict(os.environ, **(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.directory, "postfix.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"postfix exited with {process.returncode} before listening"
                    f" (see {self.directory}/postfix.out)"
                )
            return listening(self.port)

        waitUntilBlocking(ready, 60, f"Postfix to listen on {self.port}")

    def postconf(self, *args: str) -> str:
        """
        C{postconf} on this instance's configuration.
        """
        return subprocess.run(
            ["postconf", "-c", self.etc, *args],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout

    def reload(self) -> None:
        subprocess.run([POSTFIX, "-c", self.etc, "reload"], check=True)

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", self.etc, "-f"], check=True)

    def stop(self) -> None:
        """
        C{postfix stop}, and wait for the master to exit.
        """
        if self.process is not None and self.process.poll() is None:
            subprocess.run(
                [POSTFIX, "-c", self.etc, "stop"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _checkSearchable(path: str) -> None:
    """
    Postfix's daemons run as the C{postfix} user and must reach the
    instance's directory: every directory above it must be searchable by
    others (trial's C{mktemp} parent is 0700; chmod it 0711 first).

    @raise ValueError: naming the first one that is not.
    """
    while True:
        if not os.stat(path).st_mode & 0o001:
            raise ValueError(f"{path} is not searchable by the postfix user")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def postfixDirectory(testCase) -> str:
    """
    A directory for a throwaway Postfix in a test, removed in its cleanup:
    in the system's temp directory, since trial's are too deep for
    Postfix's socket paths and not searchable by its daemons.  Skips the
    test when a throwaway Postfix cannot run here; under CI=true fails it
    instead (run-tests.sh installs Postfix).
    """
    reason = postfixMissing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            testCase.fail(f"{reason} (CI must have it: see run-tests.sh)")
        raise SkipTest(reason)
    directory = tempfile.mkdtemp(prefix="msa-postfix-")
    os.chmod(directory, 0o755)
    testCase.addCleanup(shutil.rmtree, directory, True)
    return directory
