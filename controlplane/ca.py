"""The mesh CA: a persistent root and short-lived SPIFFE workload certificates.

The root (key and certificate) lives in a directory, created on first start with
owner-only permissions. Creating it survives a crash at any point: both files are
written to temporary files, synced, and renamed into place key first, and the next
start removes or completes what an interrupted one left. An existing root is refused
when others could read its key or replace its files, as ssh refuses such keys.

Workload certificates are issued per identity, kept in memory for a bounded number of
identities, and renewed once half of their lifetime has passed: when asked for, or by
`renew_due()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import tokens
from .errors import AuthError, CANotFoundError, CertificateError

log = logging.getLogger("meshplane.ca")

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
TRUST_BUNDLE = "trust-bundle.pem"
"""Every root to trust, kept up to date through a rotation: what clients of the control plane
(`meshctl bootstrap --xds-ca`) and the webhook's caBundle should use."""
PREVIOUS_CERT = "previous-root-cert.pem"
PREVIOUS_KEY = "previous-root-key.pem"
"""A root being retired by `rotate_root`: still trusted, and still the issuer of serving certificates
(the control plane's and the webhook's), until `finish_rotation` removes it."""
# Files being written while a root is created; a leftover one marks an interrupted start.
TEMP_SUFFIX = ".tmp"
ROOT_LIFETIME = dt.timedelta(days=3650)
# Issued certificates start a little in the past so peers with a slightly slow clock accept them.
BACKDATE = dt.timedelta(minutes=5)
# Workload certificates kept at most (about 1.5 kB each): a backstop against identity churn, far
# above the service accounts of a large mesh. `retain()` does the regular pruning.
MAX_IDENTITIES = 8192
# What a CSR's key must be: the floor of current guidance (NIST SP 800-57, CA/Browser Forum).
MIN_RSA_BITS = 2048
CSR_CURVES = (ec.SECP256R1, ec.SECP384R1)

