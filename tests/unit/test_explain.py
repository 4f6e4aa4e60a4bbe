"""`meshctl explain` on corpus pods and a mesh: the decision, the capture rules and the sidecar's view."""

from typing import Any

import pytest
from google.protobuf import json_format

from meshplane.bootstrap import iptables
from meshplane.controlplane import explain, meshfile
from meshplane.controlplane.generate import MeshConfig, view_of
from meshplane.controlplane.model import Workload, labels
from meshplane.controlplane.resources import short
from meshplane.webhook.config import InjectionConfig
from tests.harness import MESH_ROOT

from .test_injection import CORPUS

MESH = """
trustDomain: example.org
mtls: STRICT
services:
  - name: web
    namespace: shop
    ports: [{port: 8080, name: http}]
    selector: {app: web}
  - name: db
    namespace: shop
    ports: [{port: 5432, name: tcp-postgres}]
    selector: {app: db}
    addresses: [10.96.0.9]
  - name: grpc-api
    namespace: shop
    ports: [{port: 9000, name: grpc}]
    selector: {app: api}
workloads:
  - {name: db-0, namespace: shop, serviceAccount: db, labels: {app: db}, address: 10.0.0.9}
  - {name: legacy-db, namespace: shop, serviceAccount: old, labels: {app: db}, address: 10.0.0.10, mtls: DISABLE}
"""


def report(pod_name: str = "everything-already-there", mesh: str | None = MESH, **pod: Any) -> dict[str, Any]:
    doc = {**CORPUS[pod_name], **pod}
    doc["status"] = {"podIP": "10.0.0.5"}
    p, ns = explain.pod_of(doc, "shop")
    return explain.explain_pod(p, ns, InjectionConfig(xds_ca=MESH_ROOT), meshfile.parse(mesh) if mesh else None)


def test_an_injected_pod_and_why() -> None:
    r = report()
    assert r["injection"] == {"inject": True, "reason": "the default policy is enabled", "error": None}
    assert r["pod"]["service_account"] == "web" and r["pod"]["namespace"] == "shop"


def test_capture_rules_are_the_init_containers() -> None:
    cap = report()["capture"]
    assert cap["args"][:5] == ["iptables", "-p", "15001", "-z", "15006"]
    expected = iptables.CaptureConfig.from_flags(exclude_inbound_ports="15090,15021,15020")
    assert cap["iptables"] == iptables.rules(expected)
    assert "inbound ports never captured: 15090, 15021, 15020" in cap["summary"]


def test_an_annotation_narrows_capture() -> None:
    pod = report(metadata={"name": "narrow", "annotations": {"traffic.sidecar.istio.io/includeInboundPorts": "8080"}})
    cap = pod["capture"]
    assert "inbound TCP to 8080 goes to the sidecar on 15006" in cap["summary"]
    assert "--dport 8080 -j MESH_IN_REDIRECT" in cap["iptables"]


def test_tproxy_capture_is_explained() -> None:
    meta = CORPUS["everything-already-there"]["metadata"]
    annotations = {**meta.get("annotations", {}), "sidecar.istio.io/interceptionMode": "TPROXY"}
    pod = report(metadata={**meta, "annotations": annotations})
    cap = pod["capture"]
    assert cap["args"][-2:] == ["-m", "TPROXY"] and "-j TPROXY --on-port 15006" in cap["iptables"]
    assert (
        "inbound is captured with TPROXY (mark 1337, table 133): the app sees each client's own address"
        in (cap["summary"])
    )
    assert pod["mesh"]["inbound"] == report()["mesh"]["inbound"]


def test_identity_inbound_and_outbound() -> None:
    mesh = report()["mesh"]
    assert mesh["identity"] == "spiffe://example.org/ns/shop/sa/web"
    assert mesh["services"] == ["web.shop.svc.cluster.local"]
    ((inbound_8080, other),) = [mesh["inbound"]]
    assert inbound_8080 == {
        "port": 8080,
        "cluster": "inbound|8080||",
        "protocol": "HTTP",
        "mtls": "STRICT",
        "peers": ["spiffe://example.org/*"],
    }
    assert other["port"] is None and other["cluster"] == "InboundPassthroughCluster"
    out = {f"{o['host']}:{o['port']}": o for o in mesh["outbound"]}
    assert list(out) == [
        "db.shop.svc.cluster.local:5432",
        "grpc-api.shop.svc.cluster.local:9000",
        "web.shop.svc.cluster.local:8080",
    ]
    db = out["db.shop.svc.cluster.local:5432"]
    assert db["protocol"] == "TCP" and db["matched_by"] == ["10.96.0.9"]  # its address; endpoints only if headless
    assert db["endpoints"] == [{"address": "10.0.0.10:5432", "mtls": False}, {"address": "10.0.0.9:5432", "mtls": True}]
    assert db["sans"] == ["spiffe://example.org/ns/shop/sa/db", "spiffe://example.org/ns/shop/sa/old"]
    web = out["web.shop.svc.cluster.local:8080"]
    assert web["protocol"] == "HTTP" and "web:8080" in web["matched_by"]
    assert web["endpoints"] == [{"address": "10.0.0.5:8080", "mtls": True}]  # the pod itself, by its podIP
    api = out["grpc-api.shop.svc.cluster.local:9000"]
    assert api["protocol"] == "HTTP2" and api["endpoints"] == [] and api["sans"] == ["spiffe://example.org/*"]
    assert mesh["unknown_destinations"] == "PassthroughCluster"


