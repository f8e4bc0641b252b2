# -*- test-case-name: tests.test_startupchecks -*-
"""
Checks made once at start, so that a hardened host fails early and says why
instead of failing the first client: the certificate (expired, expiring
within 30 days, chain incomplete) and the spool directory (owned by the user
the MSA runs as, not readable by others) and the limit on open files
(enough for the configured connections).  The key matching the certificate
is checked when the TLS context is built (L{msa.tls.serverContextFactory});
the accounts file's mode when it is read (L{msa.accounts.filestore.AccountFile}).
"""

import datetime
import os
import resource
import stat

from cryptography import x509
from twisted.logger import Logger

log = Logger()

EXPIRY_WARNING = datetime.timedelta(days=30)


class StartupCheckError(Exception):
    """
    The MSA must not start; the message says why and how to fix it.
    """


def checkCertificate(
    certFile: str, chainFile: str | None = None, now=None
) -> list[str]:
    """
    @return: warnings (the start goes on).
    @raise StartupCheckError: the certificate has expired or is not yet valid.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    with open(certFile, "rb") as f:
        chain = x509.load_pem_x509_certificates(f.read())
    if chainFile:
        with open(chainFile, "rb") as f:
            chain += x509.load_pem_x509_certificates(f.read())
    leaf = chain[0]
    if leaf.not_valid_after_utc < now:
        expired = leaf.not_valid_after_utc
        raise StartupCheckError(
            f"{certFile}: the certificate expired on {expired:%Y-%m-%d}"
        )
    if leaf.not_valid_before_utc > now:
        raise StartupCheckError(
            f"{certFile}: the certificate is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d}"
        )
    warnings = []
    left = leaf.not_valid_after_utc - now
    if left < EXPIRY_WARNING:
        warnings.append(
            f"{certFile}: the certificate expires in {left.days} day(s), on "
            f"{leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    # Each certificate must be followed by its issuer until one that is
    # self-issued or whose issuer clients have (a root): an intermediate that
    # is missing makes clients fail verification (R14).
    for cert, issuer in zip(chain, chain[1:], strict=False):
        if cert.issuer != issuer.subject:
            warnings.append(
                f"{certFile}: the chain is out of order: "
                f"{cert.subject.rfc4514_string()} is not issued by "
                f"{issuer.subject.rfc4514_string()}"
            )
            break
    last = chain[-1]
    if last.issuer == last.subject:
        if len(chain) == 1:
            warnings.append(
                f"{certFile}: the certificate is self-signed; clients cannot verify it"
            )
    elif len(chain) == 1:
        warnings.append(
            f"{certFile}: no intermediate certificate follows the server certificate "
            f"(issuer {leaf.issuer.rfc4514_string()}); unless it is issued "
            "directly by a root, clients will fail to verify the chain"
        )
    return warnings


def checkSpoolDirectory(directory: str) -> None:
    """
    @raise StartupCheckError: when another user owns it or others may read it.
    """
    st = os.stat(directory)
    if st.st_uid != os.geteuid():
        raise StartupCheckError(
            f"{directory}: owned by uid {st.st_uid}, but the MSA runs as uid "
            f"{os.geteuid()}; fix with chown"
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StartupCheckError(
            f"{directory}: group or others have access (mode "
            f"{stat.S_IMODE(st.st_mode):o}); messages are confidential: chmod 700"
        )


#: File descriptors one client connection may hold: its socket and, in DATA,
#: the spool file.
FDS_PER_CONNECTION = 2

#: File descriptors one relay delivery may hold: the connection to the core,
#: the message file, and a notification being written.
FDS_PER_DELIVERY = 3

#: For the rest: listeners, logs, the control socket, the accounts file,
#: the spool's state files and directory fsyncs, the thread pool.
FD_MARGIN = 256


def filesNeeded(maxConnections: int, relayConcurrency: int) -> int:
    """
    @return: how many open files the MSA may need at its configured limits.
    """
    return (
        maxConnections * FDS_PER_CONNECTION
        + relayConcurrency * FDS_PER_DELIVERY
        + FD_MARGIN
    )


def checkFileLimit(
    maxConnections: int, relayConcurrency: int, resource=resource
) -> list[str]:
    """
    Compare C{RLIMIT_NOFILE} with what the configured limits need; a soft
    limit that is too low is raised (up to the hard limit) first.  Running
    out means EMFILE: connections refused at accept and messages refused
    with 4xx, so this is a warning, not a reason not to start.

    @param resource: the L{resource} module (a fake in tests).
    @return: warnings (the start goes on).
    """
    needed = filesNeeded(maxConnections, relayConcurrency)
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == infinity or soft >= needed:
        return []
    target = needed if hard == infinity else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.info("cannot raise the open files limit: {e}", e=e)
        else:
            log.info(
                "open files limit raised from {soft} to {target}",
                soft=soft,
                target=target,
            )
            soft = target
    if soft >= needed:
        return []
    return [
        f"the open files limit (RLIMIT_NOFILE) is {soft}, but max_connections "
        f"{maxConnections} and relay concurrency {relayConcurrency} may need "
        f"{needed}; raise it (systemd: LimitNOFILE=) or lower max_connections"
    ]


def runChecks(certFile: str, chainFile: str | None, spoolDirectory: str) -> None:
    for problem in checkCertificate(certFile, chainFile):
        log.warn("startup check: {problem}", problem=problem)
    checkSpoolDirectory(spoolDirectory)
