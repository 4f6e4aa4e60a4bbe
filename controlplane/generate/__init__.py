"""Model + proxy view -> Envoy resources. Pure functions; no I/O, no clocks.

`MeshConfig` holds everything generated from one `MeshModel`. Parts that every
proxy shares (outbound clusters, endpoints, outbound listeners) are built once
per model; parts that depend on the proxy (routes per namespace, the inbound
listener per port set and mTLS mode) once per distinct value, then reused, so
proxies with the same view get the very same message objects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.protobuf import message

from ..model import InterceptionMode, MeshModel, MtlsMode, Protocol, Workload
from ..resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from . import clusters, endpoints, listeners, routes
from .common import SECRET_DEFAULT, SECRET_ROOTCA

__all__ = ["SECRET_DEFAULT", "SECRET_ROOTCA", "MeshConfig", "ProxyView", "view_of"]

InboundPorts = tuple[tuple[int, Protocol], ...]


@dataclass(frozen=True, slots=True)
class ProxyView:
    """All a proxy's generated config depends on. Proxies with equal views share config."""

    namespace: str
    service_account: str
    inbound: InboundPorts = ()
    mtls: MtlsMode = MtlsMode.STRICT
    tproxy: bool = False
    """Its inbound capture is TPROXY: a transparent inbound listener that forwards from the client's address."""


def view_of(
    model: MeshModel, workload: Workload, interception: InterceptionMode = InterceptionMode.REDIRECT
) -> ProxyView:
    ports: dict[int, Protocol] = {}
    for service in model.services_of(workload):
        for p in service.ports:
            # A port served as HTTP by one service and TCP by another is treated as TCP.
            seen = ports.get(p.workload_port)
            ports[p.workload_port] = p.protocol if seen in (None, p.protocol) else Protocol.TCP
    return ProxyView(
        workload.namespace,
        workload.service_account,
        tuple(sorted(ports.items())),
        model.mtls_of(workload),
        interception == InterceptionMode.TPROXY,
    )


class MeshConfig:
    """Lazily generated config for one model. Not thread-safe; use from the event loop."""

    def __init__(self, model: MeshModel) -> None:
        self.model = model
        self._routes: dict[str, list[message.Message]] = {}
        self._inbound_clusters: dict[int, message.Message] = {}
        self._inbound_listeners: dict[tuple[InboundPorts, MtlsMode, bool], message.Message] = {}

    @functools.cached_property
    def outbound_clusters(self) -> list[message.Message]:
        m = self.model
        out: list[message.Message] = [clusters.outbound(m, s, p) for s in m.services for p in s.ports]
        return [*out, clusters.passthrough(), clusters.inbound_passthrough(), clusters.blackhole()]

    @functools.cached_property
    def assignments(self) -> list[message.Message]:
        m = self.model
        return [endpoints.assignment(m, s, p) for s in m.services if not s.external_name for p in s.ports]

    @functools.cached_property
    def outbound_listeners(self) -> list[message.Message]:
        m = self.model
        return [listeners.virtual_outbound(m), *(listeners.outbound_port(m, p) for p in listeners.outbound_ports(m))]

    # Memoized per instance, not with functools.cache: that cache lives on the class and would keep
    # every model's config alive (it held hundreds of MB after a few hundred pod changes).
    def routes(self, namespace: str) -> list[message.Message]:
        found = self._routes.get(namespace)
        if found is None:
            m = self.model
            found = self._routes[namespace] = [routes.route_config(m, port, namespace) for port in routes.http_ports(m)]
        return found

    def inbound_cluster(self, port: int) -> message.Message:
        found = self._inbound_clusters.get(port)
        if found is None:
            found = self._inbound_clusters[port] = clusters.inbound(port)
        return found

    def inbound_listener(self, ports: InboundPorts, mtls: MtlsMode, tproxy: bool = False) -> message.Message:
        key = (ports, mtls, tproxy)
        found = self._inbound_listeners.get(key)
        if found is None:
            found = self._inbound_listeners[key] = listeners.virtual_inbound(self.model, ports, mtls, tproxy=tproxy)
        return found

    def resources(self, view: ProxyView) -> dict[str, list[message.Message]]:
        """CDS, EDS, LDS and RDS resources for a proxy with `view` (SDS comes from the CA)."""
        return {
            CLUSTER: [*self.outbound_clusters, *(self.inbound_cluster(p) for p, _ in view.inbound)],
            ENDPOINT: self.assignments,
            LISTENER: [*self.outbound_listeners, self.inbound_listener(view.inbound, view.mtls, view.tproxy)],
            ROUTE: self.routes(view.namespace),
        }
