from pathlib import Path

import pytest

from meshplane.controlplane import meshfile
from meshplane.controlplane.errors import MeshFileError
from meshplane.controlplane.model import MtlsMode, OutboundPolicy, Protocol

EXAMPLE = Path(__file__).parents[2] / "examples" / "mesh.yaml"


def test_example_file_parses() -> None:
    model = meshfile.load(EXAMPLE)
    assert model.trust_domain == "cluster.local"
    assert model.mtls is MtlsMode.STRICT
    backend = next(s for s in model.services if s.name == "backend")
    assert [(p.port, p.protocol) for p in backend.ports] == [(9080, Protocol.HTTP), (9090, Protocol.TCP)]
    assert backend.addresses == ("10.96.0.20",)


def test_issue_schema_and_defaults() -> None:
    model = meshfile.parse(
        """
outboundTrafficPolicy: REGISTRY_ONLY
services:
  - name: reviews
    ports: [{port: 9080, name: http-web}, {port: 7000, name: grpc-api}, {port: 5432, name: db}]
    selector: {app: reviews}
workloads:
  - {name: reviews-v1, serviceAccount: reviews, labels: {app: reviews, version: 1}, address: 10.0.0.7}
"""
    )
    assert model.outbound_policy is OutboundPolicy.REGISTRY_ONLY
    svc = model.services[0]
    assert svc.namespace == "default"
    # Protocols follow Istio's port-name prefixes when not given.
    assert [p.protocol for p in svc.ports] == [Protocol.HTTP, Protocol.GRPC, Protocol.TCP]
    (w,) = model.workloads
    assert dict(w.labels) == {"app": "reviews", "version": "1"}
    assert model.endpoints(svc) == (w,)
    assert w.spiffe_id(model.trust_domain) == "spiffe://cluster.local/ns/default/sa/reviews"


def test_empty_file_is_an_empty_mesh() -> None:
    model = meshfile.parse("")
    assert model.services == () and model.workloads == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mtls: STRICTISH\n", "m.yaml:1: mtls: must be one of STRICT | PERMISSIVE | DISABLE, got 'STRICTISH'"),
        ("trustDomain: Bad_Domain\n", "m.yaml:1: trustDomain: 'Bad_Domain' is not a DNS name"),
        ("servics: []\n", "m.yaml:1: servics: unknown field"),
        (
            "services:\n  - name: a\n    ports: [{port: 0}]\n",
            "m.yaml:3: services[0].ports[0].port: must be an integer from 1 to 65535, got 0",
        ),
        ("services:\n  - name: a\n    ports: []\n", "m.yaml:3: services[0].ports: needs at least one port"),
        (
            "services:\n  - name: a\n    ports: [{port: 80}, {port: 80}]\n",
            "services[0].ports[1].port: port 80 is listed twice",
        ),
        (
            "services:\n  - name: a\n    ports: [{port: 80, protocol: UDP}]\n",
            "protocol: must be one of HTTP | HTTP2 | GRPC | TCP",
        ),
        (
            "services:\n  - {name: a, ports: [{port: 80}]}\n  - {name: a, ports: [{port: 81}]}\n",
            "m.yaml:3: services[1]: duplicate service 'a' in namespace 'default'",
        ),
        (
            "services:\n  - {name: a, ports: [{port: 80}], addresses: [10.0.0.300]}\n",
            "services[0].addresses[0]: must be an IP address, got '10.0.0.300'",
        ),
        ("workloads:\n  - {name: w}\n", "m.yaml:2: workloads[0].address: is required"),
        ("workloads:\n  - {name: w, address: 1.2.3.4, labels: {'a b': c}}\n", "is not a valid Kubernetes label"),
        ("workloads: {name: w}\n", "m.yaml:1: workloads: must be a list, got a mapping"),
        ("services: [\n", "m.yaml:2: invalid YAML"),
        ("a: 1\na: 2\n", "m.yaml:2: duplicate key 'a'"),
        ("- 1\n", "must be a mapping, got a list"),
    ],
)
def test_bad_files_say_where_and_what(text: str, message: str) -> None:
    with pytest.raises(MeshFileError) as e:
        meshfile.parse(text, "m.yaml")
    assert message in str(e.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(MeshFileError, match=r"missing\.yaml: cannot read: No such file"):
        meshfile.load(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MeshFileError, match="not UTF-8"):
        meshfile.load(binary)
