"""Render the injected pod: original pod in, pod with mesh-init and mesh-proxy out. Pure.

The JSONPatch is not written by hand: `patch.diff(original, render(original))` computes it,
so what `meshctl inject` writes and what the webhook patches are the same by construction.
"""

from __future__ import annotations

import functools
import json
import math
import posixpath
from collections.abc import Mapping
from typing import Any

from meshplane.bootstrap.envoy import (
    AppProbe,
    Ports,
    WorkloadIdentity,
    XdsCredentials,
    bootstrap,
    render_compact,
    split_address,
)
from meshplane.bootstrap.iptables import ALWAYS_EXCLUDED_INBOUND

from .annotations import ProxyOptions, dumps
from .config import InjectionConfig
from .policy import STATUS

INIT = "mesh-init"
PROXY = "mesh-proxy"
HEALTH_PORT = 15021
STATS_PORT = 15090
TLS_MODE_LABEL = "security.istio.io/tlsMode"
PROBES_ENV = "MESH_KUBE_APP_PROBERS"
XTABLES_LOCKFILE = "/dev/shm/xtables.lock"
TOKEN_VOLUME = "istio-token"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_SECONDS = 43200
ADMIN_VOLUME = "mesh-admin"
"""The emptyDir that holds the admin socket when `InjectionConfig.admin_socket` is set."""
DEFAULT_GRACE_SECONDS = 30
"""Kubernetes' terminationGracePeriodSeconds when a pod does not say."""
GRACE_MARGIN_SECONDS = 5
"""Room left after the proxy's drain for the app to finish and the kubelet to stop the containers."""
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
    labels = meta.setdefault("labels", {})
    name, revision = canonical(meta)
    labels.setdefault(CANONICAL_NAME, name)
    labels.setdefault(CANONICAL_REVISION, revision)

    proxy = _proxy_container(out, namespace, config, options, probes)
    init = _init_container(config, options)
    volumes = _volumes(config)
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes]
    # The proxy's preStop drain must fit in the grace period, with room to spare for the kubelet.
    needed = math.ceil(options.drain_seconds) + GRACE_MARGIN_SECONDS
    if int(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)) < needed:
        spec["terminationGracePeriodSeconds"] = needed
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    capture = [init] if options.capture else []  # interceptionMode NONE: no capture at all
    if options.native_sidecar:
        proxy["restartPolicy"] = "Always"
        proxy["startupProbe"] = _ready_probe(period=1, failures=600)
        spec["initContainers"] = [*capture, proxy, *inits]
    else:
        spec["initContainers"] = [*capture, *inits]
        if not spec["initContainers"]:
            del spec["initContainers"]
        if options.hold_application:
            proxy["lifecycle"]["postStart"] = {"exec": {"command": ["meshctl", "wait", "--timeout", "120s"]}}
            spec["containers"] = [proxy, *app_containers]
        else:
            spec["containers"] = [*app_containers, proxy]

    labels.setdefault(TLS_MODE_LABEL, "istio")  # a value the user set is kept, as Istio keeps it
    annotations = meta.setdefault("annotations", {})
    for key, value in (
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", str(STATS_PORT)),
        ("prometheus.io/path", "/stats/prometheus"),
    ):
        annotations.setdefault(key, value)
    annotations[STATUS] = dumps(
        {
            "initContainers": [*([INIT] if options.capture else []), *([PROXY] if options.native_sidecar else [])],
            "containers": [] if options.native_sidecar else [PROXY],
            "volumes": [v["name"] for v in volumes],
            "imagePullSecrets": None,
            "revision": config.revision,
        }
    )
    return out


CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"


