"""Istio's per-pod annotations -> proxy options. An invalid value names the annotation and what it accepts."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .config import InjectionConfig, metadata_text

_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
DEFAULT_CONCURRENCY = 2
"""Istio's default for sidecars: two workers whatever the node's cores (each worker holds its own
connection pools and copies of thread-local state, so memory grows with them)."""
MAX_CONCURRENCY = 64
DEFAULT_DRAIN_SECONDS = 5.0
"""Istio's default terminationDrainDuration."""
MAX_DRAIN_SECONDS = 3600.0
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_STATUS_PORT = 15020
STATUS_PORT = "status.sidecar.istio.io/port"
ON_DEMAND_CLUSTERS = "sidecar.meshplane.io/onDemandClusters"
RESERVED_PORTS = frozenset({15000, 15001, 15006, 15021, 15090})
"""The proxy's own listeners (admin, outbound, inbound, stats): never its status port."""
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
MAX_PROXY_METADATA = 64
"""Entries of `proxyMetadata`; each becomes an environment variable of the proxy."""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_PROXY_CONFIG = 16 * 1024
"""Bytes of `proxy.istio.io/config`: a ProxyConfig is a few lines; parsing is bounded by this."""
MAX_NESTING = 16


class InvalidAnnotation(ValueError):
    def __init__(self, name: str, value: str, accepted: str) -> None:
        self.name, self.value, self.accepted = name, value, accepted
        shown = value if len(value) <= 200 else value[:200] + "..."
        super().__init__(f"annotation {name}: {shown!r} is not valid; accepted: {accepted}")


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    image: str
    resources: dict[str, dict[str, str]]
    log_level: str
    component_log_level: str
    native_sidecar: bool
    hold_application: bool
    rewrite_probes: bool
    include_inbound_ports: str
    """Inbound ports to capture: `*` (every port, Istio's default) or a comma-separated list."""
    exclude_inbound_ports: str
    include_outbound_ranges: str
    exclude_outbound_ranges: str
    exclude_outbound_ports: str
    exclude_interfaces: str
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    concurrency: int = 2
    """Envoy's worker threads (ProxyConfig `concurrency`, Istio's default 2; 0: one per core)."""
    """How long the proxy drains before it is stopped (ProxyConfig terminationDrainDuration)."""
    capture: bool = True
    """`sidecar.istio.io/interceptionMode`: REDIRECT and TPROXY capture traffic (the init container); NONE does not."""
    tproxy: bool = False
    """`sidecar.istio.io/interceptionMode: TPROXY`: inbound captured with TPROXY, the app sees clients' addresses."""
    gateway: bool = False
    """`inject.istio.io/templates: gateway`: the proxy is the pod's main container (no capture, no probe
    rewriting, no tlsMode label), as Istio's gateway template."""
    status_port: int = DEFAULT_STATUS_PORT
    """`status.sidecar.istio.io/port`: where the app's rewritten probes, hooks and metrics are served
    (Istio's agent port); 0: none of them, and no readiness probe on the proxy."""
    proxy_metadata: tuple[tuple[str, str], ...] = ()
    """ProxyConfig `proxyMetadata` (mesh-wide, then the pod's `proxy.istio.io/config`): the proxy's
    environment, and its `ISTIO_META_*` entries its node metadata."""

    @property
    def dns_capture(self) -> bool:
        """`ISTIO_META_DNS_CAPTURE`: the pod's DNS goes to the sidecar's DNS listener."""
        return dict(self.proxy_metadata).get(DNS_CAPTURE, "").strip().lower() in ("true", "1")

    on_demand_clusters: bool = False
    """`sidecar.meshplane.io/onDemandClusters`: the proxy fetches each cluster when a call first needs it."""


