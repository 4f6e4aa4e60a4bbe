"""Failover between control-plane replicas, end to end: two `meshctl serve --kubernetes` processes
share one CA directory and one Kubernetes API server (FakeKube), both inside the lab's hub
namespace (the replicas on all its addresses: the bridge address the pods dial, and loopback for
/debug/*); real Envoy sidecars (uid 1337) in network-namespace pods with the real capture rules
list both replicas in their bootstrap (gRPC target `ipv4:HUB:P1,HUB:P2`, pick_first) and
authenticate with pod-bound tokens that TokenReview accepts. The replica the sidecars are connected
to is SIGKILLed under traffic from the frontend's app to the backend service (through both
sidecars, mTLS): every request must succeed, and the sidecars must reconnect to the survivor and
converge there."""

from __future__ import annotations

import time

import pytest

from tests.fakekube import FakeKube, endpoint_slice, namespace, pod, service
from tests.meshlab import (
    BACKEND_CLUSTER,
    BACKEND_VIP,
    FRONTEND_VIP,
    TYPES,
    ControlPlane,
    MeshLab,
    Pod,
    Sampler,
    wait_for,
)

pytestmark = [pytest.mark.envoy, pytest.mark.root]

RATE = 20.0
REQUESTS = 300  # 15 s at 20/s
INJECTED = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def connected(pods: list[Pod]) -> dict[str, int]:
    return {p.name: p.admin.stat("control_plane.connected_state") for p in pods}


def holders(plane: ControlPlane) -> set[str]:
    """Proxy ids with an open stream on `plane` (empty if it is not running)."""
    return set(plane.streams()) if plane.running else set()


def register(kube: FakeKube, p: Pod, *, port: int, vip: str, token: str) -> None:
    """The pod, its Service and EndpointSlice as Kubernetes would have them, and `token` bound to
    the pod as kubelet would project it (audience meshplane)."""
    app = p.labels["app"]
    kube.create(pod(p.name, "demo", ip=p.ip, labels=p.labels, annotations=INJECTED, service_account=p.service_account))
    kube.create(service(app, "demo", ports=[("http", port)], selector={"app": app}, cluster_ip=vip))
    kube.create(endpoint_slice(f"{app}-a", "demo", app, addresses=[p.ip], ports=[("http", port)], target_pods=[p.name]))
    kube.add_token(token, "demo", p.service_account, audiences=["meshplane"], pod_name=p.name)


