"""Malformed xDS streams against a running control plane.

Random DiscoveryRequests (unknown type URLs, absurd resource names, missing or odd nodes, random
metadata, nonces and versions), raw garbage on the HTTP/2 stream, random CSRs for the CA service
and random bearer tokens on the TLS port. Property: every call ends with a status that says what
was wrong, or normally; never UNKNOWN or INTERNAL (an unhandled exception), never a hang; and a
well-behaved proxy still gets its clusters afterwards.

The plaintext port (`insecure_trust_node_metadata`) lets node metadata through to the code that
validates it; on the TLS port every random call stops at authentication.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from meshplane.controlplane.settings import Settings
from meshplane.protos import ca_pb2
from tests.fuzz import LoopThread

MESH = """
services:
  - {name: backend, namespace: demo, ports: [{port: 9080, name: http}], selector: {app: backend}}
workloads:
  - {name: frontend-1, namespace: demo, serviceAccount: frontend, labels: {app: frontend}, address: 10.0.0.5}
"""
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
PER_TYPE = {
    CLUSTER: "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
    ENDPOINT: "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints",
    LISTENER: "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
    ROUTE: "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
    SECRET: "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
}
CA = "/meshplane.ca.v1.CertificateService/CreateCertificate"
TIMEOUT = 10.0
"""Seconds before a call counts as a hang."""
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


# -- the control plane, on its own loop for the module ----------------------------------------------


class Plane:
    def __init__(self, plane: ControlPlane, plaintext: grpc.Channel, tls: grpc.Channel) -> None:
        self.plane, self.plaintext, self.tls = plane, plaintext, tls

    def __repr__(self) -> str:
        return "<plane>"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    tmp: Path = tmp_path_factory.mktemp("xds")
    (tmp / "mesh.yaml").write_text(MESH)
    values: dict[str, object] = dict(
        mesh_file=tmp / "mesh.yaml",
        bind="127.0.0.1",
        xds_port=0,
        xds_tls_port=0,
        admin_port=0,
        webhook_port=0,
        ca_dir=tmp / "ca",
        insecure_trust_node_metadata=True,
        debounce=0.05,
        proxy_grace=0.5,
        poll_interval=0.1,
        mesh_settle=0.2,
        shutdown_delay=0,
        shutdown_grace=1,
    )
    fields = {f.name for f in dataclasses.fields(Settings)}
    cp = ControlPlane(Settings(**{k: v for k, v in values.items() if k in fields}))
    loop = LoopThread()
    loop.run(cp.start())
    plaintext = grpc.insecure_channel(f"127.0.0.1:{cp.xds_port}")
    tls_port = getattr(cp, "xds_tls_port", 0) or cp.xds_port
    tls = grpc.secure_channel(f"127.0.0.1:{tls_port}", grpc.ssl_channel_credentials(root_certificates=cp.ca.root_pem))
    yield Plane(cp, plaintext, tls)
    plaintext.close()
    tls.close()
    loop.run(cp.stop())
    loop.close()


# -- strategies --------------------------------------------------------------------------------------

KNOWN = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET]
type_urls = st.one_of(
    st.sampled_from(KNOWN),
    st.sampled_from(
        [
            "",
            CLUSTER + "x",
            "type.googleapis.com/envoy.config.cluster.v2.Cluster",
            "type.googleapis.com/google.protobuf.Empty",
            "type.googleapis.com/" + "a" * 100_000,
            "CDS",
            "\x00",
        ]
    ),
    st.text(max_size=30),
)
odd_names = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["default", "ROOTCA", "outbound|9080||backend.demo.svc.cluster.local", "9080", "*", "\x00", ""]),
    st.integers(10_000, 1_000_000).map(lambda n: "n" * n),
)
resource_names = st.one_of(
    st.lists(odd_names, max_size=5),
    st.integers(1_000, 20_000).map(lambda n: [f"name-{i}" for i in range(n)]),
)
finite = st.floats(allow_nan=False, allow_infinity=False)  # non-finite ones: a test of their own at the end
json_values = st.recursive(
    st.none() | st.booleans() | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
META_KEYS = ["NAMESPACE", "NAME", "SERVICE_ACCOUNT", "LABELS", "INSTANCE_IPS", "CLUSTER_ID", "ISTIO_VERSION"]
good_meta = {"NAMESPACE": "demo", "NAME": "web-1", "SERVICE_ACCOUNT": "web", "INSTANCE_IPS": "10.0.0.42"}
metadata = st.one_of(
    st.dictionaries(st.sampled_from(META_KEYS) | st.text(max_size=10), json_values, max_size=6),
    st.builds(
        lambda key, value: {**good_meta, key: value},
        st.sampled_from(META_KEYS),
        json_values
        | st.sampled_from(["", "-", "a" * 300, "Demo", "10.0.0.1,::1", "::1", "10.0.0.300", "x\x00y"])
        | st.dictionaries(st.text(max_size=70), st.text(max_size=70) | json_values, max_size=70),
    ),
)
node_ids = st.one_of(
    st.just("sidecar~10.0.0.42~web-1.demo~demo.svc.cluster.local"),
    st.text(max_size=40),
    st.sampled_from(["", "~~~", "sidecar~~.~", "sidecar~10.0.0.42~web-1.demo~demo~extra", "x" * 513]),
)


def make_node(node_id: str, meta: dict[str, Any] | None) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id)
    if meta is not None:
        struct = struct_pb2.Struct()
        struct.update(meta)
        node.metadata.CopyFrom(struct)
    return node


nodes = st.none() | st.builds(make_node, node_ids, st.none() | metadata)


def make_request(
    type_url: str, names: list[str], node: base_pb2.Node | None, version: str, nonce: str, nack: str | None
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, version_info=version)
    req.response_nonce = nonce
    if node is not None:
        req.node.CopyFrom(node)
    if nack is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=nack))
    return req


small_text = st.text(max_size=12) | st.sampled_from(["", "1", "2", "3"])
requests = st.builds(make_request, type_urls, resource_names, nodes, small_text, small_text, st.none() | st.text())
GOOD_NODE = make_node("sidecar~10.0.0.42~web-1.demo~demo.svc.cluster.local", good_meta)


def with_first_node(node: base_pb2.Node | None, reqs: list[discovery_pb2.DiscoveryRequest]) -> list[Any]:
    """Proxies send their node on the first request; give it the good one most of the time."""
    if node is not None:
        reqs[0].node.CopyFrom(node)
    return reqs


streams = st.builds(
    with_first_node,
    st.sampled_from([GOOD_NODE, GOOD_NODE, None]) | nodes,
    st.lists(requests, min_size=1, max_size=4),
)


# -- driving the server -----------------------------------------------------------------------------


def call_stream(
    channel: grpc.Channel, method: str, messages: list[bytes], credentials: grpc.CallCredentials | None = None
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send `messages`, half-close, read until the server ends the call."""
    rpc = channel.stream_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    responses: list[bytes] = []
    call = rpc(iter(messages), timeout=TIMEOUT, credentials=credentials)
    try:
        for response in call:
            responses.append(response)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", responses
    return grpc.StatusCode.OK, "", responses


