"""Istio's per-pod annotations -> proxy options. An invalid value names the annotation and what it accepts."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .config import InjectionConfig

_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
DEFAULT_DRAIN_SECONDS = 5.0
"""Istio's default terminationDrainDuration."""
MAX_DRAIN_SECONDS = 3600.0
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_STATUS_PORT = 15021
STATUS_PORT = "status.sidecar.istio.io/port"
ON_DEMAND_CLUSTERS = "sidecar.meshplane.io/onDemandClusters"
RESERVED_PORTS = frozenset({15000, 15001, 15006, 15090})
"""The proxy's own listeners (admin, outbound, inbound, stats): never its status port."""
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


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
    """How long the proxy drains before it is stopped (ProxyConfig terminationDrainDuration)."""
    capture: bool = True
    """`sidecar.istio.io/interceptionMode`: REDIRECT captures traffic (the init container); NONE does not."""
    status_port: int = DEFAULT_STATUS_PORT
    """`status.sidecar.istio.io/port`: the proxy's readiness and app-health port; 0: no readiness probe."""
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
    if templates != ["sidecar"]:
        raise InvalidAnnotation(
            "inject.istio.io/templates",
            a["inject.istio.io/templates"],
            "sidecar (Meshplane has no gateway or grpc-agent templates yet)",
        )
    mode = a.get("sidecar.istio.io/interceptionMode", "REDIRECT")
    if mode not in ("REDIRECT", "NONE"):
        raise InvalidAnnotation(
            "sidecar.istio.io/interceptionMode", mode, "REDIRECT or NONE (TPROXY is not supported yet)"
        )
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
    proxy_config = a.get("proxy.istio.io/config")
    if proxy_config is not None:
        doc = _proxy_config(proxy_config)
        if "holdApplicationUntilProxyStarts" in doc:
            hold = _bool(str(doc["holdApplicationUntilProxyStarts"]).lower(), "proxy.istio.io/config")
        if "terminationDrainDuration" in doc:
            drain = _drain_duration(doc["terminationDrainDuration"])
    return ProxyOptions(
        image=a.get("sidecar.istio.io/proxyImage", config.proxy_image),
        resources=resources,
        log_level=log_level,
        component_log_level=component,
        native_sidecar=_flag(a, "sidecar.istio.io/nativeSidecar", config.native_sidecars),
        hold_application=hold,
        rewrite_probes=_flag(a, "sidecar.istio.io/rewriteAppHTTPProbers", config.rewrite_probes),
        include_inbound_ports=_ports(a, "traffic.sidecar.istio.io/includeInboundPorts", star=True, default="*") or "",
        exclude_inbound_ports=_ports(a, "traffic.sidecar.istio.io/excludeInboundPorts") or "",
        include_outbound_ranges=_cidrs(a, "traffic.sidecar.istio.io/includeOutboundIPRanges", default="*"),
        exclude_outbound_ranges=_cidrs(a, "traffic.sidecar.istio.io/excludeOutboundIPRanges", default=""),
        exclude_outbound_ports=_ports(a, "traffic.sidecar.istio.io/excludeOutboundPorts") or "",
        exclude_interfaces=_interfaces(a, "traffic.sidecar.istio.io/excludeInterfaces"),
        drain_seconds=drain,
        on_demand_clusters=_flag(a, ON_DEMAND_CLUSTERS, False),
        capture=mode != "NONE",
        status_port=_status_port(a),
    )


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_SUFFIXES |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def _quantity(text: str) -> float:
    """A Kubernetes quantity (already checked by _QUANTITY) as a number: 100m -> 0.1, 1Gi -> 2**30."""
    match = _QUANTITY.match(text.strip())
    assert match is not None
    return float(match.group(1)) * _SUFFIXES.get(match.group(3) or "", 1)


def _proxy_config(text: str) -> dict[str, Any]:
    """The ProxyConfig mapping of `proxy.istio.io/config`, keeping only scalar values. Anchors and
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
    return {str(k): v for k, v in doc.items() if isinstance(v, str | int | float | bool)}


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
        "0 (no readiness probe) or a port from 1024 to 65535 other than the proxy's 15000, 15001, 15006 and 15090",
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
