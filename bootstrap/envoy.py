"""Workload identity + xDS address -> an Envoy bootstrap (protobuf), rendered as JSON or YAML.

Values may be Kubernetes `$(VAR)` references (e.g. `$(POD_IP)`): the injector passes the
bootstrap inline in the container's args, where Kubernetes expands them from the Downward API.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import address_pb2, backoff_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.core.v3 import health_check_pb2 as core_health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.grpc_credential.v3 import file_based_metadata_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.overload.v3 import overload_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.health_check.v3 import health_check_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import json_format, struct_pb2, wrappers_pb2

from .protobuf import pack as _pack
from .protobuf import seconds as _seconds
from .protobuf import socket_address as _address

XDS_CLUSTER = "xds-grpc"
FILE_BASED_METADATA = "envoy.grpc_credentials.file_based_metadata"
ADMIN_CLUSTER = "prometheus_stats"
ON_DEMAND_CLUSTERS = "ON_DEMAND_CLUSTERS"
"""Node metadata key: "true" when the sidecar asks for its clusters on demand (no CDS subscription)."""
_VAR = re.compile(r"^\$\([A-Z_][A-Z0-9_]*\)$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class BootstrapError(ValueError):
    """An identity or address that cannot make a working bootstrap; says which value and why."""


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    name: str
    namespace: str
    service_account: str = "default"
    ip: str = "$(INSTANCE_IP)"
    labels: Mapping[str, str] = field(default_factory=dict)
    domain_suffix: str = "cluster.local"
    kind: str = "sidecar"
    """Istio's node type: `sidecar`, or `router` for a gateway (the proxy is the workload)."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """More node metadata, as Istio's agent adds a pod's `ISTIO_META_<KEY>` proxy metadata: under
    <KEY> (e.g. DNS_CAPTURE). The identity's own keys above always win."""
    interception_mode: str = "REDIRECT"
    """How the pod's traffic is captured: REDIRECT, TPROXY or NONE (Istio's INTERCEPTION_MODE metadata)."""

    @property
    def node_id(self) -> str:
        return f"{self.kind}~{self.ip}~{self.name}.{self.namespace}~{self.namespace}.svc.{self.domain_suffix}"


@dataclass(frozen=True, slots=True)
class Ports:
    admin: int = 15000
    stats: int = 15090
    health: int = 15021
    """Envoy's readiness, `/healthz/ready` (Istio's 15021)."""
    status: int = 15020
    """Istio's agent port: the app's rewritten probes and lifecycle hooks (`/app-health/...`,
    `/app-lifecycle/...`), Prometheus metrics (`/stats/prometheus`) and readiness; 0: none."""
    admin_socket: str = ""
    """Serve the admin API on this unix socket instead of 127.0.0.1:`admin` (for hosts outside the pod)."""


@dataclass(frozen=True, slots=True)
class XdsCredentials:
    """How a sidecar proves who it is to the control plane, with no agent process beside it.

    Envoy's Google gRPC client reads `token_file` on every connection (rotated tokens work) and
    sends it as `authorization: Bearer <token>`. gRPC attaches such credentials to secure channels
    only, so a TCP address is TLS, verified against `ca_file` (the mesh root), and a unix socket
    uses local credentials."""

    token_file: str
    ca_file: str = ""
    ca_pem: str = ""
    """The mesh roots inline, instead of `ca_file` (an injected sidecar carries them in its bootstrap)."""
    authority: str = ""
    """The name the control plane's certificate is checked against when several replica addresses are
    listed (one address is its own name); default `DEFAULT_AUTHORITY`, which every replica's carries."""


DEFAULT_AUTHORITY = "meshplane.mesh-system.svc"
KEEPALIVE_SECONDS = 30
"""The sidecar pings an idle xDS connection this often; the server accepts pings down to 10 s."""


@dataclass(frozen=True, slots=True)
class AppProbe:
    """One of the app's original probes or lifecycle hooks, run by the sidecar for kubelet.

    kubelet calls GET `path` on the status port. HTTP probes are forwarded to the app on
    127.0.0.1 at `http_path`; TCP and gRPC probes are answered from Envoy's own active health
    checks of the app's port (every `period` seconds), so they work under STRICT mTLS too.
    """

    path: str
    kind: str
    """"http", "tcp" or "grpc"."""
    port: int
    http_path: str = "/"
    https: bool = False
    grpc_service: str = ""
    period: int = 10
    timeout: int = 1

    @property
    def cluster(self) -> str:
        return f"probe|{self.path.strip('/').replace('/', '|')}"