def assert_acceptable(code: grpc.StatusCode, details: str) -> None:
    event(code.name + (": " + details[:40] if code != grpc.StatusCode.OK else ""))
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, "the call hung"
    assert code in ACCEPTABLE, f"{code.name}: {details[:500]}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{code.name} without details"
        assert "Traceback" not in details, details


def assert_healthy(p: Plane) -> None:
    """A good proxy still gets its clusters."""
    good = make_request(
        CLUSTER, [], make_node("sidecar~10.0.0.42~web-1.demo~demo.svc.cluster.local", good_meta), "", "", None
    )
    code, details, responses = call_stream(p.plaintext, ADS, [good.SerializeToString()])
    assert code == grpc.StatusCode.OK, (code, details)
    response = discovery_pb2.DiscoveryResponse.FromString(responses[0])
    assert response.type_url == CLUSTER and len(response.resources) > 2


# -- properties --------------------------------------------------------------------------------------


@fuzz(200)
@given(streams, st.sampled_from([ADS, ADS, *PER_TYPE.values()]))
@example([make_request(CLUSTER, [], None, "", "", None)], ADS)  # no node at all
def test_random_discovery_requests(plane: Plane, reqs: list[discovery_pb2.DiscoveryRequest], method: str) -> None:
    code, details, responses = call_stream(plane.plaintext, method, [r.SerializeToString() for r in reqs])
    assert_acceptable(code, details)
    asked = {r.type_url for r in reqs}
    for raw in responses:
        assert discovery_pb2.DiscoveryResponse.FromString(raw).type_url in asked
    assert_healthy(plane)


