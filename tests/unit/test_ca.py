import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshplane.controlplane.ca import ROOT_KEY, CertificateAuthority
from meshplane.controlplane.errors import CertificateError

SPIFFE = "spiffe://cluster.local/ns/demo/sa/web"


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def _verify(leaf_pem: bytes, root_pem: bytes) -> x509.Certificate:
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    leaf.verify_directly_issued_by(root)
    return leaf


def test_root_is_created_private_and_reused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    assert (tmp_path / "ca" / ROOT_KEY).stat().st_mode & 0o777 == 0o600
    again = CertificateAuthority(tmp_path / "ca", "cluster.local")
    assert again.root_pem == ca.root_pem


def test_broken_root_is_a_clear_error(tmp_path: Path) -> None:
    CertificateAuthority(tmp_path, "cluster.local")
    (tmp_path / ROOT_KEY).write_text("garbage")
    with pytest.raises(CertificateError, match="cannot load the CA root"):
        CertificateAuthority(tmp_path, "cluster.local")


def test_workload_certificate_has_spiffe_san_and_chains_to_root(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local", workload_ttl=dt.timedelta(minutes=30))
    issued = ca.workload_certificate(SPIFFE)
    leaf = _verify(issued.cert_pem, ca.root_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=30)
    key = serialization.load_pem_private_key(issued.key_pem, None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]


def test_renewal_at_half_life(tmp_path: Path) -> None:
    clock = FakeClock()
    ca = CertificateAuthority(tmp_path, "cluster.local", workload_ttl=dt.timedelta(hours=1), clock=clock)
    first = ca.workload_certificate(SPIFFE)
    clock.now += dt.timedelta(minutes=20)
    assert ca.workload_certificate(SPIFFE) is first
    clock.now = first.renew_at()
    second = ca.workload_certificate(SPIFFE)
    assert second.cert_pem != first.cert_pem and second.key_pem != first.key_pem
    assert ca.next_renewal() == second.renew_at()


@pytest.mark.parametrize("bad", ["spiffe://other.domain/ns/a/sa/b", "spiffe://cluster.local/ns/a", "https://x"])
def test_only_identities_of_this_trust_domain(tmp_path: Path, bad: str) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    with pytest.raises(CertificateError, match="not a workload identity of this mesh"):
        ca.workload_certificate(bad)


def _csr(*sans: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_sign_csr(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local", max_ttl=dt.timedelta(hours=2))
    leaf_pem, root_pem = ca.sign_csr(_csr(x509.UniformResourceIdentifier(SPIFFE)), dt.timedelta(days=30))
    assert root_pem == ca.root_pem
    leaf = _verify(leaf_pem, root_pem)
    # Capped at the CA's maximum, whatever was asked.
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2)


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (b"not a csr", "not a PEM PKCS#10"),
        (_csr(), "no subjectAltName"),
        (_csr(x509.UniformResourceIdentifier(SPIFFE), x509.DNSName("x.example")), "exactly one SAN"),
        (_csr(x509.UniformResourceIdentifier("spiffe://evil/ns/a/sa/b")), "not a workload identity"),
    ],
)
def test_bad_csrs(tmp_path: Path, csr: bytes, message: str) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    with pytest.raises(CertificateError, match=message):
        ca.sign_csr(csr)


def test_short_lives_are_not_renewed_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    ca = CertificateAuthority(tmp_path, "cluster.local", workload_ttl=dt.timedelta(seconds=4), clock=clock)
    first = ca.workload_certificate(SPIFFE)
    assert first.renew_at() == clock.now + dt.timedelta(seconds=2)
    assert ca.workload_certificate(SPIFFE) is first


def test_retain_drops_identities_without_proxies(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    other = "spiffe://cluster.local/ns/demo/sa/other"
    ca.workload_certificate(SPIFFE)
    kept = ca.workload_certificate(other)
    ca.retain({other})
    assert ca.next_renewal() == kept.renew_at()
    ca.retain(set())
    assert ca.next_renewal() is None
