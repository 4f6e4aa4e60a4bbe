"""Kubernetes mode at cluster scale: `meshctl serve --kubernetes` against tests/fakekube.py's API server.

The fake API server (in this process, its own thread, plain HTTP on loopback) holds a cluster of
--services Services across 20 namespaces, --pods Pods (IP, one service account per Service, the
injector's `sidecar.istio.io/status` annotation) and one EndpointSlice per Service naming its
pods (one `http` port, 80 -> 8080). The control plane runs as a process of its own (`meshctl
serve --kubernetes --kubeconfig`, log level INFO to a file), or with --in-process as a
`ControlPlane` in this process's event loop. Measured per run:

1. seconds from starting the control plane until `/readyz` answers 200 (every kind listed once and
   the first model built), with the server's own log times for "lists done" and the model build;
2. the server's VmRSS and VmHWM (peak) from /proc at that point and after the sidecar got its
   config (subprocess mode only; in-process it would count the fake API server too);
3. for --changes EndpointSlice changes, each adding one ready endpoint (a pod created first, then
   its slice grown once that pod's own push went out), the ms until the server logs its push
   (subprocess) or its model holds the endpoint (--in-process), and until one simulated sidecar
   has the new ClusterLoadAssignment.
   The sidecar is a gRPC ADS client over TLS (the CA's trust bundle) with a pod-bound token that
   the fake API server's TokenReview accepts; it subscribes to CDS (wildcard) and to EDS for every
   EDS cluster it gets, ACKing as Envoy does, on incremental (delta) ADS as Meshplane's bootstrap
   asks for by default (--sotw: state of the world);
4. a 100-pod rollout of one Service (a pod created, then its slice grown, every 5 ms: 200 API
   changes): push rounds (`meshplane_xds_push_rounds_total`) and seconds until the sidecar has
   all the endpoints (20 s at most; endpoints still missing then are reported, and do not fail the
   benchmark: only a set-up that does not work does).

The server's log times (its INFO lines) break the time to ready down: when the watches started
(after the interpreter's start and imports, in subprocess mode), when every kind was listed once,
and how long the first model took to build.

    .venv/bin/python benchmarks/kube_scale.py [--services 1000] [--pods 5000] [--runs 1] [--changes 10]
                                              [--in-process] [--sotw]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from serve import cpu_seconds, first_string, free_port, requests_with_node

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))  # tests.fakekube lives in the checkout, not in the installed package

T = "type.googleapis.com/envoy."
CDS, EDS = T + "config.cluster.v3.Cluster", T + "config.endpoint.v3.ClusterLoadAssignment"
NAMESPACES = 20
SIDECAR = ("sidecar-0", "ns-0", "bench-client", "10.250.0.1")  # pod, namespace, service account, IP
TOKEN = "bench-projected-token"
ROLLOUT = 100
MAX_PODS = 60_000
STATUS = json.dumps({"containers": ["istio-proxy"], "initContainers": ["istio-init"], "version": "bench"})


def pod_ip(j: int) -> str:
    return f"10.{1 + j // 62_500}.{j // 250 % 250}.{j % 250 + 1}"


def fill(kube: Any, services: int, pods: int) -> None:
    """The cluster: namespaces, services, pods (pod j belongs to service j % services), slices."""
    from tests.fakekube import endpoint_slice, namespace, pod, service

    for n in range(NAMESPACES):
        kube.create(namespace(f"ns-{n}", labels={"istio-injection": "enabled"}))
    for j in range(pods):
        s = j % services
        kube.create(bench_pod(pod, f"svc-{s}-{j // services}", s, pod_ip(j)))
    for s in range(services):
        ns = f"ns-{s % NAMESPACES}"
        kube.create(
            service(
                f"svc-{s}",
                ns,
                ports=[("http", 80)],
                selector={"app": f"svc-{s}"},
                cluster_ip=f"10.96.{s // 250}.{s % 250 + 1}",
            )
        )
        kube.create(slice_of(endpoint_slice, s, members_of(s, services, pods)))
    name, ns, sa, ip = SIDECAR
    kube.create(pod(name, ns, ip=ip, service_account=sa, labels={"app": "client"}, annotations={STATUS_KEY: STATUS}))
    kube.add_token(TOKEN, ns, sa, audiences=["meshplane"], pod_name=name)


STATUS_KEY = "sidecar.istio.io/status"


def members_of(s: int, services: int, pods: int) -> list[tuple[str, str]]:
    """(pod name, IP) of service `s`'s pods in the cluster `fill` makes."""
    return [(f"svc-{s}-{j // services}", pod_ip(j)) for j in range(s, pods, services)]


