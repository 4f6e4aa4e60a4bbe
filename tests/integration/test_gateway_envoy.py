"""A gateway injected with Istio's `gateway` template, run as the stock Envoy it injects, against a real
control plane: it gets its identity, the mesh's clusters and endpoints, and no listener."""

from pathlib import Path

from meshplane.controlplane.app import ControlPlane
from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from tests.harness import Envoy, admin_json, endpoints, wait_until

from .conftest import localize_injected


async def test_a_gateway_gets_mesh_clusters_and_its_certificate_but_no_listener(
    plane: ControlPlane, tmp_path: Path
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "ingress-0",
            "labels": {"app": "backend"},  # selected by a mesh service: it registers as its endpoint
            "annotations": {"inject.istio.io/templates": "gateway"},
        },
        "spec": {
            "serviceAccountName": "ingress",
            "containers": [{"name": "istio-proxy", "image": "auto", "ports": [{"containerPort": 8080}]}],
        },
    }
    config = InjectionConfig(xds_address=f"127.0.0.1:{plane.xds_tls_port}", xds_ca=plane.ca.trust_bundle_pem.decode())
    path, admin, ports = localize_injected(inject(pod, "demo", config).pod, plane, tmp_path, name="ingress-0")
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:

        async def connected() -> dict[str, object] | None:
            proxies = await admin_json(plane.admin_port, "/debug/proxies")
            return next((p for p in proxies if p["id"].startswith("router~")), None)

        proxy = await wait_until(connected, what="the gateway to connect")
        assert proxy is not None

        async def has_clusters() -> bool:
            return "outbound|9080||backend.demo.svc.cluster.local" in await envoy.clusters()

        await wait_until(has_clusters, what="the mesh's clusters at the gateway")
        dump = await envoy.config_dump()
        # mTLS to the mesh's sidecars with its own identity: the frontend endpoint is there, and so is its certificate
        assert endpoints(dump, "outbound|8080||frontend.demo.svc.cluster.local") == ["10.0.0.5:8080"]
        secrets = dump["SecretsConfigDump"]["dynamic_active_secrets"]
        assert {s["name"] for s in secrets} >= {"default", "ROOTCA"}
        # no capture listeners, no inbound: what a gateway listens on is not the mesh's to decide
        assert dump["ListenersConfigDump"].get("dynamic_listeners", []) == []
        assert set(ports) == {"prometheus", "health", "status"}
        # and clients do not send it mesh mTLS: an endpoint of backend, but plaintext and not an accepted SAN
        backend = "outbound|9080||backend.demo.svc.cluster.local"

        async def registered() -> list[str]:
            return endpoints(await envoy.config_dump(), backend)

        assert await wait_until(registered, what="the gateway as backend's endpoint") == ["127.0.0.1:9080"]
        dump = await envoy.config_dump()
        (eds,) = [
            e
            for e in dump["EndpointsConfigDump"]["dynamic_endpoint_configs"]
            if e["endpoint_config"]["cluster_name"] == backend
        ]
        (lb,) = eds["endpoint_config"]["endpoints"][0]["lb_endpoints"]
        assert "metadata" not in lb  # no tlsMode=istio: the transport socket match picks plaintext
        cluster = (await envoy.clusters())[backend]
        assert "sa/ingress" not in str(cluster)
