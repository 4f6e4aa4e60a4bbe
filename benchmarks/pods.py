"""A deterministic, realistic mix of pods for the webhook benchmark: `mix(seed, n)`.

Same seed, same pods. The mix follows what clusters hold: mostly one container, some with a
helper or two and an init container; zero to a few ports, named or not; HTTP, TCP, gRPC and
exec probes (some on named ports); Istio annotations on a minority; sizes from ~1 KiB to
~140 KiB (median ~2 KiB), the large ones carrying a kubectl last-applied-configuration and many env vars, as
real large pods do. A few pods opt out of injection (they get an answer without a patch).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

IMAGES = ("nginx:1.27", "ghcr.io/acme/shop-api:2.14.1", "redis:7", "python:3.12-slim", "envoyproxy/ratelimit:v1")
ISTIO_ANNOTATIONS = (
    ("sidecar.istio.io/proxyCPU", ("50m", "100m", "250m")),
    ("sidecar.istio.io/proxyMemory", ("64Mi", "128Mi", "256Mi")),
    ("sidecar.istio.io/logLevel", ("info", "warning", "debug")),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", ("169.254.169.254/32", "10.0.0.0/8,172.16.0.0/12")),
    ("traffic.sidecar.istio.io/excludeInboundPorts", ("9901", "15020,9090")),
    ("traffic.sidecar.istio.io/includeInboundPorts", ("*",)),
    ("sidecar.istio.io/rewriteAppHTTPProbers", ("true", "false")),
    ("proxy.istio.io/config", ("holdApplicationUntilProxyStarts: true",)),
)


@dataclass(frozen=True, slots=True)
class Pod:
    doc: dict[str, Any]
    inject: bool
    """Whether the webhook should answer with a patch (False: the pod opts out)."""
    size: int
    """Bytes of JSON."""


def mix(seed: int, n: int) -> list[Pod]:
    rng = random.Random(seed)
    return [_pod(rng, i) for i in range(n)]


def _pod(rng: random.Random, i: int) -> Pod:
    app = f"app-{rng.randrange(40)}"
    labels = {"app": app, "version": rng.choice(("v1", "v2", "v3")), "pod-template-hash": f"{rng.getrandbits(32):08x}"}
    annotations: dict[str, str] = {}
    if rng.random() < 0.3:
        for name, values in rng.sample(ISTIO_ANNOTATIONS, rng.randint(1, 3)):
            annotations[name] = rng.choice(values)
    if rng.random() < 0.4:
        annotations["prometheus.io/scrape"] = "true"
        annotations["prometheus.io/port"] = str(rng.choice((8080, 9090, 9102)))
    inject = rng.random() >= 0.05
    if not inject:
        annotations["sidecar.istio.io/inject"] = "false"

    n_containers = rng.choices((1, 2, 3, 4), weights=(60, 25, 10, 5))[0]
    containers = [_container(rng, f"c{k}" if k else app, k) for k in range(n_containers)]
    spec: dict[str, Any] = {
        "containers": containers,
        "serviceAccountName": f"sa-{app}",
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": rng.choice((30, 60)),
    }
    if rng.random() < 0.3:
        spec["initContainers"] = [{"name": "migrate", "image": rng.choice(IMAGES), "command": ["/migrate", "--up"]}]
    volumes = [{"name": f"config-{k}", "configMap": {"name": f"{app}-config-{k}"}} for k in range(rng.randint(0, 3))]
    if volumes:
        spec["volumes"] = volumes
        for c in containers:
            c["volumeMounts"] = [{"name": v["name"], "mountPath": f"/etc/{v['name']}"} for v in volumes]

    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": f"{app}-{labels['pod-template-hash']}-", "labels": labels},
        "spec": spec,
    }
    if annotations:
        pod["metadata"]["annotations"] = annotations
    # Size: most pods are a few KiB; one in six carries big env and a last-applied copy of itself.
    big = rng.random() < 1 / 6
    target = int(rng.lognormvariate(10.4, 0.6)) if big else int(rng.lognormvariate(7.6, 0.5))  # ~33 KiB; ~2 KiB
    target = min(target, 120 * 1024)
    env = containers[0].setdefault("env", [])
    while len(json.dumps(pod)) < target * 0.6 and len(env) < 2000:
        env.append({"name": f"SETTING_{len(env)}", "value": "x" * rng.randint(8, 120)})
    if big:
        pod["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/last-applied-configuration"] = json.dumps(
            {"apiVersion": "v1", "kind": "Pod", "spec": spec}
        )
    while len(json.dumps(pod)) < target and len(env) < 2000:
        env.append({"name": f"SETTING_{len(env)}", "value": "y" * rng.randint(8, 120)})
    return Pod(pod, inject, len(json.dumps(pod)))


def _container(rng: random.Random, name: str, k: int) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": rng.choice(IMAGES),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
    }
    ports = []
    for p in range(rng.choices((0, 1, 2, 3), weights=(20 if k else 5, 50, 20, 5))[0]):
        port: dict[str, Any] = {"containerPort": rng.choice((80, 8080, 8443, 9090, 5000 + p)) + 100 * k}
        if rng.random() < 0.6:
            port["name"] = rng.choice(("http", "grpc", "metrics", "tcp-db")) + f"-{p}"
        ports.append(port)
    # Distinct ports in a pod: the API server would reject duplicates.
    seen: set[int] = set()
    ports = [p for p in ports if not (p["containerPort"] in seen or seen.add(p["containerPort"]))]
    if ports:
        c["ports"] = ports
    for field in ("readinessProbe", "livenessProbe", "startupProbe"):
        if rng.random() < (0.7 if field == "readinessProbe" else 0.5 if field == "livenessProbe" else 0.15):
            c[field] = _probe(rng, ports)
    return c


def _probe(rng: random.Random, ports: list[dict[str, Any]]) -> dict[str, Any]:
    kind = rng.choices(("http", "tcp", "grpc", "exec"), weights=(60, 15, 10, 15))[0]
    timing = {"periodSeconds": rng.choice((5, 10)), "failureThreshold": rng.choice((3, 6))}
    if kind == "exec" or not ports:
        return {"exec": {"command": ["cat", "/tmp/healthy"]}, **timing}
    port = rng.choice(ports)
    target: int | str = port.get("name", port["containerPort"]) if rng.random() < 0.5 else port["containerPort"]
    if kind == "http":
        return {"httpGet": {"path": rng.choice(("/ready", "/healthz", "/live")), "port": target}, **timing}
    if kind == "tcp":
        return {"tcpSocket": {"port": target}, **timing}
    return {"grpc": {"port": port["containerPort"]}, **timing}
