"""The mesh model: frozen, hashable values that every part of Meshplane shares.

A `MeshModel` is an immutable snapshot. Sources build a new one on every change;
nothing ever mutates one in place, so generators may cache on identity.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


class Protocol(enum.StrEnum):
    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    TCP = "TCP"

    @property
    def is_http(self) -> bool:
        return self is not Protocol.TCP

    @property
    def is_http2(self) -> bool:
        return self in (Protocol.HTTP2, Protocol.GRPC)

    @classmethod
    def from_port_name(cls, name: str) -> Protocol:
        """Istio's convention: `http-…`, `http2-…`, `grpc-…` (or exactly that name), else TCP."""
        prefix = name.split("-", 1)[0].upper()
        return cls(prefix) if prefix in cls.__members__ else cls.TCP


class MtlsMode(enum.StrEnum):
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


class InterceptionMode(enum.StrEnum):
    """How a proxy's inbound traffic is captured (Istio's INTERCEPTION_MODE node metadata)."""

    REDIRECT = "REDIRECT"
    """nat REDIRECT: the proxy forwards to the app from 127.0.0.6 (::6)."""
    TPROXY = "TPROXY"
    """mangle TPROXY: transparent listeners; the proxy forwards from the client's own address."""
    NONE = "NONE"
    """No capture; generated like REDIRECT (the listeners just receive nothing)."""


class OutboundPolicy(enum.StrEnum):
    ALLOW_ANY = "ALLOW_ANY"
    REGISTRY_ONLY = "REGISTRY_ONLY"


Labels = tuple[tuple[str, str], ...]


def labels(mapping: Mapping[str, str] | None) -> Labels:
    """Labels in their canonical, hashable form: sorted key/value pairs."""
    return tuple(sorted((mapping or {}).items()))


_COMPARED: dict[type, tuple[str, ...]] = {}


def _hash_fields(obj: object) -> int:
    """The hash a frozen dataclass would compute, computed once at construction: services and their
    endpoints key the generated-config memo, and hashing them deeply at every lookup was most of
    the cost of a rebuild."""
    names = _COMPARED.get(type(obj))
    if names is None:
        names = _COMPARED[type(obj)] = tuple(f.name for f in fields(obj) if f.compare)  # type: ignore[arg-type]
    return hash(tuple(getattr(obj, n) for n in names))


@dataclass(frozen=True, slots=True)
class Port:
    port: int
    name: str
    protocol: Protocol = Protocol.TCP
    target_port: int | None = None
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", _hash_fields(self))

    def __hash__(self) -> int:
        return self._hash

    @property
    def workload_port(self) -> int:
        """The port the workload listens on (`targetPort`, else the service port)."""
        return self.target_port or self.port


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload behind a service, as an EndpointSlice lists it: `ports` maps the service's port
    names to the numbers this workload listens on (a named targetPort resolves per pod)."""

    workload: Workload
    ports: tuple[tuple[str, int], ...] = ()
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", _hash_fields(self))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    ports: tuple[Port, ...]
    selector: Labels = ()
    addresses: tuple[str, ...] = ()
    endpoints: tuple[Endpoint, ...] | None = None
    """Given explicitly (Kubernetes: from EndpointSlices); None: the workloads `selector` picks."""
    external_name: str = ""
    """A DNS name the service stands for (Kubernetes `type: ExternalName`): no endpoints of its own."""
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", _hash_fields(self))

    def __hash__(self) -> int:
        return self._hash

    def hostname(self, domain_suffix: str) -> str:
        return f"{self.name}.{self.namespace}.svc.{domain_suffix}"

    def selects(self, workload: Workload) -> bool:
        if workload.namespace != self.namespace or not self.selector:
            return False
        have = dict(workload.labels)
        return all(have.get(k) == v for k, v in self.selector)


def by_name(service: Service) -> tuple[str, str]:
    """The order generated config lists services in: by namespace, then name."""
    return (service.namespace, service.name)


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    address: str
    labels: Labels = ()
    mtls: MtlsMode | None = None
    """Overrides the mesh-wide mode for this workload's inbound side."""
    sidecar: bool = True
    """Runs a sidecar of this mesh, so clients send it mTLS (Istio's tlsMode=istio endpoint label)."""
    draining: bool = False
    """Its proxy disconnected and may be gone: still an endpoint (it may be reconnecting), but clients
    send it nothing new while another endpoint is healthy."""
    egress: Egress | None = None
    """The services its sidecar may reach, set on the workload itself (a pod annotation); wins over
    the mesh's `sidecars`. None: not set here."""
    on_demand_clusters: bool = False
    """Its sidecar asks for each cluster when it first needs it (its node metadata says so)."""
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", _hash_fields(self))

    def __hash__(self) -> int:
        return self._hash

    def spiffe_id(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class EgressHost:
    """One entry of an Istio Sidecar's `egress.hosts`: `namespace/dnsName`.

    `namespace`: a namespace, `*` (any), `.` (the proxy's own) or `~` (none). `dns_name`: a service's
    full host name, `*` (every service of the namespace) or `*.<suffix>` (host names ending so)."""

    namespace: str
    dns_name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.dns_name}"

    def matches(self, service: Service, domain_suffix: str) -> bool:
        """Whether `service` is in this entry (`.` already replaced by the proxy's namespace)."""
        if self.namespace not in ("*", service.namespace):
            return False
        if self.dns_name == "*":
            return True
        host = service.hostname(domain_suffix)
        if self.dns_name.startswith("*."):
            return host.endswith(self.dns_name[1:])
        return host == self.dns_name


