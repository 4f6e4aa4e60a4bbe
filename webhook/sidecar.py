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
"""The proxy's own readiness (`/healthz/ready`), as Istio's; the app's probes go to the status port."""
STATS_PORT = 15090
TLS_MODE_LABEL = "security.istio.io/tlsMode"
PROBES_ENV = "MESH_KUBE_APP_PROBERS"
XTABLES_LOCKFILE = "/dev/shm/xtables.lock"
TOKEN_VOLUME = "istio-token"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_SECONDS = 43200
ISTIO_META = "ISTIO_META_"
"""proxyMetadata entries with this prefix are node metadata (without it), as Istio's agent makes them."""
ADMIN_VOLUME = "mesh-admin"
"""The emptyDir that holds the admin socket when `InjectionConfig.admin_socket` is set."""
DEFAULT_GRACE_SECONDS = 30
"""Kubernetes' terminationGracePeriodSeconds when a pod does not say."""
GRACE_MARGIN_SECONDS = 5
"""Room left after the proxy's drain for the app to finish and the kubelet to stop the containers."""
_PROBE_PATHS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
_HOOK_PATHS = {"postStart": "poststartz", "preStop": "prestopz"}
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
    # Containers named like the injected ones are the user's overrides of them, as in Istio: merged into
    # what is injected below, never kept as app containers of their own.
    overrides = _take_overrides(spec)
    app_containers: list[dict[str, Any]] = spec.setdefault("containers", [])
    # Status port 0: nothing answers on it, so the app's probes and hooks cannot be pointed at it either.
    rewrite = options.rewrite_probes and options.status_port != 0
    # The user's own native sidecars (init containers that keep running) have probes and hooks too.
    natives = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    probes = _rewrite_probes([*app_containers, *natives], options.status_port) if rewrite else []
    labels = meta.setdefault("labels", {})
    name, revision = canonical(meta)
    labels.setdefault(CANONICAL_NAME, name)
    labels.setdefault(CANONICAL_REVISION, revision)

    proxy = _proxy_container(out, namespace, config, options, probes)
    init = _init_container(config, options)
    for override in overrides[PROXY]:
        _merge(proxy, override)
    for override in overrides[INIT]:
        _merge(init, override)
    _follow_proxy_user(init, overrides[PROXY])
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
        if options.status_port:
            proxy.setdefault("startupProbe", _ready_probe(HEALTH_PORT, period=1, failures=600))
        spec["initContainers"] = [*capture, proxy, *inits]
    else:
        spec["initContainers"] = [*capture, *inits]
        if not spec["initContainers"]:
            del spec["initContainers"]
        if options.hold_application:
            wait = ["meshctl", "wait", "--timeout", "120s"]
            proxy.setdefault("lifecycle", {})["postStart"] = {"exec": {"command": wait}}
            spec["containers"] = [proxy, *app_containers]
        else:
            spec["containers"] = [*app_containers, proxy]

    if not options.gateway:  # a gateway takes no mesh mTLS on its own ports: clients must not send it
        labels.setdefault(TLS_MODE_LABEL, "istio")  # a value the user set is kept, as Istio keeps it
    annotations = meta.setdefault("annotations", {})
    for key, value in (
        ("prometheus.io/scrape", "true"),
        # The status port serves Envoy's metrics as Istio's agent does (it cannot merge the app's own).
        ("prometheus.io/port", str(options.status_port or STATS_PORT)),
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
        options.status_port,
        "router" if options.gateway else "sidecar",
        tuple((k.removeprefix(ISTIO_META), v) for k, v in options.proxy_metadata if k.startswith(ISTIO_META)),
        "TPROXY" if options.tproxy else "REDIRECT" if options.capture else "NONE",
        options.on_demand_clusters,
    )
    args = [
        "--config-yaml",
        config_json,
        "--log-level",
        options.log_level,
        "--disable-hot-restart",
        # 0: left to Envoy, which runs one worker per core.
        *(["--concurrency", str(options.concurrency)] if options.concurrency else []),
        # The graceful drain that `meshctl drain` starts lasts this long (Envoy's drain manager).
        "--drain-time-s",
        str(max(1, math.ceil(options.drain_seconds))),
    ]
    if options.component_log_level:
        args += ["--component-log-level", options.component_log_level]
    env: list[dict[str, Any]] = [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in _DOWNWARD.items()]
    if probes:
        env.append({"name": PROBES_ENV, "value": dumps({p.path: original for p, original in probes})})
    # As Istio: proxyMetadata is the proxy's environment (its ISTIO_META_* are in the bootstrap's node too).
    env += [{"name": k, "value": v} for k, v in options.proxy_metadata]
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
    if options.tproxy:
        # As Istio: forwarding from clients' addresses takes IP_TRANSPARENT, so CAP_NET_ADMIN, which
        # Kubernetes grants a container only as root (no ambient capabilities). Group 1337 still keeps
        # the proxy's own traffic out of the capture.
        container["securityContext"].update(
            runAsUser=0, runAsNonRoot=False, capabilities={"add": ["NET_ADMIN"], "drop": ["ALL"]}
        )
    if options.status_port:  # 0: no readiness probe, as Istio
        container["readinessProbe"] = _ready_probe(HEALTH_PORT, period=2, failures=30)
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
    status: int,
    kind: str,
    metadata: tuple[tuple[str, str], ...],
    interception: str,
    on_demand_clusters: bool,
) -> str:
    """The sidecar's bootstrap; memoized, since the pods of one workload share every input."""
    identity = WorkloadIdentity(
        name="$(POD_NAME)",
        namespace=namespace,
        service_account=service_account,
        ip="$(INSTANCE_IP)",
        labels=dict(labels),
        domain_suffix=domain_suffix,
        kind=kind,
        metadata=dict(metadata),
        interception_mode=interception,
    )
    ports = Ports(health=HEALTH_PORT, status=status, stats=STATS_PORT, admin_socket=admin_socket)
    credentials = XdsCredentials(f"{TOKEN_DIR}/{TOKEN_VOLUME}", ca_pem="" if _xds_is_unix(xds_address) else xds_ca)
    return render_compact(
        bootstrap(identity, xds_address, ports, probes, credentials, on_demand_clusters=on_demand_clusters)
    )


