import contextlib
import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshplane.controlplane.ca import (
    BACKDATE,
    MAX_IDENTITIES,
    ROOT_CERT,
    ROOT_KEY,
    TRUST_BUNDLE,
    CertificateAuthority,
)
from meshplane.controlplane.errors import CANotFoundError, CertificateError

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


# -- crash-safe creation ---------------------------------------------------------------------------


class Crash(BaseException):
    """A simulated crash: no `except Exception` in the code under test can swallow it."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th file-system change (create, write, rename, link) crash the process."""
    import builtins
    import io

    count = 0

    def step() -> None:
        nonlocal count
        count += 1
        if count == n:
            raise Crash

    def wrap(real: Any, changes: Callable[..., bool]) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if changes(*args, **kwargs):
                step()
            return real(*args, **kwargs)

        return call

    def opens_for_writing(_path: Any, mode: str = "r", *_a: Any, **_k: Any) -> bool:
        return any(c in mode for c in "wax+")

    def creates(_path: Any, flags: int, *_a: Any, **_k: Any) -> bool:
        return bool(flags & os.O_CREAT)

    monkeypatch.setattr(os, "open", wrap(os.open, creates))
    monkeypatch.setattr(io, "open", wrap(io.open, opens_for_writing))
    monkeypatch.setattr(builtins, "open", wrap(builtins.open, opens_for_writing))
    for name in ("write", "replace", "rename", "link"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name), lambda *_a, **_k: True))


@pytest.mark.parametrize("crash_at", range(1, 9))
def test_a_crash_while_creating_the_root_does_not_break_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    with monkeypatch.context() as m:
        _crash_at(m, crash_at)
        with contextlib.suppress(Crash):
            CertificateAuthority(tmp_path / "ca", "cluster.local")
    key = tmp_path / "ca" / ROOT_KEY
    key_before = key.read_bytes() if key.exists() else None
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    # A key in place is never replaced: the crashed start's root is completed, not swapped.
    assert key_before is None or key.read_bytes() == key_before
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == sorted([ROOT_CERT, ROOT_KEY, TRUST_BUNDLE])
    assert CertificateAuthority(tmp_path / "ca", "cluster.local").root_pem == ca.root_pem
    _verify(ca.workload_certificate(SPIFFE).cert_pem, ca.root_pem)


def test_a_stale_temporary_file_is_removed(tmp_path: Path) -> None:
    (tmp_path / f"{ROOT_KEY}.tmp").write_bytes(b"-----BEGIN PRIV")
    ca = CertificateAuthority(tmp_path, "cluster.local")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ROOT_CERT, ROOT_KEY, TRUST_BUNDLE])
    assert CertificateAuthority(tmp_path, "cluster.local").root_pem == ca.root_pem


@pytest.mark.parametrize(("missing", "advice"), [(ROOT_CERT, "no root-cert.pem"), (ROOT_KEY, "no root-key.pem")])
def test_a_half_written_root_is_a_clear_error(tmp_path: Path, missing: str, advice: str) -> None:
    CertificateAuthority(tmp_path, "cluster.local")
    (tmp_path / missing).unlink()
    with pytest.raises(CertificateError, match=advice) as e:
        CertificateAuthority(tmp_path, "cluster.local")
    assert str(tmp_path / missing) in str(e.value) and "remove" in str(e.value)
    # Never silently replaced: that would change the root every workload trusts.
    assert not (tmp_path / missing).exists()


# -- permissions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_a_root_key_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    CertificateAuthority(tmp_path, "cluster.local")
    (tmp_path / ROOT_KEY).chmod(mode)
    with pytest.raises(CertificateError, match=f"mode {mode:04o}.*chmod 600 {tmp_path / ROOT_KEY}"):
        CertificateAuthority(tmp_path, "cluster.local")


@pytest.mark.parametrize("mode", [0o777, 0o707, 0o770, 0o1777])
def test_a_ca_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    CertificateAuthority(tmp_path / "ca", "cluster.local")
    (tmp_path / "ca").chmod(mode)
    with pytest.raises(CertificateError, match=f"chmod 700 {tmp_path / 'ca'}"):
        CertificateAuthority(tmp_path / "ca", "cluster.local")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the key to another user")
def test_a_group_readable_key_of_another_user_is_accepted(tmp_path: Path) -> None:
    """A Kubernetes Secret volume: root owns the key, the server reads it through fsGroup (mode 0440)."""
    ca = CertificateAuthority(tmp_path, "cluster.local")
    os.chown(tmp_path / ROOT_KEY, 4242, 4242)
    (tmp_path / ROOT_KEY).chmod(0o440)
    assert CertificateAuthority(tmp_path, "cluster.local").root_pem == ca.root_pem


# -- what is issued -----------------------------------------------------------------------------------


def _key_usage(cert_pem: bytes) -> x509.KeyUsage:
    return x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(x509.KeyUsage).value


