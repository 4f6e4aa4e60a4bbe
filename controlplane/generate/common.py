"""Small builders shared by the generators: names, config sources, TLS (protobuf basics come from
`bootstrap.protobuf`, which the sidecar bootstrap shares)."""

from __future__ import annotations

import functools

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from meshplane.bootstrap.protobuf import pack

from ..model import Port, Service

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
SECRET_DEFAULT = "default"
SECRET_ROOTCA = "ROOTCA"
INBOUND_SOURCE = "127.0.0.6"
"""Source address of inbound forwarding, so the capture rules can tell it from app traffic."""
INBOUND_SOURCE6 = "::6"
"""The same for IPv6, as in Istio. Unlike 127.0.0.6 it is not local by itself: the capture step
(`meshctl iptables` with IPv6) assigns ::6/128 to lo."""
ANY = "0.0.0.0"
ANY6 = "::"
"""Listeners take both wildcards (IPv6 as an additional address), so a dual-stack pod's captured
IPv6 connections find them: original-destination hand-off looks for `[::]:<port>` for IPv6."""
TLS_SOCKET = "envoy.transport_sockets.tls"
TLS_MODE_KEY = "tlsMode"
TLS_MODE_ISTIO = "istio"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"


def outbound_cluster_name(port: Port, service: Service, domain_suffix: str) -> str:
    return f"outbound|{port.port}||{service.hostname(domain_suffix)}"


def inbound_cluster_name(port: int) -> str:
    return f"inbound|{port}||"


def ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads())


def struct(values: dict[str, str]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def common_tls(san: string_pb2.StringMatcher, alpn: list[str]) -> tls_pb2.CommonTlsContext:
    """Own certificate `default`, peers validated against `ROOTCA` and matched on their URI SAN."""
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[sds(SECRET_DEFAULT)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=[
                    common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=san)
                ]
            ),
            validation_context_sds_secret_config=sds(SECRET_ROOTCA),
        ),
        alpn_protocols=alpn,
    )


def upstream_tls(sans: list[str], trust_domain: str, sni: str, alpn: list[str]) -> base_pb2.TransportSocket:
    """Client side of mesh mTLS; with no known identities, any identity of the trust domain."""
    tls = tls_pb2.UpstreamTlsContext()
    tls.CopyFrom(_upstream_tls_template(trust_domain, tuple(alpn)))  # built once: copying is 10x cheaper
    tls.sni = sni
    if sans:
        validation = tls.common_tls_context.combined_validation_context.default_validation_context
        del validation.match_typed_subject_alt_names[:]
        for san in sans:
            validation.match_typed_subject_alt_names.add(
                san_type=common_pb2.SubjectAltNameMatcher.URI
            ).matcher.exact = san
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(tls))


@functools.lru_cache(maxsize=16)
def _upstream_tls_template(trust_domain: str, alpn: tuple[str, ...]) -> tls_pb2.UpstreamTlsContext:
    """Never modified: callers copy it."""
    ctx = common_tls(string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/"), list(alpn))
    return tls_pb2.UpstreamTlsContext(common_tls_context=ctx)


def downstream_tls(trust_domain: str) -> base_pb2.TransportSocket:
    """Server side of mesh mTLS: a client certificate from this trust domain is required."""
    ctx = common_tls(string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/"), ["h2", "http/1.1"])
    return base_pb2.TransportSocket(
        name=TLS_SOCKET,
        typed_config=pack(
            tls_pb2.DownstreamTlsContext(
                common_tls_context=ctx, require_client_certificate=wrappers_pb2.BoolValue(value=True)
            )
        ),
    )


def raw_buffer() -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.raw_buffer", typed_config=pack(raw_buffer_pb2.RawBuffer())
    )
