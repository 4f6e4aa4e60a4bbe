from typing import Any

import pytest
from google.protobuf import json_format, message

from meshplane.controlplane import meshfile
from meshplane.controlplane.cache import check_consistent
from meshplane.controlplane.generate import MeshConfig, ProxyView, view_of
from meshplane.controlplane.model import InterceptionMode, MtlsMode, Protocol
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE

MESH = """
trustDomain: example.org
services:
  - name: reviews
    namespace: bookinfo
    ports: [{port: 9080, name: http}, {port: 9443, name: grpc-x, targetPort: 8443}]
    selector: {app: reviews}
    addresses: [10.96.0.10]
  - name: db
    namespace: bookinfo
    ports: [{port: 5432, name: tcp-pg}]
    selector: {app: db}
    addresses: [10.96.0.11]
  - name: reviews
    namespace: other
    ports: [{port: 9080, name: http}]
    selector: {app: reviews}
workloads:
  - {name: reviews-1, namespace: bookinfo, serviceAccount: reviews, labels: {app: reviews}, address: 10.0.0.7}
  - {name: reviews-2, namespace: bookinfo, serviceAccount: reviews, labels: {app: reviews}, address: 10.0.0.8,
     mtls: DISABLE}
  - {name: db-1, namespace: bookinfo, serviceAccount: db, labels: {app: db}, address: 10.0.0.9}
"""


def as_dicts(msgs: list[message.Message]) -> dict[str, dict[str, Any]]:
    out = {}
    for m in msgs:
        d = json_format.MessageToDict(m)
        out[d.get("name") or d["clusterName"]] = d
    return out


@pytest.fixture
def config() -> MeshConfig:
    return MeshConfig(meshfile.parse(MESH))


def reviews_view(config: MeshConfig) -> ProxyView:
    return view_of(config.model, config.model.workloads[0])


def test_view_of_a_workload(config: MeshConfig) -> None:
    view = reviews_view(config)
    assert view == ProxyView("bookinfo", "reviews", ((8443, Protocol.GRPC), (9080, Protocol.HTTP)), MtlsMode.STRICT)


def test_istio_cluster_names_and_tls(config: MeshConfig) -> None:
    clusters = as_dicts(config.resources(reviews_view(config))[CLUSTER])
    assert set(clusters) == {
        "outbound|9080||reviews.bookinfo.svc.cluster.local",
        "outbound|9443||reviews.bookinfo.svc.cluster.local",
        "outbound|5432||db.bookinfo.svc.cluster.local",
        "outbound|9080||reviews.other.svc.cluster.local",
        "PassthroughCluster",
        "InboundPassthroughCluster",
        "BlackHoleCluster",
        "inbound|8443||",
        "inbound|9080||",
    }
    c = clusters["outbound|9080||reviews.bookinfo.svc.cluster.local"]
    assert c["type"] == "EDS"
    tls, plain = c["transportSocketMatches"]
    assert tls["match"] == {"tlsMode": "istio"} and plain.get("match") is None
    ctx = tls["transportSocket"]["typedConfig"]["commonTlsContext"]
    assert ctx["tlsCertificateSdsSecretConfigs"][0]["name"] == "default"
    validation = ctx["combinedValidationContext"]
    assert validation["validationContextSdsSecretConfig"]["name"] == "ROOTCA"
    sans = validation["defaultValidationContext"]["matchTypedSubjectAltNames"]
    assert sans == [{"sanType": "URI", "matcher": {"exact": "spiffe://example.org/ns/bookinfo/sa/reviews"}}]
    assert tls["transportSocket"]["typedConfig"]["sni"] == "outbound_.9080_._.reviews.bookinfo.svc.cluster.local"
    # No known endpoints: any identity of the trust domain, never "anything at all".
    other = clusters["outbound|9080||reviews.other.svc.cluster.local"]["transportSocketMatches"][0]
    other_sans = other["transportSocket"]["typedConfig"]["commonTlsContext"]["combinedValidationContext"]
    assert other_sans["defaultValidationContext"]["matchTypedSubjectAltNames"][0]["matcher"] == {
        "prefix": "spiffe://example.org/"
    }
    inbound = clusters["inbound|9080||"]
    assert inbound["type"] == "ORIGINAL_DST"
    assert inbound["upstreamBindConfig"]["sourceAddress"]["address"] == "127.0.0.6"