def bench_pod(pod: Callable[..., Any], name: str, s: int, ip: str) -> Any:
    return pod(
        name,
        f"ns-{s % NAMESPACES}",
        ip=ip,
        labels={"app": f"svc-{s}", "version": "v1"},
        annotations={STATUS_KEY: STATUS},
        service_account=f"sa-svc-{s}",
    )


def slice_of(endpoint_slice: Callable[..., Any], s: int, members: list[tuple[str, str]]) -> Any:
    return endpoint_slice(
        f"svc-{s}-abcde",
        f"ns-{s % NAMESPACES}",
        f"svc-{s}",
        addresses=[ip for _, ip in members],
        target_pods=[name for name, _ in members],
        ports=[("http", 8080)],
    )


def cluster_name(s: int) -> str:
    return f"outbound|80||svc-{s}.ns-{s % NAMESPACES}.svc.cluster.local"


# --- the control plane -------------------------------------------------------------------------


@dataclass
class Plane:
    admin_port: int
    xds_port: int
    ca_dir: Path
    pid: int | None = None  # subprocess mode
    log: Path | None = None
    started_wall: float = 0.0
    model_times: list[tuple[float, Any]] = field(default_factory=list)  # in-process: (perf_counter, services)
    control_plane: Any = None  # in-process: the ControlPlane


@contextlib.asynccontextmanager
async def subprocess_plane(kubeconfig: Path, work: Path) -> AsyncIterator[Plane]:
    ports = {"xds-tls": free_port(), "admin": free_port(), "webhook": free_port()}
    argv = [
        sys.executable,
        "-m",
        "meshplane.controlplane.cli",
        "--log-level",
        "info",
        "serve",
        "--kubernetes",
        "--kubeconfig",
        str(kubeconfig),
        "--bind",
        "127.0.0.1",
        "--ca-dir",
        str(work / "ca"),
        "--state-dir",
        str(work / "state"),
        "--shutdown-delay",
        "0s",
    ]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    log = work / "server.log"
    started = time.time()
    process = launch(argv, log)
    try:
        yield Plane(ports["admin"], ports["xds-tls"], work / "ca", process.pid, log, started)
    finally:
        terminate(process, 15)
        if process.returncode not in (0, -signal.SIGTERM):
            print(f"        server exited with status {process.returncode}; log tail:", flush=True)
            print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]), flush=True)


@contextlib.asynccontextmanager
async def in_process_plane(kubeconfig: Path, work: Path) -> AsyncIterator[Plane]:
    from meshplane.controlplane.app import ControlPlane
    from meshplane.controlplane.settings import Settings

    plane = ControlPlane(
        Settings(
            kubernetes=True,
            kubeconfig=kubeconfig,
            bind="127.0.0.1",
            xds_tls_port=0,
            admin_port=0,
            webhook_port=0,
            ca_dir=work / "ca",
            state_dir=work / "state",
            shutdown_delay=0,
        )
    )
    log = work / "server.log"  # the same lines as the subprocess's log, from this process's loggers
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger = logging.getLogger("meshplane")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    started = time.time()
    await plane.start()
    record = Plane(plane.admin_port, plane.xds_tls_port, work / "ca", log=log, started_wall=started)
    record.control_plane = plane
    set_cluster = plane.registry.set_cluster

    def spy(services: Any, workloads: Any) -> None:  # when the model takes the cluster's view
        set_cluster(services, workloads)
        record.model_times.append((time.perf_counter(), services))

    plane.registry.set_cluster = spy  # type: ignore[method-assign]
    try:
        yield record
    finally:
        await plane.stop()
        logger.removeHandler(handler)
        handler.close()


