"""What the sidecars cost the data plane, with real Envoys in network namespaces (scenario 8).

    sudo .venv/bin/python benchmarks/dataplane.py [--rate 1000] [--seconds 10] [--runs 3] [--starts 5]

Two measurements, each against a lab of its own (`tests/meshlab.py`: `meshctl serve`, pods on a
bridge, the real capture rules, stock Envoy from the shipped bootstrap, STRICT mTLS):

- **Latency added**: the same HTTP/1.1 load (keep-alive, `--connections` connections, `--rate`
  requests per second paced per connection, as fortio does) from a client pod to a server pod,
  once directly between two plain pods (no capture, no sidecar) and once through both sidecars
  (the client's app calls the service address; its sidecar sends mTLS to the server's sidecar).
  Latency is from writing a request to reading its whole answer; the added figures are the
  differences of the percentiles, run by run, and their median. Istio publishes +0.228 ms p90 and
  +0.298 ms p99 for the same set-up (its 1.24 performance page, 1,000 rps, 2 worker threads).
- **Pod start to traffic**: a new pod (namespace, capture rules, token, bootstrap, Envoy) whose app
  calls the service in a loop from the moment its Envoy starts; the time until the first answer,
  from Envoy's start and from the pod's creation.

The client and server are small asyncio programs run with the system Python as the app uid; they
share the 2 cores with both Envoys and the control plane, as an app would. Prints a table; `--json`
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))  # tests.meshlab lives in the checkout, not in the installed package

from tests.meshlab import (  # noqa: E402
    APP_UID,
    BACKEND_CLUSTER,
    BACKEND_VIP,
    SYSTEM_PYTHON,
    MeshLab,
    Pod,
    mesh_text,
    wait_for,
)

PORT = 9080
MAX_SECONDS = 60
MAX_RATE = 5000

# A minimal HTTP/1.1 keep-alive server: the same fixed answer to every request, one event loop.
SERVER = """
import asyncio, sys, time
port = int(sys.argv[1])
BODY = b"ok"
ANSWER = b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\ncontent-type: text/plain\\r\\n\\r\\n" + BODY
async def serve(r, w):
    try:
        while True:
            head = await r.readuntil(b"\\r\\n\\r\\n")
            w.write(ANSWER)
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        w.close()
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", port, backlog=1024)
    await asyncio.sleep(900)  # bounded, in case a kill is missed
asyncio.run(main())
"""

# The load: `conns` keep-alive connections, each paced at rate/conns; one JSON line of latencies (ms).
CLIENT = """
import asyncio, json, sys, time
host, port, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[5])
rate, seconds = float(sys.argv[3]), float(sys.argv[4])
REQ = f"GET / HTTP/1.1\\r\\nhost: {host}\\r\\n\\r\\n".encode()
lat, errors, late = [], [], []
async def one(k, start):
    r, w = await asyncio.open_connection(host, port)
    n = int(rate * seconds / conns)
    for i in range(n):
        due = start + (i + k / conns) * conns / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late.append(-delay)
        t0 = time.perf_counter()
        w.write(REQ)
        try:
            head = await asyncio.wait_for(r.readuntil(b"\\r\\n\\r\\n"), 5)
            length = int(head.lower().split(b"content-length:")[1].split(b"\\r\\n")[0])
            await asyncio.wait_for(r.readexactly(length), 5)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}"[:120])
            w.close()
            r, w = await asyncio.open_connection(host, port)
            continue
        ok = head.startswith(b"HTTP/1.1 200")
        (lat if ok else errors).append((time.perf_counter() - t0) * 1000 if ok else head[:60].decode())
    w.close()
async def main():
    # warm-up: connections open and one request each, outside the measurement
    start = time.monotonic() + 0.5
    await asyncio.gather(*(one(k, start) for k in range(conns)))
asyncio.run(main())
late.sort()
print(json.dumps({"ms": lat, "errors": errors[:20], "error_count": len(errors),
                  "late_p99_ms": 1000 * late[int(len(late) * 0.99)] if late else 0.0}))
