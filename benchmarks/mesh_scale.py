"""Thousands of xDS streams against a 1,000-service mesh: connect storm, convergence, restart, delta savings, the
transport ceiling (scenarios 1, 2, 4, 5 and 6 of docs/performance.md).

    .venv/bin/python benchmarks/mesh_scale.py [--sidecars 1000 5000] [--protocols delta sotw] [--clients 4] [--out DIR]

Each protocol is a run of its own: the simulated sidecars (the ones of `xds_push.py`: each its own HTTP/2
connection, Envoy-style requests and ACKs, reconnecting as Envoy does) speak incremental ADS, as the
bootstraps Meshplane generates ask for, or state of the world. Each line of the table is printed; all go to
DIR/mesh_scale.json, and a plot to DIR/mesh_scale.png when matplotlib is installed (`pip install -e '.[bench]'`).

- storm: N sidecars open their streams at the same instant against `meshctl serve` with a mesh file of
  1,000 services. They run in `--clients` processes of their own (one Python process cannot drive
  thousands on these 2 cores), all started first and released together at one wall-clock instant.
  Measured: sidecars holding the full config, seconds until they all do, streams that ended and why,
  and the server's resident memory per held sidecar (RSS with them held minus RSS before, over N).
- converge (first storm size only): one endpoint change at a time until every sidecar has it, p50 and
  p99 over 20 changes, made two ways: a workload's address edited in the mesh file (its poll, settle and
  parse included), and a sidecar joining (it connects and registers as an endpoint of its service).
- restart (first storm size only): the server is stopped (SIGTERM) and started again on the same ports
  under the connected sidecars: seconds from the old process's exit until 99% and all are back with
  nothing left to send, streams reopened, NACKs, whether the next change reaches all, peak memory.
- delta: bytes the server's stream states send for one endpoint change (one workload's address) to a
  sidecar holding all 1,000 clusters, delta against state of the world.
- ceiling (state of the world): the fan-out of one push (a service added: CDS and EDS to every sidecar)
  by `meshctl serve`, against a bare grpc.aio server writing the same serialized responses to as many
  streams; the ratio of their throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.service.discovery.v3 import discovery_pb2
from serve import OtherLoad, Server, cpu_seconds, free_port, meshctl_serve
from xds_push import VIEWS, Proxy, arrival, metrics, stop, wait_all

from meshplane.controlplane import meshfile
from meshplane.controlplane.ca import IssuedCertificate
from meshplane.controlplane.cache import ConfigCache
from meshplane.controlplane.delta import DeltaStreamState
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from meshplane.controlplane.stream import StreamState

SERVICES = 1000
CHANGES = 20
"""Endpoint changes in the convergence scenario (scenario 2): p50 and p99 over these."""
NEW_CLUSTER = f"outbound|8080||svc-{SERVICES}.ns-{SERVICES % 5}.svc.cluster.local"
"""The cluster the ceiling scenario's push adds (mesh(SERVICES + 1))."""
MAX_SIDECARS = 10_000
JOIN = "a sidecar joins: connects and registers"


def mesh(services: int = SERVICES, moved: int | None = None) -> str:
    """`services` services in 5 namespaces, one HTTP port and one workload each; `moved`: that
    service's workload gets another address (one endpoint change). The simulated sidecars (labels
    app: svc-0..9) register as endpoints of the first ten."""
    lines = ["services:"]
    for i in range(services):
        lines += [
            f"  - name: svc-{i}",
            f"    namespace: ns-{i % 5}",
            "    ports: [{port: 8080, name: http}]",
            f"    selector: {{app: svc-{i}}}",
            f"    addresses: [10.96.{i // 200}.{i % 200 + 1}]",
        ]
    lines.append("workloads:")
    for i in range(services):
        host = 201 if i == moved else i % 200 + 1
        lines.append(
            f"  - {{name: w-{i}, namespace: ns-{i % 5}, serviceAccount: sa-{i % 50}, "
            f"labels: {{app: svc-{i}}}, address: 10.1.{i // 200}.{host}}}"
        )
    return "\n".join(lines) + "\n"


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def hwm_bytes(pid: int) -> int:
    """The peak resident memory of process `pid` so far."""
    return rss_bytes(pid, "VmHWM")


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full (all sockets)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def max_lag(m: dict[str, float]) -> float:
    """The largest bucket bound of meshplane_event_loop_lag_seconds with an observation above the one below."""
    buckets = sorted(
        (float(k.split('le="')[1].split('"')[0]), v)
        for k, v in m.items()
        if k.startswith("meshplane_event_loop_lag_seconds_bucket")
    )
    total = buckets[-1][1] if buckets else 0
    return next((le for le, count in buckets if count == total), float("nan"))


