"""CDS: outbound EDS clusters per service port, inbound clusters, passthrough and blackhole."""

from __future__ import annotations

import functools

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as http_opts

from meshplane.bootstrap.protobuf import seconds, socket_address

from ..model import MeshModel, MtlsMode, Port, Service
from .common import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    INBOUND_SOURCE,
    INBOUND_SOURCE6,
    PASSTHROUGH,
    TLS_MODE_ISTIO,
    TLS_MODE_KEY,
    ads,
    inbound_cluster_name,
    outbound_cluster_name,
    raw_buffer,
    struct,
    upstream_tls,
)

CONNECT_TIMEOUT = 10.0
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def outbound(model: MeshModel, service: Service, port: Port) -> cluster_pb2.Cluster:
    """`outbound|<port>||<host>`: endpoints from EDS; mTLS to endpoints that carry a sidecar.
    A service that stands for a DNS name (ExternalName) resolves it instead, in plaintext."""
    name = outbound_cluster_name(port, service, model.domain_suffix)
    if service.external_name:
        return cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.STRICT_DNS,
            connect_timeout=seconds(CONNECT_TIMEOUT),
            lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
            load_assignment=endpoint_pb2.ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[
                    endpoint_components_pb2.LocalityLbEndpoints(
                        lb_endpoints=[
                            endpoint_components_pb2.LbEndpoint(
                                endpoint=endpoint_components_pb2.Endpoint(
                                    address=socket_address(service.external_name, port.workload_port)
                                )
                            )
                        ]
                    )
                ],
            ),
        )
    workloads = model.endpoints(service)
    mtls = model.mtls is not MtlsMode.DISABLE or any(model.mtls_of(w) is not MtlsMode.DISABLE for w in workloads)
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(_eds_template(port.protocol.is_http2, mtls))  # built once: copying is 10x cheaper
    cluster.name = cluster.eds_cluster_config.service_name = name
    if mtls:
        # Istio's auto-mTLS: endpoints marked tlsMode=istio (they run a sidecar) get mTLS,
        # the others plaintext, decided per endpoint by the transport socket match.
        sans = sorted({w.spiffe_id(model.trust_domain) for w in workloads if w.sidecar})
        sni = f"outbound_.{port.port}_._.{service.hostname(model.domain_suffix)}"
        alpn = ["h2"] if port.protocol.is_http2 else []
        cluster.transport_socket_matches[0].transport_socket.CopyFrom(upstream_tls(sans, model.trust_domain, sni, alpn))
    return cluster


@functools.lru_cache(maxsize=4)
def _eds_template(http2: bool, mtls: bool) -> cluster_pb2.Cluster:
    """What every outbound EDS cluster of this kind shares; never modified (callers copy it)."""
    cluster = cluster_pb2.Cluster(
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads()),
        connect_timeout=seconds(CONNECT_TIMEOUT),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if http2:
        cluster.typed_extension_protocol_options[HTTP_OPTIONS].Pack(
            http_opts.HttpProtocolOptions(
                explicit_http_config=http_opts.HttpProtocolOptions.ExplicitHttpConfig(
                    http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
                )
            )
        )
    if mtls:
        cluster.transport_socket_matches.extend(
            [
                # Its transport socket (mTLS to the service's identities) is set per cluster.
                cluster_pb2.Cluster.TransportSocketMatch(
                    name=f"{TLS_MODE_KEY}-{TLS_MODE_ISTIO}", match=struct({TLS_MODE_KEY: TLS_MODE_ISTIO})
                ),
                cluster_pb2.Cluster.TransportSocketMatch(
                    name=f"{TLS_MODE_KEY}-disabled", transport_socket=raw_buffer()
                ),
            ]
        )
    return cluster


def inbound(port: int) -> cluster_pb2.Cluster:
    """`inbound|<port>||`: to the app at the connection's original destination, from 127.0.0.6 (::6)."""
    return _original_dst(inbound_cluster_name(port), bind_inbound_source=True)


def passthrough() -> cluster_pb2.Cluster:
    return _original_dst(PASSTHROUGH, bind_inbound_source=False)


def inbound_passthrough() -> cluster_pb2.Cluster:
    return _original_dst(INBOUND_PASSTHROUGH, bind_inbound_source=True)


def blackhole() -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=BLACKHOLE, type=cluster_pb2.Cluster.STATIC, connect_timeout=seconds(CONNECT_TIMEOUT)
    )


def _original_dst(name: str, *, bind_inbound_source: bool) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=seconds(CONNECT_TIMEOUT),
        cleanup_interval=seconds(60),
    )
    if bind_inbound_source:
        # Without this source the capture rules would send the proxy's own forward
        # to the app back into 15006, looping (see notes/envoy.md). Envoy binds the
        # source of the upstream's family: ::6 for IPv6 (an IPv4 source cannot bind there).
        cluster.upstream_bind_config.CopyFrom(
            address_pb2.BindConfig(
                source_address=socket_address(INBOUND_SOURCE, 0).socket_address,
                extra_source_addresses=[
                    address_pb2.ExtraSourceAddress(address=socket_address(INBOUND_SOURCE6, 0).socket_address)
                ],
            )
        )
    return cluster
