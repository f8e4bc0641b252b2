# -*- test-case-name: tests.test_selftest_pop3 -*-
"""
A throwaway Dovecot (Debian's C{dovecot-core}, C{dovecot-pop3d},
C{dovecot-lmtpd}) for tests and the benchmark (C{bench/peer_dovecot.py}):
POP3 with STLS and LMTP on free ports, serving Maildirs in the MSA's
layout (C{<mailboxes>/<account>/{tmp,new,cur}}; Dovecot reads the MSA's
file names, C{S=} being its own size field).

It runs as C{dovecot -F -c <dir>/dovecot.conf} (as root, as Dovecot's
master must), with everything of its own under C{<dir>}: C{base_dir}, the
log, the passwd-file; never the system's service or C{/etc/dovecot}.
TLS is required before a login (C{disable_plaintext_auth}), successful
password checks are cached for 300 s (the MSA's C{[accounts]
auth_cache_ttl} default), C{mail_fsync = always} (the MSA fsyncs each
delivered file and its directory), the login processes are in
"high-performance" mode and the limits allow 1000 sessions.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
from unittest import SkipTest

from tests.waiting import listening, waitUntilBlocking

DOVECOT = "/usr/sbin/dovecot"
#: Whom the mail processes run as (Dovecot refuses root), and so who must
#: own the Maildirs.
MAIL_USER = "nobody"


def dovecotMissing() -> str | None:
    """
    Why a throwaway Dovecot cannot run here, or L{None}.
    """
    if not os.path.exists(DOVECOT):
        return "no /usr/sbin/dovecot (apt-get install dovecot-pop3d dovecot-lmtpd)"
    if not os.path.exists("/usr/lib/dovecot/pop3"):
        return "no Dovecot POP3 (apt-get install dovecot-pop3d)"
    if not os.path.exists("/usr/lib/dovecot/lmtp"):
        return "no Dovecot LMTP (apt-get install dovecot-lmtpd)"
    if os.geteuid() != 0:
        return "Dovecot's master must start as root"
    return None


def dovecotDirectory(testCase) -> str:
    """
    A directory for a throwaway Dovecot in a test, removed in its cleanup.
    Skips the test when Dovecot cannot run here; under CI=true fails it
    instead (run-tests.sh installs Dovecot).
    """
    reason = dovecotMissing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            testCase.fail(f"{reason} (CI must have it: see run-tests.sh)")
        raise SkipTest(reason)
    directory = tempfile.mkdtemp(prefix="msa-dovecot-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return directory


def giveToMailUser(path: str) -> None:
    """
    Make C{path} and everything under it the mail user's, as Dovecot's
    mail processes run as that user.
    """
    entry = pwd.getpwnam(MAIL_USER)
    for top, dirs, files in os.walk(path):
        os.chown(top, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(top, name), entry.pw_uid, entry.pw_gid)


def traversable(path: str) -> None:
    """
    Let Dovecot's unprivileged processes (auth as C{dovecot}, mail as
    L{MAIL_USER}) reach C{path}: o+x on each of its directories that
    lacks it (temp dirs are made 0700).
    """
    path = os.path.abspath(path)
    while path != "/":
        mode = os.stat(path).st_mode
        if not mode & 0o001:
            os.chmod(path, (mode & 0o7777) | 0o001)
        path = os.path.dirname(path)


class ThrowawayDovecot:
    """
    One throwaway Dovecot.

    @ivar pop3Port: the POP3 (STLS) port.
    @ivar lmtpPort: the LMTP port (plaintext, as the MSA's TCP LMTP).
    @ivar proc: the master process (the root of the tree measured).
    """

    def __init__(
        self,
        directory: str,
        mailboxes: str,
        cert: str,
        key: str,
        users: dict[str, str],
        pop3Port: int,
        lmtpPort: int,
        address: str = "127.0.0.1",
    ) -> None:
        """
        @param users: account name -> its passwd-file hash (C{doveadm pw}).
        @param address: where both listen.  Dovecot counts a connection
            whose client address is its own address as secured, TLS or
            not (it offers and takes logins there before STLS): on
            127.0.0.2 the clients come from 127.0.0.1 and are not.
        """
        self.address = address
        self.directory = directory
        self.mailboxes = mailboxes
        self.pop3Port = pop3Port
        self.lmtpPort = lmtpPort
        os.makedirs(directory, exist_ok=True)
        usersFile = os.path.join(directory, "users")
        with open(usersFile, "w") as f:
            f.writelines(f"{name}:{hashed}\n" for name, hashed in users.items())
        os.chown(usersFile, 0, pwd.getpwnam("dovecot").pw_gid)
        os.chmod(usersFile, 0o640)
        traversable(directory)
        self.config = os.path.join(directory, "dovecot.conf")
        with open(self.config, "w") as f:
            f.write(
                _CONFIG.format(
                    base=os.path.join(directory, "run"),
                    name=os.path.basename(directory.rstrip("/")),
                    log=os.path.join(directory, "dovecot.log"),
                    cert=cert,
                    key=key,
                    users=usersFile,
                    mailboxes=mailboxes,
                    mailUser=MAIL_USER,
                    pop3Port=pop3Port,
                    lmtpPort=lmtpPort,
                    address=address,
                )
            )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """
        Start the master in the foreground and wait for both ports
        (blocking: call it from a thread, or before the reactor has work).
        """
        giveToMailUser(self.mailboxes)
        traversable(self.mailboxes)
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", self.config],
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.directory, "dovecot.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        process = self.proc

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"dovecot exited with {process.returncode} before listening"
                    f" (see {self.directory}/dovecot.log)"
                )
            return all(
                listening(port, self.address) for port in (self.pop3Port, self.lmtpPort)
            )

        waitUntilBlocking(ready, 60, f"Dovecot to listen on {self.pop3Port}")

    def stop(self) -> None:
        """
        Stop the master (it stops its children) and wait for it.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(os.path.join(self.directory, "run"), ignore_errors=True)


_CONFIG = """\
# Written by tests/dovecotserver.py: a throwaway instance, nothing shared
# with the system's Dovecot.
base_dir = {base}
instance_name = {name}
protocols = pop3 lmtp
listen = {address}
log_path = {log}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_username_format = %Ln
auth_cache_size = 10M
auth_cache_ttl = 300 s
auth_cache_negative_ttl = 0
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = static
  args = uid={mailUser} gid=nogroup home={mailboxes}/%u allow_all_users=yes
}}
mail_location = maildir:{mailboxes}/%u
mail_fsync = always
pop3_uidl_format = %f
default_process_limit = 1200
default_client_limit = 4000
default_vsz_limit = 1G
service pop3-login {{
  inet_listener pop3 {{
    address = {address}
    port = {pop3Port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = 2000
}}
service pop3 {{
  process_limit = 1200
}}
service lmtp {{
  inet_listener lmtp {{
    address = {address}
    port = {lmtpPort}
  }}
}}
service anvil {{
  client_limit = 4000
}}
service auth {{
  client_limit = 4000
}}
"""
