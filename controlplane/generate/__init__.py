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
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.listener.v3 import listener_pb2
from google.protobuf import message

from .. import scope
from ..model import Egress, InterceptionMode, MeshModel, MtlsMode, Protocol, Service, Workload, by_name
from ..resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from . import clusters, dns, endpoints, listeners, ondemand, routes
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
    dns_capture: bool = False
    """The proxy asked for a DNS listener (its pod's DNS is captured): node metadata DNS_CAPTURE."""
    router: bool = False
    """A gateway (`router~` node, the gateway injection template): no capture listeners and no inbound."""
    tproxy: bool = False
    """Its inbound capture is TPROXY: a transparent inbound listener that forwards from the client's address."""
    egress: Egress | None = None
    """The services in its scope (resolved: see `scope.resolve`); None: every service."""
    on_demand: bool = False
    """It asks for each cluster when it first needs it, and subscribes to none."""


def view_of(
    model: MeshModel,
    workload: Workload,
    *,
    interception: InterceptionMode = InterceptionMode.REDIRECT,
    dns_capture: bool = False,
    router: bool = False,
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
        egress=scope.resolve(model.egress_of(workload), workload.namespace),
        on_demand=workload.on_demand_clusters,
        dns_capture=dns_capture,
        router=router,
        tproxy=interception == InterceptionMode.TPROXY,
    )


