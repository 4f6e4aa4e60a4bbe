"""A connected proxy's identity, read from its xDS node (id and metadata), Istio's way.

Node id: `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` (`router~...` for a gateway).
Metadata keys (as in Istio's bootstrap): NAMESPACE, SERVICE_ACCOUNT, NAME, LABELS, INSTANCE_IPS;
DNS_CAPTURE (Istio's ISTIO_META_DNS_CAPTURE): the pod's DNS is captured, so the proxy wants a DNS
listener; INTERCEPTION_MODE (REDIRECT, the default, TPROXY or NONE); and Meshplane's
ON_DEMAND_CLUSTERS ("true": the sidecar subscribes to no clusters and asks for each on demand).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from meshplane.bootstrap.envoy import ON_DEMAND_CLUSTERS

from . import names
from .model import InterceptionMode, Workload, labels


class NodeError(ValueError):
    """The node does not say who the proxy is; the message tells what is missing."""


@dataclass(frozen=True, slots=True)
class ProxyNode:
    id: str
    workload: Workload
    dns_capture: bool = False
    router: bool = False
    """A gateway (node type `router`): served no capture listeners."""
    interception: InterceptionMode = InterceptionMode.REDIRECT


def node_id(ip: str, name: str, namespace: str, domain_suffix: str = "cluster.local") -> str:
    return f"sidecar~{ip}~{name}.{namespace}~{namespace}.svc.{domain_suffix}"


NODE_TYPES = ("sidecar", "router")
"""Istio's node types Meshplane serves: a sidecar, and a gateway (injected with the gateway template)."""
MAX_NODE_ID = 512
"""Istio's ids are well under this; a longer one is not a sidecar of ours."""


def from_node(node: base_pb2.Node) -> ProxyNode:
    """The proxy's workload from its node, validated like the mesh file: a bad field raises
    `NodeError` whose message starts with the field's name, so the proxy's operator can fix it."""
    if not node.id:
        raise NodeError("node id: missing")
    if len(node.id) > MAX_NODE_ID:
        raise NodeError(f"node id: longer than {MAX_NODE_ID} characters")
    try:
        meta = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    except ValueError:  # NaN or infinity, which JSON cannot carry
        raise NodeError("metadata: holds a number that is not finite (NaN or infinity)") from None
    parts = node.id.split("~")
    kind = parts[0] if len(parts) == 4 else "sidecar"
    if kind not in NODE_TYPES:
        raise NodeError(f"node id: type {kind[:32]!r} is not one of {', '.join(NODE_TYPES)}")
    ip_from_id = parts[1] if len(parts) == 4 else ""
    pod_from_id, _, ns_from_id = parts[2].partition(".") if len(parts) == 4 else ("", "", "")
    namespace = _text(meta, "NAMESPACE", ns_from_id)
    name = _text(meta, "NAME", pod_from_id)
    if not namespace or not name:
        raise NodeError(
            f"NAMESPACE: node {node.id!r} says no namespace or name (set NAMESPACE and NAME metadata, "
            "or use an id like sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local)"
        )
    _check("NAMESPACE", namespace, names.DNS_LABEL.match(namespace), "a DNS label of 63 characters at most")
    _check("NAME", name, names.DNS_NAME.match(name), "a DNS name of 253 characters at most")
    service_account = _text(meta, "SERVICE_ACCOUNT", "default")
    _check("SERVICE_ACCOUNT", service_account, names.DNS_NAME.match(service_account), "a Kubernetes name")
    ips = _text(meta, "INSTANCE_IPS", ip_from_id).split(",")
    try:
        address = str(ipaddress.ip_address(ips[0].strip()))
    except ValueError:
        raise NodeError(f"INSTANCE_IPS: {ips[0][:64]!r} is not an IP address (nor is the node id's)") from None
    mode = _text(meta, "INTERCEPTION_MODE", InterceptionMode.REDIRECT)
    if mode not in tuple(InterceptionMode):
        raise NodeError(f"INTERCEPTION_MODE: {mode[:64]!r} is not one of {', '.join(InterceptionMode)}")
    return ProxyNode(
        node.id,
        Workload(
            name=name,
            namespace=namespace,
            service_account=service_account,
            address=address,
            labels=labels(_labels(meta.get("LABELS"))),
            # A gateway (`router`) terminates no mesh mTLS on its own ports: clients send it plaintext.
            sidecar=kind == "sidecar",
            on_demand_clusters=_text(meta, ON_DEMAND_CLUSTERS, "false").lower() == "true",
        ),
        dns_capture=_flag(meta, "DNS_CAPTURE"),
        router=kind == "router",
        interception=InterceptionMode(mode),
    )


def _text(meta: dict[str, object], key: str, default: str) -> str:
    value = meta.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise NodeError(f"{key}: must be a string, got {type(value).__name__}")
    return value


def _flag(meta: dict[str, object], key: str) -> bool:
    """A boolean as Istio's metadata carries it: the text "true" (any case), or a JSON true."""
    value = meta.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    if not isinstance(value, str):
        raise NodeError(f"{key}: must be true or false, got {type(value).__name__}")
    return value.strip().lower() in ("true", "1")


def _check(key: str, value: str, ok: object, what: str) -> None:
    if not ok:
        raise NodeError(f"{key}: {value[:64]!r}{'...' if len(value) > 64 else ''} is not {what}")


def _labels(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise NodeError("LABELS: must be a map of strings")
    if len(raw) > names.MAX_LABELS:
        raise NodeError(f"LABELS: {len(raw)} labels, more than the {names.MAX_LABELS} allowed")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not names.is_label_key(key):
            raise NodeError(f"LABELS.{key[:64]}: not a valid label key ([prefix/]name, name of 63 characters at most)")
        if not isinstance(value, str) or not names.is_label_value(value):
            raise NodeError(f"LABELS.{key}: {str(value)[:64]!r} is not a valid label value (63 characters at most)")
        out[key] = value
    return out
