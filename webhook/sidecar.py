"""Render the injected pod: original pod in, pod with mesh-init and mesh-proxy out. Pure.

The JSONPatch is not written by hand: `patch.diff(original, render(original))` computes it,
so what `meshctl inject` writes and what the webhook patches are the same by construction.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from meshplane.bootstrap.envoy import AppProbe, Ports, WorkloadIdentity, bootstrap, render_compact

from .annotations import ProxyOptions, dumps
from .config import InjectionConfig
from .policy import STATUS

INIT = "mesh-init"
PROXY = "mesh-proxy"
HEALTH_PORT = 15021
STATS_PORT = 15090
TLS_MODE_LABEL = "security.istio.io/tlsMode"
PROBES_ENV = "MESH_KUBE_APP_PROBERS"
_PROBE_PATHS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
_DOWNWARD = {
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "INSTANCE_IP": "status.podIP",
    "SERVICE_ACCOUNT": "spec.serviceAccountName",
}


def render(pod: Mapping[str, Any], namespace: str, config: InjectionConfig, options: ProxyOptions) -> dict[str, Any]:
    """The pod with its sidecar. `pod` is not modified."""
    # The pod is JSON data: a JSON round trip copies it several times faster than copy.deepcopy.
    out: dict[str, Any] = json.loads(json.dumps(pod))
    meta = out.setdefault("metadata", {})
    spec = out.setdefault("spec", {})
    app_containers: list[dict[str, Any]] = spec.setdefault("containers", [])
    probes = _rewrite_probes(app_containers) if options.rewrite_probes else []

    proxy = _proxy_container(out, namespace, config, options, probes)
    init = _init_container(app_containers, config, options)
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    if options.native_sidecar:
        proxy["restartPolicy"] = "Always"
        proxy["startupProbe"] = _ready_probe(period=1, failures=600)
        spec["initContainers"] = [init, proxy, *inits]
    else:
        spec["initContainers"] = [init, *inits]
        if options.hold_application:
            proxy["lifecycle"] = {"postStart": {"exec": {"command": ["meshctl", "wait", "--timeout", "120s"]}}}
            spec["containers"] = [proxy, *app_containers]
        else:
            spec["containers"] = [*app_containers, proxy]

    meta.setdefault("labels", {})[TLS_MODE_LABEL] = "istio"
    annotations = meta.setdefault("annotations", {})
    for key, value in (
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", str(STATS_PORT)),
        ("prometheus.io/path", "/stats/prometheus"),
    ):
        annotations.setdefault(key, value)
    annotations[STATUS] = dumps(
        {
            "initContainers": [INIT, PROXY] if options.native_sidecar else [INIT],
            "containers": [] if options.native_sidecar else [PROXY],
            "volumes": [],
            "imagePullSecrets": None,
            "revision": config.revision,
        }
    )
    return out


def _proxy_container(
    pod: Mapping[str, Any],
    namespace: str,
    config: InjectionConfig,
    options: ProxyOptions,
    probes: list[tuple[AppProbe, dict[str, Any]]],
) -> dict[str, Any]:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    config_json = _bootstrap_json(
        namespace,
        spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        tuple(sorted((k, v) for k, v in (meta.get("labels") or {}).items() if k != TLS_MODE_LABEL)),
        config.domain_suffix,
        config.xds_address,
        tuple(p for p, _ in probes),
    )
    args = [
        "--config-yaml",
        config_json,
        "--log-level",
        options.log_level,
        "--disable-hot-restart",
        "--drain-time-s",
        "5",
    ]
    if options.component_log_level:
        args += ["--component-log-level", options.component_log_level]
    env: list[dict[str, Any]] = [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in _DOWNWARD.items()]
    if probes:
        env.append({"name": PROBES_ENV, "value": dumps({p.path: original for p, original in probes})})
    uid = config.proxy_uid
    return {
        "name": PROXY,
        "image": options.image,
        "command": ["envoy"],
        "args": args,
        "env": env,
        "ports": [{"name": "http-envoy-prom", "containerPort": STATS_PORT, "protocol": "TCP"}],
        "readinessProbe": _ready_probe(period=2, failures=30),
        "resources": options.resources,
        "securityContext": {
            "runAsUser": uid,
            "runAsGroup": uid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }


@functools.lru_cache(maxsize=512)
def _bootstrap_json(
    namespace: str,
    service_account: str,
    labels: tuple[tuple[str, str], ...],
    domain_suffix: str,
    xds_address: str,
    probes: tuple[AppProbe, ...],
) -> str:
    """The sidecar's bootstrap; memoized, since the pods of one workload share every input."""
    identity = WorkloadIdentity(
        name="$(POD_NAME)",
        namespace=namespace,
        service_account=service_account,
        ip="$(INSTANCE_IP)",
        labels=dict(labels),
        domain_suffix=domain_suffix,
    )
    return render_compact(bootstrap(identity, xds_address, Ports(health=HEALTH_PORT, stats=STATS_PORT), probes))