def test_scope_from_the_annotation_or_the_mesh_file() -> None:
    assert report()["mesh"]["scope"] is None  # unscoped: every service
    annotated = CORPUS["everything-already-there"]
    meta = {
        **annotated["metadata"],
        "annotations": {"sidecar.meshplane.io/egressHosts": "shop/db.shop.svc.cluster.local"},
    }
    scoped = report(metadata=meta)
    assert scoped["mesh"]["scope"] == ["shop/db.shop.svc.cluster.local"]
    assert [o["host"] for o in scoped["mesh"]["outbound"]] == ["db.shop.svc.cluster.local"]
    assert "  scope: shop/db.shop.svc.cluster.local" in explain.render(scoped)
    nothing = report(mesh=MESH + "sidecars:\n  - {namespace: shop, egress: [{hosts: ['~/*']}]}\n")
    assert nothing["mesh"]["outbound"] == [] and "  scope: no service (~/*)" in explain.render(nothing)
    meta["annotations"] = {"sidecar.meshplane.io/egressHosts": "db"}
    assert any("not namespace/dnsName" in n for n in report(metadata=meta)["notes"])


def test_permissive_and_disabled_modes() -> None:
    assert report(mesh=MESH.replace("mtls: STRICT", "mtls: PERMISSIVE"))["mesh"]["inbound"][0]["mtls"] == "PERMISSIVE"
    off = report(mesh=MESH.replace("mtls: STRICT", "mtls: DISABLE"))["mesh"]
    assert off["inbound"][0]["mtls"] == "DISABLE"
    # Nothing has a sidecar that takes mTLS: clients talk plaintext to every endpoint.
    assert not any(o["mtls"] or o["sans"] for o in off["outbound"])
    assert "plaintext (no endpoint has a sidecar)" in explain.render(
        report(mesh=MESH.replace("mtls: STRICT", "mtls: DISABLE"))
    )


def test_not_injected_explains_why_and_stops() -> None:
    r = report(spec={**CORPUS["bare"]["spec"], "hostNetwork": True})
    assert r["injection"]["inject"] is False and r["injection"]["reason"] == "the pod uses the host network"
    assert r["capture"] is None and r["mesh"] is None
    assert "Injection\n  sidecar injected: no, because the pod uses the host network" in explain.render(r)


def test_without_a_mesh_file() -> None:
    r = report(mesh=None)
    assert r["capture"] is not None and r["mesh"] is None
    assert any("--mesh" in n for n in r["notes"])


def test_text_has_a_section_per_part() -> None:
    text = explain.render(report())
    for heading in (
        "Pod shop/full",
        "Injection",
        "Capture rules (init container mesh-init)",
        "Identity and mTLS (mesh file)",
        "Inbound (virtualInbound, port 15006)",
        "Outbound (virtualOutbound, port 15001)",
    ):
        assert f"\n{heading}" in f"\n{text}", heading
    assert "  identity: spiffe://example.org/ns/shop/sa/web" in text
    assert "10.0.0.10:5432 (plaintext)" in text
    assert "anything else: PassthroughCluster, let through (ALLOW_ANY)" in text


def test_a_deployments_template() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": CORPUS["bare"]["spec"]}},
    }
    pod, ns = explain.pod_of(deployment)
    assert ns == "shop" and pod["metadata"] == {"name": "web", "labels": {"app": "web"}}
    with pytest.raises(explain.ExplainError, match="no pod to explain"):
        explain.pod_of({"kind": "Service", "metadata": {"name": "x"}})


def test_live_view_reads_the_same_config() -> None:
    """The live report comes from /debug/config's JSON; built from the same resources it says the same."""
    model = meshfile.parse(MESH)
    workload = Workload("db-0", "shop", "db", "10.0.0.9", labels({"app": "db"}))
    resources = MeshConfig(model).resources(view_of(model, workload))
    config = {short(t): [json_format.MessageToDict(m) for m in ms] for t, ms in resources.items()}
    proxy = {
        "id": "sidecar~10.0.0.9~db-0.shop~shop.svc.cluster.local",
        "identity": workload.spiffe_id(model.trust_domain),
        "workload": {"name": "db-0", "namespace": "shop", "service_account": "db", "address": "10.0.0.9"},
    }
    r = explain.explain_live(proxy, config)
    assert r["injection"] is None and r["mesh"]["identity"] == "spiffe://example.org/ns/shop/sa/db"
    assert [(i["port"], i["protocol"], i["mtls"]) for i in r["mesh"]["inbound"]] == [
        (5432, "TCP", "STRICT"),
        (None, "TCP", "STRICT"),
    ]
    text = explain.render(r)
    assert text.startswith("Pod sidecar~10.0.0.9~db-0.shop~shop.svc.cluster.local\n")
    assert "Identity and mTLS (live config last sent)" in text
