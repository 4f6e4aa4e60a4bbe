"""xDS under load: N simulated sidecars on real gRPC streams against `meshctl serve` in its own process.

Each simulated sidecar has its own HTTP/2 connection (a channel with a local subchannel pool;
the benchmark counts the server's established TCP connections to check) and speaks ADS the
way Envoy does: it asks for CDS and LDS (wildcard), then subscribes to EDS with the names of
the EDS clusters it got, to RDS with the route names of its listeners, and to SDS `default`
and `ROOTCA`. Every request for a type, ACKs included, carries that type's subscribed
`resource_names` (empty for CDS/LDS), the last version received and its nonce; no response
is ever NACKed (the client does not validate config).

The mesh has 50 services (100 ports) and 200 static workloads; sidecars belong to 10 distinct
service accounts, so the server should build 10 views, not N. Measured: time until every
sidecar holds the full config (CDS, EDS for all its clusters, LDS, RDS for all its routes,
both secrets), and, over 5 edits of the mesh file that each add a service, the time from the
edit to the new cluster, and to its endpoints, at every sidecar (p50, p99, max over sidecars
and edits). The clients share one Python process (and the machine's 2 cores) with each other,
so latencies include their own work.

    .venv/bin/python benchmarks/xds_push.py [--proxies 100 300] [--edits 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from serve import OtherLoad, Server, cpu_seconds, first_string, meshctl_serve, requests_with_node

T = "type.googleapis.com/envoy."
CDS, EDS = T + "config.cluster.v3.Cluster", T + "config.endpoint.v3.ClusterLoadAssignment"
LDS, RDS = T + "config.listener.v3.Listener", T + "config.route.v3.RouteConfiguration"
SDS = T + "extensions.transport_sockets.tls.v3.Secret"
WILDCARD = (CDS, LDS)
SECRETS = ("ROOTCA", "default")
MAX_PROXIES = 2000
MAX_STREAMS = 50
"""Streams one simulated sidecar opens at most (it reconnects only when asked to)."""
RECONNECT_BACKOFF_S, RECONNECT_BACKOFF_MAX_S = 0.5, 30.0
"""Envoy's gRPC retry back-off for its xDS stream: jittered, from 0.5 s, doubling up to 30 s."""
MAX_EDITS = 20
VIEWS = 10


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


# Sidecars of one view receive the same serialized resources: parse each distinct one once.
_parsed: dict[tuple[str, bytes], tuple[str, list[str]]] = {}


def parse(type_url: str, value: bytes) -> tuple[str, list[str]]:
    """(resource name, names it makes the sidecar subscribe to: EDS for a cluster, RDS for a listener)."""
    key = (type_url, value)
    hit = _parsed.get(key)
    if hit is not None:
        return hit
    if len(_parsed) > 200_000:
        _parsed.clear()
    refs: list[str] = []
    if type_url == CDS:
        c = cluster_pb2.Cluster.FromString(value)
        name = c.name
        if c.type == cluster_pb2.Cluster.EDS:
            refs.append(c.eds_cluster_config.service_name or c.name)
    elif type_url == EDS:
        name = endpoint_pb2.ClusterLoadAssignment.FromString(value).cluster_name
    elif type_url == LDS:
        listener = listener_pb2.Listener.FromString(value)
        name = listener.name
        for chain in [*listener.filter_chains, listener.default_filter_chain]:
            for f in chain.filters:
                if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                    m = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(m)
                    if m.HasField("rds"):
                        refs.append(m.rds.route_config_name)
    else:  # RDS and SDS resources start with their name (field 1); parsing it is all we need
        name = first_string(value)
    _parsed[key] = (name, refs)
    return name, refs