def bootstrap(
    identity: WorkloadIdentity,
    xds_address: str,
    ports: Ports = Ports(),
    probes: Sequence[AppProbe] = (),
    credentials: XdsCredentials | None = None,
    *,
    delta: bool = True,
    on_demand_clusters: bool = False,
) -> bootstrap_pb2.Bootstrap:
    """The bootstrap for a sidecar of `identity` that gets its config over ADS from `xds_address`,
    authenticated with `credentials` (without them, plaintext to a server that trusts node metadata);
    incremental (delta) xDS unless `delta` is False (state of the world). With `on_demand_clusters`
    the sidecar subscribes to no clusters: it asks for each when a connection first needs it (Envoy's
    on-demand CDS, delta only), and says so in its node metadata (`ON_DEMAND_CLUSTERS`)."""
    _check(identity)
    if on_demand_clusters and not delta:
        raise BootstrapError("on-demand clusters need incremental (delta) xDS")
    if credentials is not None:
        service = _authenticated_xds(xds_address, credentials)
        xds_clusters = []
    else:
        service = grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                cluster_name=XDS_CLUSTER,
                retry_policy=base_pb2.RetryPolicy(
                    retry_back_off=backoff_pb2.BackoffStrategy(base_interval=_seconds(0.5), max_interval=_seconds(5)),
                    num_retries=wrappers_pb2.UInt32Value(value=10),
                ),
            )
        )
        xds_clusters = [_xds_cluster(xds_address)]
    labels = dict(identity.labels)
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or identity.name
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            **identity.metadata,
            "NAME": identity.name,
            "NAMESPACE": identity.namespace,
            "SERVICE_ACCOUNT": identity.service_account,
            "INSTANCE_IPS": identity.ip,
            "LABELS": labels,
            "WORKLOAD_NAME": identity.name,
        }
    )
    if identity.interception_mode != "REDIRECT":  # the default: left out, so REDIRECT bootstraps stay as they were
        metadata.update({"INTERCEPTION_MODE": identity.interception_mode})
    if on_demand_clusters:
        metadata.update({ON_DEMAND_CLUSTERS: "true"})
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=identity.node_id, cluster=f"{app}.{identity.namespace}", metadata=metadata),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            clusters=[*xds_clusters, _admin_cluster(ports), *(_probe_cluster(p) for p in probes)],
            listeners=_status_listeners(ports, probes),
        ),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            # Incremental xDS by default: a change sends only what it touched.
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=config_source_pb2.ApiConfigSource.DELTA_GRPC
                if delta
                else config_source_pb2.ApiConfigSource.GRPC,
                transport_api_version=config_source_pb2.V3,
                set_node_on_first_message_only=True,
                grpc_services=[service],
            ),
            cds_config=None if on_demand_clusters else ads,
            lds_config=ads,
        ),
        admin=bootstrap_pb2.Admin(address=_admin_address(ports)),
        overload_manager=_overload_manager(),
    )


def render(msg: bootstrap_pb2.Bootstrap, fmt: str = "json") -> str:
    text: str = json_format.MessageToJson(msg, indent=2)
    if fmt == "json":
        return text + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(json.loads(text), sort_keys=False)
    raise BootstrapError(f"unknown format {fmt!r} (json or yaml)")


def render_compact(msg: bootstrap_pb2.Bootstrap) -> str:
    """One-line JSON, for a container's args (`envoy --config-yaml`)."""
    return json.dumps(json.loads(json_format.MessageToJson(msg)), separators=(",", ":"))


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT, or unix:PATH (returned as PATH, 0)."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:").removeprefix("//")
        if not path.startswith("/"):
            raise BootstrapError(f"xDS address {address!r}: a unix socket needs an absolute path (unix:/run/x.sock)")
        return path, 0
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BootstrapError(f"xDS address {address!r} must be HOST:PORT (e.g. meshplane.mesh-system.svc:15010)")
    return host, int(port)


def _check(identity: WorkloadIdentity) -> None:
    for what, value in (
        ("name", identity.name),
        ("namespace", identity.namespace),
        ("service account", identity.service_account),
    ):
        if not (_NAME.match(value) or _VAR.match(value)):
            raise BootstrapError(f"{what} {value!r} must be a lowercase DNS name or a $(VAR) reference")
    if not _VAR.match(identity.ip):
        try:
            ipaddress.ip_address(identity.ip)
        except ValueError:
            raise BootstrapError(f"IP {identity.ip!r} is not an IP address or a $(VAR) reference") from None
    if identity.kind not in ("sidecar", "router"):
        raise BootstrapError(f"node type {identity.kind!r} must be sidecar or router")
    if identity.interception_mode not in ("REDIRECT", "TPROXY", "NONE"):
        raise BootstrapError(f"interception mode {identity.interception_mode!r} is not REDIRECT, TPROXY or NONE")


