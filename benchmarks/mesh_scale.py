"""Thousands of xDS streams against a 1,000-service mesh: a connect storm, delta savings, the transport ceiling.

    .venv/bin/python benchmarks/mesh_scale.py [--sidecars 1000 5000] [--clients 4] [--out DIR]

Scenarios (each prints a line of the table; all go to DIR/mesh_scale.json, and a plot to DIR/mesh_scale.png
when matplotlib is installed, `pip install -e '.[bench]'`):

- storm: N simulated sidecars (the ones of `xds_push.py`: each its own HTTP/2 connection, ADS state of
  the world, Envoy-style ACKs) open their streams at the same instant against `meshctl serve` with a
  mesh file of 1,000 services. They run in `--clients` processes of their own (one Python process cannot
  drive thousands on these 2 cores), all started first and released together at one wall-clock instant.
  Measured: sidecars holding the full config, seconds until they all do, streams that ended and why,
  and the server's resident memory per held sidecar (RSS with them held minus RSS before, over N).
- delta: bytes the server's stream states send for one endpoint change (one workload's address) to a
  sidecar holding all 1,000 clusters, delta against state of the world.
- ceiling: the fan-out of one push (a service added: CDS and EDS to every sidecar) by `meshctl serve`,
  against a bare grpc.aio server writing the same serialized responses to as many streams; the ratio
  of their throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from serve import OtherLoad, cpu_seconds, meshctl_serve
from xds_push import Proxy, metrics, wait_all

SERVICES = 1000
MAX_SIDECARS = 10_000


def mesh(services: int = SERVICES, moved: int | None = None) -> str:
    """`services` services in 5 namespaces, one HTTP port and one workload each; `moved`: that
    service's workload gets another address (one endpoint change)."""
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


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


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


# -- client processes -----------------------------------------------------------------------


async def client(target: str, first: int, count: int, start_at: float, within: float) -> None:
    """Run sidecars first..first+count-1, all released at `start_at` (wall clock); report on stdout
    once they all hold their config (or `within` s passed), then hold the streams until stdin closes."""
    proxies = [Proxy(i, target) for i in range(first, first + count)]
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
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in proxies:
        await p.channel.close()


@contextlib.contextmanager
def clients(target: str, n: int, processes: int, within: float) -> object:
    """Start `processes` client processes sharing n sidecars; yield their reports once all are in."""
    start_at = time.time() + 3 + n / 2000  # imports and channel set-up of every process first
    procs = []
    share = -(-n // processes)
    for first in range(0, n, share):
        argv = [sys.executable, __file__, "--role", "client", "--target", target]
        argv += ["--first", str(first), "--count", str(min(share, n - first)), "--start-at", str(start_at)]
        argv += ["--within", str(within)]
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


def report_of(proc: subprocess.Popen[str]) -> dict[str, object]:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"client process {proc.pid} exited with {proc.wait()} before reporting")
    return dict(json.loads(line))


# -- scenarios ------------------------------------------------------------------------------


async def storm(n: int, processes: int) -> dict[str, object]:
    async with meshctl_serve(mesh()) as server:
        target = f"127.0.0.1:{server.xds_port}"
        await asyncio.sleep(2)  # the model is loaded and the first views built lazily; settle first
        before = rss_bytes(server.pid)
        overflows = listen_overflows()
        cpu = cpu_seconds(server.pid)
        load = OtherLoad(server.pid)
        within = 60 + n / 25
        with clients(target, n, processes, within) as procs:
            reports = await asyncio.gather(*(asyncio.to_thread(report_of, p) for p in procs))  # type: ignore[attr-defined]
            await asyncio.sleep(2)
            held = rss_bytes(server.pid)
            m = await metrics(server.admin_port)
            cpu = cpu_seconds(server.pid) - cpu
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
            "others": load.percent(),
        }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, nargs="+", default=[1000, 5000], help=f"per storm, <= {MAX_SIDECARS}")
    parser.add_argument("--clients", type=int, default=4, help="client processes for the simulated sidecars")
    parser.add_argument("--out", type=Path, default=Path("."), help="where mesh_scale.json and .png go")
    parser.add_argument("--role", choices=["main", "client"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--within", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "client":
        await client(args.target, args.first, args.count, args.start_at, args.within)
        return 0
    if not all(0 < n <= MAX_SIDECARS for n in args.sidecars) or args.clients < 1:
        parser.error(f"--sidecars must be 1..{MAX_SIDECARS}, --clients at least 1")
    results: dict[str, object] = {"storm": []}
    print(f"mesh: {SERVICES} services, one port and one workload each; sidecars in {args.clients} client processes")
    for n in args.sidecars:
        r = await storm(n, args.clients)
        results["storm"].append(r)  # type: ignore[attr-defined]
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main()))
