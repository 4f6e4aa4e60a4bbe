"""What an automatic scope would stand on (docs/scoping.md): a real Envoy that holds no cluster asks
for a route's cluster when a request needs it (`envoy.filters.http.on_demand` with `odcds` over
ADS), and the control plane's delta server answers that named subscription, endpoints included."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import json_format

from meshplane.bootstrap.protobuf import pack, seconds, socket_address
from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.generate.common import ads
from tests.harness import Envoy, free_port

from .conftest import PlaneFactory, write_bootstrap

pytestmark = pytest.mark.envoy


def on_demand_listener(port: int, cluster: str) -> listener_pb2.Listener:
    """127.0.0.1:`port`: every request routed to `cluster`, fetched on demand if Envoy lacks it."""
    manager = hcm.HttpConnectionManager(
        stat_prefix="on_demand",
        route_config=route_pb2.RouteConfiguration(
            name="local",
            validate_clusters={"value": False},  # as Meshplane's routes: a cluster may come later
            virtual_hosts=[
                rc.VirtualHost(
                    name="all",
                    domains=["*"],
                    routes=[rc.Route(match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=cluster))],
                )
            ],
        ),
        http_filters=[
            hcm.HttpFilter(
                name="envoy.filters.http.on_demand",
                typed_config=pack(
                    on_demand_pb2.OnDemand(odcds=on_demand_pb2.OnDemandCds(source=ads(), timeout=seconds(5)))
                ),
            ),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
        ],
    )
    return listener_pb2.Listener(
        name="on_demand",
        address=socket_address("127.0.0.1", port),
        filter_chains=[
            lc.FilterChain(
                filters=[lc.Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(manager))]
            )
        ],
    )


async def test_a_cluster_asked_for_on_demand_is_served(
    tmp_path: Path, mesh_file: Path, plane_factory: PlaneFactory
) -> None:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="echo")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    upstream = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream).start()
    cluster = f"outbound|{upstream}||echo.demo.svc.cluster.local"
    mesh_file.write_text(
        f"""
mtls: DISABLE
services:
  - {{name: echo, namespace: demo, ports: [{{port: {upstream}, name: http}}], selector: {{app: echo}}}}
  - {{name: other, namespace: demo, ports: [{{port: 9090, name: http}}], selector: {{app: other}}}}
workloads:
  - {{name: echo-1, namespace: demo, labels: {{app: echo}}, address: 127.0.0.1}}
"""
    )
    try:
        plane: ControlPlane = await plane_factory()  # type: ignore[assignment]
        path, admin = write_bootstrap(tmp_path, plane, name="client-1", sa="client", labels={"app": "client"})
        doc = json.loads(path.read_text())
        # No CDS or LDS subscription at all: the only clusters it will hold are those it asks for.
        del doc["dynamicResources"]["cdsConfig"], doc["dynamicResources"]["ldsConfig"]
        listen = free_port()
        doc["staticResources"].setdefault("listeners", []).append(
            json_format.MessageToDict(on_demand_listener(listen, cluster))
        )
        path.write_text(json.dumps(doc))
        async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
            assert cluster not in await envoy.clusters()
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{listen}/", timeout=aiohttp.ClientTimeout(total=10)) as r,
            ):
                assert (r.status, await r.text()) == (200, "echo")
            held = await envoy.clusters()
            assert cluster in held and not any("other.demo" in name for name in held)
            stats = await envoy.stats()
            assert stats[f"cluster.{cluster}.upstream_rq_total"] == 1
    finally:
        await runner.cleanup()
