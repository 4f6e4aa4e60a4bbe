"""The sidecar's DNS listener: which names it answers with which addresses, and for which proxies."""

import dataclasses
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from meshplane.controlplane import meshfile
from meshplane.controlplane.explain import capture_of
from meshplane.controlplane.generate import MeshConfig, view_of
from meshplane.controlplane.generate.dns import DNS_LISTENER, names
from meshplane.controlplane.model import MeshModel, Port, Service
from meshplane.controlplane.proxy import from_node
from meshplane.controlplane.resources import LISTENER
from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from meshplane.webhook.selector import InjectionConfigError
from tests.harness import MESH_ROOT
from tests.unit.test_injection import K8S, _proxy, make
from tests.unit.test_proxy import node

MESH = """
services:
  - name: reviews
    namespace: bookinfo
    ports: [{port: 9080, name: http}]
    addresses: [10.96.0.10, "fd00:96::10"]
  - name: db
    namespace: data
    ports: [{port: 5432, name: tcp-pg}]
    selector: {app: db}
workloads:
  - {name: db-1, namespace: data, serviceAccount: db, labels: {app: db}, address: 10.0.0.9}
  - {name: db-2, namespace: data, serviceAccount: db, labels: {app: db}, address: "fd00::9"}
  - {name: web-1, namespace: bookinfo, serviceAccount: web, address: 10.0.0.5}
"""


def model() -> MeshModel:
    parsed = meshfile.parse(MESH)
    search = Service("search", "data", (Port(443, "tls"),), external_name="search.example.com")
    return dataclasses.replace(parsed, services=(*parsed.services, search))


def test_names_as_a_pod_of_its_namespace_asks_them() -> None:
    mesh = model()
    reviews, db = ("10.96.0.10", "fd00:96::10"), ("10.0.0.9", "fd00::9")
    assert names(mesh, "bookinfo") == {
        "db.data": db,  # headless (no address): its endpoints
        "db.data.svc": db,
        "db.data.svc.cluster.local": db,
        "reviews": reviews,  # the bare name only in the service's own namespace
        "reviews.bookinfo": reviews,
        "reviews.bookinfo.svc": reviews,
        "reviews.bookinfo.svc.cluster.local": reviews,
    }  # and no ExternalName service: the upstream resolvers answer for it
    assert "db" in names(mesh, "data") and "reviews" not in names(mesh, "data")


def listeners(config: MeshConfig, **view: Any) -> dict[str, dict[str, Any]]:
    resources = config.resources(view_of(config.model, config.model.workloads[2], **view))
    return {m.name: json_format.MessageToDict(m) for m in resources[LISTENER]}


def test_only_a_proxy_that_asks_gets_the_dns_listener() -> None:
    config = MeshConfig(model())
    assert DNS_LISTENER not in listeners(config)
    dns = listeners(config, dns_capture=True)[DNS_LISTENER]
    assert dns["address"]["socketAddress"] == {"address": "0.0.0.0", "portValue": 15053, "protocol": "UDP"}
    assert dns["additionalAddresses"][0]["address"]["socketAddress"]["address"] == "::"
    (dns_filter,) = dns["listenerFilters"]
    assert dns_filter["name"] == "envoy.filters.udp.dns_filter"
    filter_config = dns_filter["typedConfig"]
    table = {
        d["name"]: d["endpoint"]["addressList"]["address"]
        for d in filter_config["serverConfig"]["inlineDnsTable"]["virtualDomains"]
    }
    assert table["reviews"] == ["10.96.0.10", "fd00:96::10"]
    # Forwarded as asked (no search path of its own), to the resolvers of the pod's resolv.conf.
    client = filter_config["clientConfig"]
    assert "upstreamResolvers" not in client
    assert client["typedDnsResolverConfig"]["typedConfig"]["dnsResolverOptions"] == {"noDefaultSearchDomain": True}
    # Proxies of one namespace share the very same message.
    again = config.resources(view_of(config.model, config.model.workloads[2], dns_capture=True))[LISTENER]
    first = config.resources(view_of(config.model, config.model.workloads[2], dns_capture=True))[LISTENER]
    assert again[-1] is first[-1]


