"""xDS under load: N simulated sidecars on real gRPC streams against `meshctl serve` in its own process.

Each simulated proxy behaves like Envoy on ADS: asks for CDS and LDS, subscribes to the EDS and
RDS names it receives and to its SDS secrets, and ACKs every response. The mesh has 50 services
(100 ports) and 200 static workloads; proxies belong to 10 distinct service accounts, so the
server should build 10 views, not N. Measured: time until all proxies hold the full config, and,
over 5 edits of the mesh file, the time from the edit to the new clusters at every proxy (p50,
p99, max over proxies). The clients share one Python process, so latencies include their own work.

    .venv/bin/python benchmarks/xds_push.py [--proxies 100 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import aiohttp
import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from serve import Server, meshctl_serve

T = "type.googleapis.com/envoy."
CDS, EDS = T + "config.cluster.v3.Cluster", T + "config.endpoint.v3.ClusterLoadAssignment"
LDS, RDS = T + "config.listener.v3.Listener", T + "config.route.v3.RouteConfiguration"
SDS = T + "extensions.transport_sockets.tls.v3.Secret"


def mesh(extra: int = 0) -> str:
    lines = ["services:"]
    for i in range(50 + extra):
        lines += [
            f"  - name: svc-{i}",
            f"    namespace: ns-{i % 5}",
            f"    ports: [{{port: 8080, name: http}}, {{port: {9000 + i}, name: tcp}}]",
            f"    selector: {{app: svc-{i}}}",
            f"    addresses: [10.96.{i // 200}.{i % 200 + 1}]",
        ]
    lines.append("workloads:")
    for i in range(200):
        lines.append(
            f"  - {{name: w-{i}, namespace: ns-{i % 50 % 5}, serviceAccount: sa-{i % 50}, "
            f"labels: {{app: svc-{i % 50}}}, address: 10.1.{i // 250}.{i % 250 + 1}}}"
        )
    return "\n".join(lines) + "\n"


class Proxy:
    def __init__(self, index: int, channel: grpc.aio.Channel) -> None:
        view = index % 10
        meta = struct_pb2.Struct()
        meta.update(
            {
                "NAMESPACE": f"ns-{view % 5}",
                "NAME": f"p-{index}",
                "SERVICE_ACCOUNT": f"sa-{view}",
                "INSTANCE_IPS": f"10.2.{index // 250}.{index % 250 + 1}",
                "LABELS": {"app": f"svc-{view}"},
            }
        )
        self.node = base_pb2.Node(id=f"sidecar~10.2.0.1~p-{index}.ns~ns.svc.cluster.local", metadata=meta)
        self.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.clusters: set[str] = set()
        self.changed = asyncio.Event()
        self.complete = asyncio.Event()
        self.have: set[str] = set()

    async def requests(self):  # type: ignore[no-untyped-def]
        first = True
        while True:
            req = await self.queue.get()
            if first:
                req.node.CopyFrom(self.node)
                first = False
            yield req

    async def run(self) -> None:
        for t in (CDS, LDS):
            self.queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=t))
        self.queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=SDS, resource_names=["default", "ROOTCA"]))
        async for resp in self.stub.StreamAggregatedResources(self.requests()):
            names: list[str] = []
            if resp.type_url == CDS:
                clusters = [cluster_pb2.Cluster.FromString(r.value) for r in resp.resources]
                self.clusters = {c.name for c in clusters}
                names = sorted(c.eds_cluster_config.service_name for c in clusters if c.type == cluster_pb2.Cluster.EDS)
                self.changed.set()
            elif resp.type_url == LDS:
                for r in resp.resources:
                    for chain in listener_pb2.Listener.FromString(r.value).filter_chains:
                        for f in chain.filters:
                            if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                                m = hcm.HttpConnectionManager()
                                f.typed_config.Unpack(m)
                                if m.HasField("rds"):
                                    names.append(m.rds.route_config_name)
            ack = discovery_pb2.DiscoveryRequest(
                type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce
            )
            self.queue.put_nowait(ack)
            if names:
                follow = EDS if resp.type_url == CDS else RDS
                self.queue.put_nowait(
                    discovery_pb2.DiscoveryRequest(type_url=follow, resource_names=sorted(set(names)))
                )
            self.have.add(resp.type_url)
            if len(self.have) == 5:
                self.complete.set()


async def scenario(n: int) -> None:
    async with meshctl_serve(mesh()) as server:
        await measure(n, server)


async def measure(n: int, server: Server) -> None:
    xds, admin, mesh_file = server.xds_port, server.admin_port, server.mesh_file
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        start = time.perf_counter()
        proxies = []
        for i in range(n):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{xds}")
            channels.append(channel)
            proxy = Proxy(i, channel)
            proxies.append(proxy)
            tasks.append(asyncio.create_task(proxy.run()))
        await asyncio.wait_for(asyncio.gather(*(p.complete.wait() for p in proxies)), 300)
        initial = time.perf_counter() - start
        await asyncio.sleep(2)  # let self-registration pushes settle
        cpu_before = cpu_seconds(server.pid)
        pushes = []
        for edit in range(1, 6):
            for p in proxies:
                p.changed.clear()
            target = f"outbound|8080||svc-{49 + edit}.ns-{(49 + edit) % 5}.svc.cluster.local"
            t0 = time.perf_counter()
            mesh_file.write_text(mesh(extra=edit))
            arrivals = await asyncio.wait_for(asyncio.gather(*(arrival(p, target, t0) for p in proxies)), 120)
            pushes.extend(arrivals)
            await asyncio.sleep(1)
        cpu = cpu_seconds(server.pid) - cpu_before
        views = await metric(admin, "meshplane_config_views")
        q = statistics.quantiles(pushes, n=100)
        print(
            f"{n:>7} {initial:>9.2f} {q[49] * 1000:>9.0f} {q[98] * 1000:>9.0f} {max(pushes) * 1000:>9.0f} "
            f"{cpu / 5 * 1000:>11.0f} {views:>6.0f}"
        )
    finally:
        for t in tasks:
            t.cancel()
        for c in channels:
            await c.close()


async def arrival(p: Proxy, cluster: str, t0: float) -> float:
    while cluster not in p.clusters:
        p.changed.clear()
        await p.changed.wait()
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def metric(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, nargs="+", default=[100, 300])
    args = parser.parse_args()
    print("mesh: 50 services, 100 ports, 200 static workloads; 10 distinct proxy views; 5 edits per run")
    print(
        f"{'proxies':>7} {'initial s':>9} {'push p50':>9} {'push p99':>9} {'push max':>9} "
        f"{'server ms/push':>11} {'views':>6}"
    )
    for n in args.proxies:
        await scenario(n)
    print(
        "push: edit of the mesh file -> the new cluster at a proxy, in ms (includes the 200 ms file poll "
        "and 100 ms debounce); server ms/push: the server process's CPU time per edit"
    )


if __name__ == "__main__":
    asyncio.run(main())