class Subscription:
    """What Envoy keeps per type: the names it wants, the last version and nonce it got, what it holds."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.version = ""
        self.nonce = ""
        self.held: dict[str, bytes] = {}
        """name -> the serialized resource for EDS (what the benchmarks look into), b"" for the others."""
        self.versions: dict[str, str] = {}
        """name -> its version (delta), for `initial_resource_versions` when the stream is opened again."""
        self.refs: dict[str, list[str]] = {}
        """name -> the EDS or RDS names that resource makes the sidecar subscribe to."""
        self.responses = 0


class Proxy:
    """A simulated sidecar on its own connection. `delta`: incremental ADS, as the bootstraps Meshplane
    generates use by default; otherwise state of the world."""

    def __init__(self, index: int, target: str, *, delta: bool = False, reconnect: bool = False) -> None:
        view = index % VIEWS
        namespace = f"ns-{view % 5}"
        ip = f"10.2.{index // 250}.{index % 250 + 1}"
        meta = struct_pb2.Struct()
        meta.update(
            {
                "NAMESPACE": namespace,
                "NAME": f"p-{index}",
                "SERVICE_ACCOUNT": f"sa-{view}",
                "INSTANCE_IPS": ip,
                "LABELS": {"app": f"svc-{view}"},
            }
        )
        self.node = base_pb2.Node(id=f"sidecar~{ip}~p-{index}.{namespace}~{namespace}.svc.cluster.local", metadata=meta)
        self.target = target
        self.channel = self._channel()
        self.delta = delta
        self.reconnect = reconnect
        self.streams = 0
        """Streams opened; more than one when it reconnected."""
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest | None] = (
            asyncio.Queue()
        )
        self.subs = {t: Subscription() for t in (CDS, EDS, LDS, RDS, SDS)}
        self.changed = asyncio.Event()
        self.complete = asyncio.Event()
        self.ended: str | None = None

    def _channel(self) -> grpc.aio.Channel:
        # A local subchannel pool: this channel's connection is its own, not shared with the others.
        return grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])

    def send(self, type_url: str, subscribe: list[str] | None = None, unsubscribe: list[str] | None = None) -> None:
        """An ACK of the last response (or the first request); in delta, with subscription changes."""
        s = self.subs[type_url]
        if self.delta:
            self.queue.put_nowait(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    response_nonce=s.nonce,
                    resource_names_subscribe=subscribe or [],
                    resource_names_unsubscribe=unsubscribe or [],
                )
            )
            return
        self.queue.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=s.version,
                response_nonce=s.nonce,
                resource_names=[] if type_url in WILDCARD else s.names,
            )
        )

    def subscribe(self, type_url: str, names: list[str]) -> None:
        names = sorted(set(names))
        before = self.subs[type_url].names
        if names == before:
            return
        self.subs[type_url].names = names
        if self.delta:  # only the difference, as Envoy's delta subscriptions send it
            self.send(type_url, sorted(set(names) - set(before)), sorted(set(before) - set(names)))
        else:
            self.send(type_url)

    def requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        return requests_with_node(self.queue, self.node)

    async def run(self) -> None:
        """One stream; with `reconnect`, a new one after each that ends (at most MAX_STREAMS), as Envoy does
        after a jittered back-off of 0.5 s and up, opening with what it holds."""
        backoff = RECONNECT_BACKOFF_S
        while self.streams < MAX_STREAMS:
            if self.streams:
                # A new connection, as Envoy opens for a new stream: a gRPC channel would instead fail calls
                # at once while it backs off reconnecting on its own (1 s and up, x1.6).
                await self.channel.close()
                self.channel = self._channel()
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
            call = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
            self.streams += 1
            self.queue = asyncio.Queue()
            self.opening()
            self.ended = None
            try:
                async for resp in call(self.requests()):
                    backoff = RECONNECT_BACKOFF_S
                    self.on_response(resp)
                self.ended = "closed by the server"
            except grpc.aio.AioRpcError as e:
                self.ended = f"{e.code().name}: {e.details()}"
            finally:
                self.queue.put_nowait(None)  # ends this stream's requests (gRPC's task that sends them)
                self.changed.set()
            if not self.reconnect:
                return
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_S)

    def opening(self) -> None:
        """The requests a stream opens with: CDS and LDS, and on a new stream after the first, every other
        subscription too, with what the sidecar holds (delta) or its last version (state of the world)."""
        for type_url, s in self.subs.items():
            if self.streams > 1 and not s.responses:
                continue
            if self.streams == 1 and type_url not in WILDCARD:
                continue
            s.nonce = ""  # a nonce belongs to its stream
            if self.delta:
                self.queue.put_nowait(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=type_url,
                        resource_names_subscribe=[] if type_url in WILDCARD else s.names,
                        initial_resource_versions=s.versions,
                    )
                )
            else:
                self.send(type_url)

    def on_response(self, resp: discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse) -> None:
        s = self.subs.get(resp.type_url)
        if s is None:
            return
        s.nonce = resp.nonce
        s.responses += 1
        if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
            s.version = resp.system_version_info
            values = [r.resource.value for r in resp.resources]
            s.versions.update((r.name, r.version) for r in resp.resources)
            for name in resp.removed_resources:
                s.held.pop(name, None)
                s.refs.pop(name, None)
                s.versions.pop(name, None)
        else:
            s.version = resp.version_info
            values = [r.value for r in resp.resources]
            s.held, s.refs = {}, {}
        for value in values:
            name, more = parse(resp.type_url, value)
            s.held[name] = value if resp.type_url == EDS else b""
            s.refs[name] = more
        refs = [n for more in s.refs.values() for n in more]
        # As Envoy does (its ADS mux pauses EDS/RDS while it applies CDS/LDS): the new EDS or RDS
        # subscription first, then the ACK of the CDS or LDS response that caused it.
        if resp.type_url == CDS:
            self.subscribe(EDS, refs)
            self.subscribe(SDS, list(SECRETS))
        elif resp.type_url == LDS:
            self.subscribe(RDS, refs)
        self.send(resp.type_url)
        self.changed.set()
        if not self.complete.is_set() and self.has_everything():
            self.complete.set()

    def has_everything(self) -> bool:
        return all(s.responses for s in self.subs.values()) and all(
            self.subs[t].held.keys() >= set(self.subs[t].names) for t in (EDS, RDS, SDS)
        )


async def scenario(n: int, edits: int) -> None:
    async with meshctl_serve(mesh()) as server:
        await measure(n, edits, server)


async def measure(n: int, edits: int, server: Server) -> None:
    proxies = [Proxy(i, f"127.0.0.1:{server.xds_port}") for i in range(n)]
    tasks: list[asyncio.Task[None]] = []
    try:
        load = OtherLoad(server.pid)
        start = time.perf_counter()
        tasks = [asyncio.create_task(p.run()) for p in proxies]
        done = await wait_all([p.complete for p in proxies], 120)
        initial = time.perf_counter() - start
        await asyncio.sleep(2)  # let the pushes caused by the sidecars registering themselves settle
        connections = established(server.xds_port)
        peers = {p["peer"] for p in await debug_proxies(server.admin_port)}
        cpu_before, client_before = cpu_seconds(server.pid), time.process_time()
        clusters: list[float] = []
        endpoints: list[float] = []
        firsts: list[float] = []
        missed = 0
        for edit in range(1, edits + 1):
            service = f"svc-{49 + edit}.ns-{(49 + edit) % 5}.svc.cluster.local"
            cluster = f"outbound|8080||{service}"
            t0 = time.perf_counter()
            server.mesh_file.write_text(mesh(extra=edit))
            results = await asyncio.gather(*(arrival(p, cluster, t0) for p in proxies))
            firsts.append(min((c for c, _ in results if c is not None), default=float("nan")))
            for c, e in results:
                if c is None or e is None:
                    missed += 1
                if c is not None:
                    clusters.append(c)
                if e is not None:
                    endpoints.append(e)
            await asyncio.sleep(1)
        cpu = cpu_seconds(server.pid) - cpu_before
        client_cpu = time.process_time() - client_before
        m = await metrics(server.admin_port)
        unsubscribed = await check_subscriptions(server.admin_port, proxies)
        clusters.sort()
        endpoints.sort()
        firsts.sort()
        print(
            f"{n:>7} {done:>5} {initial:>9.2f} {ms(pct(firsts, 50)):>8} {ms(pct(clusters, 50)):>8} "
            f"{ms(pct(endpoints, 50)):>8} "
            f"{ms(pct(endpoints, 99)):>8} {ms(endpoints[-1] if endpoints else float('nan')):>8} "
            f"{cpu / edits * 1000:>9.0f} {client_cpu / edits * 1000:>9.0f} "
            f"{m.get('meshplane_config_views', float('nan')):>5.0f} {load.percent():>6.0f}",
            flush=True,
        )
        ended = [p.ended for p in proxies if p.ended]
        print(
            f"        {n} sidecars: {connections} TCP connections to the xDS port, {len(peers)} distinct peers; "
            f"ACKs {m.get('acks', 0):.0f}, NACKs {m.get('nacks', 0):.0f}, stale requests "
            f"{m.get('meshplane_xds_stale_requests_total', 0):.0f}; streams ended {len(ended)}; "
            f"missed pushes {missed}; server EDS/RDS/SDS differing from the subscription {unsubscribed}",
            flush=True,
        )
        for reason in sorted(set(ended))[:3]:
            print(f"        stream ended: {reason}")
    finally:
        await stop(proxies, tasks)


async def stop(proxies: Sequence[Proxy], tasks: list[asyncio.Task[None]]) -> None:
    """End the simulated sidecars' streams (their `run` tasks) and close their connections."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in proxies:
        await p.channel.close()


