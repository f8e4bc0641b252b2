# -*- test-case-name: tests.test_selftest,tests.test_selftest_report -*-
"""
The TLS probes of C{digipoort-msa-admin selftest} (L{msa.admin.selftest}):
protocol versions, cipher suites, key-exchange groups and the certificate.
"""

import datetime
import functools
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto

from msa import _compat
from msa.admin.probeclient import (
    FAIL,
    PASS,
    SKIP,
    ProbeResult,
    Target,
    checkName,
    clientContext,
    guard,
    handshake,
    openTLS,
    sslReason,
    verifyingContext,
)
from msa.tls import ensureSelfSignedCertificate

#: Every TLS 1.3 suite OpenSSL implements.
ALL_TLS13_CIPHERS = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
)
#: The key-exchange groups probed, by OpenSSL name; those the local OpenSSL
#: does not know are listed as not probed.
PROBED_GROUPS = (
    "X25519",
    "X448",
    "P-256",
    "P-384",
    "P-521",
    "secp224r1",
    "secp256k1",
    "brainpoolP256r1",
    "brainpoolP384r1",
    "brainpoolP512r1",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "ffdhe6144",
    "ffdhe8192",
)
_GROUP_ALIASES = {
    "prime256v1": "P-256",
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
    "x25519": "X25519",
    "x448": "X448",
}
#: Key exchanges whose suites need a shared secret, not probed.
_NOT_PROBED_KEX = ("kx-psk", "kx-dhe-psk", "kx-rsa-psk", "kx-ecdhe-psk", "kx-srp")


_localCert: tuple[crypto.X509, crypto.PKey] | None = None


def _localCertificate() -> tuple[crypto.X509, crypto.PKey]:
    """
    A throwaway self-signed certificate for the local handshake check,
    made as the MSA makes its own in a directory removed at once.
    """
    global _localCert
    if _localCert is None:
        with tempfile.TemporaryDirectory() as directory:
            certPath, keyPath = ensureSelfSignedCertificate(directory, "selftest")
            with open(certPath, "rb") as f:
                cert = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
            with open(keyPath, "rb") as f:
                key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
        _localCert = (cert, key)
    return _localCert


def localCanNegotiate(version: int) -> str | None:
    """
    Whether this machine's OpenSSL can complete a handshake at C{version}
    with itself, in memory: if not, it cannot offer it to a server either.

    @return: L{None} when it can, else OpenSSL's reason.
    """
    cert, key = _localCertificate()
    server = clientContext(version, version)
    server.use_certificate(cert)
    server.use_privatekey(key)
    client = clientContext(version, version)
    s, c = SSL.Connection(server, None), SSL.Connection(client, None)
    s.set_accept_state()
    c.set_connect_state()
    try:
        for _ in range(10):
            done = True
            for conn, peer in ((c, s), (s, c)):
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    done = False
                try:
                    data = conn.bio_read(65536)
                except SSL.WantReadError:
                    data = b""
                if data:
                    peer.bio_write(data)
            if done:
                return None
    except SSL.Error as e:
        return sslReason(e)
    return "the handshake did not complete"


def probeOldVersions(target: Target) -> list[ProbeResult]:
    """
    TLS 1.0 and 1.1 must be refused.
    """
    results = []
    for label, version in (("1.0", SSL.TLS1_VERSION), ("1.1", SSL.TLS1_1_VERSION)):
        name = f"tls{label}-refused"
        local = localCanNegotiate(version)
        if local is not None:
            results.append(
                ProbeResult(
                    name,
                    SKIP,
                    f"could not test: the local OpenSSL cannot negotiate TLS "
                    f"{label} even with itself ({local})",
                )
            )
            continue
        tls, detail = handshake(target, clientContext(version, version))
        if tls is None:
            results.append(ProbeResult(name, PASS, f"refused: {detail}"))
        else:
            results.append(ProbeResult(name, FAIL, f"accepted: {detail}"))
    return results