class MeshConfig:
    """Lazily generated config for one model. Not thread-safe; use from the event loop.

    With `previous` (the config of the model before), a resource whose inputs did not change is
    that config's very message, not built again: a change costs work in proportion to what it
    touched (one moved endpoint: one cluster and one assignment), and the cache above packs each
    message object once. Only one generation is kept: what this model does not use is let go."""

    def __init__(self, model: MeshModel, previous: MeshConfig | None = None) -> None:
        self.model = model
        self._routes: dict[str, list[message.Message]] = {}
        self._inbound_clusters: dict[int, message.Message] = {}
        self._inbound_listeners: dict[tuple[InboundPorts, MtlsMode, bool], message.Message] = {}
        self._built: dict[tuple[object, ...], message.Message] = {}
        self._before = previous._built if previous is not None else {}
        # Everything a shared resource depends on beyond its own service (see `_settings`).
        self._settings = (model.trust_domain, model.domain_suffix, model.mtls, model.outbound_policy)
        self._dns_listeners: dict[str, message.Message] = {}

        self._scoped: dict[Egress, MeshConfig] = {}
        self._on_demand: dict[int, tuple[message.Message, message.Message]] = {}

    def scoped(self, egress: Egress) -> MeshConfig:
        """The config of a proxy that reaches only the services in resolved `egress`."""
        found = self._scoped.get(egress)
        if found is None:
            found = MeshConfig(dataclasses.replace(self.model, services=scope.in_scope(self.model, egress)))
            # A memo key holds every input of its message and never which other services a proxy
            # sees: every scope shares the full config's memo (clusters and endpoints are built once).
            found._built, found._before = self._built, self._before
            self._scoped[egress] = found
        return found

    def _reuse(self, key: tuple[object, ...], build: Callable[[], message.Message]) -> message.Message:
        """The message for `key`: this config's, else the previous config's, else `build()`.
        `key` must hold every input `build` reads from the model."""
        found = self._built.get(key)
        if found is None:
            found = self._before.get(key)
            if found is None:
                found = build()
            self._built[key] = found
        return found

    @staticmethod
    def _shape(service: Service) -> tuple[object, ...]:
        """What listeners, routes and clusters read of a service itself (not its selector or endpoints)."""
        return (service.name, service.namespace, service.ports, service.addresses, service.external_name)

    def _identities(self, service: Service) -> tuple[object, ...]:
        """What a cluster reads of the endpoints: who they are and whether they take mTLS, not where."""
        found = {
            (w.namespace, w.service_account, w.sidecar, w.mtls.value if w.mtls else "")
            for w in self.model.endpoints(service)
        }
        return tuple(sorted(found))

    @functools.cached_property
    def outbound_clusters(self) -> list[message.Message]:
        m = self.model
        out: list[message.Message] = []
        for s in m.services:
            inputs = (self._shape(s), self._identities(s), self._settings)
            out += [self._reuse(("cds", p, *inputs), functools.partial(clusters.outbound, m, s, p)) for p in s.ports]
        return [*out, clusters.passthrough(), clusters.inbound_passthrough(), clusters.blackhole()]

    @functools.cached_property
    def assignments(self) -> list[message.Message]:
        m = self.model
        return [
            self._reuse(
                ("eds", p, s.name, s.namespace, m.service_endpoints(s), self._settings),
                functools.partial(endpoints.assignment, m, s, p),
            )
            for s in m.services
            if not s.external_name
            for p in s.ports
        ]

    @functools.cached_property
    def outbound_listeners(self) -> list[message.Message]:
        m = self.model

        def inputs(s: Service) -> tuple[object, ...]:
            # A headless service is matched on its endpoints' addresses: they are inputs too.
            return self._shape(s) if s.addresses else (self._shape(s), tuple(w.address for w in m.endpoints(s)))

        return [
            listeners.virtual_outbound(m),
            *(
                self._reuse(
                    ("lds", port, self._settings, *map(inputs, self._services_by_port[port])),
                    functools.partial(listeners.outbound_port, m, port, self._services_by_port[port]),
                )
                for port in listeners.outbound_ports(m)
            ),
        ]

    @functools.cached_property
    def _services_by_port(self) -> dict[int, tuple[Service, ...]]:
        """The services on each port, by namespace and name (the order listeners and routes list them)."""
        found: dict[int, list[Service]] = {}
        for s in sorted(self.model.services, key=by_name):
            for port in dict.fromkeys(p.port for p in s.ports):
                found.setdefault(port, []).append(s)
        return {port: tuple(services) for port, services in found.items()}

    # Memoized per instance, not with functools.cache: that cache lives on the class and would keep
    # every model's config alive (it held hundreds of MB after a few hundred pod changes).
    def routes(self, namespace: str) -> list[message.Message]:
        found = self._routes.get(namespace)
        if found is None:
            m = self.model
            by_port = self._services_by_port
            found = self._routes[namespace] = [
                self._reuse(
                    ("rds", port, namespace, self._settings, *map(self._shape, by_port[port])),
                    functools.partial(routes.route_config, m, port, namespace, by_port[port]),
                )
                for port in routes.http_ports(m)
            ]
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

    @functools.cached_property
    def dns_table(self) -> bytes:
        """The DNS names every namespace's DNS listener shares, serialized once per model."""
        return dns.table(dns.shared_names(self.model))

    def dns_listener(self, namespace: str) -> message.Message:
        found = self._dns_listeners.get(namespace)
        if found is None:
            found = self._dns_listeners[namespace] = dns.dns_listener(self.model, namespace, self.dns_table)
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

        Its scope narrows what it reaches; its own inbound side is the same either way. A gateway gets
        the mesh's clusters and endpoints (and its certificate) but no listener: its listeners would
        come from Istio's Gateway and VirtualService resources, which Meshplane does not read, and
        exposing every mesh service at an ingress by default would be a hole."""
        out = self if view.egress is None else self.scoped(view.egress)
        if view.router:
            return {CLUSTER: out.outbound_clusters, ENDPOINT: out.assignments, LISTENER: [], ROUTE: []}
        listeners = [*out.outbound_listeners, self.inbound_listener(view.inbound, view.mtls, view.tproxy)]
        if view.on_demand:
            listeners = [self.on_demand_listener(lst) for lst in listeners]
        if view.dns_capture:  # every mesh name resolves, in scope or not (an on-demand call needs its address)
            listeners.append(self.dns_listener(view.namespace))
        return {
            CLUSTER: [*out.outbound_clusters, *(self.inbound_cluster(p) for p, _ in view.inbound)],
            ENDPOINT: out.assignments,
            LISTENER: listeners,
            ROUTE: out.routes(view.namespace),
        }