def test_sidecars_fail_over_to_the_other_replica_under_traffic() -> None:
    t_start = time.monotonic()
    with MeshLab() as lab:
        kube = lab.fake_kube()
        kube.create(namespace("demo"))
        a, b = lab.add_plane("replica-a"), lab.add_plane("replica-b")
        a.start()  # the first start creates the shared CA; the second replica loads it
        b.start()
        assert a.trust_bundle.read_bytes() == b.trust_bundle.read_bytes()
        # Each pod dials A then B over TLS with its projected token; Kubernetes learns of the pod
        # (its IP, Service, EndpointSlice, token) before its sidecar starts, as with a real kubelet.
        pods = []
        for name, app, account, port, vip in (
            ("frontend-1", "frontend", "frontend", 8080, FRONTEND_VIP),
            ("backend-1", "backend", "backend", 9080, BACKEND_VIP),
        ):
            token = f"projected-token-{name}"
            p = lab.add_pod(
                name, {"app": app}, service_account=account, app_port=port, sidecar=False,
                xds=[a, b], token=token,
            )  # fmt: skip
            register(kube, p, port=port, vip=vip, token=token)
            pods.append(p)
        front, back = pods
        for p in pods:
            lab.start_sidecar(p)
        for p in pods:
            lab.wait_sidecar(p, timeout=30)
        lab.wait_endpoints(front, BACKEND_CLUSTER, [back.ip], timeout=20)
        ids = {p.node_id for p in pods}
        # pick_first: every sidecar holds its stream on the first address, replica A.
        wait_for(lambda: holders(a) == ids, timeout=15, what=f"{ids} connected to replica A")
        lab.wait_synced(pods, plane=a)
        assert holders(b) == set(), b.streams()
        held = {p.name: p.admin.resource_versions() for p in pods}
        setup = time.monotonic() - t_start

        traffic = lab.traffic(REQUESTS, RATE, source=front.name)
        traffic.wait_requests(60)  # 3 s of clean traffic first
        with (
            Sampler(lambda: len(front.admin.healthy_endpoints(BACKEND_CLUSTER))) as endpoints,
            Sampler(lambda: connected(pods), interval=0.05) as links,  # its time 0 is the kill
        ):
            t0 = time.monotonic()
            a.kill()  # SIGKILL
            killed_at = traffic.done()
            wait_for(lambda: all(connected(pods).values()) and holders(b) == ids, timeout=20, interval=0.05,
                     what="every sidecar reconnected to replica B")  # fmt: skip
            reconnected = time.monotonic() - t0
            synced = lab.wait_synced(pods, plane=b, timeout=20)
            converged = time.monotonic() - t0
            wait_for(lambda: links.samples[-1][1] == {"frontend-1": 1, "backend-1": 1}, timeout=5,
                     what="the sampler to see both sidecars connected")  # fmt: skip
        result = traffic.result()
        proxies = b.get("/debug/proxies")
        # Converged: B serves what A did (the same versions: both compute them from the same
        # cluster); only the workload certificate is new, B's own issue from the shared CA.
        changed = {
            p.name: sorted(k for k, v in p.admin.resource_versions().items() if held[p.name].get(k) != v) for p in pods
        }
        down = [(t, v) for t, v in links.samples if isinstance(v, dict) and not all(v.values())]
        # From Envoy's side (samples every 50 ms, time 0 at the kill): lost, then connected again.
        lost = down[0][0] if down else None
        back_at = next(
            (t for t, v in links.samples if lost is not None and t > lost and v == {"frontend-1": 1, "backend-1": 1}),
            None,
        )
        print(
            f"\nsetup {setup:.1f}s; replica A (pid {a.proc.pid if a.proc else '?'}) SIGKILLed after "
            f"request {killed_at}; sidecars reconnected to B after {reconnected:.2f}s, all SYNCED on B "
            f"after {converged:.2f}s"
            f"\nEnvoy's control_plane.connected_state (sampled every 50 ms): 0 from {lost}s, 1 again at "
            f"{back_at}s after the kill ({len(down)} of {len(links.samples)} samples with a sidecar down)"
            f"\nfrontend's healthy backend endpoints throughout: {sorted({n for _, n in endpoints.samples})}"
            f"\nreplica B's /debug/proxies: {sorted((p['id'], p['stream']) for p in proxies)}"
            f"\nreplica B's pushes: {b.pushes()}; resources whose version changed across the failover: {changed}"
            f"\n{result.summary()}"
        )
        result.assert_clean()
        assert result.answered_by() == {"backend-1": REQUESTS}, result.answered_by()
        assert {p["id"] for p in proxies} == ids, proxies
        assert all(states == dict.fromkeys(TYPES, "SYNCED") for states in synced.values()), synced
        assert all(v == 1 for v in connected(pods).values())
        assert changed == {p.name: ["secret:default"] for p in pods}, changed
        assert {n for _, n in endpoints.samples} == {1}, f"the backend endpoint flapped: {endpoints.samples}"
        # mTLS both ways, throughout: the frontend's sidecar made TLS handshakes to the backend's.
        assert front.admin.stat(f"cluster.{BACKEND_CLUSTER}.ssl.handshake") > 0
        assert back.admin.stat("listener.0.0.0.0_15006.ssl.handshake") > 0
        assert not a.running


class StreamsClosedWith13(AssertionError):
    """The sidecar never connected, and its log shows ADS streams closed with status 13."""


def test_the_shipped_bootstrap_reaches_two_replicas() -> None:
    """The bootstrap exactly as `meshctl bootstrap --xds-address A --xds-address B` writes it."""
    with MeshLab() as lab:
        kube = lab.fake_kube()
        kube.create(namespace("demo"))
        a, b = lab.add_plane("replica-a"), lab.add_plane("replica-b")
        a.start()  # B is not even needed: the first address is up
        token = "projected-token-backend-1"
        p = lab.add_pod("backend-1", {"app": "backend"}, service_account="backend", sidecar=False, xds=[a, b],
                        token=token)  # fmt: skip
        register(kube, p, port=9080, vip=BACKEND_VIP, token=token)
        lab.start_sidecar(p)
        try:
            wait_for(lambda: p.admin.stat("control_plane.connected_state") == 1, timeout=10, what="a connection")
        except AssertionError as e:
            log = p.log(600)
            if "gRPC config stream to ipv4:" in log and "closed: 13" in log and not holders(a):
                raise StreamsClosedWith13(f"{e}\n{log}") from None
            raise AssertionError(f"{e}\n{log}") from None
        # Envoy counts itself connected once the stream opens, a moment before A has read its first request.
        wait_for(lambda: holders(a) == {p.node_id}, timeout=5, what="A serving the sidecar's stream")