@fuzz(150)
@given(
    st.builds(make_node, node_ids, metadata),
    st.lists(st.sampled_from(KNOWN), min_size=1, max_size=5),
)
@example(
    make_node("sidecar~10.0.0.42~web-1.demo~demo.svc.cluster.local", {**good_meta, "LABELS": {"a": 1.0}}), [CLUSTER]
)
def test_random_node_metadata(plane: Plane, node: base_pb2.Node, types: list[str]) -> None:
    first = make_request(types[0], [], node, "", "", None)
    rest = [make_request(t, ["default"], None, "", "", None) for t in types[1:]]
    code, details, _ = call_stream(plane.plaintext, ADS, [r.SerializeToString() for r in [first, *rest]])
    assert_acceptable(code, details)
    assert_healthy(plane)


@fuzz(150)
@given(
    st.sampled_from([ADS, PER_TYPE[CLUSTER], PER_TYPE[SECRET], "/envoy.service.discovery.v3.Nope/Nope"]),
    st.lists(st.binary(max_size=200), min_size=1, max_size=3),
)
@example(ADS, [b"\xff\xff\xff\xff"])
@example(ADS, [b"\x0a\x05"])  # a truncated length-delimited field
def test_garbage_bytes_on_the_stream(plane: Plane, method: str, messages: list[bytes]) -> None:
    code, details, _ = call_stream(plane.plaintext, method, messages)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        assert method.endswith("/Nope")
    else:
        assert_acceptable(code, details)
    assert_healthy(plane)


@fuzz(100)
@given(st.text(max_size=300) | st.binary(max_size=300), st.integers(-(2**63), 2**63 - 1))
def test_random_certificate_requests(plane: Plane, csr: str | bytes, validity: int) -> None:
    if isinstance(csr, bytes):
        body = csr  # not even a CreateCertificateRequest
    else:
        body = ca_pb2.CreateCertificateRequest(csr=csr, validity_seconds=validity).SerializeToString()
    rpc = plane.plaintext.unary_unary(CA, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        rpc(body, timeout=TIMEOUT)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        assert_acceptable(code, details)
    assert_healthy(plane)


@fuzz(60)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=200), streams)
def test_random_bearer_tokens_on_the_tls_port(
    plane: Plane, token: str, reqs: list[discovery_pb2.DiscoveryRequest]
) -> None:
    code, details, _ = call_stream(
        plane.tls, ADS, [r.SerializeToString() for r in reqs], grpc.access_token_call_credentials(token)
    )
    assert_acceptable(code, details)
    assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (code, details)


@fuzz(100)
@given(streams)
def test_random_requests_with_a_valid_token_on_the_tls_port(
    plane: Plane, reqs: list[discovery_pb2.DiscoveryRequest]
) -> None:
    """Authenticated as demo/web: whatever the node claims, the answer is a status or config, never a crash."""
    token = plane.plane.ca.mint_token("demo", "web", dt.timedelta(hours=1))
    code, details, _ = call_stream(
        plane.tls, ADS, [r.SerializeToString() for r in reqs], grpc.access_token_call_credentials(token)
    )
    assert_acceptable(code, details)
    assert_healthy(plane)


def test_a_message_over_the_size_limit(plane: Plane) -> None:
    req = make_request(CLUSTER, ["n" * (17 * 1024 * 1024)], None, "", "", None)
    code, details, _ = call_stream(plane.plaintext, ADS, [req.SerializeToString()])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert_healthy(plane)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_in_metadata_are_invalid_argument(plane: Plane, bad: float) -> None:
    node = make_node("sidecar~10.0.0.42~web-1.demo~demo.svc.cluster.local", {**good_meta, "X": bad})
    code, details, _ = call_stream(
        plane.plaintext, ADS, [make_request(CLUSTER, [], node, "", "", None).SerializeToString()]
    )
    assert_healthy(plane)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


@pytest.mark.parametrize("first_good", [False, True])
def test_bytes_that_are_not_a_discovery_request_are_invalid_argument(plane: Plane, first_good: bool) -> None:
    good = make_request(
        CLUSTER, [], make_node("sidecar~10.0.0.42~web-1.demo~demo.svc.cluster.local", good_meta), "", "", None
    )
    messages = [good.SerializeToString(), b"\xff\xff\xff\xff"] if first_good else [b"\xff\xff\xff\xff"]
    code, details, _ = call_stream(plane.plaintext, ADS, messages)
    assert_healthy(plane)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


def test_bytes_that_are_not_a_certificate_request_are_invalid_argument(plane: Plane) -> None:
    rpc = plane.plaintext.unary_unary(CA, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        rpc(b"\x00", timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
