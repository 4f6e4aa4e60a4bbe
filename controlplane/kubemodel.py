"""Kubernetes objects -> mesh model parts, as Istio maps them. Pure: raw API objects (dicts) in.

- A Service becomes a service of host `<name>.<namespace>.svc.<domainSuffix>` with its ClusterIPs
  as addresses. A port's protocol comes from `appProtocol`, else the port name's prefix (`http-`,
  `http2-`, `grpc-`), else TCP; UDP and SCTP ports are left out (Envoy sidecars carry TCP).
- Endpoints come from the Service's EndpointSlices: ready endpoints, or, when none is ready, the
  serving ones that are terminating (kube-proxy's rule), on the port the slice names for each
  service port, so a named targetPort resolves per pod.
- An endpoint's identity is its pod's service account; it is sent mTLS when its pod runs our
  sidecar: Istio's `security.istio.io/tlsMode` label says `istio`, or, without the label, the
  injector's status annotation is there and the pod is not a gateway (`inject.istio.io/templates`).
- A headless Service routes to its pods' IPs; `type: ExternalName` becomes a DNS cluster.
- mTLS mode: the annotation `security.meshplane.io/mtls` (STRICT | PERMISSIVE | DISABLE) on a Pod,
  else on its Namespace, else the mesh-wide mode.
- Sidecar scope: the annotation `sidecar.meshplane.io/egressHosts` (Istio Sidecar egress hosts,
  e.g. `./*, istio-system/*`) on a Pod, else on its Namespace, else the mesh file's `sidecars`.

An object that makes no sense is skipped, with one message naming it; the rest maps as usual.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import names, scope
from .model import Egress, Endpoint, MtlsMode, Port, Protocol, Service, Workload, labels

Obj = Mapping[str, Any]
Key = tuple[str, str]
"""(namespace, name)"""

MTLS_ANNOTATION = "security.meshplane.io/mtls"
INJECTED_ANNOTATION = "sidecar.istio.io/status"
TEMPLATES_ANNOTATION = "inject.istio.io/templates"
TLS_MODE_LABEL = "security.istio.io/tlsMode"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_APP_PROTOCOLS = {
    "http": Protocol.HTTP,
    "http2": Protocol.HTTP2,
    "kubernetes.io/h2c": Protocol.HTTP2,
    "grpc": Protocol.GRPC,
}
_PORT_NAME = names.DNS_LABEL  # IANA service names are stricter (15 characters); Kubernetes ports allow 63


class Skip(ValueError):
    """An object that cannot be mapped; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class KubeView:
    """What the cluster contributes to the model."""

    services: tuple[Service, ...]
    workloads: tuple[Workload, ...]
    skipped: tuple[str, ...]
    """One line per object left out, naming it and why."""


_Mapped = tuple[Obj, MtlsMode | None, Egress | None, Workload | None, tuple[str, ...]]


class PodMemo:
    """The workloads of the last view's pods, by object identity: the informers replace an object
    that changed and never change one in place, so an object seen before maps as it did then. With
    it, a view after one change maps one pod instead of every pod (5,000 pods: 100 ms of 200)."""

    def __init__(self) -> None:
        self._last: dict[int, _Mapped] = {}
        self._next: dict[int, _Mapped] = {}

    def workload(
        self, pod: Obj, mode: MtlsMode | None, egress: Egress | None = None
    ) -> tuple[Workload | None, tuple[str, ...]]:
        """The pod's workload (None before it has an IP) and the notes mapping it made; raises `Skip`.
        `mode` and `egress` are its namespace's, which the workload also depends on."""
        hit = self._last.get(id(pod))
        if hit is None or hit[0] is not pod or hit[1] is not mode or hit[2] != egress:
            notes: list[str] = []
            hit = (pod, mode, egress, pod_workload(pod, mode, notes, egress), tuple(notes))
        self._next[id(pod)] = hit
        return hit[3], hit[4]

    def done(self) -> None:
        """One view is over: what its pods mapped to is kept, the rest let go."""
        self._last, self._next = self._next, {}


