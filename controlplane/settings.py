"""The one settings object of a `meshctl serve` process, read from flags once and passed down."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

WEBHOOK_DNS_NAMES = (
    "meshplane.mesh-system.svc",
    "meshplane.mesh-system.svc.cluster.local",
    "localhost",
    "127.0.0.1",
)


MIN_CERT_TTL = dt.timedelta(seconds=2)
"""Below this, renewal at half-life leaves no time for a push to reach every proxy before expiry,
and renewals would follow each other as fast as the loop runs."""


def default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "meshplane"


def default_ca_dir() -> Path:
    return default_state_dir() / "ca"


@dataclass(frozen=True, slots=True)
class Settings:
    mesh_file: Path | None = None
    """The YAML mesh file, watched for edits (optional with `kubernetes`)."""
    kubernetes: bool = False
    """Discover the mesh from a Kubernetes cluster (Services, EndpointSlices, Pods, Namespaces)."""
    kubeconfig: Path | None = None
    """The client configuration; None: in-cluster in a pod, else $KUBECONFIG or ~/.kube/config."""
    namespaces: tuple[str, ...] = ()
    """Watch only these namespaces (empty: all)."""
    ca_secret: str | None = None
    """NAMESPACE/NAME of the Secret holding the CA root shared by every replica (Kubernetes mode)."""
    webhook_configuration: str | None = None
    """The MutatingWebhookConfiguration whose caBundle is kept equal to the CA's trust bundle."""
    bind: str = "0.0.0.0"
    """Address every server listens on (all interfaces by default, as istiod does)."""
    xds_tls_port: int = 15012
    """gRPC over TLS: ADS, the per-type discovery services and the CA's certificate service. Callers
    authenticate with a bearer token or a mesh client certificate."""
    xds_mtls_port: int | None = None
    """Also serve gRPC over TLS that requires a mesh client certificate, which is then the caller's
    identity (for clients that hold one, e.g. agents); off by default. Sidecars use tokens."""
    xds_port: int = 15010
    """The plaintext gRPC port: served only with `insecure_trust_node_metadata`."""
    insecure_trust_node_metadata: bool = False
    """Serve the plaintext port and believe the identity a proxy's node metadata claims (anyone who
    reaches the port gets any identity's key). Local experiments only."""
    xds_socket: Path | None = None
    """Also serve xDS on this unix socket, local credentials plus a bearer token (for sidecars in pods
    with no route to the host)."""
    xds_socket_group: int | None = None
    """The socket is owner-only (0600); with a group id it is 0660 for that group (the sidecars' gid)."""
    xds_dns_names: tuple[str, ...] = field(default_factory=lambda: WEBHOOK_DNS_NAMES)
    """Names (and IPs) in the xDS server's TLS certificate, issued by the mesh CA."""
    token_audience: str = "meshplane"
    """The audience a proxy's bearer token must carry."""
    min_ping_interval: float = 10.0
    """Seconds: the most frequent keepalive ping accepted on an idle xDS connection (sidecars ping
    every 30 s). Lower only to test keepalive at a shorter scale."""
    admin_port: int = 15014
    """HTTP: /healthz, /readyz, /metrics, /debug/*."""
    webhook_port: int = 15017
    """HTTPS: the injection webhook."""
    webhook_dns_names: tuple[str, ...] = field(default_factory=lambda: WEBHOOK_DNS_NAMES)
    """Names in the webhook's serving certificate when the mesh CA issues it."""
    webhook_cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    """Lifetime of the CA-issued webhook certificate; renewed at half-life without a restart."""
    webhook_cert: Path | None = None
    webhook_key: Path | None = None
    """A serving certificate and key to use instead (reloaded when the files change)."""
    ca_dir: Path = field(default_factory=default_ca_dir)
    """Where the CA root lives; created on first start."""
    state_dir: Path | None = None
    """Where self-registrations are kept across restarts (None: not kept)."""
    restore_grace: float = 30.0
    """After a restart, how long a saved registration stands in for a proxy that has not reconnected."""
    cert_ttl: dt.timedelta = dt.timedelta(hours=1)
    """Lifetime of workload certificates; they are renewed and re-pushed at half-life."""
    debounce: float = 0.1
    """Quiet time that ends a burst of changes before a push."""
    debounce_max: float = 1.0
    """A push happens at the latest this long after the first change of a burst."""
    proxy_grace: float = 5.0
    """How long a disconnected proxy stays an endpoint (it may be reconnecting)."""
    poll_interval: float = 0.2
    """How often the mesh file is checked for edits."""
    mesh_settle: float = 0.25
    """An edit is applied once the mesh file has not changed for this long (never half written)."""
    shutdown_delay: float = 3.0
    """On shutdown, how long /readyz reports 503 while streams keep being served, before GOAWAY."""
    shutdown_grace: float = 5.0
    """Then how long in-flight pushes may take before the remaining streams are cancelled."""
    debug_from_anywhere: bool = False
    """Serve the admin /debug/* pages (every proxy's config and identity) to any address, not only
    to loopback callers; /healthz, /readyz and /metrics answer everyone either way."""

    def __post_init__(self) -> None:
        if self.mesh_file is None and not self.kubernetes:
            raise ConfigError("give a mesh file (--mesh FILE), or discover the mesh from Kubernetes (--kubernetes)")
        if self.ca_secret is not None and not re.match(r"^[a-z0-9-]+/[a-z0-9.-]+$", self.ca_secret):
            raise ConfigError(f"--ca-secret {self.ca_secret!r} must be NAMESPACE/NAME")
        if self.cert_ttl < MIN_CERT_TTL:
            raise ConfigError(
                f"--cert-ttl {self.cert_ttl.total_seconds():g}s is too short: certificates are renewed at "
                f"half-life and pushed, which needs at least {MIN_CERT_TTL.total_seconds():g}s (1h is the default)"
            )


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '15m', '1h', '250ms' or plain seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(f"{text!r} is not a duration (examples: 250ms, 90s, 15m, 1h)")
    value, unit = float(m.group(1)), m.group(2) or "s"
    return dt.timedelta(seconds=value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit])
