"""
The peer of C{bench/pop3bench.py}: the throwaway Dovecot of
C{tests/dovecotserver.py} (Debian's C{dovecot-core}, C{dovecot-pop3d},
C{dovecot-lmtpd}; its own C{base_dir} and configuration in a temp dir,
never the system's service), POP3 with STLS and LMTP on free loopback
ports, serving the same Maildirs as the MSA, and the password hashes of
the comparison.

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

import subprocess

import run  # noqa: F401  (bench/run.py puts the checkout on sys.path)

from tests.dovecotserver import dovecotMissing

__all__ = ["COST", "SCHEME", "dovecotMissing", "passwordHash"]

#: The password scheme and cost (see the module docstring).
SCHEME, COST = "BLF-CRYPT", 10


def passwordHash(password: str, cost: int = COST) -> str:
    """
    The passwd-file hash of C{password} (L{SCHEME}, C{cost}).
    """
    out = subprocess.run(
        ["doveadm", "pw", "-s", SCHEME, "-r", str(cost), "-p", password],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()
