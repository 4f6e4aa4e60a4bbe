"""Sidecar scope: which services a sidecar is sent, in the words of Istio's `Sidecar` `egress.hosts`.

A host is `namespace/dnsName`: `*/*` every service, `./*` those of the proxy's own namespace,
`prod/*` those of `prod`, `prod/db.prod.svc.cluster.local` one service, `*/*.example.org` those whose
host name ends so, `~/*` none. No scope at all means every service, as Istio without a Sidecar.
Pure functions; the mesh file and the Kubernetes source turn a `ValueError` into their own errors.
"""

from __future__ import annotations

from . import names
from .model import Egress, EgressHost, MeshModel, Service

ANNOTATION = "sidecar.meshplane.io/egressHosts"
"""Pod (or Namespace) annotation: the egress hosts, separated by commas or spaces."""


def parse_host(text: str) -> EgressHost:
    """`namespace/dnsName`, or `ValueError` saying what is wrong with it."""
    namespace, slash, dns_name = text.partition("/")
    if not slash:
        raise ValueError(f"{text!r} is not namespace/dnsName (say ./* for the proxy's own namespace)")
    if namespace not in ("*", ".", "~") and not names.DNS_LABEL.match(namespace):
        raise ValueError(f"{text!r}: namespace {namespace!r} is not a namespace, '*', '.' or '~'")
    bare = dns_name.removeprefix("*.")
    if dns_name != "*" and not names.DNS_NAME.match(bare):
        raise ValueError(f"{text!r}: {dns_name!r} is not a host name, '*' or '*.<suffix>'")
    return EgressHost(namespace, dns_name)


def parse_hosts(text: str) -> Egress:
    """An annotation's value: hosts separated by commas or whitespace (at least one)."""
    hosts = tuple(parse_host(h) for h in text.replace(",", " ").split())
    if not hosts:
        raise ValueError("no hosts (say ~/* for none)")
    return hosts


def resolve(egress: Egress | None, namespace: str) -> Egress | None:
    """`egress` for a proxy of `namespace`: `.` made explicit, `~` dropped, sorted and without
    duplicates, so proxies whose scopes say the same thing share one view and its config."""
    if egress is None:
        return None
    explicit = {EgressHost(namespace if h.namespace == "." else h.namespace, h.dns_name) for h in egress}
    return tuple(sorted((h for h in explicit if h.namespace != "~"), key=str))


def in_scope(model: MeshModel, egress: Egress) -> tuple[Service, ...]:
    """The services of `model` that resolved `egress` reaches, in the model's order."""
    return tuple(s for s in model.services if any(h.matches(s, model.domain_suffix) for h in egress))
