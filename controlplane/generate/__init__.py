"""Model + proxy view -> Envoy resources. Pure functions; no I/O, no clocks.

`MeshConfig` holds everything generated from one `MeshModel`. Parts that every
proxy shares (outbound clusters, endpoints, outbound listeners) are built once
per model; parts that depend on the proxy (routes per namespace, the inbound
listener per port set and mTLS mode) once per distinct value, then reused, so
proxies with the same view get the very same message objects.

A proxy with a sidecar scope (`ProxyView.egress`) gets the config of a model that holds only the
services in scope: clusters and endpoints are the same objects as the full mesh's, listeners and
routes are built once per distinct scope.

A proxy that asks for its clusters on demand (`ProxyView.on_demand`) is offered the same clusters
(it gets only those it asks for) and listeners that fetch a missing cluster (`ondemand`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from envoy.config.listener.v3 import listener_pb2
from google.protobuf import message

from .. import scope
from ..model import Egress, MeshModel, MtlsMode, Port, Protocol, Service, Workload
from ..resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from . import clusters, endpoints, listeners, ondemand, routes
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
    egress: Egress | None = None
    """The services in its scope (resolved: see `scope.resolve`); None: every service."""
    on_demand: bool = False
    """It asks for each cluster when it first needs it, and subscribes to none."""


def view_of(model: MeshModel, workload: Workload) -> ProxyView:
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
        scope.resolve(model.egress_of(workload), workload.namespace),
        workload.on_demand_clusters,
    )


PortKey = tuple[str, str, int]
"""(namespace, service name, port): one outbound cluster and its endpoints within a model."""


class MeshConfig:
    """Lazily generated config for one model. Not thread-safe; use from the event loop."""

    def __init__(self, model: MeshModel) -> None:
        self.model = model
        self._routes: dict[str, list[message.Message]] = {}
        self._inbound_clusters: dict[int, message.Message] = {}
        self._inbound_listeners: dict[tuple[InboundPorts, MtlsMode], message.Message] = {}
        # Shared with the scoped configs: a cluster or its endpoints depend on the service and the
        # mesh-wide settings, never on which other services a proxy sees.
        self._clusters: dict[PortKey, message.Message] = {}
        self._assignments: dict[PortKey, message.Message] = {}
        self._scoped: dict[Egress, MeshConfig] = {}
        self._on_demand: dict[int, tuple[message.Message, message.Message]] = {}

    def scoped(self, egress: Egress) -> MeshConfig:
        """The config of a proxy that reaches only the services in resolved `egress`."""
        found = self._scoped.get(egress)
        if found is None:
            found = MeshConfig(dataclasses.replace(self.model, services=scope.in_scope(self.model, egress)))
            found._clusters, found._assignments = self._clusters, self._assignments
            self._scoped[egress] = found
        return found

    def _cluster(self, service: Service, port: Port) -> message.Message:
        key = (service.namespace, service.name, port.port)
        found = self._clusters.get(key)
        if found is None:
            found = self._clusters[key] = clusters.outbound(self.model, service, port)
        return found

    def _assignment(self, service: Service, port: Port) -> message.Message:
        key = (service.namespace, service.name, port.port)
        found = self._assignments.get(key)
        if found is None:
            found = self._assignments[key] = endpoints.assignment(self.model, service, port)
        return found

    @functools.cached_property
    def outbound_clusters(self) -> list[message.Message]:
        out = [self._cluster(s, p) for s in self.model.services for p in s.ports]
        return [*out, clusters.passthrough(), clusters.inbound_passthrough(), clusters.blackhole()]

    @functools.cached_property
    def assignments(self) -> list[message.Message]:
        return [self._assignment(s, p) for s in self.model.services if not s.external_name for p in s.ports]

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

    def inbound_listener(self, ports: InboundPorts, mtls: MtlsMode) -> message.Message:
        found = self._inbound_listeners.get((ports, mtls))
        if found is None:
            found = self._inbound_listeners[(ports, mtls)] = listeners.virtual_inbound(self.model, ports, mtls)
        return found

    def on_demand_listener(self, original: message.Message) -> message.Message:
        """`original`, fetching its clusters on demand; once per listener object, so views that
        share a listener share its on-demand form."""
        hit = self._on_demand.get(id(original))
        if hit is None or hit[0] is not original:
            assert isinstance(original, listener_pb2.Listener)
            hit = self._on_demand[id(original)] = (original, ondemand.listener(original))
        return hit[1]

    def resources(self, view: ProxyView) -> dict[str, list[message.Message]]:
        """CDS, EDS, LDS and RDS resources for a proxy with `view` (SDS comes from the CA).
        Its scope narrows what it reaches; its own inbound side is the same either way."""
        out = self if view.egress is None else self.scoped(view.egress)
        listeners = [*out.outbound_listeners, self.inbound_listener(view.inbound, view.mtls)]
        if view.on_demand:
            listeners = [self.on_demand_listener(lst) for lst in listeners]
        return {
            CLUSTER: [*out.outbound_clusters, *(self.inbound_cluster(p) for p, _ in view.inbound)],
            ENDPOINT: out.assignments,
            LISTENER: listeners,
            ROUTE: out.routes(view.namespace),
        }