# -- the server's stream states, in process -------------------------------------------------------


class _NoSecrets:
    """The in-process scenarios subscribe to no SDS."""

    trust_bundle_pem = b""

    def workload_certificate(self, spiffe_id: str) -> IssuedCertificate:
        raise AssertionError("no SDS here")


def synced(cache: ConfigCache, delta: bool) -> StreamState | DeltaStreamState:
    """A stream state (the server's own) through Envoy's opening exchange for sidecar w-5: CDS and LDS,
    then EDS and RDS for every name they use, each response ACKed."""
    workload = cache.model.workloads[5]

    def source(type_url: str) -> dict[str, object]:
        return cache.resources(cache.view(workload), type_url)  # type: ignore[return-value]

    state: StreamState | DeltaStreamState = DeltaStreamState(source) if delta else StreamState(source)  # type: ignore[arg-type]
    for type_url in (CLUSTER, LISTENER, ENDPOINT, ROUTE):
        names = sorted(source(type_url)) if type_url in (ENDPOINT, ROUTE) else []
        (response,) = request(state, type_url, names=names).responses
        request(state, type_url, nonce=response.nonce, version=response.version, names=names)
    return state


def request(
    state: StreamState | DeltaStreamState, type_url: str, *, names: list[str], nonce: str = "", version: str = ""
) -> object:
    if isinstance(state, DeltaStreamState):
        subscribe = [] if nonce else names
        return state.on_request(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, response_nonce=nonce, resource_names_subscribe=subscribe
            )
        )
    return state.on_request(
        discovery_pb2.DiscoveryRequest(
            type_url=type_url, response_nonce=nonce, version_info=version, resource_names=names
        )
    )


def delta_savings() -> dict[str, object]:
    """Bytes of the responses one endpoint change (service svc-0's one workload moves) makes the server's
    stream states send to a sidecar holding the whole 1,000-service config: delta against state of the world."""
    cache = ConfigCache(meshfile.parse(mesh()), _NoSecrets())
    states = {"sotw": synced(cache, delta=False), "delta": synced(cache, delta=True)}
    cache.update(meshfile.parse(mesh(moved=0)))
    out: dict[str, object] = {"clusters": len(cache.resources(cache.view(cache.model.workloads[5]), CLUSTER))}
    for name, state in states.items():
        responses = state.on_change()
        out[f"{name}_bytes"] = sum(len(r.encode()) for r in responses)
        out[f"{name}_resources"] = sum(r.count for r in responses)
    out["ratio"] = int(out["delta_bytes"]) / int(out["sotw_bytes"])  # type: ignore[call-overload]
    return out


