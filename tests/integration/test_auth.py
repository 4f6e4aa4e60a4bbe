"""Authenticated proxies: every way in without the right credential is refused, and none of them
ever receives a private key. Real gRPC over real TLS (and a unix socket) against `meshctl serve`'s server."""

import datetime as dt
import os
import stat
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshplane.controlplane import tokens
from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.ca import CertificateAuthority
from meshplane.controlplane.resources import CLUSTER, SECRET
from meshplane.protos import ca_pb2, ca_pb2_grpc

from .conftest import xds_channel
from .test_grpc_edges import Client, node


def channel_with(
    plane: ControlPlane, call: grpc.CallCredentials | None = None, *, port: int = 0, **tls: Any
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca.root_pem, **tls)
    if call is not None:
        creds = grpc.composite_channel_credentials(creds, call)
    return grpc.aio.secure_channel(f"127.0.0.1:{port or plane.xds_tls_port}", creds)


async def refused(channel: grpc.aio.Channel, **request: Any) -> grpc.aio.AioRpcError:
    """Ask for the proxy's secrets; the stream must end with an error before any response."""
    client = Client(channel)
    client.send(type_url=SECRET, node=node(), resource_names=["default", "ROOTCA"], **request)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        got = await client.recv()
        pytest.fail(f"a refused caller received {got.type_url} with {len(got.resources)} resources")
    return e.value


def bearer(token: str) -> grpc.CallCredentials:
    return grpc.access_token_call_credentials(token)


def failures(plane: ControlPlane, reason: str) -> float:
    return plane.metrics.auth_failures.labels(reason)._value.get()  # type: ignore[attr-defined, no-any-return]


async def test_no_token_is_unauthenticated(plane: ControlPlane) -> None:
    async with channel_with(plane) as channel:
        error = await refused(channel)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "no credential" in str(error.details())
    assert failures(plane, "no-credential") == 1


async def test_a_token_for_another_service_account_is_denied(plane: ControlPlane) -> None:
    async with xds_channel(plane, "demo", "backend") as channel:  # node() claims demo/web
        error = await refused(channel)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "claims demo/web" in str(error.details()) and "demo/backend" in str(error.details())


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda ca, other: tokens.mint(other, "demo", "web", ttl=3600), "does not verify"),
        (lambda ca, other: tokens.mint(ca._root_key, "demo", "web", ttl=60, now=time.time() - 3600), "expired"),
        (lambda ca, other: tokens.mint(ca._root_key, "demo", "web", ttl=3600, audiences=["istio-ca"]), "audience"),
        (lambda ca, other: "not.a.token", "base64url"),
        (lambda ca, other: "x" * 5_000, "longer than"),
        (
            lambda ca, other: tokens._b64('{"alg":"none"}') + "." + tokens._b64('{"sub":"x"}') + ".",
            "ES256",
        ),
    ],
    ids=["forged", "expired", "wrong-audience", "garbage", "huge", "alg-none"],
)
async def test_bad_tokens_are_unauthenticated(plane: ControlPlane, make: Any, says: str) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    async with channel_with(plane, bearer(make(plane.ca, other))) as channel:
        error = await refused(channel)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and says in str(error.details())


def client_cert(ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, uri: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, cert.public_bytes(serialization.Encoding.PEM)


async def test_a_client_certificate_from_another_ca_is_refused(plane_factory: Any) -> None:
    plane = await plane_factory(xds_mtls_port=0)
    foreign = ec.generate_private_key(ec.SECP256R1())
    key, cert = client_cert(
        foreign, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")]), "spiffe://cluster.local/ns/demo/sa/web"
    )
    async with channel_with(plane, port=plane.xds_mtls_port, private_key=key, certificate_chain=cert) as channel:
        error = await refused(channel)
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails
    async with channel_with(plane, port=plane.xds_mtls_port) as channel:  # no certificate at all
        error = await refused(channel)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_mesh_client_certificate_proves_its_identity(plane_factory: Any) -> None:
    plane = await plane_factory(xds_mtls_port=0)
    issued = plane.ca.workload_certificate("spiffe://cluster.local/ns/demo/sa/web")
    mtls = {"port": plane.xds_mtls_port, "private_key": issued.key_pem, "certificate_chain": issued.cert_pem}
    async with channel_with(plane, **mtls) as channel:
        client = Client(channel)
        client.send(type_url=CLUSTER, node=node())
        assert (await client.recv()).resources
    other = plane.ca.workload_certificate("spiffe://cluster.local/ns/demo/sa/backend")
    mtls.update(private_key=other.key_pem, certificate_chain=other.cert_pem)
    async with channel_with(plane, **mtls) as channel:
        error = await refused(channel)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_certificate_service_signs_only_the_callers_own_identity(plane: ControlPlane) -> None:
    def csr(sa: str) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        uri = x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/demo/sa/{sa}")
        req = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([uri]), critical=True)
            .sign(key, hashes.SHA256())
        )
        return req.public_bytes(serialization.Encoding.PEM).decode()

    async with channel_with(plane) as channel:  # no token
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateCertificate(ca_pb2.CreateCertificateRequest(csr=csr("web")))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with xds_channel(plane, "demo", "web") as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        signed = await stub.CreateCertificate(ca_pb2.CreateCertificateRequest(csr=csr("web")))
        assert signed.cert_chain
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateCertificate(ca_pb2.CreateCertificateRequest(csr=csr("payments")))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "payments" in str(e.value.details())