def _init_container(config: InjectionConfig, options: ProxyOptions) -> dict[str, Any]:
    # As Istio: every inbound port is captured unless includeInboundPorts narrows it (declared container
    # ports are informational; an app listening on an undeclared port must not bypass mTLS). The proxy's
    # own ports are always excluded, then excludeInboundPorts.
    excluded = [str(p) for p in ALWAYS_EXCLUDED_INBOUND]
    if options.status_port and str(options.status_port) not in excluded:
        excluded.append(str(options.status_port))  # a moved status port is the proxy's too
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
        *(["--redirect-dns"] if options.dns_capture else []),
        *(["-m", "TPROXY"] if options.tproxy else []),
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


def _ready_probe(port: int, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/healthz/ready", "port": port},
        "initialDelaySeconds": 0,
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _rewrite_probes(containers: list[dict[str, Any]], status: int) -> list[tuple[AppProbe, dict[str, Any]]]:
    """Point each HTTP, TCP and gRPC probe, and each HTTP or TCP lifecycle hook, at the sidecar's status
    port (as Istio: under STRICT mTLS kubelet's plaintext call to the app's port would be refused);
    return what the sidecar must run."""
    out = []
    for c in containers:
        named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or [] if p.get("name")}
        handlers = [(c.get(field), f"/app-health/{c.get('name', 'app')}/{s}") for field, s in _PROBE_PATHS.items()]
        lifecycle = c.get("lifecycle") or {}
        handlers += [(lifecycle.get(k), f"/app-lifecycle/{c.get('name', 'app')}/{s}") for k, s in _HOOK_PATHS.items()]
        for handler, path in handlers:
            if not isinstance(handler, dict):
                continue
            found = _app_probe(handler, path, named)
            if found is None:
                continue
            original = {k: handler[k] for k in ("httpGet", "tcpSocket", "grpc") if k in handler}
            for k in original:
                del handler[k]
            handler["httpGet"] = {"path": path, "port": status, "scheme": "HTTP"}
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