def _target(xds_address: str) -> tuple[str, bool]:
    """gRPC's target for one address, or for several replicas' (comma-separated IP addresses, tried
    in turn: gRPC's pick_first moves to the next when one fails); and whether it is TCP."""
    addresses = [a.strip() for a in xds_address.split(",") if a.strip()]
    if len(addresses) == 1:
        host, port = split_address(addresses[0])
        if not port:
            return f"unix:{host}", False
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), True
    parsed = [split_address(a) for a in addresses]
    try:
        versions = {ipaddress.ip_address(host).version for host, port in parsed if port}
    except ValueError:
        versions = set()
    if len(versions) != 1 or any(not port for _, port in parsed):
        raise BootstrapError(
            f"xDS addresses {xds_address!r}: several addresses must all be IPv4 or all IPv6 HOST:PORT "
            "(a DNS name that resolves to every replica, such as a Service's, works as a single address)"
        )
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in parsed), True
    return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in parsed), True


def _authenticated_xds(xds_address: str, credentials: XdsCredentials) -> grpc_service_pb2.GrpcService:
    target, tcp = _target(xds_address)
    google = grpc_service_pb2.GrpcService.GoogleGrpc
    if tcp:
        if credentials.ca_pem:
            roots = base_pb2.DataSource(inline_string=credentials.ca_pem)
        elif credentials.ca_file:
            roots = base_pb2.DataSource(filename=credentials.ca_file)
        else:
            raise BootstrapError(f"xDS address {xds_address!r} is TCP: TLS needs the mesh root (--xds-ca FILE)")
        channel = google.ChannelCredentials(ssl_credentials=google.SslCredentials(root_certs=roots))
    else:
        channel = google.ChannelCredentials(local_credentials=google.GoogleLocalCredentials())
    token = file_based_metadata_pb2.FileBasedMetadataConfig(
        secret_data=base_pb2.DataSource(filename=credentials.token_file),
        header_key="authorization",
        header_prefix="Bearer ",
    )
    args: dict[str, int | str] = {
        "grpc.keepalive_time_ms": KEEPALIVE_SECONDS * 1000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }
    if tcp and ("," in target or credentials.authority):
        # Several addresses name no single server: TLS checks this name instead.
        args["grpc.default_authority"] = credentials.authority or DEFAULT_AUTHORITY
    return grpc_service_pb2.GrpcService(
        google_grpc=google(
            target_uri=target,
            stat_prefix=XDS_CLUSTER,
            channel_credentials=channel,
            call_credentials=[
                google.CallCredentials(
                    from_plugin=google.CallCredentials.MetadataCredentialsFromPlugin(
                        name=FILE_BASED_METADATA, typed_config=_pack(token)
                    )
                )
            ],
            credentials_factory_name=FILE_BASED_METADATA,
            channel_args=google.ChannelArgs(args={k: _channel_arg(v) for k, v in args.items()}),
        )
    )


def _channel_arg(value: int | str) -> grpc_service_pb2.GrpcService.GoogleGrpc.ChannelArgs.Value:
    value_type = grpc_service_pb2.GrpcService.GoogleGrpc.ChannelArgs.Value
    return value_type(string_value=value) if isinstance(value, str) else value_type(int_value=value)


def _xds_cluster(xds_address: str) -> cluster_pb2.Cluster:
    if "," in xds_address:
        raise BootstrapError("several xDS addresses need --token-file (authenticated xDS over gRPC's own client)")
    host, port = split_address(xds_address)
    try:
        if port:
            ipaddress.ip_address(host)
        kind = cluster_pb2.Cluster.STATIC
    except ValueError:
        kind = cluster_pb2.Cluster.STRICT_DNS
    cluster = cluster_pb2.Cluster(
        name=XDS_CLUSTER,
        type=kind,
        connect_timeout=_seconds(1),
        load_assignment=_assignment(XDS_CLUSTER, host, port),
        upstream_connection_options=cluster_pb2.UpstreamConnectionOptions(
            tcp_keepalive=address_pb2.TcpKeepalive(keepalive_time=wrappers_pb2.UInt32Value(value=300))
        ),
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    priority=base_pb2.DEFAULT,
                    max_connections=wrappers_pb2.UInt32Value(value=100000),
                    max_pending_requests=wrappers_pb2.UInt32Value(value=100000),
                    max_requests=wrappers_pb2.UInt32Value(value=100000),
                )
            ]
        ),
    )
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(
        http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions(
                    connection_keepalive=protocol_pb2.KeepaliveSettings(
                        interval=_seconds(KEEPALIVE_SECONDS), timeout=_seconds(10)
                    )
                )
            )
        )
    )
    return cluster


def _admin_cluster(ports: Ports) -> cluster_pb2.Cluster:
    target, port = (ports.admin_socket, 0) if ports.admin_socket else ("127.0.0.1", ports.admin)
    return cluster_pb2.Cluster(
        name=ADMIN_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_seconds(0.25),
        load_assignment=_assignment(ADMIN_CLUSTER, target, port),
    )


