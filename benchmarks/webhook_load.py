"""Injection webhook under load, over HTTPS, against `meshctl serve` in its own process.

Open loop: request i is sent at start + i/rate whatever happened to earlier ones (as the API
server would), on keep-alive connections, each with a 5 s timeout. Prints p50/p99/max latency,
the achieved rate and errors for: a small pod at 200 requests/s, and a 64 KiB pod.
Targets on the project's 2-core machine: p99 < 10 ms at 200/s, < 50 ms for 64 KiB, no errors.

    .venv/bin/python benchmarks/webhook_load.py [--rate 200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import time
from typing import Any

import aiohttp
from serve import meshctl_serve


def review(pod: dict[str, Any], uid: int) -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uid),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "shop",
                "operation": "CREATE",
                "object": pod,
            },
        }
    ).encode()


def small_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "nginx",
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                }
            ]
        },
    }


def big_pod(size: int = 64 * 1024) -> dict[str, Any]:
    """A realistic large pod: many env vars and annotations, padded to `size` bytes of JSON."""
    pod = small_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": f"SETTING_{i}", "value": "x" * 40} for i in range(400)]
    pod["metadata"]["annotations"] = {}
    i = 0
    while len(json.dumps(pod)) < size:
        pod["metadata"]["annotations"][f"example.com/note-{i}"] = "y" * 100
        i += 1
    return pod


async def run(url: str, tls: ssl.SSLContext, body_for: Any, rate: float, seconds: float) -> dict[str, float]:
    count = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(ssl=tls, limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        for i in range(20):  # warm up connections and the server
            async with session.post(url, data=body_for(i)) as r:
                await r.read()

        async def one(i: int) -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with session.post(url, data=body_for(i), headers={"content-type": "application/json"}) as r:
                    answer = await r.json()
                    if r.status != 200 or not answer["response"].get("patch"):
                        errors += 1
                        return
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                errors += 1
                return
            latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": count,
        "errors": errors,
        "rate": count / elapsed,
        "p50": q[49] * 1000,
        "p99": q[98] * 1000,
        "max": max(latencies, default=0) * 1000,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    async with meshctl_serve("services: []\n") as server:
        url = f"https://127.0.0.1:{server.webhook_port}/inject"
        tls = ssl.create_default_context(cafile=str(server.root_cert))
        small, big = small_pod(), big_pod()
        print(f"webhook: {url}, meshctl serve pid {server.pid}; open loop, keep-alive, 5 s timeout per request")
        print(f"{'scenario':<30} {'requests':>8} {'errors':>6} {'rate/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
        for name, body, rate in (
            (f"small pod at {args.rate:.0f}/s", small, args.rate),
            (f"64 KiB pod at {args.rate:.0f}/s", big, args.rate),
        ):
            r = await run(url, tls, lambda i, b=body: review(b, i), rate, args.seconds)
            print(
                f"{name:<30} {r['requests']:>8.0f} {r['errors']:>6.0f} {r['rate']:>7.1f} {r['p50']:>7.2f} "
                f"{r['p99']:>7.2f} {r['max']:>7.2f}"
            )
        print(
            f"(64 KiB pod: {len(json.dumps(big)) / 1024:.1f} KiB of JSON, AdmissionReview "
            f"{len(review(big, 0)) / 1024:.1f} KiB)"
        )
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
