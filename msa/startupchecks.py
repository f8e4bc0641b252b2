"""
Checks made once at start, so that a hardened host fails early and says why
instead of failing the first client: the certificate (expired, expiring
within 30 days, chain incomplete) and the spool directory (owned by the user
the MSA runs as, not readable by others).  The key matching the certificate
is checked when the TLS context is built (L{msa.tls.serverContextFactory});
the accounts file's mode when it is read (L{msa.accountstore.AccountFile}).
"""

import datetime
import os
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


def runChecks(certFile: str, chainFile: str | None, spoolDirectory: str) -> None:
    for problem in checkCertificate(certFile, chainFile):
        log.warn("startup check: {problem}", problem=problem)
    checkSpoolDirectory(spoolDirectory)
