"""Sidecar scope: Istio's egress hosts, the mesh file's `sidecars`, the pod annotation, scoped config;
and sidecars that fetch their clusters on demand."""

import dataclasses
from typing import TypeVar

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import message

from meshplane.bootstrap.envoy import BootstrapError, WorkloadIdentity, bootstrap
from meshplane.controlplane import meshfile, scope
from meshplane.controlplane.cache import check_consistent, resource
from meshplane.controlplane.errors import MeshFileError
from meshplane.controlplane.generate import MeshConfig, view_of
from meshplane.controlplane.kubemodel import view
from meshplane.controlplane.model import EgressHost, MeshModel
from meshplane.controlplane.proxy import from_node
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.fakekube import namespace, pod

M = TypeVar("M", bound=message.Message)

MESH = """
services:
  - {name: web, namespace: shop, ports: [{port: 80, name: http}], selector: {app: web}}
  - {name: cart, namespace: shop, ports: [{port: 8080, name: http}], selector: {app: cart}}
  - {name: pay, namespace: bank, ports: [{port: 8443, name: http}], selector: {app: pay}}
  - {name: ledger, namespace: bank, ports: [{port: 5432, name: tcp-pg}], selector: {app: ledger},
     addresses: [10.96.0.9]}
  - {name: ads, namespace: promo, ports: [{port: 80, name: http}]}
workloads:
  - {name: web-1, namespace: shop, labels: {app: web}, address: 10.0.0.1}
  - {name: cart-1, namespace: shop, labels: {app: cart}, address: 10.0.0.2}
  - {name: pay-1, namespace: bank, labels: {app: pay}, address: 10.0.0.3}
  - {name: ledger-1, namespace: bank, labels: {app: ledger}, address: 10.0.0.4}
  - {name: ads-1, namespace: promo, labels: {app: ads}, address: 10.0.0.5}
"""
SIDECARS = """
sidecars:
  - namespace: shop
    egress: [{hosts: ["./*"]}]
  - namespace: shop
    workloadSelector: {labels: {app: cart}}
    egress: [{hosts: ["./*"]}, {hosts: ["bank/pay.bank.svc.cluster.local"]}]
  - namespace: "*"
    egress: [{hosts: ["~/*"]}]
"""


def model(extra: str = SIDECARS) -> MeshModel:
    return meshfile.parse(MESH + extra)


def names(msgs: list[message.Message]) -> set[str]:
    return {getattr(m, "name", "") or m.cluster_name for m in msgs}


