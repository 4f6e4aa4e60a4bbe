"""Incremental (delta) xDS with a real Envoy, the generated bootstrap's default: initial sync, a service
added and removed, an endpoint change, and a reconnect that resends nothing Envoy already has.
Assertions use Envoy's own counters and the control plane's count of resources sent."""

from pathlib import Path
from typing import Any

from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.delta import DeltaStreamState
from tests.harness import Envoy, endpoints, free_port, wait_until

from .conftest import MESH, write_bootstrap
from .test_xds_envoy import BACKEND_9080, synced

EXTRA = """  - name: extra
    namespace: demo
    ports: [{port: 7070, name: http}]
    selector: {app: extra}
"""
EXTRA_CLUSTER = "outbound|7070||extra.demo.svc.cluster.local"


def sent(plane: ControlPlane) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in plane.metrics.resources_sent.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["type"]] = sample.value
    return out


def since(plane: ControlPlane, before: dict[str, float]) -> dict[str, float]:
    now = sent(plane)
    return {k: now.get(k, 0) - before.get(k, 0) for k in ("CDS", "EDS", "LDS", "RDS", "SDS")}


async def test_delta_sends_only_what_changed(plane: ControlPlane, envoy: Envoy, mesh_file: Path) -> None:
    await synced(envoy, plane)
    assert all(isinstance(c.state, DeltaStreamState) for c in plane.xds.connections.values())
    stats = await envoy.stats()
    assert stats["cluster_manager.cds.update_rejected"] == 0 and stats["listener_manager.lds.update_rejected"] == 0

    # A service added: one new cluster, its (empty) endpoints, and no listener or route the proxy had.
    before = sent(plane)
    mesh_file.write_text(MESH.replace("workloads:\n", EXTRA + "workloads:\n"))

    async def added() -> bool:
        return EXTRA_CLUSTER in await envoy.clusters()

    await wait_until(added, timeout=5, what="the new cluster in Envoy")
    await synced(envoy, plane)
    delta = since(plane, before)
    assert delta["CDS"] == 1, delta

    # Removed again: Envoy drops it, and nothing is sent in full.
    before = sent(plane)
    mesh_file.write_text(MESH)

    async def removed() -> bool:
        return EXTRA_CLUSTER not in await envoy.clusters()

    await wait_until(removed, timeout=5, what="the cluster to be removed from Envoy")
    assert since(plane, before)["CDS"] == 0  # a removal carries names, not resources

    # An endpoint change: the ClusterLoadAssignments, and only the listener of the TCP port (its filter
    # chains match endpoint addresses); no cluster, no route.
    await synced(envoy, plane)
    before = sent(plane)
    workload = "{name: backend-9, namespace: demo, serviceAccount: backend, labels: {app: backend}, address: 10.0.0.99}"
    mesh_file.write_text(MESH + f"  - {workload}\n")

    async def endpoint() -> bool:
        return "10.0.0.99:9080" in endpoints(await envoy.config_dump(), BACKEND_9080)

    await wait_until(endpoint, timeout=5, what="the new endpoint in Envoy")
    await synced(envoy, plane)
    delta = since(plane, before)
    assert delta["CDS"] == 0 and delta["RDS"] == 0 and delta["LDS"] <= 1, delta
    assert 1 <= delta["EDS"] <= 2, delta  # the backend's two ports


async def test_a_reconnect_resends_nothing_envoy_already_has(plane_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"  # registrations survive the restart, so the mesh is the same
    first = await plane_factory(xds_tls_port=port, state_dir=state)
    path, admin = write_bootstrap(tmp_path, first)
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
        await synced(envoy, first)
        await first.stop()
        second = await plane_factory(xds_tls_port=port, state_dir=state)  # a restart: same CA, same config

        async def back() -> bool:
            return bool(second.xds.connections) and second.xds.settled

        await wait_until(back, timeout=20, what="Envoy to reconnect to the restarted control plane")
        await synced(envoy, second)
        resent = since(second, {})
        print(f"resources sent after the reconnect: {resent}")
        assert resent["CDS"] == resent["EDS"] == resent["LDS"] == resent["RDS"] == 0, resent
        assert resent["SDS"] >= 1  # the restarted CA issued a new certificate


async def test_state_of_the_world_still_works(plane: ControlPlane, tmp_path: Path, mesh_file: Path) -> None:
    """meshctl bootstrap --sotw: the same config over state-of-the-world xDS."""
    from meshplane.controlplane.stream import StreamState

    path, admin = write_bootstrap(tmp_path, plane, delta=False)
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
        await synced(envoy, plane)
        assert all(isinstance(c.state, StreamState) for c in plane.xds.connections.values())
        mesh_file.write_text(MESH.replace("workloads:\n", EXTRA + "workloads:\n"))

        async def added() -> bool:
            return EXTRA_CLUSTER in await envoy.clusters()

        await wait_until(added, timeout=5, what="the new cluster in Envoy")