def _admin_address(ports: Ports) -> address_pb2.Address:
    if ports.admin_socket:
        return address_pb2.Address(pipe=address_pb2.Pipe(path=ports.admin_socket, mode=0o666))
    return _address("127.0.0.1", ports.admin)


_READY = ("/healthz/ready", "/ready")
_METRICS = ("/stats/prometheus", "/stats/prometheus")


def _status_listeners(ports: Ports, probes: Sequence[AppProbe]) -> list[listener_pb2.Listener]:
    """Istio's ports from stock Envoy: 15090 metrics, 15021 readiness, and 15020 (its agent's) for the
    app's probes and hooks, metrics and readiness, so that scrape configs and NetworkPolicies carry over."""
    if probes and not ports.status:
        raise BootstrapError("app probes are answered on the status port: it cannot be 0 when there are probes")
    listeners = [_admin_listener("prometheus", ports.stats, [_METRICS])]
    listeners.append(_admin_listener("health", ports.health, [_READY]))
    if ports.status:
        listeners.append(_admin_listener("status", ports.status, [_READY, _METRICS], probes))
    return listeners


def _admin_listener(
    name: str, port: int, paths: Sequence[tuple[str, str]], probes: Sequence[AppProbe] = ()
) -> listener_pb2.Listener:
    """Exposes admin `paths` (as path, admin path) on all interfaces without exposing the admin API
    itself, and answers the app's probes."""
    routes = [
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(path=path),
            route=route_components_pb2.RouteAction(cluster=ADMIN_CLUSTER, prefix_rewrite=rewrite),
        )
        for path, rewrite in paths
    ]
    filters = []
    for probe in probes:
        if probe.kind == "http":
            routes.append(
                route_components_pb2.Route(
                    match=route_components_pb2.RouteMatch(path=probe.path),
                    route=route_components_pb2.RouteAction(
                        cluster=probe.cluster, prefix_rewrite=probe.http_path, timeout=_seconds(probe.timeout)
                    ),
                )
            )
        else:
            # Answered here, from the active health check of the app's port.
            check = health_check_pb2.HealthCheck(
                pass_through_mode=wrappers_pb2.BoolValue(value=False),
                headers=[
                    route_components_pb2.HeaderMatcher(
                        name=":path", string_match=string_pb2.StringMatcher(exact=probe.path)
                    )
                ],
            )
            check.cluster_min_healthy_percentages[probe.cluster].value = 100
            filters.append(hcm.HttpFilter(name="envoy.filters.http.health_check", typed_config=_pack(check)))
    filters.append(hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())))
    manager = hcm.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(
            virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=["*"], routes=routes)]
        ),
        http_filters=filters,
    )
    return listener_pb2.Listener(
        name=name,
        address=_address("0.0.0.0", port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_pack(manager)
                    )
                ]
            )
        ],
    )


def _probe_cluster(probe: AppProbe) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=probe.cluster,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_seconds(probe.timeout),
        load_assignment=_assignment(probe.cluster, "127.0.0.1", probe.port),
    )
    if probe.kind == "http" and probe.https:
        # kubelet does not verify an app's certificate for HTTPS probes; neither do we.
        cluster.transport_socket.name = "envoy.transport_sockets.tls"
        cluster.transport_socket.typed_config.Pack(tls_pb2.UpstreamTlsContext())
    if probe.kind in ("tcp", "grpc"):
        check = core_health_check_pb2.HealthCheck(
            timeout=_seconds(probe.timeout),
            interval=_seconds(probe.period),
            unhealthy_threshold=wrappers_pb2.UInt32Value(value=1),
            healthy_threshold=wrappers_pb2.UInt32Value(value=1),
            no_traffic_interval=_seconds(probe.period),
        )
        if probe.kind == "tcp":
            check.tcp_health_check.SetInParent()
        else:
            check.grpc_health_check.service_name = probe.grpc_service
            cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(
                http_protocol_options_pb2.HttpProtocolOptions(
                    explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                        http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
                    )
                )
            )
        cluster.health_checks.append(check)
    return cluster


def _assignment(cluster: str, host: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    """One endpoint: HOST:PORT, or the unix socket at HOST when `port` is 0."""
    address = address_pb2.Address(pipe=address_pb2.Pipe(path=host)) if port == 0 else _address(host, port)
    endpoint = endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=address))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])]
    )


def _overload_manager() -> overload_pb2.OverloadManager:
    # Envoy warns at start-up unless a global downstream connection limit is configured.
    limit = downstream_connections_pb2.DownstreamConnectionsConfig(max_active_downstream_connections=100_000)
    return overload_pb2.OverloadManager(
        resource_monitors=[
            overload_pb2.ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections", typed_config=_pack(limit)
            )
        ]
    )