def outbound(msgs: list[message.Message]) -> set[str]:
    return {n for n in names(msgs) if n.startswith("outbound|")}


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("*/*", EgressHost("*", "*")),
        ("./*", EgressHost(".", "*")),
        ("~/*", EgressHost("~", "*")),
        ("bank/pay.bank.svc.cluster.local", EgressHost("bank", "pay.bank.svc.cluster.local")),
        ("*/*.example.org", EgressHost("*", "*.example.org")),
    ],
)
def test_hosts_parse(text: str, host: EgressHost) -> None:
    assert scope.parse_host(text) == host
    assert str(host) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("pay.bank.svc.cluster.local", "is not namespace/dnsName"),
        ("Bank/*", "namespace 'Bank' is not a namespace"),
        ("bank/", "'' is not a host name"),
        ("bank/pay*", "is not a host name"),
        ("bank/*.", "is not a host name"),
    ],
)
def test_bad_hosts_say_what(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        scope.parse_host(text)


def test_resolve_makes_own_namespace_explicit_and_drops_none() -> None:
    hosts = scope.parse_hosts("./*, bank/*  ~/* shop/*")
    assert scope.resolve(hosts, "shop") == (EgressHost("bank", "*"), EgressHost("shop", "*"))
    assert scope.resolve(scope.parse_hosts("~/*"), "shop") == ()
    assert scope.resolve(None, "shop") is None


def test_matching_follows_istio() -> None:
    m = model("")

    def reached(text: str) -> set[str]:
        egress = scope.resolve(scope.parse_hosts(text), "shop") or ()
        return {f"{s.namespace}/{s.name}" for s in scope.in_scope(m, egress)}

    cases = ["*/*", "./*", "*/pay.bank.svc.cluster.local", "bank/*.bank.svc.cluster.local"]
    cases += ["shop/*.bank.svc.cluster.local", "~/*"]
    assert {text: reached(text) for text in cases} == {
        "*/*": {"shop/web", "shop/cart", "bank/pay", "bank/ledger", "promo/ads"},
        "./*": {"shop/web", "shop/cart"},
        "*/pay.bank.svc.cluster.local": {"bank/pay"},
        "bank/*.bank.svc.cluster.local": {"bank/pay", "bank/ledger"},
        "shop/*.bank.svc.cluster.local": set(),
        "~/*": set(),
    }


def test_which_scope_a_workload_gets() -> None:
    m = model()
    by_name = {w.name: view_of(m, w).egress for w in m.workloads}
    assert by_name["web-1"] == (EgressHost("shop", "*"),)  # the namespace's default
    assert by_name["cart-1"] == (EgressHost("bank", "pay.bank.svc.cluster.local"), EgressHost("shop", "*"))
    assert by_name["pay-1"] == ()  # the mesh-wide default: nothing
    assert view_of(model(""), m.workloads[0]).egress is None  # no sidecars: every service, as Istio


def test_scoped_proxy_gets_only_services_in_scope_and_its_own_inbound() -> None:
    m = model()
    config = MeshConfig(m)
    cart = config.resources(view_of(m, m.workloads[1]))
    assert outbound(cart[CLUSTER]) == {
        "outbound|80||web.shop.svc.cluster.local",
        "outbound|8080||cart.shop.svc.cluster.local",
        "outbound|8443||pay.bank.svc.cluster.local",
    }
    assert names(cart[ENDPOINT]) == outbound(cart[CLUSTER])
    assert "inbound|8080||" in names(cart[CLUSTER])
    assert names(cart[LISTENER]) == {
        "virtualOutbound", "0.0.0.0_80", "0.0.0.0_8080", "0.0.0.0_8443", "virtualInbound"
    }  # fmt: skip
    assert names(cart[ROUTE]) == {"80", "8080", "8443"}
    domains = {d for r in cart[ROUTE] for vh in r.virtual_hosts for d in vh.domains}  # type: ignore[attr-defined]
    assert "pay.bank.svc.cluster.local" in domains and "ads.promo.svc.cluster.local" not in domains
    check_consistent({t: {r.name: r for r in map(resource, msgs)} for t, msgs in cart.items()})
    pay = config.resources(view_of(m, m.workloads[2]))
    assert outbound(pay[CLUSTER]) == set() and names(pay[LISTENER]) == {"virtualOutbound", "virtualInbound"}


def test_scoped_config_shares_clusters_and_endpoints_with_the_full_mesh() -> None:
    m = model()
    config = MeshConfig(m)
    full = {getattr(c, "name", ""): c for c in config.outbound_clusters}
    web = config.resources(view_of(m, m.workloads[0]))
    assert all(c is full[c.name] for c in web[CLUSTER] if c.name.startswith("outbound|"))  # type: ignore[attr-defined]
    cart_again = config.resources(view_of(m, m.workloads[0]))
    assert cart_again[LISTENER][0] is web[LISTENER][0]  # one scope, built once


def test_annotation_on_pod_wins_over_namespace_and_mesh_file() -> None:
    ns = namespace("shop")
    ns["metadata"]["annotations"] = {scope.ANNOTATION: "./*"}
    own = pod("a", "shop", ip="10.1.0.1", annotations={scope.ANNOTATION: "bank/*,promo/*"})
    plain = pod("b", "shop", ip="10.1.0.2")
    typo = pod("c", "other", ip="10.1.0.3", annotations={scope.ANNOTATION: "bank"})
    v = view({"shop": ns}, {}, {}, {("shop", "a"): own, ("shop", "b"): plain, ("other", "c"): typo})
    egress = {w.name: w.egress for w in v.workloads}
    assert egress == {
        "a": (EgressHost("bank", "*"), EgressHost("promo", "*")),
        "b": (EgressHost(".", "*"),),
        "c": None,
    }
    assert any("Pod other/c" in line and scope.ANNOTATION in line for line in v.skipped)
    m = MeshModel(sidecars=model().sidecars, workloads=v.workloads)
    assert [m.egress_of(w) for w in v.workloads] == [(EgressHost("~", "*"),), egress["a"], egress["b"]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sidecars:\n  - {egress: [{hosts: ['./*']}]}\n", "m.yaml:2: sidecars[0].namespace: is required"),
        ("sidecars:\n  - {namespace: a}\n", "m.yaml:2: sidecars[0].egress: needs at least one entry with hosts"),
        ("sidecars:\n  - {namespace: a, egress: [{}]}\n", "sidecars[0].egress[0].hosts: needs at least one host"),
        ("sidecars:\n  - {namespace: a, egress: [{port: 80}]}\n", "sidecars[0].egress[0].port: unknown field"),
        (
            "sidecars:\n  - namespace: a\n    egress:\n      - hosts: ['./*', reviews]\n",
            "m.yaml:4: sidecars[0].egress[0].hosts[1]: 'reviews' is not namespace/dnsName",
        ),
        ("sidecars:\n  - {namespace: a, egress: [{hosts: [7]}]}\n", "hosts[0]: must be a string, got int 7"),
        (
            "sidecars:\n  - {namespace: a, egress: [{hosts: ['./*']}]}\n"
            "  - {namespace: a, egress: [{hosts: ['~/*']}]}\n",
            "m.yaml:3: sidecars[1]: a second entry without workloadSelector for namespace 'a'",
        ),
        (
            "sidecars:\n  - {namespace: '*', workloadSelector: {labels: {a: b}}, egress: [{hosts: ['./*']}]}\n",
            "sidecars[0].workloadSelector: the mesh-wide default",
        ),
        (
            "sidecars:\n  - {namespace: a, workloadSelector: {app: b}, egress: [{hosts: ['./*']}]}\n",
            "sidecars[0].workloadSelector.app: unknown field (expected one of: labels)",
        ),
    ],
)
def test_bad_sidecars_say_where_and_what(text: str, message: str) -> None:
    with pytest.raises(MeshFileError) as e:
        meshfile.parse(text, "m.yaml")
    assert message in str(e.value)