Clock = Callable[[], dt.datetime]
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


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

    With `create` (the default) a directory without a root gets a new one; without it a
    missing root raises `CANotFoundError`, for commands that must use the server's CA.
    At most `max_identities` workload certificates are kept, least recently asked for
    dropped first; more identities than that with connected proxies would have their
    certificates reissued on every push, so raise it for such a mesh.

    Thread-safe: the gRPC certificate service and the xDS push path may call it at once.
    Separate processes creating a root in the same directory take turns (an flock on it).
    """

    def __init__(
        self,
        directory: str | Path,
        trust_domain: str,
        *,
        workload_ttl: dt.timedelta = dt.timedelta(hours=1),
        max_ttl: dt.timedelta = dt.timedelta(hours=24),
        clock: Clock = _utcnow,
        create: bool = True,
        max_identities: int = MAX_IDENTITIES,
    ) -> None:
        if workload_ttl <= dt.timedelta(0):
            raise CertificateError("the workload certificate lifetime must be positive")
        if max_identities < 1:
            raise CertificateError("the CA must be able to keep at least one workload certificate")
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.workload_ttl = workload_ttl
        self.max_ttl = max(max_ttl, workload_ttl)
        self.max_identities = max_identities
        self.clock = clock
        self._lock = threading.Lock()
        # Least recently asked for first.
        self._issued: OrderedDict[str, IssuedCertificate] = OrderedDict()
        self._dropped = 0
        self._bundle: tuple[tuple[x509.Certificate, ...], bytes] | None = None
        self._root_key, self._root_cert = self._load_or_create_root(create)
        self._previous = self._load_previous()
        self._pending: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None
        self._ensure_bundle()
        self._stamp = self._files_stamp()

    # -- trust and rotation ---------------------------------------------------------

    @property
    def root_pem(self) -> bytes:
        """The root that signs workload certificates now."""
        return _pem(self._root_cert)

    @property
    def trust_bundle_pem(self) -> bytes:
        """Every root a peer's certificate may chain to: the signing root, a root being introduced
        (`pending`), and one being retired. Proxies get it as ROOTCA; webhooks as caBundle."""
        roots = (self._root_cert, *(r[1] for r in (self._pending, self._previous) if r is not None))
        # Read for every SDS response and webhook answer: serialized again only when the roots change.
        cached = self._bundle
        if (
            cached is None
            or len(cached[0]) != len(roots)
            or any(a is not b for a, b in zip(cached[0], roots, strict=True))
        ):
            cached = self._bundle = (roots, b"".join(dict.fromkeys(_pem(c) for c in roots)))
        return cached[1]

    @property
    def pending(self) -> bool:
        """A new root is trusted but does not sign yet (`activate_pending` makes it sign)."""
        return self._pending is not None

    def _server_signer(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        # The oldest trusted root: clients configured before a rotation began still verify us.
        if self._previous is not None:
            return self._previous
        return self._root_key, self._root_cert

    def _load_previous(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
        cert_path, key_path = self.directory / PREVIOUS_CERT, self.directory / PREVIOUS_KEY
        if not cert_path.exists() and not key_path.exists():
            return None
        return self._load_root(cert_path, key_path)

    def _files_stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for name in (ROOT_CERT, ROOT_KEY, PREVIOUS_CERT, PREVIOUS_KEY):
            try:
                st = os.stat(self.directory / name)
                out.append((st.st_ino, st.st_mtime_ns))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def reload(self) -> bool:
        """Pick up a rotation done on disk (`rotate_root`, `finish_rotation`); True when trust changed.

        A new root found on disk is first only trusted (`pending`): the caller distributes the new
        trust bundle, then calls `activate_pending` so the new root signs. Blocks: use a thread."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        with _locked(self.directory):
            key, cert = self._load_root()
            previous = self._load_previous()
        with self._lock:
            self._stamp = stamp
            new_root = cert != self._root_cert and (self._pending is None or self._pending[1] != cert)
            if new_root:
                self._pending = (key, cert)
                log.info("a new CA root was found in %s: trusting it now, signing with it next", self.directory)
            self._previous = previous
            if previous is None and self._pending is None:
                log.info("the previous CA root was retired: only %s is trusted now", self.directory / ROOT_CERT)
        return True

    def activate_pending(self) -> bool:
        """Make the introduced root the signing one; True if there was one. Reissue afterwards."""
        with self._lock:
            if self._pending is None:
                return False
            self._root_key, self._root_cert = self._pending
            self._pending = None
            for spiffe_id, old in self._issued.items():
                # Backdate the issue time so the renewal point (halfway) is already past: the next
                # `renew_due` replaces every certificate the old root signed.
                lifetime = old.not_after - old.issued_at
                self._issued[spiffe_id] = dataclasses.replace(old, issued_at=old.issued_at - lifetime)
        log.info("the new CA root signs workload certificates from now on")
        return True

    def rotate_root(self) -> None:
        """Start a root rotation on disk: the current root becomes the previous one (still trusted,
        still signing serving certificates) and a new root is created. A running server picks it up
        (`reload`); `finish_rotation` later retires the previous root."""
        with _locked(self.directory) as dir_fd:
            if (self.directory / PREVIOUS_CERT).exists() or (self.directory / PREVIOUS_KEY).exists():
                raise CertificateError(
                    f"a rotation is in progress in {self.directory} ({PREVIOUS_CERT} exists): finish it first "
                    "(meshctl ca rotate --finish) once every proxy has been restarted with the new trust bundle"
                )
            os.replace(self.directory / ROOT_KEY, self.directory / PREVIOUS_KEY)
            os.replace(self.directory / ROOT_CERT, self.directory / PREVIOUS_CERT)
            os.fsync(dir_fd)
            self._root_key, self._root_cert = self._create_root(dir_fd)
            self._previous = self._load_previous()
            self._write_bundle(dir_fd)

    def finish_rotation(self) -> None:
        """Retire the previous root: no longer trusted, no longer signing anything."""
        with _locked(self.directory) as dir_fd:
            if not (self.directory / PREVIOUS_CERT).exists():
                raise CertificateError(f"no rotation in progress in {self.directory} (no {PREVIOUS_CERT})")
            (self.directory / PREVIOUS_KEY).unlink(missing_ok=True)
            (self.directory / PREVIOUS_CERT).unlink()
            self._previous = None
            self._write_bundle(dir_fd)

    def _ensure_bundle(self) -> None:
        """Write the trust bundle when it is missing or out of date (not on a read-only mount)."""
        path = self.directory / TRUST_BUNDLE
        try:
            if path.exists() and path.read_bytes() == self.trust_bundle_pem:
                return
            with _locked(self.directory) as dir_fd:
                self._write_bundle(dir_fd)
        except OSError as e:
            log.debug("trust bundle %s not written: %s", path, e)

    def _write_bundle(self, dir_fd: int) -> None:
        path = self.directory / TRUST_BUNDLE
        _write_synced(_temp(path), self.trust_bundle_pem, 0o644)
        os.replace(_temp(path), path)
        os.fsync(dir_fd)

    # -- root -------------------------------------------------------------------

    def _load_or_create_root(self, create: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.directory.is_dir():
            if not create:
                raise self._not_found()
            try:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise CertificateError(f"cannot create the CA directory {self.directory}: {e.strerror}") from None
        try:
            with _locked(self.directory) as dir_fd:
                _check_directory(self.directory)
                self._finish_interrupted_creation(dir_fd)
                cert_path, key_path = self.directory / ROOT_CERT, self.directory / ROOT_KEY
                has_cert, has_key = cert_path.exists(), key_path.exists()
                if has_cert and has_key:
                    return self._load_root()
                if has_key:
                    raise CertificateError(
                        f"{self.directory} has {ROOT_KEY} but no {ROOT_CERT}: creating the CA was interrupted "
                        f"or the certificate was deleted. Restore {cert_path} from a backup; if no workload "
                        f"uses this CA yet, remove {key_path} instead and start again to create a new root"
                    )
                if has_cert:
                    raise CertificateError(
                        f"{self.directory} has {ROOT_CERT} but no {ROOT_KEY}: the CA cannot sign without its key. "
                        f"Restore {key_path} from a backup, or remove {cert_path} and start again to create a "
                        "new root (every workload and the webhook's caBundle will then need the new root)"
                    )
                if not create:
                    raise self._not_found()
                return self._create_root(dir_fd)
        except OSError as e:
            raise CertificateError(f"cannot use the CA directory {self.directory}: {e}") from None

    def _not_found(self) -> CANotFoundError:
        return CANotFoundError(f"there is no mesh CA in {self.directory} (no {ROOT_CERT} and {ROOT_KEY})")

    def _load_root(
        self, cert_path: Path | None = None, key_path: Path | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        cert_path, key_path = cert_path or self.directory / ROOT_CERT, key_path or self.directory / ROOT_KEY
        _check_key_file(key_path)
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
        if not _belong_together(key, cert):
            raise CertificateError(f"{cert_path} and {key_path} do not belong together")
        return key, cert

    def _finish_interrupted_creation(self, dir_fd: int) -> None:
        """Complete or discard what a start that died in `_create_root` left behind.

        The key is renamed into place only once both temporary files are synced, so a key
        beside a temporary certificate that matches it is a root one rename short of done.
        Anything else temporary is a root nobody has seen: removed.
        """
        cert_path, key_path = self.directory / ROOT_CERT, self.directory / ROOT_KEY
        cert_tmp, key_tmp = _temp(cert_path), _temp(key_path)
        if key_path.exists() and not cert_path.exists() and cert_tmp.exists():
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                cert = x509.load_pem_x509_certificate(cert_tmp.read_bytes())
            except ValueError:
                pass  # not the pair _create_root writes: reported as a half-written root
            else:
                if _belong_together(key, cert):
                    os.replace(cert_tmp, cert_path)
                    os.fsync(dir_fd)
                    log.warning(
                        "finished creating the CA root in %s, which an earlier start left undone", self.directory
                    )
        for leftover in (key_tmp, cert_tmp, _temp(self.directory / TRUST_BUNDLE)):
            if leftover.exists():
                leftover.unlink()
                log.warning("removed %s, left by a start that was interrupted", leftover)

    def _create_root(self, dir_fd: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
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
        cert_path, key_path = self.directory / ROOT_CERT, self.directory / ROOT_KEY
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_synced(_temp(key_path), key_pem, 0o600)
        _write_synced(_temp(cert_path), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        # Key first: a crash between the two renames leaves what _finish_interrupted_creation completes.
        os.replace(_temp(key_path), key_path)
        os.replace(_temp(cert_path), cert_path)
        os.fsync(dir_fd)
        log.info("created a new CA root for %s in %s", self.trust_domain, self.directory)
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
        """The current certificate for `spiffe_id`, issued or renewed as needed.

        Marks the identity as recently used; past `max_identities`, the identity asked for
        least recently is dropped (and gets a new certificate if asked for again).
        """
        self.check_spiffe_id(spiffe_id)
        with self._lock:
            current = self._issued.get(spiffe_id)
            if current is None or self.clock() >= current.renew_at():
                current = self._issue(spiffe_id, self.workload_ttl, spiffe_id)
                self._issued[spiffe_id] = current
            self._issued.move_to_end(spiffe_id)
            while len(self._issued) > self.max_identities:
                dropped, _ = self._issued.popitem(last=False)
                self._dropped += 1
                if self._dropped == 1:
                    log.warning(
                        "the CA keeps certificates for at most %d identities; dropped %s, the least recently "
                        "used. If that many identities have connected proxies, raise max_identities",
                        self.max_identities,
                        dropped,
                    )
            return current

    def identities(self) -> list[str]:
        """The identities the CA keeps a certificate for, least recently asked for first."""
        with self._lock:
            return list(self._issued)

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
        return self._issue(x509.SubjectAlternativeName(sans), ttl, "", common_name=dns_names[0], server=True)

    def server_chain(self, cert_pem: bytes) -> bytes:
        """A serving certificate followed by its issuing root, as TLS servers send it."""
        return cert_pem + _pem(self._server_signer()[1])

    def _issue(
        self,
        san: x509.SubjectAlternativeName | str,
        ttl: dt.timedelta,
        spiffe_id: str,
        common_name: str = "",
        *,
        server: bool = False,
    ) -> IssuedCertificate:
        """A new key and a certificate for it."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(key.public_key(), san, ttl, common_name, signer=self._server_signer() if server else None)
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

    def renew_due(self) -> list[str]:
        """Reissue every kept certificate whose renewal time has passed; the identities renewed.

        So renewal does not wait for a proxy to ask: call it when `next_renewal()` has come,
        then push secrets to the returned identities' proxies (their next
        `workload_certificate()` returns the new certificate).

        - Only identities the CA keeps are renewed; none is added, and the order of use that
          `max_identities` goes by is left alone (a renewal is not a use).
        - Signing happens outside the lock, so concurrent callers are not held up. If one of
          them renewed an identity meanwhile, or `retain()` dropped it, that stands, and the
          identity is not in the result.
        - Blocks for key generation and signing (well under a millisecond per certificate):
          from an event loop, call it in a thread (`asyncio.to_thread`).
        """
        now = self.clock()
        with self._lock:
            due = [(spiffe_id, c) for spiffe_id, c in self._issued.items() if now >= c.renew_at()]
        renewed = []
        for spiffe_id, old in due:
            new = self._issue(spiffe_id, self.workload_ttl, spiffe_id)
            with self._lock:
                if self._issued.get(spiffe_id) is old:
                    self._issued[spiffe_id] = new  # assigning to an existing key keeps its place
                    renewed.append(spiffe_id)
        return renewed

    def mint_token(
        self, namespace: str, service_account: str, ttl: dt.timedelta, audiences: Sequence[str] = (tokens.AUDIENCE,)
    ) -> str:
        """A bearer token for a workload identity, signed with the root key (see `tokens`)."""
        return tokens.mint(self._root_key, namespace, service_account, ttl=ttl.total_seconds(), audiences=audiences)

    def verify_token(self, token: str, audience: str = tokens.AUDIENCE) -> tokens.Identity:
        """The identity a token minted by this CA proves; `tokens.TokenError` says why not."""
        keys = [r[0].public_key() for r in ((self._root_key, self._root_cert), self._pending, self._previous) if r]
        return tokens.verify(token, keys, audience=audience)

    def retain(self, spiffe_ids: set[str]) -> None:
        """Keep certificates only for these identities (those with a connected proxy)."""
        with self._lock:
            for gone in self._issued.keys() - spiffe_ids:
                del self._issued[gone]

    def sign_csr(
        self, csr_pem: str | bytes, validity: dt.timedelta | int | None = None, *, for_identity: str | None = None
    ) -> list[bytes]:
        """Sign a PKCS#10 request whose only URI SAN is a SPIFFE ID of this mesh; leaf then root.

        With `for_identity` (the caller's authenticated SPIFFE ID), a CSR for any other identity
        raises `AuthError` (denied): a workload can only ever get a certificate for itself.

        `validity` is the lifetime asked for: a timedelta, or whole seconds as a gRPC
        CreateCertificateRequest carries them (int64, taken as is). None or zero means the
        CA's workload lifetime; more than `max_ttl` is capped; a negative value is refused.
        The CSR's key must be RSA of at least 2048 bits, or EC on P-256 or P-384.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
        except ValueError as e:
            raise CertificateError(f"the CSR is not a PEM PKCS#10 request: {e}") from None
        # Before verifying the signature: that is where an unreasonable key would cost.
        public_key = _check_csr_key(csr.public_key())
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
        if for_identity is not None and uris[0] != for_identity:
            raise AuthError(
                f"the CSR asks for {uris[0]}, but the caller is {for_identity}", reason="csr-identity", denied=True
            )
        cert = self._sign(public_key, uris[0], self._requested_ttl(validity))
        return [cert.public_bytes(serialization.Encoding.PEM), self.root_pem]

    def _requested_ttl(self, validity: dt.timedelta | int | None) -> dt.timedelta:
        if not validity:
            return self.workload_ttl
        # Compared as numbers: a timedelta of 2**62 seconds does not exist (OverflowError).
        seconds = validity.total_seconds() if isinstance(validity, dt.timedelta) else validity
        if seconds < 0:
            raise CertificateError(f"the requested validity must be positive, got {seconds} seconds")
        if seconds >= self.max_ttl.total_seconds():
            return self.max_ttl
        return dt.timedelta(seconds=seconds)

    def _sign(
        self,
        public_key: PublicKey,
        san: x509.SubjectAlternativeName | str,
        ttl: dt.timedelta,
        common_name: str = "",
        signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    ) -> x509.Certificate:
        root_key, root_cert = signer or (self._root_key, self._root_cert)
        if isinstance(san, str):  # a SPIFFE ID
            san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)])
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
        now = self.clock()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(root_cert.subject)
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
                    # TLS with an RSA key may carry the session key encrypted to it (RSA key exchange);
                    # an EC key only ever signs (RFC 8813).
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
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
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_csr_key(key: object) -> PublicKey:
    """The CSR's public key, if it is one the mesh accepts."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertificateError(f"the CSR's RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, CSR_CURVES):
            raise CertificateError(
                f"the CSR's EC key is on {key.curve.name}; only P-256 (secp256r1) and P-384 (secp384r1) are accepted"
            )
        return key
    kind = type(key).__name__.strip("_").removesuffix("PublicKey") or "unknown"
    raise CertificateError(
        f"the CSR's key is {kind}; it must be RSA ({MIN_RSA_BITS} bits or more) or EC on P-256 or P-384"
    )


def _belong_together(key: object, cert: x509.Certificate) -> bool:
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return False
    raw = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)


def _check_directory(directory: Path) -> None:
    """Refuse a CA directory others may write to: they could replace the root."""
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    # A read-only mount (a Kubernetes Secret volume: mode 1777 but read-only) cannot be changed by anyone.
    if mode & 0o022 and not os.statvfs(directory).f_flag & os.ST_RDONLY:
        who = "others" if mode & 0o002 else "its group"
        raise CertificateError(
            f"the CA directory {directory} is writable by {who} (mode {mode:04o}), who could replace the CA "
            f"root: run `chmod 700 {directory}`"
        )


def _check_key_file(path: Path) -> None:
    """Refuse a root key that others may read or change, as ssh does.

    Read access for the group is accepted only when the key belongs to another user: that is how
    a server is given a key it does not own (a Kubernetes Secret volume with fsGroup, mode 0440).
    """
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    group_read_needed = st.st_uid != os.geteuid()
    if mode & 0o037 or (mode & 0o040 and not group_read_needed):
        fix = f"run `chmod 600 {path}`"
        if group_read_needed:
            fix += f", or `chmod 640 {path}` if the server reads it through its group"
        raise CertificateError(f"the CA root key {path} is open to other users (mode {mode:04o}): {fix}")


def _temp(path: Path) -> Path:
    return path.with_name(path.name + TEMP_SUFFIX)


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    """Write a new file and flush it to disk, so a rename of it never exposes a partial file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[int]:
    """An open descriptor of `directory`, held under an exclusive flock (released on close)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # A file system without flock (some network mounts): creating stays atomic, just not exclusive.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)