def _init_container(
    app_containers: list[dict[str, Any]], config: InjectionConfig, options: ProxyOptions
) -> dict[str, Any]:
    ports = options.include_inbound_ports
    if ports is None:
        declared = sorted(
            {
                p["containerPort"]
                for c in app_containers
                for p in c.get("ports") or []
                if isinstance(p.get("containerPort"), int)
            }
        )
        # No declared ports: capture every inbound port rather than silently none.
        ports = ",".join(map(str, declared)) or "*"
    uid = str(config.proxy_uid)
    args = [
        "iptables",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        uid,
        "-g",
        uid,
        "-b",
        ports,
        "-d",
        options.exclude_inbound_ports,
        "-i",
        options.include_outbound_ranges,
        "-x",
        options.exclude_outbound_ranges,
        "-o",
        options.exclude_outbound_ports,
        "-c",
        options.exclude_interfaces,
    ]
    return {
        "name": INIT,
        "image": options.image,
        "command": ["meshctl"],
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _ready_probe(*, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT},
        "initialDelaySeconds": 0,
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _rewrite_probes(containers: list[dict[str, Any]]) -> list[tuple[AppProbe, dict[str, Any]]]:
    """Point each HTTP, TCP and gRPC probe at the sidecar's health port; return what the sidecar must run."""
    out = []
    for c in containers:
        named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or [] if p.get("name")}
        for field, suffix in _PROBE_PATHS.items():
            probe = c.get(field)
            if not isinstance(probe, dict):
                continue
            path = f"/app-health/{c.get('name', 'app')}/{suffix}"
            found = _app_probe(probe, path, named)
            if found is None:
                continue
            original = {k: probe[k] for k in ("httpGet", "tcpSocket", "grpc") if k in probe}
            for k in original:
                del probe[k]
            probe["httpGet"] = {"path": path, "port": HEALTH_PORT, "scheme": "HTTP"}
            out.append((found, original))
    return out


def _app_probe(probe: dict[str, Any], path: str, named: Mapping[Any, Any]) -> AppProbe | None:
    period, timeout = int(probe.get("periodSeconds", 10)), int(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        h = probe["httpGet"]
        port = _port(h.get("port"), named)
        if port is None or h.get("host"):
            return None  # a named port we cannot resolve, or another host: leave the probe alone
        return AppProbe(
            path,
            "http",
            port,
            h.get("path") or "/",
            str(h.get("scheme", "HTTP")).upper() == "HTTPS",
            period=period,
            timeout=timeout,
        )
    if "tcpSocket" in probe:
        port = _port(probe["tcpSocket"].get("port"), named)
        return (
            None
            if port is None or probe["tcpSocket"].get("host")
            else AppProbe(path, "tcp", port, period=period, timeout=timeout)
        )
    if "grpc" in probe:
        port = _port(probe["grpc"].get("port"), named)
        return (
            None
            if port is None
            else AppProbe(
                path, "grpc", port, grpc_service=probe["grpc"].get("service") or "", period=period, timeout=timeout
            )
        )
    return None  # exec probes run in the app container and need nothing from the proxy


def _port(value: Any, named: Mapping[Any, Any]) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    resolved = named.get(value)
    return resolved if isinstance(resolved, int) else None
