"""Listeners for a sidecar that asks for its clusters on demand (Envoy's on-demand CDS over ADS).

Such a sidecar subscribes to no clusters. Every filter that names a cluster learns to fetch it
when a request or connection first needs it: HTTP connection managers get the
`envoy.filters.http.on_demand` filter before the router (routes name clusters the sidecar may not
have: their `validate_clusters` is off), TCP proxies their `on_demand` config. The request or
connection waits for the cluster and its endpoints, at most `TIMEOUT`.
"""

from __future__ import annotations

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from meshplane.bootstrap.protobuf import pack, seconds

from .common import ads

TIMEOUT = 5.0
ROUTER = "envoy.filters.http.router"
ON_DEMAND = "envoy.filters.http.on_demand"


def listener(original: listener_pb2.Listener) -> listener_pb2.Listener:
    """`original` with every cluster fetched on demand (a new message; `original` is left alone)."""
    out = listener_pb2.Listener()
    out.CopyFrom(original)
    for chain in out.filter_chains:
        for f in chain.filters:
            _on_demand(f)
    return out


def _on_demand(f: lc.Filter) -> None:
    if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
        manager = hcm.HttpConnectionManager()
        f.typed_config.Unpack(manager)
        fetch = hcm.HttpFilter(
            name=ON_DEMAND,
            typed_config=pack(
                on_demand_pb2.OnDemand(odcds=on_demand_pb2.OnDemandCds(source=ads(), timeout=seconds(TIMEOUT)))
            ),
        )
        filters = list(manager.http_filters)
        at = next(i for i, h in enumerate(filters) if h.name == ROUTER)
        del manager.http_filters[:]
        manager.http_filters.extend([*filters[:at], fetch, *filters[at:]])
        f.typed_config.CopyFrom(pack(manager))
    elif f.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
        proxy = tcp_proxy_pb2.TcpProxy()
        f.typed_config.Unpack(proxy)
        proxy.on_demand.CopyFrom(tcp_proxy_pb2.TcpProxy.OnDemand(odcds_config=ads(), timeout=seconds(TIMEOUT)))
        f.typed_config.CopyFrom(pack(proxy))