def launch(argv: list[str], log: Path, cwd: Path = TOP, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`argv` in a session (and process group) of its own, its output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def terminate(process: subprocess.Popen[bytes], within: float) -> None:
    """SIGTERM to `process`'s group, SIGKILL to it after `within` s; waits for `process`."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(within)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


async def pushed_after(plane: Plane, wall: float, within: float) -> bool:
    """Wait until the server logs a push started after `wall` (epoch s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(w >= wall for w in log_times(plane.log, "pushing to")):
            return True
        await asyncio.sleep(0.05)
    return False


class Others:
    """The share of the machine's CPU (all cores, %) used by processes other than `pids` over a span."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(cpu[:8]) - cpu[3] - cpu[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        return time.monotonic(), busy, sum(cpu_seconds(p) for p in self.pids)

    def percent(self) -> float:
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._sample()
        return max(0.0, 100 * ((busy1 - busy0) - (ours1 - ours0)) / ((t1 - t0) * (os.cpu_count() or 1)))


def memory(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM of `pid`, MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def log_times(log: Path | None, text: str) -> list[float]:
    """Wall-clock times (epoch s) of the server's log lines containing `text`."""
    if log is None or not log.exists():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if text in line:
            with contextlib.suppress(ValueError):
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                out.append(stamp.timestamp())
    return out


async def metric(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


async def wait_ready(plane: Plane, within: float) -> float:
    """Seconds from the start until /readyz is 200 (polled every 20 ms)."""
    deadline = time.time() + within
    async with aiohttp.ClientSession() as s:
        while time.time() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(f"http://127.0.0.1:{plane.admin_port}/readyz") as r:
                    if r.status == 200:
                        return time.time() - plane.started_wall
            if plane.pid is not None and not Path(f"/proc/{plane.pid}").exists():
                raise RuntimeError("the control plane exited before it was ready")
            await asyncio.sleep(0.02)
    raise RuntimeError(f"/readyz not 200 within {within:.0f} s")


# --- one simulated sidecar ----------------------------------------------------------------------


class Sidecar:
    """CDS (wildcard) and EDS for every EDS cluster, over TLS with a pod-bound token, as Envoy does:
    incremental (delta) ADS, as the bootstrap Meshplane writes asks for by default, or with
    `delta=False` state of the world."""

    def __init__(self, target: str, trust_bundle: bytes, *, delta: bool = True) -> None:
        name, ns, sa, ip = SIDECAR
        meta = struct_pb2.Struct()
        meta.update({"NAMESPACE": ns, "NAME": name, "SERVICE_ACCOUNT": sa, "INSTANCE_IPS": ip})
        self.node = base_pb2.Node(id=f"sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local", metadata=meta)
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=trust_bundle),
            grpc.access_token_call_credentials(TOKEN),
        )
        self.channel = grpc.aio.secure_channel(target, creds, options=[("grpc.max_receive_message_length", 1 << 28)])
        self.delta = delta
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.state = {CDS: ["", "", []], EDS: ["", "", []]}  # version, nonce, subscribed names
        self.clusters: dict[str, str] = {}  # cluster -> its EDS name ("" when not EDS)
        self.endpoints: dict[str, tuple[bytes, frozenset[str]]] = {}  # cluster -> (CLA bytes, IPs)
        self.changed = asyncio.Event()
        self.ended: str | None = None
        self.responses = {CDS: 0, EDS: 0}
        self.eds_bytes = 0
        self.task: asyncio.Task[None] | None = None

    def send(self, type_url: str, subscribe: list[str] | None = None, unsubscribe: list[str] | None = None) -> None:
        version, nonce, names = self.state[type_url]
        if self.delta:
            self.queue.put_nowait(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    response_nonce=nonce,
                    resource_names_subscribe=subscribe or [],
                    resource_names_unsubscribe=unsubscribe or [],
                )
            )
        else:
            self.queue.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url, version_info=version, response_nonce=nonce, resource_names=names
                )
            )

    def requests(self) -> AsyncIterator[Any]:
        return requests_with_node(self.queue, self.node)

    async def run(self) -> None:
        self.send(CDS)  # names nothing: the wildcard, in both protocols
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        rpc = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
        try:
            async for resp in rpc(self.requests()):
                self.on_response(resp)
            self.ended = "closed by the server"
        except grpc.aio.AioRpcError as e:
            self.ended = f"{e.code().name}: {e.details()}"
        finally:
            self.changed.set()

    def on_response(self, resp: Any) -> None:
        state = self.state.get(resp.type_url)
        if state is None:
            return
        state[0], state[1] = getattr(resp, "version_info", "") or getattr(resp, "system_version_info", ""), resp.nonce
        self.responses[resp.type_url] += 1
        # (name, serialized message) of what the response carries; delta responses also name removals.
        if self.delta:
            carried = [(r.name, r.resource.value) for r in resp.resources]
            removed = list(resp.removed_resources)
        else:
            carried = [("", r.value) for r in resp.resources]
            removed = []
        if resp.type_url == CDS:
            if not self.delta:
                self.clusters = {}
            for name in removed:
                self.clusters.pop(name, None)
            for _, value in carried:
                c = cluster_pb2.Cluster.FromString(value)
                eds = c.eds_cluster_config.service_name or c.name if c.type == cluster_pb2.Cluster.EDS else ""
                self.clusters[c.name] = eds
            wanted = sorted(n for n in self.clusters.values() if n)
            if wanted != self.state[EDS][2]:
                before = set(self.state[EDS][2])
                self.state[EDS][2] = wanted
                # The new subscription first, then the CDS ACK (Envoy's ADS mux order).
                self.send(EDS, sorted(set(wanted) - before), sorted(before - set(wanted)))
        else:
            self.eds_bytes = resp.ByteSize()
            if not self.delta:
                removed = [n for n in self.endpoints if n not in {first_string(v) for _, v in carried}]
            for name in removed:
                self.endpoints.pop(name, None)
            for _, value in carried:
                seen = self.endpoints.get(first_string(value))
                if seen is not None and seen[0] == value:
                    continue
                cla = endpoint_pb2.ClusterLoadAssignment.FromString(value)
                ips = frozenset(
                    e.endpoint.address.socket_address.address for g in cla.endpoints for e in g.lb_endpoints
                )
                self.endpoints[cla.cluster_name] = (value, ips)
        self.send(resp.type_url)  # the ACK
        self.changed.set()

    def has(self, cluster: str, ips: set[str]) -> bool:
        got = self.endpoints.get(cluster)
        return got is not None and ips <= got[1]

    async def until(self, check: Callable[[], bool], within: float) -> float | None:
        """perf_counter time at which `check()` first held (None: not within `within` s)."""
        deadline = time.perf_counter() + within
        while self.ended is None:
            if check():
                return time.perf_counter()
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - time.perf_counter())
            except TimeoutError:
                return None
        return None