def proxy_options(annotations: Mapping[str, str], config: InjectionConfig) -> ProxyOptions:
    """Raises `InvalidAnnotation` on the first invalid value."""
    a = annotations
    resources = {k: dict(v) for k, v in config.resources.items()}
    for name, section, key in (
        ("proxyCPU", "requests", "cpu"),
        ("proxyCPULimit", "limits", "cpu"),
        ("proxyMemory", "requests", "memory"),
        ("proxyMemoryLimit", "limits", "memory"),
    ):
        value = a.get(f"sidecar.istio.io/{name}")
        if value is not None:
            if not _QUANTITY.match(value.strip()):
                raise InvalidAnnotation(
                    f"sidecar.istio.io/{name}",
                    value,
                    "a Kubernetes quantity, e.g. 100m or 0.5 (CPU), 128Mi or 1G (memory)",
                )
            resources.setdefault(section, {})[key] = value.strip()
    log_level = a.get("sidecar.istio.io/logLevel", config.log_level)
    if log_level not in LOG_LEVELS:
        raise InvalidAnnotation("sidecar.istio.io/logLevel", log_level, " | ".join(LOG_LEVELS))
    component = a.get("sidecar.istio.io/componentLogLevel", "")
    for item in filter(None, component.split(",")):
        name, _, level = item.partition(":")
        if not re.match(r"^[a-z0-9_]+$", name) or level not in LOG_LEVELS:
            raise InvalidAnnotation(
                "sidecar.istio.io/componentLogLevel",
                component,
                f"component:level pairs separated by commas, levels {' | '.join(LOG_LEVELS)}",
            )
    templates = [t.strip() for t in a.get("inject.istio.io/templates", "sidecar").split(",") if t.strip()]
    if templates not in (["sidecar"], ["gateway"]):
        raise InvalidAnnotation(
            "inject.istio.io/templates",
            a["inject.istio.io/templates"],
            "sidecar or gateway (Meshplane has no grpc-agent or grpc-simple template, and templates do not combine)",
        )
    mode = a.get("sidecar.istio.io/interceptionMode", "REDIRECT")
    if mode not in ("REDIRECT", "TPROXY", "NONE"):
        raise InvalidAnnotation("sidecar.istio.io/interceptionMode", mode, "REDIRECT, TPROXY or NONE")
    for kind in ("cpu", "memory"):
        request, limit = resources.get("requests", {}).get(kind), resources.get("limits", {}).get(kind)
        if request and limit and _quantity(request) > _quantity(limit):
            raise InvalidAnnotation(
                f"sidecar.istio.io/proxy{'CPU' if kind == 'cpu' else 'Memory'}",
                request,
                f"a request no larger than the proxy's {kind} limit ({limit}); raise the limit with "
                f"sidecar.istio.io/proxy{'CPU' if kind == 'cpu' else 'Memory'}Limit",
            )
    hold = config.hold_application_until_proxy_starts
    drain = DEFAULT_DRAIN_SECONDS
    concurrency = DEFAULT_CONCURRENCY
    metadata = dict(config.proxy_metadata)
    proxy_config = a.get("proxy.istio.io/config")
    if proxy_config is not None:
        doc = _proxy_config(proxy_config)
        metadata.update(_proxy_metadata(doc.pop("proxyMetadata", None), proxy_config))
        if "holdApplicationUntilProxyStarts" in doc:
            hold = _bool(str(doc["holdApplicationUntilProxyStarts"]).lower(), "proxy.istio.io/config")
        if "terminationDrainDuration" in doc:
            drain = _drain_duration(doc["terminationDrainDuration"])
        if "concurrency" in doc:
            concurrency = _concurrency(doc["concurrency"])
    gateway = templates == ["gateway"]  # the proxy is the workload: nothing of a sidecar's applies
    return ProxyOptions(
        image=a.get("sidecar.istio.io/proxyImage", config.proxy_image),
        resources=resources,
        log_level=log_level,
        component_log_level=component,
        native_sidecar=_flag(a, "sidecar.istio.io/nativeSidecar", config.native_sidecars) and not gateway,
        hold_application=hold and not gateway,
        rewrite_probes=_flag(a, "sidecar.istio.io/rewriteAppHTTPProbers", config.rewrite_probes) and not gateway,
        include_inbound_ports=_ports(a, "traffic.sidecar.istio.io/includeInboundPorts", star=True, default="*") or "",
        exclude_inbound_ports=_ports(a, "traffic.sidecar.istio.io/excludeInboundPorts") or "",
        include_outbound_ranges=_cidrs(a, "traffic.sidecar.istio.io/includeOutboundIPRanges", default="*"),
        exclude_outbound_ranges=_cidrs(a, "traffic.sidecar.istio.io/excludeOutboundIPRanges", default=""),
        exclude_outbound_ports=_ports(a, "traffic.sidecar.istio.io/excludeOutboundPorts") or "",
        exclude_interfaces=_interfaces(a, "traffic.sidecar.istio.io/excludeInterfaces"),
        drain_seconds=drain,
        concurrency=concurrency,
        on_demand_clusters=_flag(a, ON_DEMAND_CLUSTERS, False),
        capture=mode != "NONE" and not gateway,
        gateway=gateway,
        tproxy=mode == "TPROXY" and not gateway,
        status_port=_status_port(a),
        proxy_metadata=tuple(sorted(metadata.items())),
    )


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_SUFFIXES |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def _quantity(text: str) -> float:
    """A Kubernetes quantity (already checked by _QUANTITY) as a number: 100m -> 0.1, 1Gi -> 2**30."""
    match = _QUANTITY.match(text.strip())
    assert match is not None
    return float(match.group(1)) * _SUFFIXES.get(match.group(3) or "", 1)