def push_payload() -> tuple[list[bytes], list[bytes]]:
    """What `meshctl serve` sends a sidecar of the static mesh, serialized: its opening responses, and
    those of the push that adds svc-1000 (CDS, the routes, then the EDS its new subscription asks for)."""
    cache = ConfigCache(meshfile.parse(mesh()), _NoSecrets())
    state = StreamState(lambda t: cache.resources(cache.view(cache.model.workloads[5]), t))
    initial = []
    for type_url in (CLUSTER, LISTENER, ENDPOINT, ROUTE):
        names = (
            sorted(cache.resources(cache.view(cache.model.workloads[5]), type_url))
            if type_url in (ENDPOINT, ROUTE)
            else []
        )
        (response,) = request(state, type_url, names=names).responses
        initial.append(response.encode())
        request(state, type_url, nonce=response.nonce, version=response.version_info, names=names)
    cache.update(meshfile.parse(mesh(SERVICES + 1)))
    push = state.on_change()
    eds = sorted(cache.resources(cache.view(cache.model.workloads[5]), ENDPOINT))
    push += request(state, ENDPOINT, names=eds, nonce=state.types[ENDPOINT].nonce, version="").responses
    return initial, [r.encode() for r in push]


# -- the bare transport -------------------------------------------------------------------------


async def bare(port: int, payload: Path) -> None:
    """A grpc.aio server with nothing but the ADS method: each stream gets the opening responses, and on
    SIGUSR1 every stream gets the push, all pre-serialized bytes; requests are read and dropped."""
    doc = json.loads(payload.read_text())
    initial, push = ([bytes.fromhex(h) for h in doc[k]] for k in ("initial", "push"))
    streams: set[asyncio.Queue[list[bytes]]] = set()

    async def drain(requests: object) -> None:
        async for _ in requests:  # type: ignore[attr-defined]
            pass

    async def ads(requests: object, context: grpc.aio.ServicerContext) -> object:
        queue: asyncio.Queue[list[bytes]] = asyncio.Queue()
        streams.add(queue)
        reader = asyncio.create_task(drain(requests))
        try:
            queue.put_nowait(initial)
            while True:
                for message in await queue.get():
                    yield message
        finally:
            streams.discard(queue)
            reader.cancel()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService",
                {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(ads)},  # bytes in, bytes out
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: [q.put_nowait(push) for q in streams])
    print("ready", flush=True)
    await server.wait_for_termination()


# -- client processes -----------------------------------------------------------------------


class CountingProxy(Proxy):
    """A simulated sidecar that counts the bytes of the responses it gets, and is ready either with its
    full config or (against the bare server, which serves no secrets) once it has clusters and endpoints."""

    def __init__(self, index: int, target: str, full: bool, delta: bool) -> None:
        super().__init__(index, target, delta=delta, reconnect=True)
        self.full = full
        self.bytes = 0

    def on_response(self, resp: discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse) -> None:
        self.bytes += resp.ByteSize()
        super().on_response(resp)
        if not self.full and self.subs[ENDPOINT].responses:
            self.complete.set()


async def client(target: str, first: int, count: int, start_at: float, within: float, full: bool, delta: bool) -> None:
    """Run sidecars first..first+count-1, all released at `start_at` (wall clock); report on stdout
    once they all hold their config (or `within` s passed). Then, for each line on stdin (a cluster name),
    report when that cluster's endpoints reached the sidecars and the bytes they got meanwhile; end
    when stdin closes. The sidecars reconnect, as Envoy does, when their stream ends."""
    proxies = [CountingProxy(i, target, full, delta) for i in range(first, first + count)]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = time.time()
    tasks = [asyncio.create_task(p.run()) for p in proxies]
    ready = await wait_all([p.complete for p in proxies], within)
    ended: dict[str, int] = {}
    for p in proxies:
        if p.ended:
            ended[p.ended] = ended.get(p.ended, 0) + 1
    report = {"ready": ready, "seconds": time.time() - started, "ended": ended, "cpu": time.process_time()}
    print(json.dumps(report), flush=True)
    loop = asyncio.get_running_loop()
    while cluster := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if cluster == "streams":  # streams each sidecar opened, and how their latest ended (None: open)
            ended = {}
            for p in proxies:
                ended[str(p.ended)] = ended.get(str(p.ended), 0) + 1
            print(json.dumps({"reopened": sum(p.streams > 1 for p in proxies), "latest": ended}), flush=True)
            continue
        if cluster.startswith("endpoint "):  # "endpoint CLUSTER IP": when IP is among CLUSTER's endpoints
            _, name, ip = cluster.split()
            wall0 = time.time()
            times = await asyncio.gather(*(moved_to(p, name, ip.encode(), within) for p in proxies))
            got = [wall0 + t for t in times if t is not None]
            print(json.dumps({"arrived": len(got), "first": min(got, default=0), "last": max(got, default=0)}))
            continue
        t0, wall0 = time.perf_counter(), time.time()
        before = sum(p.bytes for p in proxies)
        times = [e for _, e in await asyncio.gather(*(arrival(p, cluster, t0, within) for p in proxies))]
        got = [wall0 + e for e in times if e is not None]
        after = sum(p.bytes for p in proxies)
        print(
            json.dumps(
                {
                    "arrived": len(got),
                    "first": min(got, default=0),
                    "last": max(got, default=0),
                    "bytes": after - before,
                }
            ),
            flush=True,
        )
    await stop(proxies, tasks)


