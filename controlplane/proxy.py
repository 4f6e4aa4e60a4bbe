"""A connected proxy's identity, read from its xDS node (id and metadata), Istio's way.

Node id: `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`. Metadata keys
(as in Istio's bootstrap): NAMESPACE, SERVICE_ACCOUNT, NAME, LABELS, INSTANCE_IPS.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from .model import Workload, labels


class NodeError(ValueError):
    """The node does not say who the proxy is; the message tells what is missing."""


@dataclass(frozen=True, slots=True)
class ProxyNode:
    id: str
    workload: Workload


def node_id(ip: str, name: str, namespace: str, domain_suffix: str = "cluster.local") -> str:
    return f"sidecar~{ip}~{name}.{namespace}~{namespace}.svc.{domain_suffix}"


def from_node(node: base_pb2.Node) -> ProxyNode:
    if not node.id:
        raise NodeError("the node has no id")
    meta = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    parts = node.id.split("~")
    ip_from_id = parts[1] if len(parts) == 4 else ""
    pod_from_id, _, ns_from_id = parts[2].partition(".") if len(parts) == 4 else ("", "", "")
    namespace = str(meta.get("NAMESPACE") or ns_from_id)
    name = str(meta.get("NAME") or pod_from_id)
    ips = str(meta.get("INSTANCE_IPS") or ip_from_id).split(",")
    if not namespace or not name:
        raise NodeError(
            f"node {node.id!r}: no namespace or name (set NAMESPACE and NAME metadata, "
            "or use an id like sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local)"
        )
    try:
        address = str(ipaddress.ip_address(ips[0].strip()))
    except ValueError:
        raise NodeError(f"node {node.id!r}: {ips[0]!r} is not an IP address (INSTANCE_IPS or the node id)") from None
    raw_labels = meta.get("LABELS") or {}
    if not isinstance(raw_labels, dict):
        raise NodeError(f"node {node.id!r}: LABELS must be a map of strings")
    return ProxyNode(
        node.id,
        Workload(
            name=name,
            namespace=namespace,
            service_account=str(meta.get("SERVICE_ACCOUNT") or "default"),
            address=address,
            labels=labels({str(k): str(v) for k, v in raw_labels.items()}),
        ),
    )
