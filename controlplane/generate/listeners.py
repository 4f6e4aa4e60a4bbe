"""LDS: `virtualOutbound` (15001), one `0.0.0.0_<port>` per outbound port, `virtualInbound` (15006).

Every listener takes IPv4 and IPv6 (0.0.0.0 and [::]): the capture rules redirect both families.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from meshplane.bootstrap.iptables import TPROXY_MARK
from meshplane.bootstrap.protobuf import pack, socket_address

from ..model import MeshModel, MtlsMode, OutboundPolicy, Protocol, Service, by_name
from .common import (
    ANY,
    ANY6,
    BLACKHOLE,
    INBOUND_CAPTURE_PORT,
    INBOUND_PASSTHROUGH,
    OUTBOUND_CAPTURE_PORT,
    PASSTHROUGH,
    VIRTUAL_INBOUND,
    VIRTUAL_OUTBOUND,
    ads,
    downstream_tls,
    inbound_cluster_name,
    outbound_cluster_name,
)

OUTBOUND = base_pb2.OUTBOUND
INBOUND = base_pb2.INBOUND


def virtual_outbound(model: MeshModel) -> listener_pb2.Listener:
    """Receives every captured outbound connection and hands it to the listener of its original port."""
    return listener_pb2.Listener(
        name=VIRTUAL_OUTBOUND,
        address=socket_address(ANY, OUTBOUND_CAPTURE_PORT),
        additional_addresses=_ipv6_wildcard(OUTBOUND_CAPTURE_PORT),
        use_original_dst=wrappers_pb2.BoolValue(value=True),
        traffic_direction=OUTBOUND,
        filter_chains=[
            lc.FilterChain(name="virtualOutbound-catchall-tcp", filters=[_tcp_proxy(_unknown_destination(model))])
        ],
    )


def outbound_ports(model: MeshModel) -> list[int]:
    return sorted({p.port for s in model.services for p in s.ports})


def outbound_port(model: MeshModel, port: int, services: Sequence[Service] | None = None) -> listener_pb2.Listener:
    """`0.0.0.0_<port>`: TCP services matched by destination address, HTTP routed by Host via RDS.

    A TCP service is matched on its service addresses; only a headless one (no address) on its
    endpoints' addresses, as Istio does: so an endpoint change touches no listener but a headless
    service's. `services`: those with `port`, by namespace and name, when the caller has them."""
    chains: list[lc.FilterChain] = []
    claimed: set[str] = set()
    has_http = False
    for service in services if services is not None else sorted(model.services, key=by_name):
        for p in service.ports:
            if p.port != port:
                continue
            if p.protocol.is_http:
                has_http = True
                continue
            ips = list(service.addresses) or [w.address for w in model.endpoints(service)]
            prefixes = [ip for ip in dict.fromkeys(ips) if ip not in claimed]
            claimed.update(prefixes)
            if prefixes:
                cluster = outbound_cluster_name(p, service, model.domain_suffix)
                chains.append(
                    lc.FilterChain(
                        name=cluster,
                        filter_chain_match=lc.FilterChainMatch(prefix_ranges=[_cidr(ip) for ip in prefixes]),
                        filters=[_tcp_proxy(cluster)],
                    )
                )
    if has_http:
        default = _http_filter(f"outbound_0.0.0.0_{port}", rds=str(port))
    else:
        default = _tcp_proxy(_unknown_destination(model))
    chains.append(lc.FilterChain(name=f"{ANY}_{port}", filters=[default]))
    return listener_pb2.Listener(
        name=f"{ANY}_{port}",
        address=socket_address(ANY, port),
        additional_addresses=_ipv6_wildcard(port),
        bind_to_port=wrappers_pb2.BoolValue(value=False),
        traffic_direction=OUTBOUND,
        filter_chains=chains,
    )