async def moved_to(p: CountingProxy, cluster: str, ip: bytes, within: float) -> float | None:
    """Seconds until `cluster`'s endpoints at `p` include `ip` (its address is a string field of the
    serialized ClusterLoadAssignment); None if not within `within` s."""
    t0 = time.perf_counter()
    while ip not in p.subs[ENDPOINT].held.get(cluster, b""):
        p.changed.clear()
        left = t0 + within - time.perf_counter()
        if left <= 0 or p.ended is not None:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.changed.wait(), left)
    return time.perf_counter() - t0


@contextlib.contextmanager
def clients(target: str, n: int, processes: int, within: float, full: bool = True, delta: bool = False) -> object:
    """Start `processes` client processes sharing n sidecars; yield their reports once all are in."""
    start_at = time.time() + 3 + n / 2000  # imports and channel set-up of every process first
    procs = []
    share = -(-n // processes)
    for first in range(0, n, share):
        argv = [sys.executable, __file__, "--role", "client", "--target", target]
        argv += ["--first", str(first), "--count", str(min(share, n - first)), "--start-at", str(start_at)]
        argv += ["--within", str(within)] + ([] if full else ["--bare"]) + (["--delta"] if delta else [])
        procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(BrokenPipeError):
                p.stdin.close()  # type: ignore[union-attr]
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def ask(procs: list[subprocess.Popen[str]], cluster: str) -> None:
    for p in procs:
        p.stdin.write(cluster + "\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]


def fan_out(reports: list[dict[str, object]]) -> dict[str, float]:
    """One push's fan-out over every client process: sidecars reached, seconds from the first sidecar
    holding the new endpoints to the last, bytes per sidecar, and bytes per second."""
    arrived = sum(int(r["arrived"]) for r in reports)  # type: ignore[call-overload]
    spread = max(float(r["last"]) for r in reports) - min(float(r["first"]) for r in reports if r["arrived"])  # type: ignore[arg-type]
    sent = sum(int(r["bytes"]) for r in reports)  # type: ignore[call-overload]
    return {
        "arrived": arrived,
        "seconds": spread,
        "bytes_per_sidecar": sent / max(arrived, 1),
        "mb_per_s": sent / spread / 2**20,
    }


def report_of(proc: subprocess.Popen[str]) -> dict[str, object]:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"client process {proc.pid} exited with {proc.wait()} before reporting")
    return dict(json.loads(line))


# -- scenarios ------------------------------------------------------------------------------


async def storm(n: int, processes: int, follow: bool, delta: bool) -> dict[str, object]:
    """The connect storm; with `follow`, then one push (a service added) to the sidecars it holds, the
    endpoint changes of scenario 2, and the restart of scenario 5."""
    async with meshctl_serve(mesh()) as server:
        target = f"127.0.0.1:{server.xds_port}"
        await asyncio.sleep(2)  # the model is loaded and the first views built lazily; settle first
        before = rss_bytes(server.pid)
        overflows = listen_overflows()
        cpu = cpu_seconds(server.pid)
        load = OtherLoad(server.pid)
        within = 60 + n / 10
        restart = None
        with clients(target, n, processes, within, delta=delta) as procs:
            reports = await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs))  # type: ignore[attr-defined]
            await asyncio.sleep(2)
            held = rss_bytes(server.pid)
            m = await metrics(server.admin_port)
            cpu = cpu_seconds(server.pid) - cpu
            push = None
            others: float | None = None
            converge: list[float] = []
            joins: list[float] = []
            if follow:
                ask(procs, NEW_CLUSTER)  # type: ignore[arg-type]
                server.mesh_file.write_text(mesh(SERVICES + 1))
                push = fan_out(await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs)))  # type: ignore[attr-defined]
                # Scenario 2: one endpoint change at a time (a workload moves), until every sidecar has it.
                for k in range(CHANGES):
                    moved = 20 + k  # not one of the services the simulated sidecars register with
                    cluster = f"outbound|8080||svc-{moved}.ns-{moved % 5}.svc.cluster.local"
                    ask(procs, f"endpoint {cluster} 10.1.{moved // 200}.201")  # type: ignore[arg-type]
                    written = time.time()
                    server.mesh_file.write_text(mesh(SERVICES + 1, moved=moved))
                    got = await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs))  # type: ignore[attr-defined]
                    if sum(int(r["arrived"]) for r in got) == n:  # type: ignore[call-overload]
                        converge.append(max(float(r["last"]) for r in got) - written)  # type: ignore[arg-type]
                joins = await join_changes(target, procs, n, delta)  # type: ignore[arg-type]
                others = load.percent()  # before the restart: it measures the first server process
                restart = await reconnect_storm(server, procs, n)  # type: ignore[arg-type]
        ready = sum(int(r["ready"]) for r in reports)  # type: ignore[call-overload]
        ended: dict[str, int] = {}
        for r in reports:
            for reason, count in r["ended"].items():  # type: ignore[attr-defined]
                ended[reason] = ended.get(reason, 0) + count
        return {
            "sidecars": n,
            "ready": ready,
            "seconds": max(float(r["seconds"]) for r in reports),  # type: ignore[arg-type]
            "ended": ended,
            "rss_before_mb": before / 2**20,
            "rss_held_mb": held / 2**20,
            "mb_per_sidecar": (held - before) / n / 2**20,
            "server_cpu_s": cpu,
            "clients_cpu_s": sum(float(r["cpu"]) for r in reports),  # type: ignore[arg-type]
            "listen_overflows": listen_overflows() - overflows,
            "loop_lag_max_s": max_lag(m),
            "server_ended": {k: v for k, v in m.items() if k.startswith("meshplane_xds_streams_ended")},
            "others": others if others is not None else load.percent(),
            "push": push,
            "converge_s": converge,
            "join_s": joins,
            "restart": restart,
            "protocol": "delta" if delta else "sotw",
        }