def test_endpoints_use_target_port_and_mark_sidecars(config: MeshConfig) -> None:
    cla = as_dicts(config.resources(reviews_view(config))[ENDPOINT])
    lb = cla["outbound|9443||reviews.bookinfo.svc.cluster.local"]["endpoints"][0]["lbEndpoints"]
    assert [e["endpoint"]["address"]["socketAddress"] for e in lb] == [
        {"address": "10.0.0.7", "portValue": 8443},
        {"address": "10.0.0.8", "portValue": 8443},
    ]
    assert lb[0]["metadata"]["filterMetadata"]["envoy.transport_socket_match"] == {"tlsMode": "istio"}
    assert "metadata" not in lb[1]  # mtls: DISABLE -> plaintext to that endpoint
    assert cla["outbound|9080||reviews.other.svc.cluster.local"] == {
        "clusterName": "outbound|9080||reviews.other.svc.cluster.local"
    }


def test_routes_short_names_only_in_own_namespace(config: MeshConfig) -> None:
    routes = as_dicts(config.routes("bookinfo"))
    hosts = {vh["name"]: vh["domains"] for vh in routes["9080"]["virtualHosts"]}
    assert "reviews" in hosts["reviews.bookinfo.svc.cluster.local:9080"]
    assert "10.96.0.10:9080" in hosts["reviews.bookinfo.svc.cluster.local:9080"]
    assert "reviews" not in hosts["reviews.other.svc.cluster.local:9080"]
    assert "reviews.other" in hosts["reviews.other.svc.cluster.local:9080"]
    assert hosts["allow_any"] == ["*"]
    all_domains = [d for ds in hosts.values() for d in ds]
    assert len(all_domains) == len(set(all_domains)), "Envoy rejects duplicate domains"
    other = {
        vh["name"]: vh["domains"] for vh in as_dicts(MeshConfig(config.model).routes("other"))["9080"]["virtualHosts"]
    }
    assert "reviews" in other["reviews.other.svc.cluster.local:9080"]


def test_registry_only_blackholes_unknown_destinations() -> None:
    config = MeshConfig(meshfile.parse(MESH + "outboundTrafficPolicy: REGISTRY_ONLY\n"))
    listeners = as_dicts(config.outbound_listeners)
    default = listeners["virtualOutbound"]["filterChains"][0]["filters"][0]["typedConfig"]
    assert default["cluster"] == "BlackHoleCluster"
    route = as_dicts(config.routes("bookinfo"))["9080"]["virtualHosts"][-1]
    assert route["name"] == "block_all" and route["routes"][0]["directResponse"]["status"] == 502


def test_tcp_ports_match_by_destination_address(config: MeshConfig) -> None:
    listener = as_dicts(config.outbound_listeners)["0.0.0.0_5432"]
    assert listener["bindToPort"] is False
    chain, default = listener["filterChains"]
    prefixes = [r["addressPrefix"] for r in chain["filterChainMatch"]["prefixRanges"]]
    assert prefixes == ["10.96.0.11"]  # the service address only: endpoints change no listener
    assert chain["filters"][0]["typedConfig"]["cluster"] == "outbound|5432||db.bookinfo.svc.cluster.local"
    assert default["filters"][0]["typedConfig"]["cluster"] == "PassthroughCluster"
    http = as_dicts(config.outbound_listeners)["0.0.0.0_9080"]["filterChains"][-1]["filters"][0]["typedConfig"]
    assert http["rds"]["routeConfigName"] == "9080"