def view(
    namespaces: Mapping[str, Obj],
    services: Mapping[Key, Obj],
    slices: Mapping[Key, Obj],
    pods: Mapping[Key, Obj],
    memo: PodMemo | None = None,
) -> KubeView:
    """With `memo` (one per source, used by one thread at a time), unchanged pods are not mapped again."""
    skipped: list[str] = []
    ns_modes = {name: _mtls(ns, f"Namespace {name}", skipped) for name, ns in namespaces.items()}
    ns_egress = {name: _egress(ns, f"Namespace {name}", skipped) for name, ns in namespaces.items()}
    workloads: dict[Key, Workload] = {}
    memo = memo or PodMemo()
    for key, pod in pods.items():
        try:
            w, notes = memo.workload(pod, ns_modes.get(key[0]), ns_egress.get(key[0]))
            skipped.extend(notes)
            if w is not None:
                workloads[key] = w
        except Skip as e:
            skipped.append(f"Pod {key[0]}/{key[1]}: {e}")
    memo.done()
    by_service: dict[Key, list[Obj]] = {}
    for (ns, _), s in slices.items():
        owner = ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if owner:
            by_service.setdefault((ns, owner), []).append(s)
    out: list[Service] = []
    for key, svc in sorted(services.items()):
        try:
            out.append(service(svc, by_service.get(key, []), workloads))
        except Skip as e:
            skipped.append(f"Service {key[0]}/{key[1]}: {e}")
    return KubeView(tuple(out), tuple(workloads[k] for k in sorted(workloads)), tuple(skipped))