def test_ec_leaves_are_for_signatures_only(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    leaves = [
        ca.workload_certificate(SPIFFE).cert_pem,
        ca.server_certificate(["meshplane.mesh-system.svc"], dt.timedelta(hours=1)).cert_pem,
        ca.sign_csr(_csr(x509.UniformResourceIdentifier(SPIFFE)))[0],
    ]
    for leaf in leaves:
        usage = _key_usage(leaf)
        assert usage.digital_signature and not usage.key_encipherment


def _csr_with(key: Any) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE)]), critical=False
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_rsa_leaves_from_csrs_may_also_encipher_keys(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    leaf, _ = ca.sign_csr(_csr_with(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    usage = _key_usage(leaf)
    assert usage.digital_signature and usage.key_encipherment


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_csrs_with_p256_and_p384_keys_are_signed(tmp_path: Path, curve: ec.EllipticCurve) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    leaf, root = ca.sign_csr(_csr_with(ec.generate_private_key(curve)))
    _verify(leaf, root)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=1024), "1024 bits; at least 2048"),
        (ec.generate_private_key(ec.SECP521R1()), "secp521r1.*only P-256.*P-384"),
        (ec.generate_private_key(ec.SECP256K1()), "secp256k1.*only P-256.*P-384"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519.*must be RSA"),
    ],
)
def test_csrs_with_weak_or_unexpected_keys_are_refused(tmp_path: Path, key: Any, message: str) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    with pytest.raises(CertificateError, match=message):
        ca.sign_csr(_csr_with(key))


# -- requested lifetimes ------------------------------------------------------------------------------


def _lifetime(leaf_pem: bytes) -> dt.timedelta:
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    return leaf.not_valid_after_utc - leaf.not_valid_before_utc


@pytest.mark.parametrize("seconds", [2**62, 2**63 - 1, 10**18, 86_400_000_000_000])
def test_a_huge_validity_in_seconds_is_capped(tmp_path: Path, seconds: int) -> None:
    """What a CreateCertificateRequest's int64 validity_seconds may carry."""
    ca = CertificateAuthority(tmp_path, "cluster.local", max_ttl=dt.timedelta(hours=2))
    leaf, _ = ca.sign_csr(_csr(x509.UniformResourceIdentifier(SPIFFE)), seconds)
    assert _lifetime(leaf) == dt.timedelta(hours=2) + BACKDATE


def test_validity_in_seconds(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local", workload_ttl=dt.timedelta(minutes=30))
    csr = _csr(x509.UniformResourceIdentifier(SPIFFE))
    assert _lifetime(ca.sign_csr(csr, 600)[0]) == dt.timedelta(minutes=10) + BACKDATE
    # Zero is what an unset proto3 field reads as: the CA's own lifetime.
    assert _lifetime(ca.sign_csr(csr, 0)[0]) == dt.timedelta(minutes=30) + BACKDATE
    assert _lifetime(ca.sign_csr(csr, None)[0]) == dt.timedelta(minutes=30) + BACKDATE


@pytest.mark.parametrize("validity", [-1, -(2**63), dt.timedelta(seconds=-1)])
def test_a_negative_validity_is_refused(tmp_path: Path, validity: int | dt.timedelta) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    with pytest.raises(CertificateError, match="validity must be positive"):
        ca.sign_csr(_csr(x509.UniformResourceIdentifier(SPIFFE)), validity)


# -- loading without creating -------------------------------------------------------------------------


def test_create_false_loads_an_existing_root(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    assert CertificateAuthority(tmp_path / "ca", "cluster.local", create=False).root_pem == ca.root_pem


@pytest.mark.parametrize("exists", [False, True])
def test_create_false_never_creates_a_root(tmp_path: Path, exists: bool) -> None:
    if exists:
        (tmp_path / "ca").mkdir(mode=0o700)
    with pytest.raises(CANotFoundError, match=f"no mesh CA in {tmp_path / 'ca'}"):
        CertificateAuthority(tmp_path / "ca", "cluster.local", create=False)
    assert (tmp_path / "ca").exists() == exists
    assert not exists or not any((tmp_path / "ca").iterdir())


# -- what the CA keeps --------------------------------------------------------------------------------


def test_identities_kept_are_bounded(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local")
    first = "spiffe://cluster.local/ns/churn/sa/0"
    for i in range(10_000):
        ca.workload_certificate(f"spiffe://cluster.local/ns/churn/sa/{i}")
        if i % 1000 == 0:
            ca.workload_certificate(first)  # in use: stays, however many others come and go
    held = ca.identities()
    assert len(held) <= MAX_IDENTITIES
    assert held[-1] == "spiffe://cluster.local/ns/churn/sa/9999" and first in held
    assert "spiffe://cluster.local/ns/churn/sa/1" not in held


def test_the_cap_is_least_recently_asked_first(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, "cluster.local", max_identities=2)
    a, b, c = (f"spiffe://cluster.local/ns/demo/sa/{n}" for n in "abc")
    kept = ca.workload_certificate(a)
    ca.workload_certificate(b)
    assert ca.workload_certificate(a) is kept
    ca.workload_certificate(c)
    assert ca.identities() == [a, c]
    assert ca.workload_certificate(a) is kept


def test_renew_due_renews_without_being_asked(tmp_path: Path) -> None:
    clock = FakeClock()
    ca = CertificateAuthority(tmp_path, "cluster.local", workload_ttl=dt.timedelta(hours=1), clock=clock)
    other = "spiffe://cluster.local/ns/demo/sa/other"
    early = ca.workload_certificate(SPIFFE)
    clock.now += dt.timedelta(minutes=20)
    late = ca.workload_certificate(other)
    assert ca.renew_due() == []
    clock.now = early.renew_at()
    assert ca.renew_due() == [SPIFFE]
    renewed = ca.workload_certificate(SPIFFE)
    assert renewed is not early and renewed.issued_at == early.renew_at()
    assert ca.workload_certificate(other) is late
    assert ca.next_renewal() == late.renew_at()
    ca.retain({SPIFFE})
    clock.now = renewed.renew_at()
    assert ca.renew_due() == [SPIFFE]  # only what is held: retain() dropped the other identity
    assert ca.identities() == [SPIFFE]
