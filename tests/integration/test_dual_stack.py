"""Dual stack through a real sidecar: IPv6 and IPv4 connections into and out of a pod whose traffic
`meshctl iptables` captures, carried by a real Envoy (uid 1337, in the pod's network namespace)
that gets its config from a ControlPlane over a unix socket. Assertions are on what the app and
the peer saw, and on Envoy's own /stats."""

import asyncio
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from meshplane.bootstrap.envoy import WorkloadIdentity
from tests.harness import EnvoyAdmin
from tests.netns import ADDRESS_SERVER, Net, counted, pod_sidecar, require_netns, sh, two_hosts

MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli", "iptables"]
EXT = "outbound|80||ext.demo.svc.cluster.local"
EXT_HTTP = "outbound|9080||ext.demo.svc.cluster.local"
VIP6 = "fd00:96::20"
MESH = """
trustDomain: cluster.local
mtls: PERMISSIVE
services:
  - name: web
    namespace: demo
    ports: [{port: 8080, name: tcp-web}]
    selector: {app: web}
  - name: ext
    namespace: demo
    ports: [{port: 80, name: tcp-ext}, {port: 9080, name: http}]
    selector: {app: ext}
    addresses: ["fd00:96::20"]
workloads:
  - {name: ext-1, namespace: demo, serviceAccount: ext, labels: {app: ext}, address: "fd00:250::1", mtls: DISABLE}
"""

HTTP_GET = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    print(r.status, r.headers.get("x-envoy-upstream-service-time") is not None)
"""


@pytest.fixture
def net() -> Iterator[Net]:
    require_netns()
    if not shutil.which("ip6tables-restore"):
        pytest.skip("needs ip6tables (make system-deps installs it)")
    with two_hosts(ipv6=True) as net, tempfile.TemporaryDirectory() as empty:
        # The pod's app on 8080; the peer's servers on 80 (fd00:250::1 is the mesh service ext,
        # fd00:251::1 is outside the mesh).
        for ns, port in ((net.pod, "8080"), (net.peer, "80")):
            proc = net.start(ns, "/usr/bin/python3", "-c", ADDRESS_SERVER, port)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        net.start(net.peer, "/usr/bin/python3", "-m", "http.server", "--bind", "::", "--directory", empty, "9080")
        # The init container's step: `auto` sees the pod's global IPv6 address and captures both families.
        sh(*MESHCTL, "--ipv6", "auto", ns=net.pod)
        yield net


@pytest.fixture
async def sidecar(net: Net) -> AsyncIterator[EnvoyAdmin]:
    identity = WorkloadIdentity(
        name="web-1", namespace="demo", service_account="web", ip=net.pod_ip6, labels={"app": "web"}
    )
    async with pod_sidecar(net, MESH, identity, listeners=("virtualInbound", "0.0.0.0_80")) as admin:
        yield admin


async def test_inbound_ipv6_and_ipv4_go_through_the_sidecar(net: Net, sidecar: EnvoyAdmin) -> None:
    inbound = ("cluster.inbound|8080||.upstream_cx_total", "listener.0.0.0.0_15006.downstream_cx_total")
    # IPv6: the app sees Envoy's inbound source ::6, so the connection went through virtualInbound.
    assert await counted(sidecar, net.peer, net.pod_ip6, 8080, *inbound) == ("8080 ::6", [1, 1])
    # IPv4 as before: from 127.0.0.6.
    assert await counted(sidecar, net.peer, net.pod_ip, 8080, *inbound) == ("8080 127.0.0.6", [1, 1])


async def test_outbound_ipv6_goes_through_the_sidecar(net: Net, sidecar: EnvoyAdmin) -> None:
    ext = f"cluster.{EXT}.upstream_cx_total"
    passthrough = "cluster.PassthroughCluster.upstream_cx_total"
    # A mesh service at an IPv6 address: matched by its /128 prefix, sent to its own cluster (whose
    # endpoint answers). Its endpoint's own address is not matched: only a headless service's are.
    answer, grown = await counted(sidecar, net.pod, VIP6, 80, ext, passthrough)
    assert (answer, grown) == (f"80 {net.pod_ip6}", [1, 0])
    # An IPv6 destination outside the mesh: allowed (ALLOW_ANY) through the passthrough cluster.
    answer, grown = await counted(sidecar, net.pod, net.peer_ip6_2, 80, ext, passthrough)
    assert (answer, grown) == (f"80 {net.pod_ip6}", [0, 1])
    # IPv4 outside the mesh still passes through too.
    answer, grown = await counted(sidecar, net.pod, net.peer_ip, 80, ext, passthrough)
    assert (answer, grown) == (f"80 {net.pod_ip}", [0, 1])


async def test_outbound_http_to_an_ipv6_service_address(net: Net, sidecar: EnvoyAdmin) -> None:
    # By the service's IPv6 address: Host `[fd00:96::20]:9080` is routed to the service's cluster.
    url = f"http://[{VIP6}]:9080/"
    stat = f"cluster.{EXT_HTTP}.upstream_rq_total"
    for _ in range(20):  # the peer's HTTP server may still be starting
        before = await sidecar.stats()
        answer = await asyncio.to_thread(sh, "/usr/bin/python3", "-c", HTTP_GET, url, ns=net.pod, check=False)
        if answer.strip():
            break
        await asyncio.sleep(0.1)
    after = await sidecar.stats()
    assert (answer.strip(), after.get(stat, 0) - before.get(stat, 0)) == ("200 True", 1)
