"""RDS: one RouteConfiguration per outbound HTTP port, named after the port, as Istio does.

Route tables depend on the proxy's namespace: short names (`reviews`, `reviews:9080`)
resolve within the caller's own namespace only, as Kubernetes DNS does.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2

from meshplane.bootstrap.protobuf import pack

from ..model import MeshModel, OutboundPolicy, Port, Service, by_name
from .common import PASSTHROUGH, outbound_cluster_name

RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def http_ports(model: MeshModel) -> list[int]:
    return sorted({p.port for s in model.services for p in s.ports if p.protocol.is_http})


def route_config(
    model: MeshModel, port: int, namespace: str, services: Sequence[Service] | None = None
) -> route_pb2.RouteConfiguration:
    """`services`: those with `port`, by namespace and name, when the caller has them."""
    claimed: set[str] = set()
    hosts = []
    ordered = services if services is not None else sorted(model.services, key=by_name)
    # Services of the caller's namespace first, so their short names win.
    mine = [s for s in ordered if s.namespace == namespace]
    for service in [*mine, *(s for s in ordered if s.namespace != namespace)]:
        for p in service.ports:
            if p.port == port and p.protocol.is_http:
                domains = [d for d in domains_of(model, service, p, namespace) if d not in claimed]
                claimed.update(domains)
                if domains:
                    hosts.append(_virtual_host(model, service, p, domains))
    hosts.append(_catch_all(model.outbound_policy))
    return route_pb2.RouteConfiguration(name=str(port), virtual_hosts=hosts, validate_clusters={"value": False})


def domains_of(model: MeshModel, service: Service, port: Port, namespace: str) -> list[str]:
    """The Host/authority forms a client may use for `service` on `port`."""
    host = service.hostname(model.domain_suffix)
    names = [host, f"{service.name}.{service.namespace}.svc", f"{service.name}.{service.namespace}"]
    if service.namespace == namespace:
        names.append(service.name)
    names.extend(f"[{a}]" if ":" in a else a for a in service.addresses)
    return [form for name in names for form in (name, f"{name}:{port.port}")]


def _virtual_host(model: MeshModel, service: Service, port: Port, domains: list[str]) -> rc.VirtualHost:
    vhost = rc.VirtualHost()
    vhost.CopyFrom(_VIRTUAL_HOST)  # built once: copying is several times cheaper than building
    vhost.name = f"{service.hostname(model.domain_suffix)}:{port.port}"
    vhost.domains.extend(domains)
    vhost.routes[0].route.cluster = outbound_cluster_name(port, service, model.domain_suffix)
    return vhost


_VIRTUAL_HOST = rc.VirtualHost(
    routes=[
        rc.Route(
            name="default",
            match=rc.RouteMatch(prefix="/"),
            route=rc.RouteAction(
                timeout={"seconds": 0},
                retry_policy=rc.RetryPolicy(
                    retry_on=RETRY_ON,
                    num_retries={"value": 2},
                    retry_host_predicate=[
                        rc.RetryPolicy.RetryHostPredicate(
                            name="envoy.retry_host_predicates.previous_hosts",
                            typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
                        )
                    ],
                    host_selection_retry_max_attempts=5,
                ),
            ),
        )
    ],
)
"""Every service's virtual host but its name, domains and cluster; never modified (copied)."""


def _catch_all(policy: OutboundPolicy) -> rc.VirtualHost:
    if policy is OutboundPolicy.ALLOW_ANY:
        action = {"route": rc.RouteAction(cluster=PASSTHROUGH, timeout={"seconds": 0})}
        return rc.VirtualHost(
            name="allow_any",
            domains=["*"],
            routes=[rc.Route(name="allow_any", match=rc.RouteMatch(prefix="/"), **action)],
        )
    return rc.VirtualHost(
        name="block_all",
        domains=["*"],
        routes=[
            rc.Route(
                name="block_all", match=rc.RouteMatch(prefix="/"), direct_response=rc.DirectResponseAction(status=502)
            )
        ],
    )