# --- one run ----------------------------------------------------------------------------------------


@dataclass
class Result:
    ready: float = float("nan")
    watching: float = float("nan")
    lists: float = float("nan")
    build_ms: float = float("nan")
    rss: float = float("nan")
    hwm: float = float("nan")
    rss_after: float = float("nan")
    hwm_after: float = float("nan")
    initial: float = float("nan")
    server: list[float] = field(default_factory=list)  # ms: push log line (subprocess) or model (in-process)
    sidecar: list[float] = field(default_factory=list)
    missed: int = 0
    pushes: float = float("nan")
    rollout_s: float = float("nan")
    rollout_missing: int = 0
    others: float = float("nan")
    responses: str = ""
    ended: str | None = None


async def run_once(args: argparse.Namespace) -> Result:
    from tests.fakekube import FakeKube

    result = Result()
    work = Path(tempfile.mkdtemp(prefix="meshplane-kube-bench-"))
    kube = FakeKube(history=100_000)
    kube.start()
    try:
        t = time.perf_counter()
        fill(kube, args.services, args.pods)
        print(f"        cluster filled in {time.perf_counter() - t:.1f} s", flush=True)
        kubeconfig = kube.write_kubeconfig(work / "kubeconfig")
        start = in_process_plane if args.in_process else subprocess_plane
        async with start(kubeconfig, work) as plane:
            load = Others([os.getpid()] + ([plane.pid] if plane.pid is not None else []))
            result.ready = await wait_ready(plane, 300)
            if plane.pid is not None:
                result.rss, result.hwm = memory(plane.pid)
            watching = log_times(plane.log, ": watching ")
            result.watching = watching[0] - plane.started_wall if watching else float("nan")
            listed = log_times(plane.log, "first list of every watched kind done")
            result.lists = listed[0] - plane.started_wall if listed else float("nan")
            for line in (plane.log.read_text(errors="replace") if plane.log else "").splitlines():
                if "first view of the cluster" in line:
                    result.build_ms = float(line.rsplit("(", 1)[1].split()[0])

            bundle = (plane.ca_dir / "trust-bundle.pem").read_bytes()
            sidecar = Sidecar(f"127.0.0.1:{plane.xds_port}", bundle, delta=not args.sotw)
            try:
                await measure(args, kube, plane, sidecar, result)
                result.others = load.percent()
            finally:  # the stream ends before the server does
                await sidecar.channel.close()
                if sidecar.task is not None:
                    await asyncio.gather(sidecar.task, return_exceptions=True)
    finally:
        kube.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result


