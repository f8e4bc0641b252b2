# -*- test-case-name: tests.test_tls,tests.test_tls_daemon -*-
"""
The files behind the TLS policy of L{msa.tls}: the operator's OCSP response
(checked, and re-read when a cron job replaces it) and the self-signed
certificate made on a first start with built-in defaults.
"""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.logger import Logger

__all__ = ["OCSPStaple", "ensureSelfSignedCertificate", "readOCSPResponse"]

log = Logger(namespace="msa.tls")


class OCSPStaple:
    """
    The DER OCSP response in a file, re-read when its modification time or
    size changes, so that a cron job can refresh it without a restart.
    """

    def __init__(self, path: str, serialNumber: int | None = None) -> None:
        self._path = path
        self._serialNumber = serialNumber
        self._stamp: tuple[int, int] | None = None
        self._data = b""
        self._failing = False
        self.refresh(strict=True)

    def refresh(self, strict: bool = False) -> bytes:
        try:
            st = os.stat(self._path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._data = readOCSPResponse(self._path, self._serialNumber)
                self._stamp = stamp
                self._failing = False
        except (OSError, ValueError) as e:
            if strict:
                raise
            if not self._failing:
                log.warn(
                    "cannot re-read the OCSP response {path}: {error}; stapling "
                    "the last one read",
                    path=self._path,
                    error=e,
                )
            self._failing = True
        return self._data

    def __call__(self, conn: SSL.Connection, data) -> bytes:
        return self.refresh()


def readOCSPResponse(path: str, serialNumber: int | None = None) -> bytes:
    """
    The bytes of a DER OCSP response file.

    @param serialNumber: when given, the response must be a successful one
        for the certificate with this serial number.
    @raise OSError: when it cannot be read.
    @raise ValueError: when it is not a DER OCSP response, or not one for
        the certificate.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError as e:
        raise ValueError(f"{path}: not a DER OCSP response ({e})") from e
    if serialNumber is None:
        return data
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ValueError(f"{path}: OCSP response status {response.response_status}")
    if response.serial_number != serialNumber:
        raise ValueError(
            f"{path}: the OCSP response is for serial number "
            f"{response.serial_number:x}, not the certificate's {serialNumber:x}"
        )
    nextUpdate = response.next_update_utc
    if nextUpdate is not None and nextUpdate < datetime.datetime.now(datetime.UTC):
        log.warn(
            "the OCSP response {path} expired at {nextUpdate}; clients may "
            "refuse it: fetch a fresh one",
            path=path,
            nextUpdate=nextUpdate.isoformat(),
        )
    return data


def ensureSelfSignedCertificate(directory: str, hostname: str) -> tuple[str, str]:
    """
    Make an ECDSA P-256 self-signed certificate for C{hostname} in
    C{directory} unless one is there, for a start on built-in defaults.

    @return: the paths of the certificate and the key.
    """
    certPath = os.path.join(directory, "selfsigned-cert.pem")
    keyPath = os.path.join(directory, "selfsigned-key.pem")
    if os.path.exists(certPath) and os.path.exists(keyPath):
        return certPath, keyPath
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    altNames: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname == "localhost":
        altNames.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(altNames), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    fd = os.open(keyPath + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(certPath + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(keyPath + ".tmp", keyPath)
    os.replace(certPath + ".tmp", certPath)
    log.info(
        "Made a self-signed certificate for {hostname} in {path}: clients cannot "
        "verify it; configure a real certificate for production",
        hostname=hostname,
        path=certPath,
    )
    return certPath, keyPath