@pytest.mark.parametrize(
    ("mode", "transports"),
    [(MtlsMode.STRICT, ["tls"]), (MtlsMode.PERMISSIVE, ["tls", "raw_buffer"]), (MtlsMode.DISABLE, ["raw_buffer"])],
)
def test_inbound_chains_per_mtls_mode(config: MeshConfig, mode: MtlsMode, transports: list[str]) -> None:
    view = ProxyView("bookinfo", "reviews", ((9080, Protocol.HTTP), (5432, Protocol.TCP)), mode)
    listener = as_dicts(config.resources(view)[LISTENER])["virtualInbound"]
    assert [f["name"] for f in listener["listenerFilters"]] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
    ]
    by_port: dict[Any, list[str]] = {}
    for chain in listener["filterChains"]:
        match = chain["filterChainMatch"]
        by_port.setdefault(match.get("destinationPort"), []).append(match["transportProtocol"])
        if match["transportProtocol"] == "tls":
            tls = chain["transportSocket"]["typedConfig"]
            assert tls["requireClientCertificate"] is True
        else:
            assert "transportSocket" not in chain
    assert by_port == {9080: transports, 5432: transports, None: transports}
    http = next(c for c in listener["filterChains"] if c["filterChainMatch"].get("destinationPort") == 9080)
    manager = http["filters"][0]["typedConfig"]
    if "tls" in transports[:1]:
        assert manager["forwardClientCertDetails"] == "SANITIZE_SET"
        assert manager["setCurrentClientCertDetails"] == {"uri": True}
    assert manager["routeConfig"]["virtualHosts"][0]["routes"][0]["route"]["cluster"] == "inbound|9080||"


def test_snapshot_is_consistent_and_shared_across_views(config: MeshConfig) -> None:
    a = config.resources(reviews_view(config))
    b = config.resources(view_of(config.model, config.model.workloads[2]))
    for res in (a, b):
        check_consistent(res)
    # Shared config is the very same objects, so it is serialized once.
    assert a[ENDPOINT] is b[ENDPOINT]
    assert a[CLUSTER][0] is b[CLUSTER][0]
    assert a[ROUTE] is b[ROUTE]  # same namespace


def test_every_capture_listener_takes_ipv4_and_ipv6(config: MeshConfig) -> None:
    listeners = as_dicts(config.resources(reviews_view(config))[LISTENER])
    for name, port in (("virtualOutbound", 15001), ("virtualInbound", 15006), ("0.0.0.0_5432", 5432)):
        listener = listeners[name]
        assert listener["address"]["socketAddress"] == {"address": "0.0.0.0", "portValue": port}
        # An IPv6-only [::] socket beside it (no ipv4_compat): IPv4 stays on 0.0.0.0 as before.
        assert listener["additionalAddresses"] == [{"address": {"socketAddress": {"address": "::", "portValue": port}}}]


def test_inbound_forwarding_has_a_source_per_family(config: MeshConfig) -> None:
    clusters = as_dicts(config.resources(reviews_view(config))[CLUSTER])
    for name in ("inbound|9080||", "InboundPassthroughCluster"):
        bind = clusters[name]["upstreamBindConfig"]
        assert bind["sourceAddress"] == {"address": "127.0.0.6", "portValue": 0}
        assert bind["extraSourceAddresses"] == [{"address": {"address": "::6", "portValue": 0}}]
    assert "upstreamBindConfig" not in clusters["PassthroughCluster"]  # outbound: the pod's own address