async def measure(args: argparse.Namespace, kube: Any, plane: Plane, sidecar: Sidecar, result: Result) -> None:
    """The sidecar's first config, then the slice changes and the rollout (figures 3 and 4)."""
    from tests.fakekube import endpoint_slice, pod

    # The sidecar: connect, and wait for CDS and every cluster's endpoints.
    t0 = time.perf_counter()
    sidecar.task = asyncio.create_task(sidecar.run())
    full = await sidecar.until(
        lambda: bool(sidecar.state[EDS][2]) and set(sidecar.state[EDS][2]) <= set(sidecar.endpoints), 120
    )
    if full is None:
        result.ended = sidecar.ended or "no full config within 120 s"
        return
    result.initial = full - t0
    await asyncio.sleep(1)
    if plane.pid is not None:
        result.rss_after, result.hwm_after = memory(plane.pid)

    # EndpointSlice changes, one endpoint added each (pods past --pods are the added ones).
    counted = dict(sidecar.responses)
    extra = args.pods
    for c in range(args.changes):
        s = (7 * c + 3) % args.services
        members = members_of(s, args.services, args.pods)
        name, ip = f"added-{extra}", pod_ip(extra)
        extra += 1
        created = time.time()
        kube.create(bench_pod(pod, name, s, ip))
        await pushed_after(plane, created, 10)  # the pod's own rebuild and push pass first
        await asyncio.sleep(0.3)
        members.append((name, ip))
        marks = len(plane.model_times)
        wall0, t0 = time.time(), time.perf_counter()
        kube.update(slice_of(endpoint_slice, s, members))
        got = await sidecar.until(lambda s=s, ip=ip: sidecar.has(cluster_name(s), {ip}), 30)  # type: ignore[misc]
        if got is None:
            result.missed += 1
        else:
            result.sidecar.append((got - t0) * 1000)
        if plane.pid is not None:
            pushed = [w for w in log_times(plane.log, "pushing to") if w >= wall0 - 0.001]
            if pushed:
                result.server.append((pushed[0] - wall0) * 1000)
        else:
            for when, services in plane.model_times[marks:]:
                if has_endpoint(services, f"svc-{s}", ip):
                    result.server.append((when - t0) * 1000)
                    break
        await asyncio.sleep(0.5)

    result.responses = (
        f"CDS {sidecar.responses[CDS] - counted[CDS]}, EDS {sidecar.responses[EDS] - counted[EDS]} "
        f"({sidecar.eds_bytes / 1024:.0f} KiB each)"
    )

    # A rollout: ROLLOUT pods for one service (not one changed above), the slice grown after each.
    s = 1 % args.services
    members = members_of(s, args.services, args.pods)
    await asyncio.sleep(1)
    before = await metric(plane.admin_port, "meshplane_xds_push_rounds_total")
    t0 = time.perf_counter()
    for i in range(ROLLOUT):
        name, ip = f"rollout-{i}", pod_ip(extra + i)
        kube.create(bench_pod(pod, name, s, ip))
        members.append((name, ip))
        kube.update(slice_of(endpoint_slice, s, members))
        await asyncio.sleep(0.005)
    want = {ip for _, ip in members}
    got = await sidecar.until(lambda: sidecar.has(cluster_name(s), want), 20)
    if got is None:
        have = sidecar.endpoints.get(cluster_name(s), (b"", frozenset()))[1]
        result.rollout_missing = len(want - have)
        if plane.control_plane is not None:  # where they are: the watch's store, the model?
            cp = plane.control_plane
            stored = cp.source.stores["EndpointSlice"][(f"ns-{s % NAMESPACES}", f"svc-{s}-abcde")]
            in_store = sum(len(e.get("addresses", ())) for e in stored.get("endpoints", ()))
            svc = next(x for x in cp.registry.model.services if x.name == f"svc-{s}")
            print(
                f"        rollout: {len(want)} endpoints wanted; the control plane's watch store has "
                f"{in_store}, its model {len(svc.endpoints or ())}, the sidecar {len(want & have)}",
                flush=True,
            )
    else:
        result.rollout_s = got - t0
    await asyncio.sleep(2)  # let the last debounced push go out
    result.pushes = await metric(plane.admin_port, "meshplane_xds_push_rounds_total") - before
    result.ended = sidecar.ended