async def test_only_the_proxys_own_key_is_ever_sent(plane: ControlPlane) -> None:
    async with xds_channel(plane, "demo", "web") as channel:
        client = Client(channel)
        client.send(type_url=SECRET, node=node(), resource_names=["default", "ROOTCA"])
        resp = await client.recv()
    for packed in resp.resources:
        secret = secret_pb2.Secret()
        packed.Unpack(secret)
        if secret.name == "default":
            cert = x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/demo/sa/web"]


async def test_plaintext_serves_nothing_unless_asked_for(plane_factory: Any, tmp_path: Path) -> None:
    plane = await plane_factory()
    assert plane.xds_port == 0  # not even listening
    insecure = await plane_factory(insecure_trust_node_metadata=True, xds_port=0, ca_dir=tmp_path / "ca2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{insecure.xds_port}") as channel:
        client = Client(channel)
        client.send(type_url=CLUSTER, node=node())
        assert (await client.recv()).resources


async def test_the_unix_socket_needs_a_token_and_is_not_world_writable(plane_factory: Any, tmp_path: Path) -> None:
    socket = tmp_path / "xds.sock"
    plane = await plane_factory(xds_socket=socket)
    assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
    local = grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)
    async with grpc.aio.secure_channel(f"unix:{socket}", local) as channel:
        error = await refused(channel)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    token = plane.ca.mint_token("demo", "web", dt.timedelta(minutes=5))
    creds = grpc.composite_channel_credentials(local, bearer(token))
    async with grpc.aio.secure_channel(f"unix:{socket}", creds) as channel:
        client = Client(channel)
        client.send(type_url=CLUSTER, node=node())
        assert (await client.recv()).resources


def test_tokens_round_trip_and_name_their_problems(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    token = ca.mint_token("demo", "web", dt.timedelta(minutes=1))
    assert ca.verify_token(token) == tokens.Identity("demo", "web")
    header, claims, signature = token.split(".")
    tampered = f"{header}.{tokens._b64(tokens._unb64(claims).replace(b'web', b'wec'))}.{signature}"
    with pytest.raises(tokens.TokenError, match="does not verify"):
        ca.verify_token(tampered)
    with pytest.raises(tokens.TokenError, match="audience"):
        ca.verify_token(token, audience="other")


async def test_envoy_with_a_refused_token_gets_nothing_until_the_file_holds_a_good_one(
    plane: ControlPlane, tmp_path: Path
) -> None:
    """Stock Envoy re-reads its token file on every connection, so a rotated token just works."""
    from tests.harness import Envoy, wait_until

    from .conftest import write_bootstrap

    path, admin = write_bootstrap(tmp_path, plane)
    token = tmp_path / "token-demo-backend"
    good = token.read_text()
    token.write_text(plane.ca.mint_token("demo", "web", dt.timedelta(hours=1)))  # not this proxy's identity
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:

        async def denied() -> bool:
            return failures(plane, "identity-mismatch") >= 2  # refused, retried, refused again

        await wait_until(denied, timeout=15, what="Envoy's refused attempts")
        dump = await envoy.config_dump()
        assert not dump["SecretsConfigDump"].get("dynamic_active_secrets")
        assert (await envoy.stats())["control_plane.connected_state"] == 0
        token.write_text(good)

        async def served() -> bool:
            dump = await envoy.config_dump()
            return {s["name"] for s in dump["SecretsConfigDump"].get("dynamic_active_secrets", [])} == {
                "default",
                "ROOTCA",
            }

        await wait_until(served, timeout=20, what="Envoy to reconnect with the rotated token")
