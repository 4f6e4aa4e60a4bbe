"""Sidecar scope with real Envoys in network-namespace pods: a scoped sidecar holds only the services
in scope (its own /config_dump says so), its traffic to an in-scope service flows (mTLS through both
sidecars), and a scope edited in the mesh file reaches it."""

from __future__ import annotations

import pytest

from tests.meshlab import BACKEND_CLUSTER, Pod, mesh_text, standard_lab, wait_for

pytestmark = [pytest.mark.envoy, pytest.mark.root]

FAR = """\
  - name: far
    namespace: elsewhere
    ports: [{port: 7070, name: http}]
    addresses: [10.96.0.70]
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