Egress = tuple[EgressHost, ...]


@dataclass(frozen=True, slots=True)
class SidecarScope:
    """What Istio's `Sidecar` resource says of egress: the workloads of `namespace` (`*`: every
    namespace, the mesh-wide default) that `selector` picks (empty: all of them) reach only `egress`."""

    namespace: str
    egress: Egress
    selector: Labels = ()

    def selects(self, workload: Workload) -> bool:
        if self.namespace not in ("*", workload.namespace):
            return False
        have = dict(workload.labels)
        return all(have.get(k) == v for k, v in self.selector)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True, slots=True)
class MeshModel:
    trust_domain: str = "cluster.local"
    domain_suffix: str = "cluster.local"
    mtls: MtlsMode = MtlsMode.STRICT
    outbound_policy: OutboundPolicy = OutboundPolicy.ALLOW_ANY
    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    sidecars: tuple[SidecarScope, ...] = ()
    _endpoints: dict[tuple[str, str], tuple[Endpoint, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _by_name: dict[tuple[str, str], Workload] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _by_label: dict[tuple[str, str, str], list[Workload]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _by_first_label: dict[tuple[str, str, str], list[tuple[int, Service]]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def with_workloads(self, extra: tuple[Workload, ...]) -> MeshModel:
        """This model plus `extra` (connected) workloads. A static workload of the same namespace and
        name wins, so the proxy and its clients see one entry, unless it names another service
        account: a connected proxy's identity is a fact, and an entry contradicting it is dropped."""
        extra_by_key = {(w.namespace, w.name): w for w in extra}
        static = tuple(
            w
            for w in self.workloads
            if (other := extra_by_key.get((w.namespace, w.name))) is None or other.service_account == w.service_account
        )
        have = {(w.namespace, w.name) for w in static}
        added = tuple(w for w in extra if (w.namespace, w.name) not in have)
        return MeshModel(
            trust_domain=self.trust_domain,
            domain_suffix=self.domain_suffix,
            mtls=self.mtls,
            outbound_policy=self.outbound_policy,
            services=self.services,
            workloads=static + added,
            sidecars=self.sidecars,
        )

    def workload(self, namespace: str, name: str) -> Workload | None:
        """The entry every part of the mesh uses for this workload (memoized)."""
        if not self._by_name and self.workloads:
            self._by_name.update(((w.namespace, w.name), w) for w in self.workloads)
        return self._by_name.get((namespace, name))

    def service_endpoints(self, service: Service) -> tuple[Endpoint, ...]:
        """What is behind `service`: its explicit endpoints, else the workloads its selector picks,
        ordered by address then name (memoized)."""
        key = (service.namespace, service.name)
        found = self._endpoints.get(key)
        if found is None:
            if service.endpoints is not None:
                chosen = list(service.endpoints)
            else:
                chosen = [Endpoint(w) for w in self._candidates(service) if service.selects(w)]
            found = tuple(sorted(chosen, key=lambda e: (e.workload.address, e.workload.name)))
            self._endpoints[key] = found
        return found

    def _candidates(self, service: Service) -> list[Workload]:
        """The workloads of the service's namespace carrying its selector's first label: the only ones
        it can select. An index built once per model, so that selecting is not services x workloads."""
        if not service.selector:
            return []
        if not self._by_label and self.workloads:
            for w in self.workloads:
                for key, value in w.labels:
                    self._by_label.setdefault((w.namespace, key, value), []).append(w)
        key, value = service.selector[0]
        return self._by_label.get((service.namespace, key, value), [])

    def endpoints(self, service: Service) -> tuple[Workload, ...]:
        return tuple(e.workload for e in self.service_endpoints(service))

    def services_of(self, workload: Workload) -> tuple[Service, ...]:
        """The services whose selector picks `workload`, in mesh order. Only services whose selector's
        first label the workload carries are checked (an index built once per model): every view
        needs this, and checking all services for each cost 35 ms per view at 1,000 services."""
        if not self._by_first_label and self.services:
            for i, s in enumerate(self.services):
                if s.selector:
                    key, value = s.selector[0]
                    self._by_first_label.setdefault((s.namespace, key, value), []).append((i, s))
        found = [
            hit
            for key, value in workload.labels
            for hit in self._by_first_label.get((workload.namespace, key, value), ())
        ]
        return tuple(s for _, s in sorted(found, key=lambda hit: hit[0]) if s.selects(workload))

    def mtls_of(self, workload: Workload) -> MtlsMode:
        return workload.mtls or self.mtls

    def egress_of(self, workload: Workload) -> Egress | None:
        """The services `workload`'s sidecar may reach, as Istio picks a Sidecar: the workload's own
        setting, else a scope of its namespace whose selector picks it, else its namespace's scope
        without a selector, else the mesh-wide one (`*`). None: every service (no scope applies)."""
        if workload.egress is not None:
            return workload.egress
        ranked = sorted(
            (s for s in self.sidecars if s.selects(workload)),
            key=lambda s: (s.namespace == "*", not s.selector),
        )  # stable: the first of equal rank in the mesh file wins
        return ranked[0].egress if ranked else None
