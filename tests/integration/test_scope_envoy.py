"""Sidecar scope with real Envoys in network-namespace pods: a scoped sidecar holds only the services
in scope (its own /config_dump says so), its traffic to an in-scope service flows (mTLS through both
sidecars), and a scope edited in the mesh file reaches it."""

from __future__ import annotations

import pytest

from tests.meshlab import BACKEND_CLUSTER, FRONTEND_VIP, MeshLab, Pod, mesh_text, standard_lab, wait_for

pytestmark = [pytest.mark.envoy, pytest.mark.root]

FAR = """\
  - name: far
    namespace: elsewhere
    ports: [{port: 7070, name: http}]
    addresses: [10.96.0.70]
"""
LATE = """\
  - name: late
    namespace: demo
    ports: [{port: 7071, name: tcp-late}]
    addresses: [10.96.0.71]
"""
SCOPE = """\
sidecars:
  - namespace: demo
    workloadSelector: {{labels: {{app: frontend}}}}
    egress: [{{hosts: [{hosts}]}}]
"""
OTHER_CLUSTER = "outbound|9080||other.demo.svc.cluster.local"
FRONTEND_CLUSTER = "outbound|8080||frontend.demo.svc.cluster.local"
FAR_CLUSTER = "outbound|7070||far.elsewhere.svc.cluster.local"


def mesh(hosts: str) -> str:
    return mesh_text(extra=FAR + SCOPE.format(hosts=hosts))


def outbound(pod: Pod) -> tuple[set[str], set[str]]:
    """The outbound clusters (active or warming) and the listeners the pod's Envoy holds."""
    dump = pod.admin.config_dump()
    clusters = dump["ClustersConfigDump"]
    names = {
        c["cluster"]["name"]
        for key in ("dynamic_active_clusters", "dynamic_warming_clusters")
        for c in clusters.get(key, [])
    }
    listeners = {lst["name"] for lst in dump["ListenersConfigDump"].get("dynamic_listeners", [])}
    return {n for n in names if n.startswith("outbound|")}, listeners


def test_scoped_sidecar_holds_only_its_scope_reaches_it_and_follows_edits() -> None:
    with standard_lab(backends=1, mesh=mesh('"demo/backend.demo.svc.cluster.local"')) as lab:
        front, back = lab.pods["frontend"], lab.pods["backend-1"]
        clusters, listeners = outbound(front)
        assert clusters == {BACKEND_CLUSTER}
        assert listeners == {"virtualOutbound", "virtualInbound", "0.0.0.0_9080"}
        # The backend has no scope: it holds the whole mesh.
        assert outbound(back)[0] == {BACKEND_CLUSTER, OTHER_CLUSTER, FRONTEND_CLUSTER, FAR_CLUSTER}

        traffic = lab.traffic(20, rate=20)
        result = traffic.result()
        print(f"\nscoped frontend -> backend: {result.summary()}")
        result.assert_clean()
        assert front.admin.stat(f"cluster.{BACKEND_CLUSTER}.ssl.handshake") >= 1  # mTLS, through its cluster

        lab.edit_mesh(mesh('"./*"'))
        wait_for(
            lambda: outbound(front)[0] == {BACKEND_CLUSTER, OTHER_CLUSTER, FRONTEND_CLUSTER},
            timeout=10,
            what="the frontend's scope widened to its namespace",
        )
        assert "0.0.0.0_8080" in outbound(front)[1] and "0.0.0.0_7070" not in outbound(front)[1]
        lab.edit_mesh(mesh('"~/*"'))
        wait_for(lambda: outbound(front) == (set(), {"virtualOutbound", "virtualInbound"}), timeout=10, what="no scope")
        assert front.admin.stat("cluster_manager.cds.update_rejected") == 0
        assert front.admin.stat("listener_manager.lds.update_rejected") == 0


def test_a_sidecar_with_on_demand_clusters_fetches_what_it_calls() -> None:
    """No cluster at start; the first request to a service (HTTP out) or to the pod (inbound) fetches
    its cluster and waits for it; nothing else is ever sent."""
    with MeshLab(mesh=mesh_text(extra=FAR)) as lab:
        lab.plane.start()
        back = lab.add_pod("backend-1", {"app": "backend"}, service_account="backend")
        front = lab.add_pod(
            "frontend", {"app": "frontend"}, service_account="frontend", app_port=8080, on_demand_clusters=True
        )
        for pod in (back, front):
            lab.wait_sidecar(pod)
        wait_for(
            lambda: back.admin.healthy_endpoints(FRONTEND_CLUSTER) == [f"{front.ip}:8080"],
            timeout=15,
            what="the frontend as the backend's endpoint",
        )
        assert outbound(front)[0] == set()
        assert "outbound|9080||backend.demo.svc.cluster.local" not in front.admin.get("/clusters")

        result = lab.traffic(20, rate=20).result()
        print(f"\non-demand frontend -> backend: {result.summary()}")
        result.assert_clean()
        inbound = lab.traffic(10, rate=20, source="backend-1", url=f"http://{FRONTEND_VIP}:8080/").result()
        print(f"backend -> on-demand frontend: {inbound.summary()}")
        inbound.assert_clean()

        dump = front.admin.config_dump()["ClustersConfigDump"]
        held = {c["cluster"]["name"] for c in dump.get("dynamic_active_clusters", [])}
        assert held == {BACKEND_CLUSTER, "inbound|8080||"}, held
        assert front.admin.stat(f"cluster.{BACKEND_CLUSTER}.ssl.handshake") >= 1
        # A new service reaches it as a listener; its cluster still waits for a call.
        lab.edit_mesh(mesh_text(extra=FAR + LATE))
        wait_for(lambda: "0.0.0.0_7071" in outbound(front)[1], timeout=10, what="the new service's listener")
        assert outbound(front)[0] == {BACKEND_CLUSTER}
        assert front.admin.stat("listener_manager.lds.update_rejected") == 0