def pod_workload(
    pod: Obj,
    namespace_mode: MtlsMode | None = None,
    notes: list[str] | None = None,
    namespace_egress: Egress | None = None,
) -> Workload | None:
    """The workload a pod is, once it has an IP (None before). A bad annotation is noted in `notes`
    and ignored; labels or a service account that cannot be valid skip the pod (`Skip`)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return None
    pod_labels = meta.get("labels") or {}
    if len(pod_labels) > names.MAX_LABELS:
        raise Skip(f"{len(pod_labels)} labels, more than the {names.MAX_LABELS} a workload may carry")
    for k, v in pod_labels.items():
        if not isinstance(v, str) or not names.is_label_key(k) or not names.is_label_value(v):
            raise Skip(f"label {str(k)[:64]!r} is not a valid Kubernetes label")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if not names.DNS_NAME.match(str(account)):
        raise Skip(f"service account {str(account)[:64]!r} is not a Kubernetes name")
    annotations = meta.get("annotations") or {}
    # The tlsMode label decides, as in Istio; without it, an injected pod that is not a gateway (which
    # takes no mesh mTLS on its own ports).
    tls_mode = pod_labels.get(TLS_MODE_LABEL)
    injected = INJECTED_ANNOTATION in annotations and annotations.get(TEMPLATES_ANNOTATION, "sidecar") != "gateway"
    sidecar = tls_mode == "istio" if tls_mode is not None else injected
    notes = notes if notes is not None else []
    what = f"Pod {meta.get('namespace')}/{meta.get('name')}"
    return Workload(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace")),
        service_account=str(account),
        address=_ip(ip),
        labels=labels(pod_labels),
        mtls=_mtls(pod, what, notes) or namespace_mode,
        sidecar=sidecar,
        egress=_egress(pod, what, notes) or namespace_egress,
    )


def service(svc: Obj, slices: list[Obj], pods: Mapping[Key, Workload]) -> Service:
    meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    ports: list[Port] = []
    for i, p in enumerate(spec.get("ports") or []):
        if (p.get("protocol") or "TCP") != "TCP":
            continue
        number = p.get("port")
        if not isinstance(number, int) or not 0 < number < 65536:
            raise Skip(f"ports[{i}].port {number!r} is not a port number")
        port_name = p.get("name") or f"port-{number}"
        if not isinstance(port_name, str) or not _PORT_NAME.match(port_name):
            raise Skip(f"ports[{i}].name {str(port_name)[:64]!r} is not a valid port name")
        target = p.get("targetPort")
        target_port = target if isinstance(target, int) and 0 < target < 65536 else None
        app_protocol = str(p.get("appProtocol") or "").lower()
        if app_protocol:
            protocol = _APP_PROTOCOLS.get(app_protocol, Protocol.TCP)
        else:
            protocol = Protocol.from_port_name(port_name)
        ports.append(Port(number, port_name, protocol, target_port))
    if not ports:
        raise Skip("no TCP ports")
    if spec.get("type") == "ExternalName":
        external = str(spec.get("externalName") or "").rstrip(".").lower()
        if not names.DNS_NAME.match(external):
            raise Skip(f"externalName {external[:64]!r} is not a DNS name")
        return Service(name, namespace, tuple(ports), endpoints=(), external_name=external)
    ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"]
    return Service(
        name,
        namespace,
        tuple(ports),
        selector=labels(spec.get("selector") or {}),
        addresses=tuple(_ip(ip) for ip in ips),
        endpoints=_endpoints(namespace, slices, pods, ports[0].name if len(ports) == 1 else ""),
    )


def _endpoints(namespace: str, slices: list[Obj], pods: Mapping[Key, Workload], only_port: str) -> tuple[Endpoint, ...]:
    """`only_port`: the name given to a single-port service's unnamed port, which slices leave unnamed."""
    ready: list[Endpoint] = []
    terminating: list[Endpoint] = []
    for s in sorted(slices, key=lambda s: str((s.get("metadata") or {}).get("name"))):
        slice_ports = tuple(
            (str(p.get("name") or only_port), p["port"])
            for p in s.get("ports") or []  # null when the slice has none
            if isinstance(p.get("port"), int) and (p.get("protocol") or "TCP") == "TCP"
        )
        for e in s.get("endpoints") or []:
            addresses = e.get("addresses") or []
            if not addresses:
                continue
            conditions = e.get("conditions") or {}
            is_ready = conditions.get("ready") is not False  # unset means ready
            serving = conditions.get("serving", is_ready) is not False
            if not is_ready and not (serving and conditions.get("terminating")):
                continue
            ref = e.get("targetRef") or {}
            workload = (
                pods.get((ref.get("namespace") or namespace, ref.get("name") or ""))
                if ref.get("kind") == "Pod"
                else None
            )
            try:
                address = _ip(addresses[0])
            except Skip:
                continue
            if workload is None or workload.address != address:
                # Not a pod we know (yet), or a second address of it: an endpoint without a sidecar.
                workload = Workload(f"{address}", namespace, "default", address, sidecar=False)
            (ready if is_ready else terminating).append(Endpoint(workload, slice_ports))
    return tuple(ready or terminating)


def _mtls(obj: Obj, what: str, skipped: list[str]) -> MtlsMode | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(MTLS_ANNOTATION)
    if value is None:
        return None
    try:
        return MtlsMode(str(value).upper())
    except ValueError:
        skipped.append(f"{what}: annotation {MTLS_ANNOTATION}={str(value)[:32]!r} is not STRICT, PERMISSIVE or DISABLE")
        return None


def _egress(obj: Obj, what: str, skipped: list[str]) -> Egress | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(scope.ANNOTATION)
    if value is None:
        return None
    try:
        return scope.parse_hosts(str(value))
    except ValueError as e:
        # Left unscoped: a sidecar that is sent too much still works; one sent too little does not.
        skipped.append(f"{what}: annotation {scope.ANNOTATION}: {str(e)[:128]}; the sidecar is not scoped")
        return None


@functools.lru_cache(maxsize=65536)  # every view parses every endpoint address again otherwise
def _ip(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise Skip(f"{str(value)[:64]!r} is not an IP address") from None
