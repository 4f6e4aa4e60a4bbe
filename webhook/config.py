"""Injection settings: what the injector puts into pods, shared with the control plane's settings.

Read once (flags and an optional YAML file, like Istio's injector ConfigMap) and passed down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .selector import InjectionConfigError, LabelSelector

DEFAULT_IMAGE = "meshplane-proxy:1.40.0"


@dataclass(frozen=True, slots=True)
class InjectionConfig:
    proxy_image: str = DEFAULT_IMAGE
    """The sidecar and init image (`sidecar.istio.io/proxyImage` overrides it per pod)."""
    init_image: str = ""
    """The capture init container's image (it needs `meshctl` and iptables: the control plane image
    has both); empty: the sidecar's image, as the local sandbox's carries them too."""
    xds_address: str = "meshplane.mesh-system.svc:15012"
    """Where injected sidecars find the xDS server (its TLS port, or unix:/path)."""
    xds_ca: str = ""
    """The mesh trust bundle (PEM) injected sidecars verify the control plane's TLS certificate with,
    carried in their bootstrap; `meshctl serve` fills it from its CA. Needed for a TCP `xds_address`."""
    token_audience: str = "meshplane"
    """The audience of the projected service-account token sidecars authenticate with."""
    admin_socket: str = ""
    """Serve the sidecar's admin API on this unix socket path (in an emptyDir volume the injector adds)
    instead of 127.0.0.1:15000, so a host outside the pod can read /config_dump (the local sandbox)."""
    revision: str = "default"
    """This control plane's revision, matched against `istio.io/rev` labels."""
    enabled_by_default: bool = True
    """The policy when nothing on the pod or namespace decides (Istio's `policy: enabled`)."""
    never_inject: tuple[LabelSelector, ...] = ()
    always_inject: tuple[LabelSelector, ...] = ()
    native_sidecars: bool = False
    """Put the proxy in initContainers with restartPolicy: Always (Kubernetes 1.29+)."""
    hold_application_until_proxy_starts: bool = False
    rewrite_probes: bool = True
    ignore_invalid_annotations: bool = False
    """Inject with defaults instead of denying a pod whose annotations are invalid."""
    domain_suffix: str = "cluster.local"
    proxy_metadata: Mapping[str, str] = field(default_factory=dict)
    """Mesh-wide ProxyConfig `proxyMetadata` (Istio's meshConfig.defaultConfig.proxyMetadata), e.g.
    {ISTIO_META_DNS_CAPTURE: "true"} for every pod; a pod's `proxy.istio.io/config` adds to it."""
    proxy_uid: int = 1337
    log_level: str = "warning"
    resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2000m", "memory": "1Gi"},
        }
    )

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> InjectionConfig:
        """Defaults, then the YAML file at `path` (Istio-style keys), then `overrides` that are not None."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                doc = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise InjectionConfigError(f"{path}: cannot read the injection config: {e}") from None
            if not isinstance(doc, dict):
                raise InjectionConfigError(f"{path}: the injection config must be a mapping")
            values = _from_yaml(doc, str(path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_KEYS = {
    "policy": "enabled_by_default",
    "proxyImage": "proxy_image",
    "initImage": "init_image",
    "xdsAddress": "xds_address",
    "tokenAudience": "token_audience",
    "adminSocket": "admin_socket",
    "revision": "revision",
    "neverInjectSelector": "never_inject",
    "alwaysInjectSelector": "always_inject",
    "nativeSidecars": "native_sidecars",
    "holdApplicationUntilProxyStarts": "hold_application_until_proxy_starts",
    "rewriteAppHTTPProbers": "rewrite_probes",
    "ignoreInvalidAnnotations": "ignore_invalid_annotations",
    "proxyMetadata": "proxy_metadata",
}


def _from_yaml(doc: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise InjectionConfigError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = _KEYS[key]
        if key == "policy":
            if value not in ("enabled", "disabled"):
                raise InjectionConfigError(f"{source}: policy must be enabled or disabled, got {value!r}")
            out[name] = value == "enabled"
        elif key == "proxyMetadata":
            if not isinstance(value, dict) or not all(isinstance(v, str | int | float | bool) for v in value.values()):
                raise InjectionConfigError(f"{source}: proxyMetadata must map variable names to values")
            out[name] = {str(k): metadata_text(v) for k, v in value.items()}
        elif key in ("neverInjectSelector", "alwaysInjectSelector"):
            if not isinstance(value, list):
                raise InjectionConfigError(f"{source}: {key} must be a list of label selectors")
            out[name] = tuple(LabelSelector.parse(v, f"{source}: {key}") for v in value)
        else:
            out[name] = value
    return out


def metadata_text(value: str | float | bool) -> str:
    """A proxyMetadata value as the environment variable Istio renders it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