def virtual_inbound(
    model: MeshModel, ports: tuple[tuple[int, Protocol], ...], mtls: MtlsMode, *, tproxy: bool = False
) -> listener_pb2.Listener:
    """Receives captured inbound connections; TLS or plaintext per the workload's mTLS mode.

    STRICT accepts only mTLS: a plaintext connection matches no chain and is closed.
    PERMISSIVE accepts both; DISABLE only plaintext. Ports no service declares pass through.
    With `tproxy` (TPROXY capture) the listener is transparent, to accept connections to any
    address, and forwards to the app from the client's own address, as Istio does (original_src).
    """
    chains: list[lc.FilterChain] = []
    for port, protocol in ports:
        cluster = inbound_cluster_name(port)
        for tls in _transports(mtls):
            if protocol.is_http:
                terminal = _http_filter(f"inbound_0.0.0.0_{port}", inline=_inbound_routes(cluster), inbound=tls)
            else:
                terminal = _tcp_proxy(cluster)
            chains.append(_inbound_chain(f"{cluster}{'|mtls' if tls else ''}", model, tls, terminal, port))
    for tls in _transports(mtls):
        chains.append(
            _inbound_chain(
                f"virtualInbound-catchall{'-mtls' if tls else ''}", model, tls, _tcp_proxy(INBOUND_PASSTHROUGH), None
            )
        )
    filters = [
        lc.ListenerFilter(name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst()))
    ]
    if tproxy:
        # The upstream connection to the app binds the client's address (IP_TRANSPARENT) and carries the
        # capture's mark, so the app's replies route back here; this overrides the inbound clusters'
        # 127.0.0.6 source, which stays for REDIRECT. Before tls_inspector: a listener filter timeout
        # (server-first protocols) skips the filters after it.
        filters.append(
            lc.ListenerFilter(
                name="envoy.filters.listener.original_src",
                typed_config=pack(original_src_pb2.OriginalSrc(mark=TPROXY_MARK)),
            )
        )
    filters.append(
        lc.ListenerFilter(
            name="envoy.filters.listener.tls_inspector", typed_config=pack(tls_inspector_pb2.TlsInspector())
        )
    )
    return listener_pb2.Listener(
        name=VIRTUAL_INBOUND,
        address=socket_address(ANY, INBOUND_CAPTURE_PORT),
        additional_addresses=_ipv6_wildcard(INBOUND_CAPTURE_PORT),
        traffic_direction=INBOUND,
        # TPROXY hands the listener connections to any address: it must be transparent to accept them.
        transparent=wrappers_pb2.BoolValue(value=True) if tproxy else None,
        listener_filters=filters,
        # Server-first protocols send nothing for tls_inspector to read: go on after a second.
        listener_filters_timeout={"seconds": 1},
        continue_on_listener_filters_timeout=True,
        filter_chains=chains,
    )


def _ipv6_wildcard(port: int) -> list[listener_pb2.AdditionalAddress]:
    """[::]:`port` beside 0.0.0.0:`port` (an IPv6-only socket), as Istio does for dual-stack proxies.

    For a captured IPv6 connection, Envoy hands off to the listener of `[::]:<port>`, so the
    per-port listeners need it too. One [::] socket with ipv4_compat also carried both families
    in our tests (Envoy 1.40), but it renames every listener and its stats to `[__]_<port>`
    and puts IPv4 on an IPv6 socket; this keeps 0.0.0.0 exactly as it was.
    """
    return [listener_pb2.AdditionalAddress(address=socket_address(ANY6, port))]


def _transports(mtls: MtlsMode) -> tuple[bool, ...]:
    return {MtlsMode.STRICT: (True,), MtlsMode.PERMISSIVE: (True, False), MtlsMode.DISABLE: (False,)}[mtls]


def _inbound_chain(name: str, model: MeshModel, tls: bool, terminal: lc.Filter, port: int | None) -> lc.FilterChain:
    match = lc.FilterChainMatch(transport_protocol="tls" if tls else "raw_buffer")
    if port is not None:
        match.destination_port.value = port
    chain = lc.FilterChain(name=name, filter_chain_match=match, filters=[terminal])
    if tls:
        chain.transport_socket.CopyFrom(downstream_tls(model.trust_domain))
    return chain


def _inbound_routes(cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=cluster,
        virtual_hosts=[
            rc.VirtualHost(
                name="inbound|http",
                domains=["*"],
                routes=[
                    rc.Route(
                        name="default",
                        match=rc.RouteMatch(prefix="/"),
                        route=rc.RouteAction(cluster=cluster, timeout={"seconds": 0}),
                    )
                ],
            )
        ],
        validate_clusters=wrappers_pb2.BoolValue(value=False),
    )


def _http_filter(
    stat_prefix: str,
    *,
    rds: str | None = None,
    inline: route_pb2.RouteConfiguration | None = None,
    inbound: bool = False,
) -> lc.Filter:
    manager = hcm.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm.HttpConnectionManager.AUTO,
        http_filters=[hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))],
        normalize_path=wrappers_pb2.BoolValue(value=True),
    )
    if rds is not None:
        manager.rds.CopyFrom(hcm.Rds(config_source=ads(), route_config_name=rds))
    elif inline is not None:
        manager.route_config.CopyFrom(inline)
    if inbound:
        # The app learns the caller's verified identity from x-forwarded-client-cert,
        # and a header from outside the mesh is never passed through as-is.
        manager.forward_client_cert_details = hcm.HttpConnectionManager.SANITIZE_SET
        manager.set_current_client_cert_details.uri = True
    else:
        manager.forward_client_cert_details = hcm.HttpConnectionManager.SANITIZE
    return lc.Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(manager))


def _tcp_proxy(cluster: str) -> lc.Filter:
    return lc.Filter(
        name="envoy.filters.network.tcp_proxy",
        typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)),
    )


def _unknown_destination(model: MeshModel) -> str:
    return PASSTHROUGH if model.outbound_policy is OutboundPolicy.ALLOW_ANY else BLACKHOLE


@functools.lru_cache(maxsize=16384)
def _cidr(ip: str) -> address_pb2.CidrRange:
    """Never modified: a repeated field copies what it is given."""
    addr = ipaddress.ip_address(ip)
    return address_pb2.CidrRange(
        address_prefix=str(addr), prefix_len=wrappers_pb2.UInt32Value(value=addr.max_prefixlen)
    )