PROXY_NAMES = ("istio-proxy", PROXY)
"""Names of the proxy container a pod may carry as an override (Istio's first: Meshplane's own wins)."""
INIT_NAMES = ("istio-init", INIT)
_PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")
_MERGE_KEYS = {"env": "name", "volumeMounts": "mountPath", "ports": "containerPort"}
AUTO_IMAGE = "auto"
"""An override's image `auto` means the injected one, as in Istio."""


def _take_overrides(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Remove the pod's containers named like the injected ones (in `containers` or `initContainers`);
    return them, Istio's names before Meshplane's so that Meshplane's own name wins a conflict."""
    found: dict[str, list[dict[str, Any]]] = {PROXY: [], INIT: []}
    for field in ("containers", "initContainers"):
        kept = []
        for c in spec.get(field) or []:
            name = c.get("name") if isinstance(c, dict) else None
            if name in PROXY_NAMES:
                found[PROXY].append(c)
            elif name in INIT_NAMES:
                found[INIT].append(c)
            else:
                kept.append(c)
        if field in spec and spec[field] is not None and len(kept) != len(spec[field]):
            spec[field] = kept
    order = {**{n: i for i, n in enumerate(PROXY_NAMES)}, **{n: i for i, n in enumerate(INIT_NAMES)}}
    for overrides in found.values():
        overrides.sort(key=lambda c: order[c["name"]])
    return found


def _merge(base: dict[str, Any], override: Mapping[str, Any], top: bool = True) -> None:
    """Merge `override` into `base` as a strategic merge patch of a container would (Istio applies the
    user's container this way): maps merge, `env` by name, `volumeMounts` by path, `ports` by number,
    other lists and values are replaced. The name is kept; an image `auto` is the injected one."""
    for key, value in override.items():
        if top and (key == "name" or (key == "image" and value == AUTO_IMAGE)):
            continue
        if top and key in _MERGE_KEYS and isinstance(value, list) and isinstance(base.get(key), list):
            merged = {dumps(item.get(_MERGE_KEYS[key])): item for item in base[key] if isinstance(item, dict)}
            for item in value:
                if isinstance(item, dict):
                    merged[dumps(item.get(_MERGE_KEYS[key]))] = item
            base[key] = list(merged.values())
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            if any(h in value for h in _PROBE_HANDLERS):  # a probe with its own handler replaces ours
                for h in _PROBE_HANDLERS:
                    base[key].pop(h, None)
            _merge(base[key], value, top=False)
        else:
            base[key] = value


def _follow_proxy_user(init: dict[str, Any], overrides: list[dict[str, Any]]) -> None:
    """As Istio: a proxy override running as another uid/gid moves the capture's owner exclusion with it."""
    for flag, field in (("-u", "runAsUser"), ("-g", "runAsGroup")):
        ids = [(o.get("securityContext") or {}).get(field) for o in overrides]
        uid = next((i for i in reversed(ids) if isinstance(i, int) and i > 0), None)
        args = init.get("args") or []
        if uid is not None and flag in args[:-1]:
            args[args.index(flag) + 1] = str(uid)


# Migration from Istio: a pod (or template) Istio injected is un-injected before Meshplane injects it.
ISTIO_PROBERS_ENV = "ISTIO_KUBE_APP_PROBERS"
ISTIO_PROMETHEUS_ENV = "ISTIO_PROMETHEUS_ANNOTATIONS"
ISTIO_METRICS_PORT = "15020"
ISTIO_OVERRIDES = "proxy.istio.io/overrides"
_DEFAULT_CONTAINER = ("kubectl.kubernetes.io/default-container", "kubectl.kubernetes.io/default-logs-container")


def uninject_istio(pod: Mapping[str, Any]) -> dict[str, Any]:
    """`pod` as it was before Istio's injector: without the containers, volumes and image pull secrets
    its `sidecar.istio.io/status` lists, with the app's probes and `prometheus.io/*` annotations that
    Istio rewrote restored from the proxy's environment, and without the labels and annotations Istio
    added (a label the user set to another value is kept). `pod` is not modified."""
    out: dict[str, Any] = json.loads(json.dumps(pod))
    meta = out.setdefault("metadata", {})
    spec = out.setdefault("spec", {})
    annotations = meta.get("annotations") or {}
    try:
        status = json.loads(annotations.get(STATUS) or "{}")
    except ValueError:
        status = {}
    status = status if isinstance(status, dict) else {}

    def listed(key: str) -> set[str]:
        names = status.get(key)
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    injected = listed("containers") | listed("initContainers")
    proxy = next(
        (
            c
            for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
            if isinstance(c, dict) and c.get("name") == "istio-proxy"
        ),
        {},
    )
    env = {
        e["name"]: e.get("value")
        for e in proxy.get("env") or []
        if isinstance(e, dict) and isinstance(e.get("name"), str)
    }

    def kept(items: list[Any], names: set[str]) -> list[Any]:
        return [i for i in items if not (isinstance(i, dict) and isinstance(i.get("name"), str) and i["name"] in names)]

    for field in ("containers", "initContainers"):
        if isinstance(spec.get(field), list):
            spec[field] = kept(spec[field], injected)
    if not spec.get("initContainers"):
        spec.pop("initContainers", None)
    for field in ("volumes", "imagePullSecrets"):
        if isinstance(spec.get(field), list):
            spec[field] = kept(spec[field], listed(field))
            if not spec[field]:
                del spec[field]
    _restore_probes(spec, env.get(ISTIO_PROBERS_ENV))

    if "creationTimestamp" in meta and meta["creationTimestamp"] is None:
        del meta["creationTimestamp"]  # what `istioctl kube-inject` writes into a template
    for key in (STATUS, "istio.io/rev", ISTIO_OVERRIDES):
        annotations.pop(key, None)
    first = next((c.get("name") for c in spec.get("containers") or [] if isinstance(c, dict)), None)
    for key in _DEFAULT_CONTAINER:  # Istio names the first app container; a user's other choice stays
        if annotations.get(key) == first:
            del annotations[key]
    _restore_prometheus(annotations, env.get(ISTIO_PROMETHEUS_ENV))
    if "annotations" in meta and not annotations:
        del meta["annotations"]

    labels = meta.get("labels") or {}
    if labels.get(TLS_MODE_LABEL) == "istio":
        del labels[TLS_MODE_LABEL]
    for key, derived in zip(
        (CANONICAL_NAME, CANONICAL_REVISION),
        canonical(
            {**meta, "labels": {k: v for k, v in labels.items() if k not in (CANONICAL_NAME, CANONICAL_REVISION)}}
        ),
        strict=True,
    ):
        if labels.get(key) == derived:  # Istio derived it; Meshplane derives the same again
            del labels[key]
    if "labels" in meta and not labels:
        del meta["labels"]
    return out


def _restore_probes(spec: dict[str, Any], probers: str | None) -> None:
    try:
        originals = json.loads(probers or "{}")
    except (ValueError, TypeError):
        return
    if not isinstance(originals, dict):
        return
    handlers = ("httpGet", "tcpSocket", "grpc")
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for field in _PROBE_PATHS:
            probe = c.get(field) if isinstance(c, dict) else None
            if not isinstance(probe, dict) or not isinstance(probe.get("httpGet"), dict):
                continue
            path = probe["httpGet"].get("path")
            original = originals.get(path) if isinstance(path, str) else None
            if isinstance(original, dict) and any(h in original for h in handlers):
                del probe["httpGet"]
                probe.update({h: original[h] for h in handlers if h in original})


def _restore_prometheus(annotations: dict[str, str], saved: str | None) -> None:
    """Istio's metrics merge points `prometheus.io/*` at its agent (port 15020), keeping the app's own
    in the proxy's environment: put the app's back, or drop Istio's."""
    keys = ("scrape", "path", "port")
    try:
        original = json.loads(saved) if saved else None
    except (ValueError, TypeError):
        original = None
    if isinstance(original, dict):
        for key in keys:
            annotations.pop(f"prometheus.io/{key}", None)
            if original.get(key):
                annotations[f"prometheus.io/{key}"] = str(original[key])
    elif annotations.get("prometheus.io/port") == ISTIO_METRICS_PORT:
        for key in keys:
            annotations.pop(f"prometheus.io/{key}", None)