def has_endpoint(services: Any, name: str, ip: str) -> bool:
    for svc in services:
        if svc.name == name:
            return any(e.workload.address == ip for e in svc.endpoints or ())
    return False


# --- output -----------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=1, help="each with a fresh API server and control plane")
    parser.add_argument("--changes", type=int, default=10, help="EndpointSlice changes timed per run")
    parser.add_argument("--in-process", action="store_true", help="run the control plane in this process")
    parser.add_argument("--sotw", action="store_true", help="the sidecar speaks state-of-the-world ADS, not delta")
    args = parser.parse_args()
    if not (0 < args.services <= args.pods <= MAX_PODS - 1000) or not 0 < args.runs <= 10 or not 0 < args.changes <= 50:
        parser.error(f"need 0 < --services <= --pods <= {MAX_PODS - 1000}, --runs 1..10, --changes 1..50")
    mode = "in-process ControlPlane" if args.in_process else "meshctl serve --kubernetes (own process)"
    mode += ", sidecar on state-of-the-world ADS" if args.sotw else ", sidecar on delta ADS"
    server_what = "model" if args.in_process else "push log"
    print(
        f"cluster: {args.services} Services in {NAMESPACES} namespaces, {args.pods} Pods, {args.services} "
        f"EndpointSlices; {mode}; {args.changes} slice changes and a {ROLLOUT}-pod rollout per run",
        flush=True,
    )
    results: list[Result] = []
    for run in range(1, args.runs + 1):
        print(f"=== run {run} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} loadavg {os.getloadavg()}")
        cpu0 = cpu_seconds(os.getpid())
        r = await run_once(args)
        results.append(r)
        print(
            f"        ready {r.ready:.2f} s (watches started {r.watching:.2f} s, lists done {r.lists:.2f} s, "
            f"model {r.build_ms:.0f} ms); sidecar's config {r.initial:.2f} s after connecting"
            + (
                f"; RSS {r.rss:.1f} MiB, peak {r.hwm:.1f} MiB at ready, RSS {r.rss_after:.1f} MiB, "
                f"peak {r.hwm_after:.1f} MiB with the sidecar served"
                if not args.in_process
                else ""
            ),
            flush=True,
        )
        print(
            f"        slice change -> {server_what} p50 {spread([med(r.server)], '{:.0f}')} ms "
            f"(all: {sorted(round(v) for v in r.server)}), -> sidecar p50 {med(r.sidecar):.0f} ms "
            f"(all: {sorted(round(v) for v in r.sidecar)}), missed {r.missed}, responses to the sidecar meanwhile: "
            f"{r.responses}; rollout: {r.pushes:.0f} push rounds, "
            f"all endpoints at the sidecar after {r.rollout_s:.2f} s (missing {r.rollout_missing}); "
            f"stream ended: {r.ended}; benchmark process CPU {cpu_seconds(os.getpid()) - cpu0:.0f} s; "
            f"others {r.others:.0f}%",
            flush=True,
        )
    print(f"--- {len(results)} run(s), median (range)")

    def of(attr: str, fmt: str = "{:.2f}") -> str:
        return spread([getattr(r, attr) for r in results], fmt)

    print(
        f"time to ready: {of('ready')} s; watches started at {of('watching')} s, lists done at {of('lists')} s, "
        f"first model built in {of('build_ms', '{:.0f}')} ms"
    )
    if not args.in_process:
        print(
            f"server memory at ready: VmRSS {of('rss', '{:.1f}')} MiB, VmHWM {of('hwm', '{:.1f}')} MiB; "
            f"one sidecar served: VmRSS {of('rss_after', '{:.1f}')} MiB, VmHWM {of('hwm_after', '{:.1f}')} MiB"
        )
    print(f"sidecar's full config (CDS + {args.services} CLAs) after connecting: {of('initial')} s")
    server_ms = spread([med(r.server) for r in results], "{:.0f}")
    sidecar_ms = spread([med(r.sidecar) for r in results], "{:.0f}")
    print(
        f"one endpoint added to a slice -> {server_what}: {server_ms} ms; -> the sidecar's ClusterLoadAssignment: "
        f"{sidecar_ms} ms (median of {args.changes} per run); missed {sum(r.missed for r in results)}"
    )
    print(
        f"{ROLLOUT}-pod rollout ({2 * ROLLOUT} API changes): {of('pushes', '{:.0f}')} push rounds; all endpoints "
        f"at the sidecar in {sum(r.rollout_s == r.rollout_s for r in results)} of {len(results)} runs, after "
        f"{of('rollout_s')} s; endpoints never arriving {sum(r.rollout_missing for r in results)}"
    )
    print(f"others (CPU of other processes, % of the machine): {of('others', '{:.0f}')}")
    lost = sum(r.missed + r.rollout_missing for r in results)
    if lost:
        print(
            f"WARNING: {lost} endpoint(s) never reached the sidecar (20-30 s): the control plane lost a change "
            "(see docs/performance.md, 'Kubernetes at scale')"
        )
    # A lost change is a figure of the product, reported above; only a broken set-up fails the benchmark.
    return 0 if all(r.ended is None and r.initial == r.initial for r in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
