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
    return dict(sorted({**shared_names(model), **own_names(model, namespace)}.items()))


def shared_names(model: MeshModel) -> dict[str, tuple[str, ...]]:
    """The names every proxy answers alike: each service's FQDN, `<svc>.<ns>.svc` and `<svc>.<ns>`.
    Each has dots, so none is ever a bare name of `own_names`."""
    out: dict[str, tuple[str, ...]] = {}
    for service in model.services:
        addresses = _addresses(model, service)
        if addresses:
            for name in (
                service.hostname(model.domain_suffix),
                f"{service.name}.{service.namespace}.svc",
                f"{service.name}.{service.namespace}",
            ):
                out[name] = addresses
    return out


def own_names(model: MeshModel, namespace: str) -> dict[str, tuple[str, ...]]:
    """The bare `<svc>` names of the services of `namespace`."""
    out: dict[str, tuple[str, ...]] = {}
    for service in model.services:
        if service.namespace == namespace and (addresses := _addresses(model, service)):
            out[service.name] = addresses
    return out


def _addresses(model: MeshModel, service: Service) -> tuple[str, ...]:
    if service.external_name:
        return ()
    if service.addresses:
        return tuple(dict.fromkeys(service.addresses))
    return tuple(dict.fromkeys(w.address for w in model.endpoints(service) if w.address))


def table(entries: dict[str, tuple[str, ...]]) -> bytes:
    """A serialized DnsTable of `entries`. Serialized tables concatenate into one (repeated fields
    append): the part every namespace shares is built once per model, not once per namespace, and
    each entry is one name set on a reused message rather than a new message (several times faster
    for a mesh of thousands of names)."""
    one = dns_table_pb2.DnsTable()
    entry = one.virtual_domains.add(answer_ttl=seconds(ANSWER_TTL_SECONDS))
    out = []
    for name, addresses in entries.items():
        if list(entry.endpoint.address_list.address) != list(addresses):
            entry.endpoint.address_list.ClearField("address")
            entry.endpoint.address_list.address.extend(addresses)
        entry.name = name
        out.append(one.SerializeToString())
    return b"".join(out)


def dns_listener(model: MeshModel, namespace: str, shared: bytes | None = None) -> listener_pb2.Listener:
    """The UDP listener on 0.0.0.0:15053 and [::]:15053 with the DNS filter for a proxy in `namespace`;
    `shared` is `table(shared_names(model))` when the caller already has it."""
    if shared is None:
        shared = table(shared_names(model))
    inline = dns_table_pb2.DnsTable.FromString(shared + table(own_names(model, namespace)))
    resolver = cares_dns_resolver_pb2.CaresDnsResolverConfig(
        # The app's resolver already applied its search path: forward the name as it was asked.
        dns_resolver_options=resolver_pb2.DnsResolverOptions(no_default_search_domain=True),
    )
    config = dns_filter_pb2.DnsFilterConfig(
        stat_prefix=DNS_LISTENER,
        server_config=dns_filter_pb2.DnsFilterConfig.ServerContextConfig(inline_dns_table=inline),
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