def _proxy_config(text: str) -> dict[str, Any]:
    """The ProxyConfig mapping of `proxy.istio.io/config`, keeping scalar values and `proxyMetadata`. Anchors and
    aliases, deep nesting and oversized text are refused before building anything: any pod's author
    writes this, and an alias bomb would otherwise hold the webhook for seconds."""
    bad = InvalidAnnotation("proxy.istio.io/config", text, "a YAML or JSON ProxyConfig mapping (no anchors or aliases)")
    if len(text) > MAX_PROXY_CONFIG:
        raise bad
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise bad
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING:
                    raise bad
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        doc = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError, RecursionError):
        raise bad from None
    if not isinstance(doc, dict):
        raise bad
    return {str(k): v for k, v in doc.items() if isinstance(v, str | int | float | bool) or k == "proxyMetadata"}


def _proxy_metadata(value: object, text: str) -> dict[str, str]:
    """`proxyMetadata`: environment variable names to scalar values (as text, as Istio renders them)."""
    if value is None:
        return {}
    if not (
        isinstance(value, dict)
        and len(value) <= MAX_PROXY_METADATA
        and all(isinstance(k, str) and _ENV_NAME.match(k) for k in value)
        and all(isinstance(v, str | int | float | bool) for v in value.values())
    ):
        raise InvalidAnnotation(
            "proxy.istio.io/config",
            text,
            f"proxyMetadata as a mapping of up to {MAX_PROXY_METADATA} environment variable names to values, "
            'e.g. {ISTIO_META_DNS_CAPTURE: "true"}',
        )
    return {k: metadata_text(v) for k, v in value.items()}


def _concurrency(value: object) -> int:
    """ProxyConfig `concurrency`: Envoy's worker threads, 0 for one per core."""
    text = str(value).strip()
    if not text.isdigit() or int(text) > MAX_CONCURRENCY:
        raise InvalidAnnotation(
            "proxy.istio.io/config",
            f"concurrency: {value}",
            f"concurrency as a number of worker threads from 0 (one per core) to {MAX_CONCURRENCY}",
        )
    return int(text)


def _drain_duration(value: object) -> float:
    """A simple duration such as 5s, 500ms, 1.5m or 1h (Istio's ProxyConfig form), at most an hour."""
    match = _DURATION.match(str(value).strip())
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)] if match else -1.0
    if not 0 <= seconds <= MAX_DRAIN_SECONDS:
        raise InvalidAnnotation(
            "proxy.istio.io/config",
            f"terminationDrainDuration: {value}",
            "terminationDrainDuration as a duration up to 1h, e.g. 5s, 500ms or 1m",
        )
    return seconds


def _bool(value: str, name: str) -> bool:
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise InvalidAnnotation(name, value, "true or false")


def _flag(a: Mapping[str, str], name: str, default: bool) -> bool:
    return default if name not in a else _bool(a[name].strip().lower(), name)


def _ports(a: Mapping[str, str], name: str, *, star: bool = False, default: str | None = "") -> str | None:
    value = a.get(name)
    if value is None:
        return default
    text = value.replace(" ", "")
    if star and text == "*":
        return "*"
    items = [p for p in text.split(",") if p]
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in items):
        raise InvalidAnnotation(
            name, value, ("'*' or " if star else "") + "comma-separated port numbers, e.g. 8080,9090"
        )
    return ",".join(items)