async def wait_all(events: list[asyncio.Event], within: float) -> int:
    """Wait until every event is set or `within` seconds pass; return how many are set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), within)
    return sum(e.is_set() for e in events)


async def arrival(p: Proxy, cluster: str, t0: float, within: float = 30) -> tuple[float | None, float | None]:
    """Seconds from t0 until `cluster` and then its endpoints are at `p` (None: not within `within` s)."""
    got_cluster = None
    deadline = t0 + within
    while p.ended is None:
        now = time.perf_counter()
        if got_cluster is None and cluster in p.subs[CDS].held:
            got_cluster = now - t0
        if got_cluster is not None and cluster in p.subs[EDS].held:
            return got_cluster, now - t0
        p.changed.clear()
        try:
            await asyncio.wait_for(p.changed.wait(), deadline - now)
        except TimeoutError:
            break
    return got_cluster, None


def established(port: int) -> int:
    """Established TCP connections whose local port is `port` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


async def debug_proxies(port: int) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/debug/proxies") as r:
        doc = json.loads(await r.text())
    return list(doc if isinstance(doc, list) else doc.get("proxies", []))


async def check_subscriptions(port: int, proxies: list[Proxy]) -> int:
    """How many sidecars the server sent, as last EDS/RDS/SDS, other names than they subscribed to."""
    by_id = {p.node.id: p for p in proxies}
    wrong = 0
    for entry in await debug_proxies(port):
        p = by_id.get(str(entry["id"]))
        types = entry.get("types")
        if p is None or not isinstance(types, dict):
            continue
        for t, short in ((EDS, "EDS"), (RDS, "RDS"), (SDS, "SDS")):
            sent = set(types.get(short, {}).get("resources", []))
            if sent != set(p.subs[t].names):
                wrong += 1
                break
    return wrong