def filters(listeners: list[message.Message], kind: type[M]) -> list[M]:
    """The typed configs of `kind` in the listeners' filter chains."""
    out = []
    for lst in listeners:
        assert isinstance(lst, listener_pb2.Listener)
        for chain in lst.filter_chains:
            for f in chain.filters:
                if f.typed_config.Is(kind.DESCRIPTOR):
                    config = kind()
                    f.typed_config.Unpack(config)
                    out.append(config)
    return out


def test_on_demand_sidecar_gets_listeners_that_fetch_every_cluster() -> None:
    m = model("")
    config = MeshConfig(m)
    plain = config.resources(view_of(m, m.workloads[0]))
    fetching = config.resources(view_of(m, dataclasses.replace(m.workloads[0], on_demand_clusters=True)))
    assert names(fetching[CLUSTER]) == names(plain[CLUSTER])  # offered alike; it gets what it asks for
    managers = filters(fetching[LISTENER], hcm.HttpConnectionManager)
    assert managers and all(
        [h.name for h in mgr.http_filters][-2:] == ["envoy.filters.http.on_demand", "envoy.filters.http.router"]
        for mgr in managers
    )
    proxies = filters(fetching[LISTENER], tcp_proxy_pb2.TcpProxy)
    assert proxies and all(p.on_demand.odcds_config.HasField("ads") for p in proxies)
    assert {p.cluster for p in proxies} >= {"outbound|5432||ledger.bank.svc.cluster.local", "PassthroughCluster"}
    # The plain view's listeners are untouched, and one on-demand form is built per listener.
    assert not any(p.HasField("on_demand") for p in filters(plain[LISTENER], tcp_proxy_pb2.TcpProxy))
    again = config.resources(view_of(m, dataclasses.replace(m.workloads[1], on_demand_clusters=True)))
    assert again[LISTENER][0] is fetching[LISTENER][0]


def test_on_demand_comes_from_the_node_and_the_bootstrap_subscribes_to_no_clusters() -> None:
    identity = WorkloadIdentity(name="web-1", namespace="shop", ip="10.0.0.1")
    config = bootstrap(identity, "127.0.0.1:15010", on_demand_clusters=True)
    assert not config.dynamic_resources.HasField("cds_config") and config.dynamic_resources.HasField("lds_config")
    assert from_node(config.node).workload.on_demand_clusters
    plain = bootstrap(identity, "127.0.0.1:15010")
    assert plain.dynamic_resources.HasField("cds_config") and not from_node(plain.node).workload.on_demand_clusters
    with pytest.raises(BootstrapError, match="need incremental"):
        bootstrap(identity, "127.0.0.1:15010", on_demand_clusters=True, delta=False)
