"""LDS: the sidecar's DNS listener (UDP 15053) for pods whose DNS is captured (`--redirect-dns`).

Envoy's DNS filter answers the mesh's host names from an inline table and forwards every other
query to the pod's own resolvers (c-ares reads the pod's /etc/resolv.conf), as Istio's agent does
with its DNS proxy, without an agent. The table follows the mesh, so it is pushed, never bootstrapped.

Names, as Istio's DNS proxy answers them for a proxy in namespace `ns`: every service's FQDN
`<svc>.<svc-ns>.svc.<suffix>`, its `<svc>.<svc-ns>` and `<svc>.<svc-ns>.svc` forms, and the bare
`<svc>` for services of `ns` only. Answers are the service's addresses (A for IPv4, AAAA for
IPv6); a service without addresses (headless) answers with its endpoints' addresses; an
ExternalName service is left to the upstream resolvers (Envoy's table has no CNAME).
"""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, extension_pb2, resolver_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2, udp_listener_config_pb2
from envoy.data.dns.v3 import dns_table_pb2
from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2
from envoy.extensions.network.dns_resolver.cares.v3 import cares_dns_resolver_pb2

from meshplane.bootstrap.iptables import DNS_CAPTURE_PORT
from meshplane.bootstrap.protobuf import pack, seconds

from ..model import MeshModel, Service
from .common import ANY, ANY6

DNS_LISTENER = "dns"
DNS_FILTER = "envoy.filters.udp.dns_filter"
ANSWER_TTL_SECONDS = 30
"""Istio's DNS proxy answers with this TTL too: short enough that a moved service is found soon."""
RESOLVER_TIMEOUT_SECONDS = 5
"""How long a forwarded query may wait for the upstream resolvers before Envoy gives up on it."""


def names(model: MeshModel, namespace: str) -> dict[str, tuple[str, ...]]:
    """Host name -> addresses, as a proxy in `namespace` answers them (sorted by name)."""
    out: dict[str, tuple[str, ...]] = {}
    for service in sorted(model.services, key=lambda s: (s.namespace, s.name)):
        addresses = _addresses(model, service)
        if not addresses:
            continue
        forms = [service.hostname(model.domain_suffix), f"{service.name}.{service.namespace}.svc"]
        forms.append(f"{service.name}.{service.namespace}")
        if service.namespace == namespace:
            forms.append(service.name)
        for name in forms:
            out.setdefault(name, addresses)
    return dict(sorted(out.items()))


def _addresses(model: MeshModel, service: Service) -> tuple[str, ...]:
    if service.external_name:
        return ()
    if service.addresses:
        return tuple(dict.fromkeys(service.addresses))
    return tuple(dict.fromkeys(w.address for w in model.endpoints(service) if w.address))


def dns_listener(model: MeshModel, namespace: str) -> listener_pb2.Listener:
    """The UDP listener on 0.0.0.0:15053 and [::]:15053 with the DNS filter for a proxy in `namespace`."""
    table = dns_table_pb2.DnsTable(
        virtual_domains=[
            dns_table_pb2.DnsTable.DnsVirtualDomain(
                name=name,
                endpoint=dns_table_pb2.DnsTable.DnsEndpoint(
                    address_list=dns_table_pb2.DnsTable.AddressList(address=list(addresses))
                ),
                answer_ttl=seconds(ANSWER_TTL_SECONDS),
            )
            for name, addresses in names(model, namespace).items()
        ]
    )
    resolver = cares_dns_resolver_pb2.CaresDnsResolverConfig(
        # The app's resolver already applied its search path: forward the name as it was asked.
        dns_resolver_options=resolver_pb2.DnsResolverOptions(no_default_search_domain=True),
    )
    config = dns_filter_pb2.DnsFilterConfig(
        stat_prefix=DNS_LISTENER,
        server_config=dns_filter_pb2.DnsFilterConfig.ServerContextConfig(inline_dns_table=table),
        # No upstream_resolvers: c-ares uses the pod's /etc/resolv.conf, the nameservers the app asked.
        client_config=dns_filter_pb2.DnsFilterConfig.ClientContextConfig(
            resolver_timeout=seconds(RESOLVER_TIMEOUT_SECONDS),
            typed_dns_resolver_config=extension_pb2.TypedExtensionConfig(
                name="envoy.network.dns_resolver.cares", typed_config=pack(resolver)
            ),
            max_pending_lookups=1024,
        ),
    )
    return listener_pb2.Listener(
        name=DNS_LISTENER,
        address=_udp(ANY),
        additional_addresses=[listener_pb2.AdditionalAddress(address=_udp(ANY6))],
        udp_listener_config=udp_listener_config_pb2.UdpListenerConfig(),
        listener_filters=[lc.ListenerFilter(name=DNS_FILTER, typed_config=pack(config))],
    )


def _udp(ip: str) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(
            address=ip, port_value=DNS_CAPTURE_PORT, protocol=address_pb2.SocketAddress.UDP
        )
    )