def _cipherInfo(cipherString: str) -> list[dict[str, Any]]:
    """
    The suites an OpenSSL cipher string names, with Python's description
    of each (key exchange, authentication, AEAD, digest).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers(cipherString + ":@SECLEVEL=0")
    return [dict(c) for c in context.get_ciphers()]


def expectedCiphers(cipherString: str) -> tuple[set[str], set[str]]:
    """
    The TLS 1.2 and the TLS 1.3 suites of an expected policy: an OpenSSL
    cipher string for TLS 1.2, in which TLS 1.3 suites may be named too.

    @raise ValueError: when the string names no suite this OpenSSL knows.
    """
    names = [n for n in cipherString.split(":") if n]
    tls13 = {n for n in names if n.startswith("TLS_")}
    rest = ":".join(n for n in names if not n.startswith("TLS_"))
    tls12: set[str] = set()
    if rest:
        try:
            tls12 = {c["name"] for c in _cipherInfo(rest) if c["protocol"] != "TLSv1.3"}
        except ssl.SSLError:
            pass
    if not tls12 and not tls13:
        raise ValueError(f"no suite matches {cipherString!r}")
    return tls12, tls13


def weakness(cipher: dict[str, Any]) -> str | None:
    """
    Why a TLS 1.2 suite is weak, whatever the operator expects; L{None}
    when it is not.  The rule: no forward secrecy (static RSA key exchange),
    no authentication (anonymous), no encryption (NULL), a broken cipher
    (RC4, DES, 3DES, export strength), or CBC with an MD5 or SHA-1 MAC.
    Other suites outside the expected policy (CBC with SHA-256, CCM,
    Camellia, ARIA, DHE...) are not weak by this rule but still fail the
    probe when not expected.

    @param cipher: a L{ssl.SSLContext.get_ciphers} entry.
    """
    name = cipher["name"]
    symmetric = (cipher.get("symmetric") or "").lower()
    if cipher.get("auth") == "auth-null" or name.startswith(("ADH-", "AECDH-")):
        return "anonymous"
    if "NULL" in name.split("-") or not symmetric or symmetric == "null":
        return "no encryption"
    if cipher.get("kea") not in ("kx-ecdhe", "kx-dhe", "kx-any"):
        return "no forward secrecy"
    if any(w in symmetric for w in ("rc4", "des", "rc2", "idea", "seed")):
        return "broken cipher"
    if cipher.get("strength_bits", 128) < 128:
        return "export strength"
    if not cipher.get("aead") and cipher.get("digest") in ("sha1", "md5"):
        return f"CBC with {cipher['digest'].upper()}"
    return None


def _accepted(
    target: Target, candidates: list[str], contextFor: Callable[[list[str]], Any]
) -> list[str]:
    """
    The candidates the server accepts, found by elimination: offer all,
    note the one the server picks, offer the rest, until it accepts none.
    """
    accepted: list[str] = []
    remaining = list(candidates)
    while remaining:
        tls, _ = handshake(target, contextFor(remaining))
        if tls is None:
            break
        chosen = tls.get_cipher_name() or ""
        if chosen not in remaining:
            break
        accepted.append(chosen)
        remaining.remove(chosen)
    return accepted


def probeCiphers(target: Target) -> list[ProbeResult]:
    """
    The suites the server accepts, TLS 1.2 and 1.3, against the expected
    policy and the weakness rule.
    """
    known = [
        c
        for c in _cipherInfo("ALL:COMPLEMENTOFALL")
        if c["protocol"] != "TLSv1.3" and c["kea"] not in _NOT_PROBED_KEX
    ]
    info = {c["name"]: c for c in known}
    expected, expectTLS13 = expectedCiphers(target.expectCiphers)
    tls12 = _accepted(
        target,
        list(info),
        lambda names: clientContext(
            SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, ":".join(names) + ":@SECLEVEL=0"
        ),
    )
    tls13: list[str] = []
    for suite in ALL_TLS13_CIPHERS:
        context = clientContext(SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)
        try:
            context.set_tls13_ciphersuites(suite.encode("ascii"))
        except SSL.Error:
            continue
        tls, _ = handshake(target, context)
        if tls is not None and tls.get_cipher_name() == suite:
            tls13.append(suite)
    problems = []
    for name in tls12:
        why = weakness(info[name])
        if why is not None:
            problems.append(f"{name} (weak: {why})")
        elif name not in expected:
            problems.append(f"{name} (not expected)")
    problems += [f"{name} (not expected)" for name in tls13 if name not in expectTLS13]
    problems.sort()
    seen = (
        f"TLS 1.2: {', '.join(tls12) or 'none'}; TLS 1.3: {', '.join(tls13) or 'none'}"
    )
    if not tls12 and not tls13:
        return [ProbeResult("cipher-suites", FAIL, "no suite accepted at all")]
    if problems:
        return [
            ProbeResult("cipher-suites", FAIL, f"accepts {', '.join(problems)}; {seen}")
        ]
    return [
        ProbeResult(
            "cipher-suites",
            PASS,
            f"{seen} ({len(info)} TLS 1.2 suites offered, by elimination)",
        )
    ]


def _groupName(name: str | None) -> str:
    if not name:
        return ""
    return _GROUP_ALIASES.get(name.lower(), _GROUP_ALIASES.get(name, name))


def probeGroups(target: Target) -> list[ProbeResult]:
    """
    The key-exchange groups the server accepts, one group per handshake.
    """
    expected = {_groupName(g) for g in target.expectGroups.split(":") if g}
    accepted, unknown = [], []
    for group in PROBED_GROUPS:
        context = clientContext(SSL.TLS1_2_VERSION)
        if not _compat.setGroups(context, group):
            unknown.append(group)
            continue
        tls, _ = handshake(target, context)
        if tls is None:
            continue
        used = _groupName(tls.get_group_name())
        if used.lower() == _groupName(group).lower():
            accepted.append(_groupName(group))
    unexpected = [g for g in accepted if g not in expected]
    tail = f" (not known locally, not probed: {', '.join(unknown)})" if unknown else ""
    if not accepted:
        return [ProbeResult("groups", FAIL, "no group accepted" + tail)]
    if unexpected:
        return [
            ProbeResult(
                "groups",
                FAIL,
                f"accepts {', '.join(unexpected)}, not in {target.expectGroups}; "
                f"accepted: {', '.join(accepted)}{tail}",
            )
        ]
    return [ProbeResult("groups", PASS, f"accepted: {', '.join(accepted)}{tail}")]


def probeCertificate(target: Target) -> list[ProbeResult]:
    """
    The certificate verifies, for the name, with the whole chain sent, and
    has enough time left.
    """
    name = "certificate"
    errors: list[str] = []
    try:
        session = openTLS(target, verifyingContext(target, errors))
    except (SSL.Error, OSError) as e:
        return [ProbeResult(name, FAIL, f"handshake failed: {sslReason(e)}")]
    with session:
        tls = session.tls
        assert tls is not None
        leafCert = tls.get_peer_certificate()
        sent = tls.get_peer_cert_chain() or []
        verified = tls.get_verified_chain() or []
        wrongName = checkName(tls, target.name)
    if leafCert is None:
        return [ProbeResult(name, FAIL, "no certificate")]
    leaf = leafCert.to_cryptography()
    problems = list(errors)
    if wrongName is not None:
        problems.append(f"not valid for {target.name}: {wrongName}")
    sentDER = {c.to_cryptography().fingerprint(hashes.SHA256()) for c in sent}
    missing = [
        c.to_cryptography().subject.rfc4514_string()
        for c in verified[1:-1]
        if c.to_cryptography().fingerprint(hashes.SHA256()) not in sentDER
    ]
    if missing:
        problems.append(
            f"intermediate(s) not sent by the server: {', '.join(missing)} "
            "(clients without them cannot verify)"
        )
    expires = leaf.not_valid_after_utc
    left = expires - datetime.datetime.now(datetime.UTC)
    days = left.days
    if left.total_seconds() > 0 and days < target.minDays:
        problems.append(
            f"expires {expires:%Y-%m-%d} ({days} days left, less than {target.minDays})"
        )
    store = target.caFile or "the system store"
    subject = leaf.subject.rfc4514_string()
    if problems:
        return [ProbeResult(name, FAIL, f"{subject}: " + "; ".join(problems))]
    return [
        ProbeResult(
            name,
            PASS,
            f"{subject}, valid for {target.name}, chain of {len(verified)} "
            f"verified by {store}, expires {expires:%Y-%m-%d} ({days} days left)",
        )
    ]


def probeListener(
    target: Target, preTLS: list[tuple[str, Callable[[Target], list[ProbeResult]]]]
) -> list[ProbeResult]:
    """
    The probes of a listener that greeted: the protocol's C{preTLS} probes
    (N/A on an implicit-TLS listener, which has no plaintext phase), then
    the TLS probes, each failing on its own.
    """
    results: list[ProbeResult] = []
    for name, probe in preTLS:
        if target.implicit:
            results.append(
                ProbeResult(name, SKIP, "N/A: implicit TLS, no plaintext phase")
            )
        else:
            results += guard(name, functools.partial(probe, target))
    for name, tlsProbe in [
        ("tls-versions", probeOldVersions),
        ("cipher-suites", probeCiphers),
        ("groups", probeGroups),
        ("certificate", probeCertificate),
    ]:
        results += guard(name, functools.partial(tlsProbe, target))
    return results
