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

from ..model import MeshModel, MtlsMode, Protocol, Workload
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


def view_of(model: MeshModel, workload: Workload) -> ProxyView:
    ports: dict[int, Protocol] = {}
    for service in model.services_of(workload):
        for p in service.ports:
            # A port served as HTTP by one service and TCP by another is treated as TCP.
            seen = ports.get(p.workload_port)
            ports[p.workload_port] = p.protocol if seen in (None, p.protocol) else Protocol.TCP
    return ProxyView(
        workload.namespace, workload.service_account, tuple(sorted(ports.items())), model.mtls_of(workload)
    )


class MeshConfig:
    """Lazily generated config for one model. Not thread-safe; use from the event loop."""

    def __init__(self, model: MeshModel) -> None:
        self.model = model

    @functools.cached_property
    def outbound_clusters(self) -> list[message.Message]:
        m = self.model
        out: list[message.Message] = [clusters.outbound(m, s, p) for s in m.services for p in s.ports]
        return [*out, clusters.passthrough(), clusters.inbound_passthrough(), clusters.blackhole()]

    @functools.cached_property
    def assignments(self) -> list[message.Message]:
        return [endpoints.assignment(self.model, s, p) for s in self.model.services for p in s.ports]

    @functools.cached_property
    def outbound_listeners(self) -> list[message.Message]:
        m = self.model
        return [listeners.virtual_outbound(m), *(listeners.outbound_port(m, p) for p in listeners.outbound_ports(m))]

    @functools.cache  # noqa: B019 - bounded by the model's namespaces; dies with this object
    def routes(self, namespace: str) -> list[message.Message]:
        return [routes.route_config(self.model, port, namespace) for port in routes.http_ports(self.model)]

    @functools.cache  # noqa: B019
    def inbound_cluster(self, port: int) -> message.Message:
        return clusters.inbound(port)

    @functools.cache  # noqa: B019
    def inbound_listener(self, ports: InboundPorts, mtls: MtlsMode) -> message.Message:
        return listeners.virtual_inbound(self.model, ports, mtls)

    def resources(self, view: ProxyView) -> dict[str, list[message.Message]]:
        """CDS, EDS, LDS and RDS resources for a proxy with `view` (SDS comes from the CA)."""
        return {
            CLUSTER: [*self.outbound_clusters, *(self.inbound_cluster(p) for p, _ in view.inbound)],
            ENDPOINT: self.assignments,
            LISTENER: [*self.outbound_listeners, self.inbound_listener(view.inbound, view.mtls)],
            ROUTE: self.routes(view.namespace),
        }