async def join_changes(target: str, procs: list[subprocess.Popen[str]], n: int, delta: bool) -> list[float]:
    """Scenario 2 without the mesh file: one sidecar joins (connects, and registers as an endpoint of its
    service), CHANGES times; each timed from its start until every sidecar has its address."""
    out: list[float] = []
    joiners: list[Proxy] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for k in range(CHANGES):
            joiner = Proxy(n + k, target, delta=delta)
            view = (n + k) % VIEWS
            cluster = f"outbound|8080||svc-{view}.ns-{view % 5}.svc.cluster.local"
            ip = joiner.node.id.split("~")[1]
            ask(procs, f"endpoint {cluster} {ip}")
            joined = time.time()
            joiners.append(joiner)
            tasks.append(asyncio.create_task(joiner.run()))
            got = await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs))
            if sum(int(r["arrived"]) for r in got) == n:  # type: ignore[call-overload]
                out.append(max(float(r["last"]) for r in got) - joined)  # type: ignore[arg-type]
    finally:
        await stop(joiners, tasks)
    return out


async def reconnect_storm(server: Server, procs: list[subprocess.Popen[str]], n: int) -> dict[str, object]:
    """Scenario 5: restart the control plane under n connected sidecars. Measured from the old process's exit:
    until the new one holds all n streams with nothing left to send (every type ACKed or resumed); then
    one endpoint change must reach all n (they are on live streams with their full config). Peak memory
    is the new process's high-water mark."""
    exited = await server.restart()
    listening = time.time() - exited
    most = back = None
    deadline = exited + 60
    while time.time() < deadline and back is None:
        with contextlib.suppress(aiohttp.ClientError):
            m = await metrics(server.admin_port)
            connected = m.get("meshplane_xds_connected_proxies", 0)
            if most is None and connected >= 0.99 * n:
                most = time.time() - exited
            if connected >= n and m.get("meshplane_xds_unacked_streams") == 0:
                back = time.time() - exited
        await asyncio.sleep(0.1)
    moved = 20 + CHANGES
    cluster = f"outbound|8080||svc-{moved}.ns-{moved % 5}.svc.cluster.local"
    ask(procs, f"endpoint {cluster} 10.1.{moved // 200}.201")
    written = time.time()
    server.mesh_file.write_text(mesh(SERVICES + 1, moved=moved))
    got = await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs))
    arrived = sum(int(r["arrived"]) for r in got)  # type: ignore[call-overload]
    ask(procs, "streams")
    streams = await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs))
    latest: dict[str, int] = {}
    for r in streams:
        for reason, count in r["latest"].items():  # type: ignore[attr-defined]
            latest[reason] = latest.get(reason, 0) + count
    m = await metrics(server.admin_port)
    return {
        "listening_s": listening,
        "most_s": most,
        "back_s": back,
        "reopened": sum(int(r["reopened"]) for r in streams),  # type: ignore[call-overload]
        "latest_streams": latest,
        "nacks": m.get("nacks", 0),
        "change_arrived": arrived,
        "change_s": max(float(r["last"]) for r in got) - written if arrived else None,  # type: ignore[arg-type]
        "peak_rss_mb": hwm_bytes(server.pid) / 2**20,
    }


