"""TPROXY capture through a real sidecar: `meshctl iptables -m TPROXY` in a pod's network namespace, a real
Envoy (uid 1337, keeping CAP_NET_ADMIN as an ambient capability) fed by a ControlPlane that reads the
proxy's INTERCEPTION_MODE, and real connections from the peer namespace and from the app. The point of
TPROXY: the app sees each client's own address, where REDIRECT shows it the proxy's 127.0.0.6 (::6).
Assertions are on what the app and the peer saw, and on Envoy's own /stats and /config_dump."""

import shutil
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from meshplane.bootstrap.envoy import WorkloadIdentity
from tests.harness import EnvoyAdmin, endpoints, wait_until
from tests.netns import ADDRESS_SERVER, Net, counted, pod_sidecar, require_netns, sh, two_hosts

MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli", "iptables"]
MESH = """
trustDomain: cluster.local
mtls: PERMISSIVE
services:
  - name: web
    namespace: demo
    ports: [{port: 8080, name: tcp-web}]
    selector: {app: web}
    addresses: ["10.96.0.10"]
"""
VIP = "10.96.0.10"
INBOUND = ("cluster.inbound|8080||.upstream_cx_total", "listener.0.0.0.0_15006.downstream_cx_total")
PASSTHROUGH = "cluster.PassthroughCluster.upstream_cx_total"


# TPROXY with the proxy as uid 1337 keeping CAP_NET_ADMIN as an ambient capability, and as the injected
# pod runs it (Istio's template): root with CAP_NET_ADMIN only, group 1337.
USERS = {"TPROXY": (1337, 1337), "TPROXY-as-injected": (0, 1337), "REDIRECT": (1337, 1337)}


@pytest.fixture(params=sorted(USERS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mode(variant: str) -> str:
    return variant.split("-")[0]


@pytest.fixture
def net(mode: str) -> Iterator[Net]:
    require_netns()
    if not shutil.which("ip6tables-restore"):
        pytest.skip("needs ip6tables (make system-deps installs it)")
    with two_hosts(ipv6=True) as net:
        # The pod's app on 8080 and 9090 (a port no service declares); the peer's server on 80.
        for ns, ports in ((net.pod, ("8080", "9090")), (net.peer, ("80",))):
            proc = net.start(ns, "/usr/bin/python3", "-c", ADDRESS_SERVER, *ports)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # The init container's step, for both families.
        sh(*MESHCTL, "-m", mode, "--ipv6", "on", ns=net.pod)
        yield net


@pytest.fixture
async def sidecar(net: Net, mode: str, variant: str) -> AsyncIterator[EnvoyAdmin]:
    identity = WorkloadIdentity(
        name="web-1",
        namespace="demo",
        service_account="web",
        ip=net.pod_ip,
        labels={"app": "web"},
        interception_mode=mode,
    )
    # What Istio grants its TPROXY sidecar: CAP_NET_ADMIN, to bind clients' addresses (IP_TRANSPARENT).
    caps = ("net_admin",) if mode == "TPROXY" else ()
    async with pod_sidecar(net, MESH, identity, caps=caps, user=USERS[variant]) as admin:
        yield admin


async def test_inbound_the_app_sees_the_client_address_only_with_tproxy(
    net: Net, mode: str, sidecar: EnvoyAdmin
) -> None:
    tproxy = mode == "TPROXY"
    # Through virtualInbound and the inbound cluster either way (the stats); the source the app sees
    # is the peer's own address with TPROXY, the proxy's 127.0.0.6 / ::6 with REDIRECT.
    expected4, expected6 = (net.peer_ip, net.peer_ip6) if tproxy else ("127.0.0.6", "::6")
    assert await counted(sidecar, net.peer, net.pod_ip, 8080, *INBOUND) == (f"8080 {expected4}", [1, 1])
    assert await counted(sidecar, net.peer, net.pod_ip6, 8080, *INBOUND) == (f"8080 {expected6}", [1, 1])
    # A port no service declares: through virtualInbound's passthrough chain, same source rule.
    passthrough = ("cluster.InboundPassthroughCluster.upstream_cx_total", INBOUND[1])
    assert await counted(sidecar, net.peer, net.pod_ip, 9090, *passthrough) == (f"9090 {expected4}", [1, 1])


async def test_outbound_is_still_captured(net: Net, sidecar: EnvoyAdmin) -> None:
    # The app's connection out goes through the proxy's passthrough; the peer sees the pod's address.
    for pod_ip, peer_ip in ((net.pod_ip, net.peer_ip), (net.pod_ip6, net.peer_ip6)):
        assert await counted(sidecar, net.pod, peer_ip, 80, PASSTHROUGH) == (f"80 {pod_ip}", [1])


async def test_a_call_to_its_own_service_goes_out_and_back_in_over_mtls(
    net: Net, mode: str, sidecar: EnvoyAdmin
) -> None:
    # The app calls its own service's address: the proxy's outbound sends it, with mTLS, to the one
    # endpoint, this pod; over lo that is the proxy calling its own pod IP, which must reach inbound
    # (TPROXY: its packets carry mark 1338), be accepted over TLS, and be forwarded to the app.
    stats = ("cluster.outbound|8080||web.demo.svc.cluster.local.upstream_cx_total", *INBOUND)
    stats += ("listener.0.0.0.0_15006.ssl.handshake",)
    # The app sees the proxy's outbound connection's source: the pod's own address with TPROXY.
    source = net.pod_ip if mode == "TPROXY" else "127.0.0.6"
    own = "outbound|8080||web.demo.svc.cluster.local"

    async def own_endpoint() -> bool:  # its registration comes back to it as an EDS push: wait for that
        return endpoints(await sidecar.config_dump(), own) == [f"{net.pod_ip}:8080"]

    await wait_until(own_endpoint, timeout=15, what="the pod as its own service's endpoint")
    assert await counted(sidecar, net.pod, VIP, 8080, *stats) == (f"8080 {source}", [1, 1, 1, 1])


async def test_the_inbound_listener_is_transparent_only_with_tproxy(mode: str, sidecar: EnvoyAdmin) -> None:
    listeners = (await sidecar.config_dump())["ListenersConfigDump"]["dynamic_listeners"]
    inbound = next(x["active_state"]["listener"] for x in listeners if x["name"] == "virtualInbound")
    filters = [f["name"] for f in inbound["listener_filters"]]
    if mode == "TPROXY":
        assert inbound.get("transparent") is True and "envoy.filters.listener.original_src" in filters
    else:
        assert "transparent" not in inbound and "envoy.filters.listener.original_src" not in filters
