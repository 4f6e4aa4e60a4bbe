"""The authenticated xDS connection of a sidecar's bootstrap: targets, TLS roots, the token plugin."""

import pytest

from meshplane.bootstrap.envoy import BootstrapError, WorkloadIdentity, XdsCredentials, bootstrap

ID = WorkloadIdentity(name="web-1", namespace="demo", service_account="web", ip="10.0.0.1")


def google(address: str, credentials: XdsCredentials) -> object:
    return bootstrap(ID, address, credentials=credentials).dynamic_resources.ads_config.grpc_services[0].google_grpc


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("meshplane.mesh-system.svc:15012", "meshplane.mesh-system.svc:15012"),
        ("127.0.0.1:1,127.0.0.2:2", "ipv4:127.0.0.1:1,127.0.0.2:2"),
        ("[::1]:1,[fd00::2]:2", "ipv6:[::1]:1,[fd00::2]:2"),
    ],
)
def test_one_or_several_replicas(address: str, target: str) -> None:
    g = google(address, XdsCredentials("/t", ca_pem="PEM"))
    assert g.target_uri == target and g.channel_credentials.ssl_credentials.root_certs.inline_string == "PEM"  # type: ignore[attr-defined]


def test_a_unix_socket_uses_local_credentials() -> None:
    g = google("unix:/run/xds.sock", XdsCredentials("/t"))
    assert g.target_uri == "unix:/run/xds.sock" and g.channel_credentials.HasField("local_credentials")  # type: ignore[attr-defined]


@pytest.mark.parametrize("address", ["a.example:1,b.example:2", "127.0.0.1:1,[::1]:2", "127.0.0.1:1,unix:/x"])
def test_several_replicas_must_be_ip_addresses_of_one_family(address: str) -> None:
    with pytest.raises(BootstrapError, match="several addresses"):
        google(address, XdsCredentials("/t", ca_pem="PEM"))


def test_tcp_without_roots_is_refused() -> None:
    with pytest.raises(BootstrapError, match="mesh root"):
        google("127.0.0.1:1", XdsCredentials("/t"))


def test_several_replicas_are_checked_against_one_name() -> None:
    args = google("127.0.0.1:1,127.0.0.2:2", XdsCredentials("/t", ca_pem="PEM")).channel_args.args  # type: ignore[attr-defined]
    assert args["grpc.default_authority"].string_value == "meshplane.mesh-system.svc"
    one = google("127.0.0.1:1", XdsCredentials("/t", ca_pem="PEM")).channel_args.args  # type: ignore[attr-defined]
    assert "grpc.default_authority" not in one
    named = google("127.0.0.1:1,127.0.0.2:2", XdsCredentials("/t", ca_pem="PEM", authority="cp.example"))
    assert named.channel_args.args["grpc.default_authority"].string_value == "cp.example"  # type: ignore[attr-defined]
