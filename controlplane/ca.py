"""The mesh CA: a persistent root and short-lived SPIFFE workload certificates.

The root (key and certificate) lives in a directory, created on first start with
owner-only permissions. Workload certificates are issued per identity, kept in
memory, and renewed once half of their lifetime has passed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertificateError

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
ROOT_LIFETIME = dt.timedelta(days=3650)
# Issued certificates start a little in the past so peers with a slightly slow clock accept them.
BACKDATE = dt.timedelta(minutes=5)

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes
    issued_at: dt.datetime
    not_after: dt.datetime

    def renew_at(self) -> dt.datetime:
        # From issuance, not from notBefore: that is backdated, and would make short lives renew at once.
        return self.issued_at + (self.not_after - self.issued_at) / 2


class CertificateAuthority:
    """Issues workload certificates from a root kept in `directory`.

    Thread-safe: the gRPC certificate service and the xDS push path may call it at once.
    """

    def __init__(
        self,
        directory: str | Path,
        trust_domain: str,
        *,
        workload_ttl: dt.timedelta = dt.timedelta(hours=1),
        max_ttl: dt.timedelta = dt.timedelta(hours=24),
        clock: Clock = _utcnow,
    ) -> None:
        if workload_ttl <= dt.timedelta(0):
            raise CertificateError("the workload certificate lifetime must be positive")
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.workload_ttl = workload_ttl
        self.max_ttl = max(max_ttl, workload_ttl)
        self.clock = clock
        self._lock = threading.Lock()
        self._issued: dict[str, IssuedCertificate] = {}
        self._root_key, self._root_cert = self._load_or_create_root()
        self.root_pem = self._root_cert.public_bytes(serialization.Encoding.PEM)

    # -- root -------------------------------------------------------------------

    def _load_or_create_root(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        cert_path, key_path = self.directory / ROOT_CERT, self.directory / ROOT_KEY
        if cert_path.exists() or key_path.exists():
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (OSError, ValueError) as e:
                raise CertificateError(
                    f"cannot load the CA root from {self.directory}: {e}. "
                    f"Both {ROOT_CERT} and {ROOT_KEY} must be readable PEM files; "
                    "remove the directory to start a new root (every workload will need new certificates)"
                ) from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CertificateError(f"{key_path}: the CA key must be an EC key")
            raw = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
                raise CertificateError(f"{cert_path} and {key_path} do not belong together")
            return key, cert
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise CertificateError(f"cannot create the CA directory {self.directory}: {e.strerror}") from None
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Meshplane"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Meshplane root CA for {self.trust_domain}"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    # -- issuing ------------------------------------------------------------------

    def check_spiffe_id(self, spiffe_id: str) -> None:
        prefix = f"spiffe://{self.trust_domain}/ns/"
        rest = spiffe_id.removeprefix(prefix)
        parts = rest.split("/")
        if not spiffe_id.startswith(prefix) or len(parts) != 3 or parts[1] != "sa" or not all(parts):
            raise CertificateError(
                f"{spiffe_id!r} is not a workload identity of this mesh "
                f"(expected spiffe://{self.trust_domain}/ns/<namespace>/sa/<service-account>)"
            )

    def workload_certificate(self, spiffe_id: str) -> IssuedCertificate:
        """The current certificate for `spiffe_id`, issued or renewed as needed."""
        self.check_spiffe_id(spiffe_id)
        with self._lock:
            current = self._issued.get(spiffe_id)
            if current is None or self.clock() >= current.renew_at():
                current = self._issue(spiffe_id, self.workload_ttl, spiffe_id)
                self._issued[spiffe_id] = current
            return current

    def server_certificate(self, dns_names: Sequence[str], ttl: dt.timedelta) -> IssuedCertificate:
        """A serving certificate for `dns_names` (IP addresses become IP SANs), e.g. the webhook's."""
        if not dns_names:
            raise CertificateError("a serving certificate needs at least one DNS name")
        sans: list[x509.GeneralName] = []
        for name in dns_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        return self._issue(x509.SubjectAlternativeName(sans), ttl, "", common_name=dns_names[0])

    def _issue(
        self, san: x509.SubjectAlternativeName | str, ttl: dt.timedelta, spiffe_id: str, common_name: str = ""
    ) -> IssuedCertificate:
        """A new key and a certificate for it."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(key.public_key(), san, ttl, common_name)
        return IssuedCertificate(
            spiffe_id=spiffe_id,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            issued_at=self.clock(),
            not_after=cert.not_valid_after_utc,
        )

    def next_renewal(self) -> dt.datetime | None:
        """When the earliest issued certificate is due for renewal (None if none issued)."""
        with self._lock:
            return min((c.renew_at() for c in self._issued.values()), default=None)

    def retain(self, spiffe_ids: set[str]) -> None:
        """Keep certificates only for these identities (those with a connected proxy)."""
        with self._lock:
            for gone in self._issued.keys() - spiffe_ids:
                del self._issued[gone]

    def sign_csr(self, csr_pem: str | bytes, validity: dt.timedelta | None = None) -> list[bytes]:
        """Sign a PKCS#10 request whose only URI SAN is a SPIFFE ID of this mesh; leaf then root."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
        except ValueError as e:
            raise CertificateError(f"the CSR is not a PEM PKCS#10 request: {e}") from None
        try:
            if not csr.is_signature_valid:
                raise CertificateError("the CSR's signature does not verify")
        except InvalidSignature:
            raise CertificateError("the CSR's signature does not verify") from None
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CertificateError("the CSR has no subjectAltName with a SPIFFE ID") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or len(list(san)) != 1:
            raise CertificateError("the CSR must have exactly one SAN, the workload's SPIFFE URI")
        self.check_spiffe_id(uris[0])
        ttl = min(validity or self.workload_ttl, self.max_ttl)
        if ttl <= dt.timedelta(0):
            raise CertificateError("the requested validity must be positive")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise CertificateError("the CSR's key must be EC or RSA")
        cert = self._sign(public_key, uris[0], ttl)
        return [cert.public_bytes(serialization.Encoding.PEM), self.root_pem]

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        san: x509.SubjectAlternativeName | str,
        ttl: dt.timedelta,
        common_name: str = "",
    ) -> x509.Certificate:
        if isinstance(san, str):  # a SPIFFE ID
            san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)])
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
        now = self.clock()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._root_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ttl)
            # RFC 5280: the SAN extension is critical when the subject is empty.
            .add_extension(san, critical=not common_name)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._root_key.public_key()), critical=False
            )
            .sign(self._root_key, hashes.SHA256())
        )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