"""


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = {q: ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] for q in (50, 90, 99)}
    return {f"p{q}": round(v, 3) for q, v in pick.items()}


def load(lab: MeshLab, client: Pod, host: str, rate: float, seconds: float, conns: int) -> dict[str, Any]:
    proc = lab.spawn(client.ns, SYSTEM_PYTHON, "-c", CLIENT, host, str(PORT), str(rate), str(seconds), str(conns),
                     uid=APP_UID)  # fmt: skip
    out, _ = proc.communicate(timeout=seconds + 30)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if not result["ms"]:
        raise SystemExit(f"no request answered from {client.name} to {host}: {result['errors']}")
    return result


def serve_app(lab: MeshLab, pod: Pod) -> None:
    lab.spawn(pod.ns, SYSTEM_PYTHON, "-c", SERVER, str(PORT), uid=APP_UID, log=pod.dir / "server.log")


def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with MeshLab(mesh=mesh_text("STRICT", other=False)) as lab:
        lab.plane.start()
        front = lab.add_pod("frontend", {"app": "frontend"}, service_account="frontend", app_port=None)
        back = lab.add_pod("backend-1", {"app": "backend"}, service_account="backend", app_port=None)
        plain_client = lab.add_pod("plain-client", {}, service_account="plain", app_port=None, capture=False)
        plain_server = lab.add_pod("plain-server", {}, service_account="plain", app_port=None, capture=False)
        for pod in (back, plain_server):
            serve_app(lab, pod)
        for pod in (front, back):
            lab.wait_sidecar(pod)
        lab.wait_endpoints(front, BACKEND_CLUSTER, [back.ip])
        wait_for(lambda: _answered(lab, plain_client, plain_server.ip), what="the plain server")
        load(lab, front, BACKEND_VIP, 200, 1, args.connections)  # warm both paths' connection pools
        for run in range(1, args.runs + 1):
            # Alternate the order so neither path always runs on a warmer (or busier) machine.
            order = [("direct", plain_client, plain_server.ip), ("sidecars", front, BACKEND_VIP)]
            for name, client, host in order if run % 2 else reversed(order):
                result = load(lab, client, host, args.rate, args.seconds, args.connections)
                rows.append({"run": run, "path": name, "requests": len(result["ms"]),
                             "errors": result["error_count"], "late_p99_ms": round(result["late_p99_ms"], 2),
                             **percentiles(result["ms"])})  # fmt: skip
                print(_row(rows[-1]), flush=True)
        tls = front.admin.stats(r"cluster\.outbound\|9080\|\|backend.*ssl\.handshake")
        print(f"# frontend sidecar's TLS handshakes to the backend: {tls}")
        if not any(tls.values()):
            raise SystemExit("the sidecar path did not use mTLS: the figures would not be what they claim")
    return rows


def starts(args: argparse.Namespace) -> list[dict[str, float]]:
    out = []
    with MeshLab(mesh=mesh_text("STRICT", other=False)) as lab:
        lab.plane.start()
        back = lab.add_pod("backend-1", {"app": "backend"}, service_account="backend", app_port=None)
        serve_app(lab, back)
        lab.wait_sidecar(back)
        for i in range(args.starts):
            t0 = time.monotonic()
            pod = lab.add_pod(f"client-{i}", {"app": "frontend"}, service_account="frontend", app_port=None,
                              sidecar=False)  # fmt: skip
            created = time.monotonic() - t0
            lab.start_sidecar(pod)
            t1 = time.monotonic()
            # The app calls the service from the moment its Envoy starts, every 10 ms, until answered.
            wait_for(
                lambda p=pod: _answered(lab, p, BACKEND_VIP), timeout=30, interval=0.01, what=f"{pod.name}'s traffic"
            )
            done = time.monotonic()
            out.append({"pod": i, "setup_s": round(created, 3), "envoy_to_traffic_s": round(done - t1, 3),
                        "pod_to_traffic_s": round(done - t0, 3)})  # fmt: skip
            print(f"pod {i}: namespace + capture + token + bootstrap {created:.2f} s, "
                  f"Envoy start -> first answer {done - t1:.2f} s, pod start -> first answer {done - t0:.2f} s",
                  flush=True)  # fmt: skip
    return out


def _answered(lab: MeshLab, pod: Pod, host: str) -> bool:
    """One request from `pod`'s app to `host` was answered (a fresh client process: what an app does)."""
    proc = lab.spawn(pod.ns, SYSTEM_PYTHON, "-c", CLIENT, host, str(PORT), "100", "0.01", "1", uid=APP_UID)
    out, _ = proc.communicate(timeout=15)
    return bool(out.strip() and json.loads(out.strip().splitlines()[-1])["ms"])


def _row(r: dict[str, Any]) -> str:
    return (
        f"run {r['run']} {r['path']:>8} {r['requests']:>6} requests, {r['errors']} errors, "
        f"p50 {r['p50']:.3f} p90 {r['p90']:.3f} p99 {r['p99']:.3f} ms (client late p99 {r['late_p99_ms']} ms)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000, help="requests per second (default 1000)")
    p.add_argument("--seconds", type=float, default=10, help="seconds per measurement (default 10)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    p.add_argument("--runs", type=int, default=3, help="runs of each path (default 3)")
    p.add_argument("--starts", type=int, default=5, help="pods started for the start-to-traffic figure (default 5)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    if not 0 < args.rate <= MAX_RATE or not 0 < args.seconds <= MAX_SECONDS:
        p.error(f"--rate must be in (0, {MAX_RATE}] and --seconds in (0, {MAX_SECONDS}]")
    rows = latency(args)
    added: dict[str, float] = {}
    for q in ("p50", "p90", "p99"):
        diffs = []
        for run in range(1, args.runs + 1):
            by_path = {r["path"]: r[q] for r in rows if r["run"] == run}
            diffs.append(by_path["sidecars"] - by_path["direct"])
        added[q] = round(statistics.median(diffs), 3)
    direct = {q: statistics.median(r[q] for r in rows if r["path"] == "direct") for q in ("p50", "p90", "p99")}
    print(f"added by two sidecars with mTLS at {args.rate:g} rps (median of {args.runs} runs): "
          f"p50 +{added['p50']:.3f} ms, p90 +{added['p90']:.3f} ms, p99 +{added['p99']:.3f} ms "
          f"(direct p50 {direct['p50']:.3f}, p90 {direct['p90']:.3f}, p99 {direct['p99']:.3f} ms)")  # fmt: skip
    started = starts(args)
    median_start = statistics.median(s["pod_to_traffic_s"] for s in started)
    median_envoy = statistics.median(s["envoy_to_traffic_s"] for s in started)
    print(f"pod start -> traffic flowing: median {median_start:.2f} s ({median_envoy:.2f} s from Envoy's start), "
          f"{len(started)} pods")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"latency": rows, "added_ms": added, "starts": started}, indent=2) + "\n")


if __name__ == "__main__":
    main()