async def bare_ceiling(n: int, processes: int) -> dict[str, float]:
    """The same push to n sidecars from a bare grpc.aio server sending pre-serialized bytes."""
    initial, push = push_payload()
    with tempfile.TemporaryDirectory(prefix="meshplane-bare-") as work:
        payload = Path(work) / "payload.json"
        payload.write_text(json.dumps({"initial": [b.hex() for b in initial], "push": [b.hex() for b in push]}))
        port = free_port()
        argv = [sys.executable, __file__, "--role", "bare", "--target", str(port), "--payload", str(payload)]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError("the bare server did not start")
            before = rss_bytes(server.pid)
            with clients(f"127.0.0.1:{port}", n, processes, 60 + n / 10, full=False) as procs:
                reports = await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs))  # type: ignore[attr-defined]
                if sum(int(r["ready"]) for r in reports) < n:  # type: ignore[call-overload]
                    raise RuntimeError(f"only {[r['ready'] for r in reports]} sidecars connected to the bare server")
                await asyncio.sleep(2)
                held = rss_bytes(server.pid)
                ask(procs, NEW_CLUSTER)  # type: ignore[arg-type]
                await asyncio.sleep(0.5)
                server.send_signal(signal.SIGUSR1)
                out = fan_out(await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs)))  # type: ignore[attr-defined]
                return {**out, "mb_per_sidecar": (held - before) / n / 2**20}
        finally:
            server.terminate()
            server.wait(10)