async def metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {"acks": 0.0, "nacks": 0.0}
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            if name.startswith("meshplane_xds_acks_total"):
                out["acks"] += float(value)
            elif name.startswith("meshplane_xds_nacks_total"):
                out["nacks"] += float(value)
            else:
                out[name] = float(value)
    return out


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--proxies", type=int, nargs="+", default=[100, 300], help=f"sidecars per run, <= {MAX_PROXIES}"
    )
    parser.add_argument("--edits", type=int, default=5, help=f"mesh-file edits per run, <= {MAX_EDITS}")
    args = parser.parse_args()
    if not all(0 < n <= MAX_PROXIES for n in args.proxies) or not 0 < args.edits <= MAX_EDITS:
        parser.error(f"--proxies must be 1..{MAX_PROXIES} and --edits 1..{MAX_EDITS}")
    print(
        f"mesh: 50 services, 100 ports, 200 static workloads; {VIEWS} distinct sidecar views; "
        f"{args.edits} edits per run, each adding a service"
    )
    print(
        f"{'proxies':>7} {'ready':>5} {'initial s':>9} {'first':>8} {'cds p50':>8} {'eds p50':>8} {'eds p99':>8} "
        f"{'eds max':>8} {'cpu ms/ed':>9} {'clients':>9} {'views':>5} {'others':>6}",
        flush=True,
    )
    for n in args.proxies:
        await scenario(n, args.edits)
    print(
        "ready: sidecars holding the full config; initial: seconds from connecting until they all do; "
        "first: ms from the mesh-file edit until the new cluster is at the first sidecar (median over edits; "
        "mostly the server's file poll, settle and debounce waits); cds/eds: ms from the edit until the new "
        "cluster / its endpoints are at a sidecar, over all sidecars and edits; cpu ms/ed: server CPU time per edit "
        "(clients: the simulated sidecars' own CPU time per edit, on the same 2 cores); others: "
        "% of the machine's CPU used by other processes meanwhile (noise)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