def _status_port(a: Mapping[str, str]) -> int:
    """As Istio: 0 (no readiness probe) or an unprivileged port the proxy does not already use."""
    value = a.get(STATUS_PORT)
    if value is None:
        return DEFAULT_STATUS_PORT
    text = value.strip()
    if text.isdigit() and (int(text) == 0 or (1024 <= int(text) <= 65535 and int(text) not in RESERVED_PORTS)):
        return int(text)
    raise InvalidAnnotation(
        STATUS_PORT,
        value,
        "0 (no readiness probe) or a port from 1024 to 65535 other than the proxy's "
        "15000, 15001, 15006, 15021 and 15090",
    )


def _cidrs(a: Mapping[str, str], name: str, *, default: str) -> str:
    value = a.get(name)
    if value is None:
        return default
    text = value.replace(" ", "")
    if text == "*" and default == "*":
        return "*"
    items = [c for c in text.split(",") if c]
    try:
        return ",".join(str(ipaddress.ip_network(c, strict=False)) for c in items)
    except ValueError:
        raise InvalidAnnotation(
            name,
            value,
            "comma-separated IP ranges, e.g. 10.0.0.0/8,172.16.0.0/12" + (", or '*'" if default == "*" else ""),
        ) from None


def _interfaces(a: Mapping[str, str], name: str) -> str:
    value = a.get(name, "")
    items = [i for i in value.replace(" ", "").split(",") if i]
    if not all(re.match(r"^[A-Za-z0-9_.:@-]{1,15}$", i) for i in items):
        raise InvalidAnnotation(name, value, "comma-separated interface names, e.g. eth1,net1")
    return ",".join(items)


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


_METRICS_INSTEAD = "Envoy's own stats are served unchanged on 15090 and 15020"
UNSUPPORTED: dict[str, str] = {
    "sidecar.istio.io/bootstrapOverride": "the bootstrap is generated; `meshctl bootstrap` writes one to start from",
    "sidecar.istio.io/userVolume": "add volumes to the pod and mount them with a `mesh-proxy` container override",
    "sidecar.istio.io/userVolumeMount": "mount volumes with a `mesh-proxy` container override",
    "sidecar.istio.io/statsInclusionPrefixes": _METRICS_INSTEAD,
    "sidecar.istio.io/statsInclusionSuffixes": _METRICS_INSTEAD,
    "sidecar.istio.io/statsInclusionRegexps": _METRICS_INSTEAD,
    "sidecar.istio.io/extraStatTags": _METRICS_INSTEAD,
    "sidecar.istio.io/statsHistogramBuckets": _METRICS_INSTEAD,
    "sidecar.istio.io/agentLogLevel": "there is no agent; `sidecar.istio.io/logLevel` sets Envoy's",
    "sidecar.istio.io/discoveryAddress": "sidecars dial the injector's `xdsAddress`",
    "sidecar.istio.io/enableCoreDump": "the proxy runs read-only and unprivileged, without core dumps",
    "sidecar.istio.io/proxyImageType": "the image is `sidecar.istio.io/proxyImage` or the injector's",
    "readiness.status.sidecar.istio.io/applicationPorts": "the proxy is ready when Envoy holds its config",
    "readiness.status.sidecar.istio.io/initialDelaySeconds": "the proxy's readiness probe has fixed timing",
    "readiness.status.sidecar.istio.io/periodSeconds": "the proxy's readiness probe has fixed timing",
    "readiness.status.sidecar.istio.io/failureThreshold": "the proxy's readiness probe has fixed timing",
    "prometheus.istio.io/merge-metrics": "stock Envoy cannot merge the app's metrics: the app's own "
    "`prometheus.io/*` annotations are kept, so it is scraped as before",
}
"""Istio annotations Meshplane does not implement, each with what happens instead. The pod is still
injected (these tune, they do not secure), and the webhook answers with a warning kubectl shows."""


def unsupported(annotations: Mapping[str, str]) -> list[str]:
    """One warning per Istio annotation of the pod that Meshplane ignores."""
    return [
        f"{name}: not supported by Meshplane, ignored ({UNSUPPORTED[name]})"
        for name in sorted(annotations)
        if name in UNSUPPORTED
    ]