def test_ipv6_services_and_endpoints_match_as_single_addresses() -> None:
    mesh = """
services:
  - name: db
    namespace: ns
    ports: [{port: 5432, name: tcp-pg}]
    selector: {app: db}
    addresses: ["fd00:10:96::11", 10.96.0.11]
  - name: db-pods
    namespace: ns
    ports: [{port: 5433, name: tcp-pg, targetPort: 5432}]
    selector: {app: db}
workloads:
  - {name: db-1, namespace: ns, serviceAccount: db, labels: {app: db}, address: "FD00:250:0::9"}
"""
    config = MeshConfig(meshfile.parse(mesh))
    listeners = as_dicts(config.outbound_listeners)

    def ranges(port: int) -> list[tuple[str, int]]:
        chain = listeners[f"0.0.0.0_{port}"]["filterChains"][0]
        return [(r["addressPrefix"], r["prefixLen"]) for r in chain["filterChainMatch"]["prefixRanges"]]

    assert ranges(5432) == [("fd00:10:96::11", 128), ("10.96.0.11", 32)]
    assert ranges(5433) == [("fd00:250::9", 128)]  # headless: matched by its endpoints' addresses
    cla = as_dicts(config.assignments)["outbound|5432||db.ns.svc.cluster.local"]
    address = cla["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
    assert address == {"address": "fd00:250::9", "portValue": 5432}


def test_draining_and_sidecarless_endpoints() -> None:
    """A disconnected proxy's endpoint is DRAINING (Envoy sends it nothing new while others are healthy);
    an endpoint without a sidecar gets plaintext and is not among the identities the client accepts."""
    import dataclasses

    model = meshfile.parse(MESH)
    first, second, *rest = model.workloads
    model = dataclasses.replace(
        model,
        workloads=(
            dataclasses.replace(first, draining=True),
            dataclasses.replace(second, mtls=None, sidecar=False),
            *rest,
        ),
    )
    config = MeshConfig(model)
    view = view_of(model, model.workloads[2])
    lb = as_dicts(config.resources(view)[ENDPOINT])["outbound|9080||reviews.bookinfo.svc.cluster.local"]
    first_lb, second_lb = lb["endpoints"][0]["lbEndpoints"]
    assert first_lb["healthStatus"] == "DRAINING" and "healthStatus" not in second_lb
    assert "metadata" not in second_lb
    cluster = as_dicts(config.resources(view)[CLUSTER])["outbound|9080||reviews.bookinfo.svc.cluster.local"]
    tls = cluster["transportSocketMatches"][0]["transportSocket"]["typedConfig"]["commonTlsContext"]
    sans = tls["combinedValidationContext"]["defaultValidationContext"]["matchTypedSubjectAltNames"]
    assert [s["matcher"]["exact"] for s in sans] == ["spiffe://example.org/ns/bookinfo/sa/reviews"]


def test_a_rebuild_reuses_every_message_whose_inputs_did_not_change(config: MeshConfig) -> None:
    """A moved db endpoint: only db's assignment is new; every other message is the previous one."""
    before = config.resources(reviews_view(config))
    moved = meshfile.parse(MESH.replace("address: 10.0.0.9}", "address: 10.0.0.19}"))
    after = MeshConfig(moved, config).resources(view_of(moved, moved.workloads[0]))
    new = {t: [m for m in after[t] if not any(m is old for old in before[t])] for t in after}
    assert [m.cluster_name for m in new[ENDPOINT]] == ["outbound|5432||db.bookinfo.svc.cluster.local"]
    assert [c.name for c in new[CLUSTER] if c.name.startswith("outbound|")] == [] and new[ROUTE] == []
    assert [m.name for m in new[LISTENER]] == ["virtualOutbound", "virtualInbound"]  # few, built per config
    # and what was reused is what a fresh build makes
    fresh = MeshConfig(moved).resources(view_of(moved, moved.workloads[0]))
    for t in after:
        assert [m.SerializeToString() for m in after[t]] == [m.SerializeToString() for m in fresh[t]]
    # a new service account behind db changes the SANs its clients accept: its cluster is rebuilt
    renamed = meshfile.parse(MESH.replace("serviceAccount: db,", "serviceAccount: db2,"))
    rebuilt = MeshConfig(renamed, config).outbound_clusters
    assert [c.name for c in rebuilt if c.name.startswith("outbound|") and not any(c is o for o in before[CLUSTER])] == [
        "outbound|5432||db.bookinfo.svc.cluster.local"
    ]


def test_tproxy_view_gets_a_transparent_inbound_listener_and_shares_everything_else(config: MeshConfig) -> None:
    workload = config.model.workloads[0]
    redirect = config.resources(view_of(config.model, workload))
    tproxy_view = view_of(config.model, workload, interception=InterceptionMode.TPROXY)
    assert tproxy_view.tproxy and not reviews_view(config).tproxy
    tproxy = config.resources(tproxy_view)
    inbound = as_dicts(tproxy[LISTENER])["virtualInbound"]
    assert inbound["transparent"] is True
    # original_src before tls_inspector: a listener filter timeout skips the filters after it.
    assert [(f["name"], f["typedConfig"].get("mark")) for f in inbound["listenerFilters"]] == [
        ("envoy.filters.listener.original_dst", None),
        ("envoy.filters.listener.original_src", 1337),
        ("envoy.filters.listener.tls_inspector", None),
    ]
    # The same chains; REDIRECT's listener untouched; clusters (127.0.0.6 kept, as Istio) shared.
    assert inbound["filterChains"] == as_dicts(redirect[LISTENER])["virtualInbound"]["filterChains"]
    assert "transparent" not in as_dicts(redirect[LISTENER])["virtualInbound"]
    assert tproxy[CLUSTER] == redirect[CLUSTER] and tproxy[LISTENER][:-1] == redirect[LISTENER][:-1]
