"""`meshctl serve --kubernetes` against a local API server that speaks list and watch faithfully
(tests/fakekube.py), with the real `kubernetes` client and a real Envoy whose identity Kubernetes
vouches for (TokenReview of its pod-bound token)."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, XdsCredentials, bootstrap, render
from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.ca import TRUST_BUNDLE
from tests.fakekube import FakeKube, endpoint_slice, namespace, pod, service
from tests.harness import Envoy, free_port, plane_settings, wait_until
from tests.harness import endpoints as endpoints_of

WEB = "outbound|80||web.demo.svc.cluster.local"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as k:
        k.create(namespace("demo"))
        k.create(pod("backend-1", "demo", ip="127.0.0.1", service_account="backend", labels={"app": "backend"}))
        for i in (1, 2):
            p = pod(f"web-{i}", "demo", ip=f"10.1.0.{i}", service_account="web", labels={"app": "web"})
            p["metadata"]["annotations"] = {"sidecar.istio.io/status": "{}"}
            k.create(p)
        k.create(service("web", "demo", ports=[("http", 80)], selector={"app": "web"}, cluster_ip="10.96.0.7"))
        k.create(
            endpoint_slice(
                "web-a", "demo", "web", addresses=["10.1.0.1", "10.1.0.2"], ports=[("http", 8080)],
                target_pods=["web-1", "web-2"],
            )
        )  # fmt: skip
        yield k


async def start_plane(kube: FakeKube, directory: Path, **settings: Any) -> ControlPlane:
    """A control plane in Kubernetes mode against `kube`, its files in `directory`; stopped if it
    fails to start."""
    directory.mkdir(exist_ok=True)
    values: dict[str, Any] = dict(
        kubernetes=True,
        kubeconfig=kube.write_kubeconfig(directory / "kubeconfig"),
        ca_dir=directory / "ca",
        debounce=0.02,
        debounce_max=0.5,
    )
    values.update(settings)
    plane = ControlPlane(plane_settings(**values))
    try:
        await plane.start()
    except BaseException:
        await plane.stop()
        raise
    return plane


@pytest.fixture
async def plane(kube: FakeKube, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    p = await start_plane(kube, tmp_path)
    yield p
    await p.stop()


@pytest.fixture
async def envoy(kube: FakeKube, plane: ControlPlane, tmp_path: Path) -> AsyncIterator[Envoy]:
    """backend-1's sidecar, with a pod-bound service-account token as kubelet would project it."""
    kube.add_token("projected-token-backend-1", "demo", "backend", audiences=["meshplane"], pod_name="backend-1")
    (tmp_path / "token").write_text("projected-token-backend-1")
    identity = WorkloadIdentity(name="backend-1", namespace="demo", service_account="backend", ip="127.0.0.1")
    admin = free_port()
    credentials = XdsCredentials(str(tmp_path / "token"), str(plane.settings.ca_dir / TRUST_BUNDLE))
    ports = Ports(admin=admin, stats=free_port(), health=free_port(), status=free_port())
    path = tmp_path / "envoy.json"
    path.write_text(render(bootstrap(identity, f"127.0.0.1:{plane.xds_tls_port}", ports, (), credentials)))
    async with Envoy(path, admin, tmp_path / "envoy.log") as proxy:
        yield proxy


async def endpoints(envoy: Envoy, cluster: str) -> list[str]:
    try:
        return endpoints_of(await envoy.config_dump(), cluster)
    except KeyError:
        return []


async def test_a_service_with_a_ready_slice_becomes_a_cluster_with_those_endpoints(
    kube: FakeKube, plane: ControlPlane, envoy: Envoy
) -> None:
    async def served() -> list[str]:
        return await endpoints(envoy, WEB)

    assert await wait_until(served, timeout=15, what="the slice's endpoints in Envoy") == [
        "10.1.0.1:8080",
        "10.1.0.2:8080",
    ]
    # Scaling the slice reaches Envoy within a second: the median of three scalings (the machine is shared).
    took = []
    for count in (3, 4, 5):
        addresses = [f"10.1.0.{i}" for i in range(1, count + 1)]
        kube.update(endpoint_slice("web-a", "demo", "web", addresses=addresses, ports=[("http", 8080)]))
        started = time.monotonic()

        async def scaled(count: int = count) -> bool:
            return len(await endpoints(envoy, WEB)) == count

        await wait_until(scaled, timeout=5, interval=0.01, what=f"{count} endpoints in Envoy")
        took.append(time.monotonic() - started)
    print(f"EndpointSlice change -> Envoy config: {', '.join(f'{t * 1000:.0f}' for t in took)} ms")
    assert sorted(took)[1] < 1.0, took


async def test_a_410_and_relist_loses_nothing(kube: FakeKube, plane: ControlPlane, envoy: Envoy) -> None:
    async def two() -> bool:
        return len(await endpoints(envoy, WEB)) == 2

    await wait_until(two, timeout=15, what="the first endpoints")
    assert plane.source is not None
    kube.compact()
    kube.drop_watches()  # the watch reconnects from a resourceVersion that is now compacted away...
    kube.update(endpoint_slice("web-a", "demo", "web", addresses=["10.1.0.2"], ports=[("http", 8080)]))
    kube.compact()  # ...and the change made meanwhile is only visible to a new list

    async def relisted() -> bool:
        return (
            plane.source is not None and plane.source.relists > 0 and await endpoints(envoy, WEB) == ["10.1.0.2:8080"]
        )

    await wait_until(relisted, timeout=15, what="a relist after 410 Gone, and its result in Envoy")


