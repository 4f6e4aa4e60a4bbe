"""Node metadata is validated as strictly as the mesh file; errors name the field."""

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshplane.controlplane.model import InterceptionMode
from meshplane.controlplane.proxy import NodeError, from_node


def node(**meta: object) -> base_pb2.Node:
    m = struct_pb2.Struct()
    m.update({"NAMESPACE": "default", "NAME": "web-1", "INSTANCE_IPS": "10.0.0.1", **meta})
    return base_pb2.Node(id="sidecar~10.0.0.1~web-1.default~default.svc.cluster.local", metadata=m)


def test_a_good_node() -> None:
    p = from_node(node(SERVICE_ACCOUNT="web", LABELS={"app": "web", "example.com/tier": "front"}))
    assert p.workload.service_account == "web" and dict(p.workload.labels)["app"] == "web"


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"SERVICE_ACCOUNT": "a/b"}, "SERVICE_ACCOUNT"),
        ({"SERVICE_ACCOUNT": "x" * 254}, "SERVICE_ACCOUNT"),
        ({"NAMESPACE": "Not_A_Namespace"}, "NAMESPACE"),
        ({"NAMESPACE": "n" * 64}, "NAMESPACE"),
        ({"NAME": "a b"}, "NAME"),
        ({"LABELS": {"app": "v" * 64}}, "LABELS.app"),
        ({"LABELS": {"k" * 64: "v"}}, "LABELS." + "k" * 64),
        ({"LABELS": {"a/b/c": "v"}}, "LABELS.a/b/c"),
        ({"LABELS": {f"k{i}": "v" for i in range(65)}}, "LABELS"),
        ({"LABELS": ["app"]}, "LABELS"),
        ({"LABELS": {"app": {"nested": 1}}}, "LABELS.app"),
        ({"INSTANCE_IPS": "not-an-ip"}, "INSTANCE_IPS"),
    ],
)
def test_bad_metadata_is_refused_naming_the_field(meta: dict[str, object], field: str) -> None:
    with pytest.raises(NodeError) as e:
        from_node(node(**meta))
    assert f"{field}:" in str(e.value)


def test_an_overlong_node_id_is_refused() -> None:
    n = node()
    n.id = "x" * 2000
    with pytest.raises(NodeError, match="node id"):
        from_node(n)


def test_a_gateway_node_is_not_sent_mesh_mtls_and_unknown_node_types_are_refused() -> None:
    n = node()
    n.id = "router~10.0.0.1~ingress-1.default~default.svc.cluster.local"
    assert not from_node(n).workload.sidecar
    assert from_node(node()).workload.sidecar
    n.id = "waypoint~10.0.0.1~w.default~default.svc.cluster.local"
    with pytest.raises(NodeError, match="node id: type 'waypoint'"):
        from_node(n)


def test_interception_mode_from_metadata() -> None:
    assert from_node(node()).interception == InterceptionMode.REDIRECT
    assert from_node(node(INTERCEPTION_MODE="TPROXY")).interception == InterceptionMode.TPROXY
    assert from_node(node(INTERCEPTION_MODE="NONE")).interception == InterceptionMode.NONE
    with pytest.raises(NodeError, match=r"^INTERCEPTION_MODE: 'tproxy' is not one of REDIRECT, TPROXY, NONE"):
        from_node(node(INTERCEPTION_MODE="tproxy"))
