"""Rewritten app probes and hooks, answered by a real Envoy on its status port (Istio's 15020) from the
injected bootstrap, which also serves metrics and readiness there."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from meshplane.controlplane.app import ControlPlane
from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from tests.harness import Envoy, free_port, wait_until

from .conftest import localize_injected


@pytest.fixture
async def app_ports() -> AsyncIterator[tuple[int, int]]:
    """An HTTP app (200 on /live, 500 on /broken) and a TCP listener, on free loopback ports."""

    async def live(_: web.Request) -> web.Response:
        return web.Response(text="alive")

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/live", live)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    http_port, tcp_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    tcp = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", tcp_port)
    yield http_port, tcp_port
    tcp.close()
    await runner.cleanup()


async def test_rewritten_probes_are_answered_by_envoy(
    plane: ControlPlane, app_ports: tuple[int, int], tmp_path: Path
) -> None:
    http_port, tcp_port = app_ports
    closed = free_port()  # nothing listens here
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "web",
                    "ports": [{"containerPort": http_port, "name": "http"}],
                    "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}},
                    "readinessProbe": {"tcpSocket": {"port": tcp_port}, "periodSeconds": 1},
                    "startupProbe": {"httpGet": {"path": "/broken", "port": http_port}},
                    "lifecycle": {"preStop": {"httpGet": {"path": "/live", "port": http_port}}},
                },
                {"name": "db", "image": "db", "readinessProbe": {"tcpSocket": {"port": closed}, "periodSeconds": 1}},
            ]
        },
    }
    config = InjectionConfig(xds_address=f"127.0.0.1:{plane.xds_tls_port}", xds_ca=plane.ca.trust_bundle_pem.decode())
    out = inject(pod, "demo", config).pod
    path, admin, ports = localize_injected(out, plane, tmp_path, name="web-0")
    status = ports["status"]

    async with Envoy(path, admin, tmp_path / "envoy.log"):

        async def get(path: str) -> tuple[int, str]:
            url = f"http://127.0.0.1:{status}{path}"
            async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status, await r.text()

        async def probe(kind: str, container: str = "web") -> int:
            return (await get(f"/app-health/{container}/{kind}"))[0]

        assert await wait_until(lambda: probe("livez"), what="the liveness probe route") == 200
        assert await probe("startupz") == 500  # the app's own answer comes back
        assert await get("/app-lifecycle/web/prestopz") == (200, "alive")  # the hook reaches the app
        code, metrics = await get("/stats/prometheus")
        assert code == 200 and "envoy_server_live" in metrics

        async def ready() -> bool:
            return (await get("/healthz/ready"))[0] == 200

        await wait_until(ready, what="Envoy's readiness on the status port")

        async def tcp_probe_passes() -> bool:
            return await probe("readyz") == 200

        await wait_until(tcp_probe_passes, timeout=10, what="the TCP probe to pass")

        async def closed_port_fails() -> bool:
            return await probe("readyz", "db") == 503

        await wait_until(closed_port_fails, timeout=10, what="the closed port's probe to fail")