async def test_a_pod_annotation_scopes_its_sidecar(kube: FakeKube, plane: ControlPlane, envoy: Envoy) -> None:
    far = "outbound|81||far.other.svc.cluster.local"
    kube.create(namespace("other"))
    kube.create(service("far", "other", ports=[("http", 81)], selector={"app": "far"}, cluster_ip="10.96.0.8"))

    async def holds(want: set[str]) -> bool:
        return {n for n in await envoy.clusters() if n.startswith("outbound|")} == want

    await wait_until(lambda: holds({WEB, far}), timeout=15, what="both services, unscoped")
    for hosts, want in (("./*", {WEB}), ("~/*", set()), ("other/far.other.svc.cluster.local", {far})):
        kube.update(
            pod("backend-1", "demo", ip="127.0.0.1", service_account="backend", labels={"app": "backend"},
                annotations={"sidecar.meshplane.io/egressHosts": hosts})
        )  # fmt: skip
        await wait_until(lambda want=want: holds(want), timeout=10, what=f"{hosts}: {sorted(want)} only")


async def test_not_ready_and_nothing_served_until_every_kind_is_listed(kube: FakeKube, tmp_path: Path) -> None:
    kube.fail("/apis/discovery.k8s.io/v1/endpointslices", status=500, times=2, watch=False)
    plane = await start_plane(kube, tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{plane.admin_port}/readyz") as r:
                assert r.status == 503  # still listing EndpointSlices: nothing built from a partial view

            async def ready() -> bool:
                async with s.get(f"http://127.0.0.1:{plane.admin_port}/readyz") as r:
                    return r.status == 200

            await wait_until(ready, timeout=15, what="readiness after the list succeeds")
        web = next(s for s in plane.registry.model.services if s.name == "web")
        assert len(plane.registry.model.endpoints(web)) == 2  # the first model already had the endpoints
    finally:
        await plane.stop()


async def test_a_rollout_of_100_pods_is_a_handful_of_pushes(kube: FakeKube, plane: ControlPlane, envoy: Envoy) -> None:
    async def two() -> bool:
        return len(await endpoints(envoy, WEB)) == 2

    await wait_until(two, timeout=15, what="the first endpoints")
    rounds = plane.metrics.push_rounds._value.get()  # type: ignore[attr-defined]
    addresses = []
    for i in range(100):  # a Deployment rolling out: pods appear, the controller grows the slice
        ip = f"10.2.{i // 200}.{i % 200 + 1}"
        kube.create(pod(f"api-{i}", "demo", ip=ip, service_account="web", labels={"app": "web"}))
        addresses.append(ip)
        kube.update(endpoint_slice("web-a", "demo", "web", addresses=addresses, ports=[("http", 8080)]))
        await asyncio.sleep(0.005)

    async def rolled_out() -> bool:
        return len(await endpoints(envoy, WEB)) == 100

    await wait_until(rolled_out, timeout=15, what="all 100 endpoints in Envoy")
    pushes = plane.metrics.push_rounds._value.get() - rounds  # type: ignore[attr-defined]
    print(f"100-pod rollout (200 API changes): {pushes:.0f} pushes")
    assert pushes <= 10


async def test_a_proxy_claiming_another_pod_is_refused(kube: FakeKube, plane: ControlPlane, tmp_path: Path) -> None:
    """The token is bound to web-1; the proxy says it is backend-1 (whose service account it does not have)."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
    from google.protobuf import struct_pb2

    from meshplane.controlplane.resources import SECRET

    kube.add_token("projected-token-web-1", "demo", "web", audiences=["meshplane"], pod_name="web-1")
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": "demo", "NAME": "backend-1", "SERVICE_ACCOUNT": "web", "INSTANCE_IPS": "127.0.0.1"})
    node = base_pb2.Node(id="sidecar~127.0.0.1~backend-1.demo~demo.svc.cluster.local", metadata=meta)
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=plane.ca.trust_bundle_pem),
        grpc.access_token_call_credentials("projected-token-web-1"),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{plane.xds_tls_port}", creds) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([discovery_pb2.DiscoveryRequest(type_url=SECRET, node=node, resource_names=["default"])])
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call.read(), 10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "bound to pod web-1" in str(e.value.details())


async def test_a_change_during_a_slow_rebuild_is_not_lost(
    kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a thousand services a rebuild takes a few hundred ms; what changes meanwhile must still land."""
    import threading

    from meshplane.controlplane import kubemodel

    real = kubemodel.view
    building = threading.Event()

    def slow_view(*args: Any) -> Any:  # runs in the rebuild's thread: the loop keeps taking events
        building.set()
        time.sleep(0.4)
        return real(*args)

    monkeypatch.setattr(kubemodel, "view", slow_view)
    plane = await start_plane(kube, tmp_path)
    try:
        building.clear()
        kube.update(endpoint_slice("web-a", "demo", "web", addresses=["10.1.0.1"], ports=[("http", 8080)]))
        await asyncio.to_thread(building.wait, 5)  # a rebuild is under way...
        kube.update(endpoint_slice("web-a", "demo", "web", addresses=["10.1.0.9"], ports=[("http", 8080)]))

        async def last_change_landed() -> bool:  # ...and the change made during it is not lost
            web = next((s for s in plane.registry.model.services if s.name == "web"), None)
            return web is not None and [w.address for w in plane.registry.model.endpoints(web)] == ["10.1.0.9"]

        await wait_until(last_change_landed, timeout=10, what="the change made during a rebuild")
    finally:
        await plane.stop()
