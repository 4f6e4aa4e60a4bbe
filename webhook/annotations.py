"""Istio's per-pod annotations -> proxy options. An invalid value names the annotation and what it accepts."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from .config import InjectionConfig

_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


class InvalidAnnotation(ValueError):
    def __init__(self, name: str, value: str, accepted: str) -> None:
        self.name, self.value, self.accepted = name, value, accepted
        super().__init__(f"annotation {name}: {value!r} is not valid; accepted: {accepted}")


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    image: str
    resources: dict[str, dict[str, str]]
    log_level: str
    component_log_level: str
    native_sidecar: bool
    hold_application: bool
    rewrite_probes: bool
    include_inbound_ports: str | None
    """None: the pod's container ports."""
    exclude_inbound_ports: str
    include_outbound_ranges: str
    exclude_outbound_ranges: str
    exclude_outbound_ports: str
    exclude_interfaces: str


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
    hold = config.hold_application_until_proxy_starts
    proxy_config = a.get("proxy.istio.io/config")
    if proxy_config is not None:
        try:
            doc = yaml.safe_load(proxy_config) or {}
            if not isinstance(doc, dict):
                raise ValueError
        except (yaml.YAMLError, ValueError):
            raise InvalidAnnotation(
                "proxy.istio.io/config", proxy_config, "a YAML or JSON ProxyConfig mapping"
            ) from None
        if "holdApplicationUntilProxyStarts" in doc:
            hold = _bool(str(doc["holdApplicationUntilProxyStarts"]).lower(), "proxy.istio.io/config")
    return ProxyOptions(
        image=a.get("sidecar.istio.io/proxyImage", config.proxy_image),
        resources=resources,
        log_level=log_level,
        component_log_level=component,
        native_sidecar=_flag(a, "sidecar.istio.io/nativeSidecar", config.native_sidecars),
        hold_application=hold,
        rewrite_probes=_flag(a, "sidecar.istio.io/rewriteAppHTTPProbers", config.rewrite_probes),
        include_inbound_ports=_ports(a, "traffic.sidecar.istio.io/includeInboundPorts", star=True, default=None),
        exclude_inbound_ports=_ports(a, "traffic.sidecar.istio.io/excludeInboundPorts") or "",
        include_outbound_ranges=_cidrs(a, "traffic.sidecar.istio.io/includeOutboundIPRanges", default="*"),
        exclude_outbound_ranges=_cidrs(a, "traffic.sidecar.istio.io/excludeOutboundIPRanges", default=""),
        exclude_outbound_ports=_ports(a, "traffic.sidecar.istio.io/excludeOutboundPorts") or "",
        exclude_interfaces=_interfaces(a, "traffic.sidecar.istio.io/excludeInterfaces"),
    )


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