def plot(results: dict[str, Any], path: Path) -> bool:
    """The figures as a PNG; False when matplotlib is not installed (`pip install -e '.[bench]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    a2 = a.twinx()
    for protocol, color in (("delta", "tab:blue"), ("sotw", "tab:gray")):
        storms = [r for r in results["storm"] if r["protocol"] == protocol]
        xs = [r["sidecars"] for r in storms]
        a.plot(
            xs, [r["seconds"] for r in storms], "o-", color=color, label=f"{protocol}: s until all hold their config"
        )
        a2.plot(xs, [r["mb_per_sidecar"] for r in storms], "s--", color=color, label=f"{protocol}: server MB/sidecar")
    a.set_xlabel("sidecars connecting at once")
    a.set_ylabel("seconds")
    a2.axhline(0.5, color="tab:red", linestyle=":", linewidth=1)  # the target
    a2.set_ylabel("MB per sidecar")
    a.set_ylim(bottom=0)
    a2.set_ylim(bottom=0)
    a.set_title("connect storm, 1,000-service mesh")
    a.legend(loc="upper left", fontsize=8)
    a2.legend(loc="lower right", fontsize=8)
    d = results["delta"]
    b.bar(["state of the world", "delta"], [d["sotw_bytes"], d["delta_bytes"]], color=["tab:gray", "tab:blue"])
    b.set_yscale("log")
    b.set_ylabel("bytes sent")
    b.set_title(f"one endpoint change, {d['clusters']} clusters: {d['ratio'] * 100:.2f}%")
    if results.get("ceiling"):
        e = results["ceiling"]
        c.bar(["meshctl serve", "bare grpc.aio"], [e["ours"]["mb_per_s"], e["bare"]["mb_per_s"]])
        c.set_ylabel("MB/s to all sidecars")
        c.set_title(f"one push to {e['sidecars']} sidecars: ratio {e['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, nargs="+", default=[1000, 5000], help=f"per storm, <= {MAX_SIDECARS}")
    parser.add_argument("--clients", type=int, default=4, help="client processes for the simulated sidecars")
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=["delta", "sotw"],
        default=["delta", "sotw"],
        help="ADS variants of the simulated sidecars, each a run of its own (delta: what generated bootstraps use)",
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="where mesh_scale.json and .png go")
    parser.add_argument("--role", choices=["main", "client", "bare"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--within", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--delta", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--payload", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "client":
        await client(args.target, args.first, args.count, args.start_at, args.within, not args.bare, args.delta)
        return 0
    if args.role == "bare":
        await bare(int(args.target), args.payload)
        return 0
    if not all(0 < n <= MAX_SIDECARS for n in args.sidecars) or args.clients < 1:
        parser.error(f"--sidecars must be 1..{MAX_SIDECARS}, --clients at least 1")
    results: dict[str, Any] = {"storm": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(
        f"mesh: {SERVICES} services, one HTTP port and one workload each; sidecars in {args.clients} client processes"
    )
    print(
        f"{'storm':<8} {'ready':>11} {'ended':>6} {'all in s':>8} {'rss MB':>7} {'MB/sidecar':>10} "
        f"{'lag s <=':>8} {'server cpu':>10} {'clients cpu':>11} {'others':>6}",
        flush=True,
    )
    for protocol in args.protocols:
        for i, n in enumerate(args.sidecars):
            r = await storm(n, args.clients, follow=i == 0, delta=protocol == "delta")
            results["storm"].append(r)
            print(
                f"{protocol:<8} {r['ready']:>5}/{n:<5} {sum(r['ended'].values()):>6} {r['seconds']:>8.1f} "
                f"{r['rss_held_mb']:>7.0f} "
                f"{r['mb_per_sidecar']:>10.3f} {r['loop_lag_max_s']:>8.2f} {r['server_cpu_s']:>10.1f} "
                f"{r['clients_cpu_s']:>11.1f} {r['others']:>6.0f}",
                flush=True,
            )
            for reason, count in sorted(r["ended"].items()):
                print(f"         ended {count}: {reason}")
            if i:
                continue
            for key, how in (("converge_s", "a mesh-file edit, its poll and settle included"), ("join_s", JOIN)):
                times = sorted(r[key])
                if times:
                    p50, p99 = times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]
                    print(
                        f"{protocol:<8} converge: one endpoint change ({how}) at all {n} sidecars: p50 {p50:.2f} s, "
                        f"p99 {p99:.2f} s over {len(times)} of {CHANGES} changes"
                        + ("" if len(times) == CHANGES else " (the others missed a sidecar)"),
                        flush=True,
                    )
            back = r["restart"]
            print(
                f"{protocol:<8} restart: new server listening {back['listening_s']:.2f} s after the old one exited; "
                + (f"99% of sidecars back after {back['most_s']:.2f} s, " if back["most_s"] is not None else "")
                + f"all {n} back and in sync "
                + (f"after {back['back_s']:.2f} s" if back["back_s"] is not None else "NOT within 60 s")
                + f"; {back['reopened']} streams reopened, latest streams "
                f"{back['latest_streams']}, NACKs {back['nacks']:.0f}; the next endpoint change reached "
                f"{back['change_arrived']}/{n}"
                + (f" in {back['change_s']:.2f} s" if back["change_s"] is not None else "")
                + f"; peak server memory {back['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    d = results["delta"] = delta_savings()
    print(
        f"delta    one endpoint change, {d['clusters']} clusters: state of the world {d['sotw_bytes']:,} bytes "
        f"({d['sotw_resources']} resources), delta {d['delta_bytes']:,} bytes ({d['delta_resources']}): "
        f"{d['ratio'] * 100:.3f}%",
        flush=True,
    )
    sotw = [r for r in results["storm"] if r["protocol"] == "sotw" and r["push"]]
    if not sotw:
        print("ceiling  not measured: it pushes state of the world, as the bare server does (--protocols sotw)")
        return finish(results, args.out)
    ours = sotw[0]["push"]
    n = args.sidecars[0]
    theirs = await bare_ceiling(n, args.clients)
    e = results["ceiling"] = {
        "sidecars": n,
        "ours": ours,
        "bare": theirs,
        "ratio": ours["mb_per_s"] / theirs["mb_per_s"],
    }
    print(
        f"ceiling  one push (a service added) to {n} sidecars: meshctl serve {ours['arrived']} reached, "
        f"{ours['bytes_per_sidecar'] / 1024:.0f} KiB each, {ours['seconds']:.2f} s first to last, "
        f"{ours['mb_per_s']:.0f} MB/s; "
        f"bare grpc.aio {theirs['arrived']} reached, {theirs['bytes_per_sidecar'] / 1024:.0f} KiB each, "
        f"{theirs['seconds']:.2f} s, {theirs['mb_per_s']:.0f} MB/s, it holds {theirs['mb_per_sidecar']:.3f} MB per "
        f"sidecar; ratio {e['ratio']:.2f}",
        flush=True,
    )
    return finish(results, args.out)


def finish(results: dict[str, Any], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mesh_scale.json").write_text(json.dumps(results, indent=2))
    drawn = plot(results, out / "mesh_scale.png")
    print(
        f"wrote {out / 'mesh_scale.json'}"
        + (f" and {out / 'mesh_scale.png'}" if drawn else " (no plot: matplotlib is not installed)")
    )
    print(
        "ready: sidecars holding their full config (CDS, EDS, LDS, RDS, SDS); ended: streams that ended (gRPC status); "
        "all in: s from the release of every sidecar until the last holds its config; MB/sidecar: server RSS with "
        "them held minus before, over sidecars; lag: the bucket bound of the server's largest event-loop lag; "
        "others: % of the machine's CPU used by other processes meanwhile"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main()))
