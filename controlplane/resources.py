"""xDS resource types: type URLs, which types are wildcard, and the push order.

The order is defined once, here. Clusters come before the endpoints they load,
listeners before the routes they name, so a proxy never points at something it
has not received yet (make-before-break); removals are sent last (see stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import any_pb2

_PREFIX = "type.googleapis.com/"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
"""CDS, EDS, LDS, RDS, SDS: the order Istio uses, and the one Envoy's warming expects."""

WILDCARD: frozenset[str] = frozenset({CLUSTER, LISTENER})
"""Types whose every response carries the proxy's full set (state of the world)."""

SHORT_NAMES = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", SECRET: "SDS"}


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource, packed and serialized once and shared by every stream that sends it."""

    name: str
    version: str
    packed: any_pb2.Any


Resources = dict[str, Resource]
"""name -> Resource for one type."""