def canonical(meta: Mapping[str, Any]) -> tuple[str, str]:
    """The workload's canonical service name and revision, derived as Istio derives them: from its own
    labels, else the owning workload's name (a ReplicaSet's pod name less its two hash suffixes)."""
    labels = meta.get("labels") or {}
    name = labels.get(CANONICAL_NAME) or labels.get("app.kubernetes.io/name") or labels.get("app")
    if not name:
        base = str(meta.get("generateName") or meta.get("name") or "").rstrip("-")
        parts = base.split("-")
        # Deployment pods: <deployment>-<replicaset hash>-<pod hash>, generateName <deployment>-<hash>-
        if meta.get("generateName") and len(parts) > 1 and "pod-template-hash" in labels:
            parts = parts[:-1]
        name = "-".join(parts) or "unknown"
    revision = (
        labels.get(CANONICAL_REVISION) or labels.get("app.kubernetes.io/version") or labels.get("version") or "latest"
    )
    return str(name)[:63].rstrip("-._"), str(revision)[:63].rstrip("-._")


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
        config.admin_socket,
        config.xds_ca,
    )
    args = [
        "--config-yaml",
        config_json,
        "--log-level",
        options.log_level,
        "--disable-hot-restart",
        # The graceful drain that `meshctl drain` starts lasts this long (Envoy's drain manager).
        "--drain-time-s",
        str(max(1, math.ceil(options.drain_seconds))),
    ]
    if options.component_log_level:
        args += ["--component-log-level", options.component_log_level]
    env: list[dict[str, Any]] = [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in _DOWNWARD.items()]
    if probes:
        env.append({"name": PROBES_ENV, "value": dumps({p.path: original for p, original in probes})})
    uid = config.proxy_uid
    # Like Istio's pilot-agent on SIGTERM: drain inbound listeners, wait, then let the kubelet stop Envoy
    # (which exits at once on SIGTERM). Kubernetes does not expand $(VAR) here, so the path is literal.
    drain = ["meshctl", "drain", "--duration", f"{options.drain_seconds:g}s"]
    drain += ["--admin-socket", config.admin_socket] if config.admin_socket else []
    container: dict[str, Any] = {
        "name": PROXY,
        "image": options.image,
        "command": ["envoy"],
        "args": args,
        "env": env,
        "ports": [{"name": "http-envoy-prom", "containerPort": STATS_PORT, "protocol": "TCP"}],
        "lifecycle": {"preStop": {"exec": {"command": drain}}},
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
    mounts = [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}]
    if config.admin_socket:
        mounts.append({"name": ADMIN_VOLUME, "mountPath": posixpath.dirname(config.admin_socket)})
    container["volumeMounts"] = mounts
    return container


def _xds_is_unix(address: str) -> bool:
    return split_address(address)[1] == 0


def _volumes(config: InjectionConfig) -> list[dict[str, Any]]:
    """The proxy's volumes: its projected service-account token (its credential to the control plane, as
    Istio's `istio-token`) and the admin socket's directory. The mesh roots it verifies the control
    plane with travel inline in its bootstrap: no ConfigMap to publish into every namespace."""
    token = {"audience": config.token_audience, "expirationSeconds": TOKEN_SECONDS, "path": TOKEN_VOLUME}
    out: list[dict[str, Any]] = [{"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}}]
    if config.admin_socket:
        out.append({"name": ADMIN_VOLUME, "emptyDir": {"medium": "Memory"}})
    return out


@functools.lru_cache(maxsize=512)
def _bootstrap_json(
    namespace: str,
    service_account: str,
    labels: tuple[tuple[str, str], ...],
    domain_suffix: str,
    xds_address: str,
    probes: tuple[AppProbe, ...],
    admin_socket: str,
    xds_ca: str,
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
    ports = Ports(health=HEALTH_PORT, stats=STATS_PORT, admin_socket=admin_socket)
    credentials = XdsCredentials(f"{TOKEN_DIR}/{TOKEN_VOLUME}", ca_pem="" if _xds_is_unix(xds_address) else xds_ca)
    return render_compact(bootstrap(identity, xds_address, ports, probes, credentials))


def _init_container(config: InjectionConfig, options: ProxyOptions) -> dict[str, Any]:
    # As Istio: every inbound port is captured unless includeInboundPorts narrows it (declared container
    # ports are informational; an app listening on an undeclared port must not bypass mTLS). The proxy's
    # own ports are always excluded, then excludeInboundPorts.
    excluded = [str(p) for p in ALWAYS_EXCLUDED_INBOUND]
    excluded += [p for p in options.exclude_inbound_ports.split(",") if p and p not in excluded]
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
        options.include_inbound_ports,
        "-d",
        ",".join(excluded),
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
        "image": config.init_image or options.image,
        "command": ["meshctl"],
        "args": args,
        # iptables (legacy backend) takes a lock in /run, which a read-only root filesystem refuses;
        # /dev/shm is writable in every container.
        "env": [{"name": "XTABLES_LOCKFILE", "value": XTABLES_LOCKFILE}],
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
