"""Injection webhook under load, over HTTPS, against `meshctl serve` in its own process.

Pods: a deterministic mix (benchmarks/pods.py, `--seed`): 1-4 containers, 0-3 ports each,
HTTP/TCP/gRPC/exec probes, Istio annotations on some, JSON from ~1 KiB to ~140 KiB
(median ~2 KiB); 5% opt out of injection. Requests pick pods from the mix in a seeded order.

Open loop: request i is due at start + i/rate whatever happened to earlier ones (as the API
server would), on up to 64 keep-alive connections, each with a 5 s timeout. Latency is timed
from the request's SCHEDULED time, so a client or connection pool that falls behind shows up
as latency instead of quietly lowering the rate; `lag p99` is how late the client itself
started sending (client-side queueing, included in the latencies). An error is a failed or
timed-out request, a non-200 status, or an answer that is not the expected one (allowed,
same uid, a patch exactly when the pod did not opt out).

    .venv/bin/python benchmarks/webhook_load.py [--rates 100 200 400] [--seconds 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import ssl
import sys
import time
from typing import Any

import aiohttp
from pods import Pod, mix
from serve import OtherLoad, meshctl_serve

POOL = 500
TIMEOUT = 5.0


def body(pod_json: bytes, uid: int) -> bytes:
    head = (
        b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"%d",'
        b'"kind":{"group":"","version":"v1","kind":"Pod"},"namespace":"shop","operation":"CREATE","object":' % uid
    )
    return head + pod_json + b"}}"


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


async def run(url: str, tls: ssl.SSLContext, pool: list[Pod], rate: float, seconds: float, seed: int) -> dict[str, Any]:
    count = int(rate * seconds)
    order = random.Random(seed).choices(range(len(pool)), k=count)
    encoded = [json.dumps(p.doc, separators=(",", ":")).encode() for p in pool]
    bodies = [body(encoded[order[i]], i) for i in range(count)]
    latencies: list[float] = []
    lags: list[float] = []
    errors: dict[str, int] = {}
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(ssl=tls, limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        for i in range(40):  # warm up connections and the server
            async with session.post(url, data=body(encoded[i % len(encoded)], i), headers=headers) as r:
                await r.read()

        async def one(i: int, due: float) -> None:
            lags.append(time.perf_counter() - due)
            problem = None
            try:
                async with session.post(url, data=bodies[i], headers=headers) as r:
                    answer = await r.json(content_type=None)
                    response = answer.get("response", {}) if r.status == 200 else {}
                    if r.status != 200:
                        problem = f"HTTP {r.status}"
                    elif response.get("uid") != str(i) or not response.get("allowed"):
                        problem = "not allowed or wrong uid"
                    elif bool(response.get("patch")) != pool[order[i]].inject:
                        problem = "patch missing" if pool[order[i]].inject else "unexpected patch"
            except TimeoutError:
                problem = "timeout"
            except (aiohttp.ClientError, ValueError) as e:
                problem = type(e).__name__
            latencies.append(time.perf_counter() - due)
            if problem:
                errors[problem] = errors.get(problem, 0) + 1

        tasks = []
        start = time.perf_counter() + 0.05
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies.sort()
    lags.sort()
    return {
        "requests": count,
        "errors": sum(errors.values()),
        "kinds": ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "",
        "rate": count / elapsed,
        "p50": pct(latencies, 50) * 1000,
        "p90": pct(latencies, 90) * 1000,
        "p99": pct(latencies, 99) * 1000,
        "max": latencies[-1] * 1000,
        "lag": pct(lags, 99) * 1000,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200, 400], help="requests per second")
    parser.add_argument("--seconds", type=float, default=10, help="length of each rate's run")
    parser.add_argument("--seed", type=int, default=1, help="seed of the pod mix and of the request order")
    args = parser.parse_args()
    if not all(0 < r <= 2000 for r in args.rates) or not 0 < args.seconds <= 120:
        parser.error("--rates must be in 1..2000 and --seconds in 1..120")
    pool = mix(args.seed, POOL)
    sizes = sorted(p.size for p in pool)
    containers = [len(p.doc["spec"]["containers"]) for p in pool]
    async with meshctl_serve("services: []\n") as server:
        url = f"https://127.0.0.1:{server.webhook_port}/inject"
        tls = ssl.create_default_context(cafile=str(server.root_cert))
        print(f"webhook: {url}, meshctl serve pid {server.pid}; open loop, keep-alive (<= 64 connections), 5 s timeout")
        print(
            f"pods: {POOL} distinct (seed {args.seed}), JSON median {pct(sizes, 50) / 1024:.1f} KiB, "
            f"p90 {pct(sizes, 90) / 1024:.1f} KiB, max {sizes[-1] / 1024:.1f} KiB; "
            f"1-4 containers (mean {sum(containers) / POOL:.2f}); {sum(not p.inject for p in pool)} opt out"
        )
        print(
            "latency from each request's scheduled send time, in ms; lag: how late the client started sending; "
            "others: % of the machine's CPU used by other processes meanwhile (noise)"
        )
        print(
            f"{'scenario':<22} {'requests':>8} {'errors':>6} {'rate/s':>7} {'p50':>7} {'p90':>7} {'p99':>7} "
            f"{'max':>7} {'lag p99':>7} {'others':>6}"
        )
        for rate in args.rates:
            load = OtherLoad(server.pid)
            r = await run(url, tls, pool, rate, args.seconds, args.seed + int(rate))
            others = load.percent()
            name = f"mixed pods at {rate:.0f}/s"
            print(
                f"{name:<22} {r['requests']:>8.0f} {r['errors']:>6.0f} {r['rate']:>7.1f} {r['p50']:>7.1f} "
                f"{r['p90']:>7.1f} {r['p99']:>7.1f} {r['max']:>7.1f} {r['lag']:>7.1f} {others:>6.0f}"
                + (f"  ({r['kinds']})" if r["kinds"] else ""),
                flush=True,
            )
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