def test_dns_capture_in_node_metadata() -> None:
    assert from_node(node(DNS_CAPTURE="true")).dns_capture
    assert from_node(node(DNS_CAPTURE=True)).dns_capture
    assert not from_node(node(DNS_CAPTURE="false")).dns_capture
    assert not from_node(node()).dns_capture


def dns_pod(proxy_config: str | None) -> dict[str, Any]:
    annotations = {} if proxy_config is None else {"proxy.istio.io/config": proxy_config}
    return make("web", {"containers": [{"name": "app", "image": "app"}]}, annotations=annotations)


def test_a_pod_opts_in_with_istios_proxy_metadata() -> None:
    opted = 'proxyMetadata: {ISTIO_META_DNS_CAPTURE: "true", FOO: bar}\nholdApplicationUntilProxyStarts: true'
    out = inject(dns_pod(opted), "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    kubernetes_validate.validate(out, K8S, strict=True)
    init = out["spec"]["initContainers"][0]
    assert init["args"][-1] == "--redirect-dns"
    proxy = _proxy(out)
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["ISTIO_META_DNS_CAPTURE"] == "true" and env["FOO"] == "bar"  # as Istio: the proxy's environment
    bootstrap = json.loads(proxy["args"][proxy["args"].index("--config-yaml") + 1])
    assert bootstrap["node"]["metadata"]["DNS_CAPTURE"] == "true" and "FOO" not in bootstrap["node"]["metadata"]
    # What the control plane reads from that node: the proxy wants its DNS listener.
    node = json_format.ParseDict(bootstrap["node"], base_pb2.Node())
    node.id = node.id.replace("$(INSTANCE_IP)", "10.0.0.5").replace("$(POD_NAME)", "web")
    node.metadata["INSTANCE_IPS"], node.metadata["NAME"] = "10.0.0.5", "web"
    assert from_node(node).dns_capture
    # The capture `meshctl explain` shows for it.
    assert any("UDP DNS" in line for line in capture_of(out)["summary"])


def test_no_dns_capture_unless_asked_and_a_pod_may_turn_the_mesh_default_off() -> None:
    plain = inject(dns_pod(None), "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod
    assert "--redirect-dns" not in plain["spec"]["initContainers"][0]["args"]
    assert "DNS_CAPTURE" not in json.dumps(plain)
    mesh_wide = InjectionConfig(xds_ca=MESH_ROOT, proxy_metadata={"ISTIO_META_DNS_CAPTURE": "true"})
    assert inject(dns_pod(None), "shop", mesh_wide).pod["spec"]["initContainers"][0]["args"][-1] == "--redirect-dns"
    off = inject(dns_pod("proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'false'}"), "shop", mesh_wide).pod
    assert "--redirect-dns" not in off["spec"]["initContainers"][0]["args"]


@pytest.mark.parametrize("metadata", ["proxyMetadata: [ISTIO_META_DNS_CAPTURE]", "proxyMetadata: {'A B': x}"])
def test_bad_proxy_metadata_is_a_clear_deny(metadata: str) -> None:
    outcome = inject(dns_pod(metadata), "shop", InjectionConfig(xds_ca=MESH_ROOT))
    assert outcome.error is not None and "proxyMetadata as a mapping" in str(outcome.error)


def test_mesh_wide_proxy_metadata_in_the_injection_config(tmp_path: Path) -> None:
    path = tmp_path / "injection.yaml"
    path.write_text("proxyMetadata: {ISTIO_META_DNS_CAPTURE: true}\n")  # a YAML boolean, rendered as Istio does
    config = InjectionConfig.load(path, xds_ca=MESH_ROOT)
    assert config.proxy_metadata == {"ISTIO_META_DNS_CAPTURE": "true"}
    assert inject(dns_pod(None), "shop", config).pod["spec"]["initContainers"][0]["args"][-1] == "--redirect-dns"
    path.write_text("proxyMetadata: [ISTIO_META_DNS_CAPTURE]\n")
    with pytest.raises(InjectionConfigError, match="proxyMetadata must map"):
        InjectionConfig.load(path)
