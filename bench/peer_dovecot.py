"""
A throwaway Dovecot (Debian's C{dovecot-core}, C{dovecot-pop3d},
C{dovecot-lmtpd}) for C{bench/pop3bench.py}: POP3 with STLS and LMTP on
free loopback ports, serving the same Maildirs as the MSA.

It runs as C{dovecot -F -c <dir>/dovecot.conf} (as root, as Dovecot's
master must), with everything of its own under C{<dir>}: C{base_dir}, the
log, the passwd-file; never the system's service or C{/etc/dovecot}.

Like with like against the MSA:

 - TLS: the same ECDSA P-256 certificate, TLS 1.2 minimum, STLS required
   before a login (C{disable_plaintext_auth}, the MSA's R3 rule).
 - Passwords: C{BLF-CRYPT} (bcrypt) with cost 10, which costs about the
   CPU time of the MSA's C{scrypt$16384$8$1} (both ~60 ms on this machine,
   measured with C{doveadm pw -t} and C{hashlib.scrypt}).  Dovecot 2.3.19
   has no scrypt; its C{ARGON2ID} default (64 MiB, t=3) costs ten times
   more, C{SHA512-CRYPT} is not memory-hard either.  Successful checks are
   cached as the MSA's are: C{auth_cache_ttl = 300 s}, the MSA's
   C{[accounts] auth_cache_ttl} default.
 - Store: C{mail_location = maildir:<mailboxes>/%u}, the MSA's layout
   (C{<directory>/<account>/{tmp,new,cur}}); Dovecot reads the MSA's file
   names (C{<uid>,S=<size>,H=<sha256>}, C{S=} being its own size field).
   C{mail_fsync = always}: the MSA fsyncs every delivered file and its
   directory before the 250.
 - Processes: the login processes in "high-performance" mode
   (C{service_count = 0}, one per core), one C{pop3} process per session
   (Dovecot's design), limits raised for 1000 sessions.  Its memory is
   the summed PSS of the whole process tree.
"""

import os
import pwd
import shutil
import subprocess

from run import stopProcess, waitForPort

DOVECOT = "/usr/sbin/dovecot"
#: The password scheme and cost (see the module docstring).
SCHEME, COST = "BLF-CRYPT", 10
#: Whom the mail processes run as (Dovecot refuses root), and so who must
#: own the Maildirs.
MAIL_USER = "nobody"


def dovecotMissing() -> str | None:
    """
    Why Dovecot cannot run here, or L{None}.
    """
    if not os.path.exists(DOVECOT):
        return "no /usr/sbin/dovecot (apt-get install dovecot-pop3d dovecot-lmtpd)"
    if not os.path.exists("/usr/lib/dovecot/pop3"):
        return "no Dovecot POP3 (apt-get install dovecot-pop3d)"
    if not os.path.exists("/usr/lib/dovecot/lmtp"):
        return "no Dovecot LMTP (apt-get install dovecot-lmtpd)"
    if os.getuid() != 0:
        return "Dovecot's master must start as root"
    return None


def passwordHash(password: str) -> str:
    """
    The passwd-file hash of C{password} (L{SCHEME}, L{COST}).
    """
    out = subprocess.run(
        ["doveadm", "pw", "-s", SCHEME, "-r", str(COST), "-p", password],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


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


class Dovecot:
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
    ) -> None:
        """
        @param users: account name -> its passwd-file hash (L{passwordHash}).
        """
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
                )
            )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """
        Start the master in the foreground and wait for both ports.
        """
        giveToMailUser(self.mailboxes)
        traversable(self.mailboxes)
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", self.config],
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.directory, "dovecot.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        waitForPort(self.pop3Port, self.proc)
        waitForPort(self.lmtpPort, self.proc)

    def stop(self) -> None:
        """
        Stop the master (it stops its children) and wait for it.
        """
        stopProcess(self.proc)
        shutil.rmtree(os.path.join(self.directory, "run"), ignore_errors=True)


_CONFIG = """\
# Written by bench/peer_dovecot.py: a throwaway instance, nothing shared
# with the system's Dovecot.
base_dir = {base}
instance_name = {name}
protocols = pop3 lmtp
listen = 127.0.0.1
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
    address = 127.0.0.1
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
    address = 127.0.0.1
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
