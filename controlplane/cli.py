"""`meshctl`: parses flags into settings and calls into the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, MeshError
from .settings import WEBHOOK_DNS_NAMES, Settings, default_ca_dir, default_state_dir, parse_duration

if TYPE_CHECKING:
    from meshplane.webhook.config import InjectionConfig

log = logging.getLogger("meshplane")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0 picks a free port)")
    return int(text)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshctl",
        description="Meshplane: a control plane for Envoy sidecars (xDS with SPIFFE mTLS, "
        "bootstrap generation, traffic capture, sidecar injection).",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log (default: info)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the control plane (xDS, CA, admin HTTP)",
        description="Run the control plane: the xDS server (ADS and per-type services) with the "
        "mesh CA, and the admin HTTP server. Edits to the mesh file are applied live.",
    )
    s.add_argument(
        "--mesh",
        type=Path,
        metavar="FILE",
        help="the YAML mesh file (watched for edits); required unless --kubernetes, where it adds to the cluster's "
        "services (the cluster wins a service both name)",
    )
    s.add_argument(
        "--kubernetes",
        action="store_true",
        help="discover the mesh from Kubernetes: Services, EndpointSlices, Pods and Namespaces; proxies are "
        "authenticated with TokenReview and their pods decide their endpoints",
    )
    s.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        help="client configuration for --kubernetes (default: in-cluster in a pod, else $KUBECONFIG or ~/.kube/config)",
    )
    s.add_argument(
        "--namespaces",
        type=lambda v: tuple(n for n in v.split(",") if n),
        default=(),
        metavar="A,B",
        help="with --kubernetes, watch only these namespaces (default: all)",
    )
    s.add_argument(
        "--ca-secret",
        metavar="NAMESPACE/NAME",
        help="with --kubernetes, keep the CA root in this Secret, shared by every replica (the first one creates it)",
    )
    s.add_argument(
        "--webhook-configuration",
        metavar="NAME",
        help="with --kubernetes, keep this MutatingWebhookConfiguration's caBundle equal to the mesh trust bundle",
    )
    s.add_argument(
        "--bind",
        default="0.0.0.0",
        metavar="ADDRESS",
        help="address to listen on (default: 0.0.0.0, all interfaces, as istiod)",
    )
    s.add_argument(
        "--xds-tls-port",
        type=_port,
        default=15012,
        metavar="N",
        help="gRPC xDS and CA over TLS, with a mesh-CA certificate; proxies authenticate with a bearer "
        "token (meshctl token) or a mesh client certificate (default: 15012)",
    )
    s.add_argument(
        "--xds-socket",
        type=Path,
        metavar="PATH",
        help="also serve xDS on this unix socket (local credentials plus a bearer token; for sidecars that "
        "cannot reach the host); owner-only unless --xds-socket-group",
    )
    s.add_argument(
        "--xds-socket-group",
        type=int,
        metavar="GID",
        help="make the socket 0660 for this group (the sidecars' gid, e.g. 1337) instead of owner-only",
    )
    s.add_argument(
        "--token-audience",
        default="meshplane",
        metavar="AUD",
        help="the audience proxies' bearer tokens must carry (default: meshplane)",
    )
    s.add_argument(
        "--xds-mtls-port",
        type=_port,
        metavar="N",
        help="also serve gRPC over TLS requiring a mesh client certificate, which is then the caller's identity "
        "(off by default; sidecars authenticate with tokens on --xds-tls-port)",
    )
    s.add_argument(
        "--insecure-trust-node-metadata",
        action="store_true",
        help="INSECURE, local experiments only: also serve plaintext xDS on --xds-port and believe the "
        "identity each proxy's node metadata claims (anyone who reaches it gets any identity's key)",
    )
    s.add_argument(
        "--xds-port",
        type=_port,
        default=15010,
        metavar="N",
        help="the plaintext port of --insecure-trust-node-metadata (default: 15010); not served otherwise",
    )
    s.add_argument(
        "--admin-port",
        type=_port,
        default=15014,
        metavar="N",
        help="admin HTTP port: /healthz /readyz /metrics /debug/proxies (default: 15014)",
    )
    s.add_argument(
        "--webhook-port",
        type=_port,
        default=15017,
        metavar="N",
        help="HTTPS port of the injection webhook (default: 15017)",
    )
    s.add_argument(
        "--ca-dir",
        type=Path,
        default=default_ca_dir(),
        metavar="DIR",
        help=f"where the CA root is kept; created on first start (default: {default_ca_dir()})",
    )
    s.add_argument(
        "--cert-ttl",
        default="1h",
        metavar="DURATION",
        help="workload certificate lifetime, renewed at half-life (default: 1h; e.g. 30m, 90s)",
    )
    s.add_argument(
        "--proxy-grace",
        default="5s",
        metavar="DURATION",
        help="how long a disconnected proxy stays an endpoint (default: 5s)",
    )
    s.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        metavar="DIR",
        help=f"where proxies' self-registrations are kept across restarts, so a restarted control plane does not "
        f"push a mesh that lacks them (default: {default_state_dir()})",
    )
    s.add_argument(
        "--shutdown-delay",
        default="3s",
        metavar="DURATION",
        help="on SIGTERM, how long /readyz reports 503 while xDS keeps serving, so load balancers and "
        "proxies move away before streams close (default: 3s)",
    )

    s.add_argument(
        "--webhook-cert",
        type=Path,
        metavar="FILE",
        help="the webhook's serving certificate (PEM); default: issued by the mesh CA and rotated",
    )
    s.add_argument("--webhook-key", type=Path, metavar="FILE", help="the key of --webhook-cert")
    s.add_argument(
        "--webhook-dns-name",
        action="append",
        metavar="NAME",
        help="a name for the CA-issued webhook certificate (repeatable; default: "
        "meshplane.mesh-system.svc[.cluster.local], localhost, 127.0.0.1)",
    )
    s.add_argument(
        "--xds-dns-name",
        action="append",
        metavar="NAME",
        help="a name or IP address for the xDS server's TLS certificate, as sidecars dial it (repeatable; replaces "
        "the default: meshplane.mesh-system.svc[.cluster.local], localhost, 127.0.0.1)",
    )
    s.add_argument(
        "--debug-from-anywhere",
        action="store_true",
        help="serve the admin /debug/* pages (every proxy's config and identity) to any address; by default only "
        "callers on this host (loopback) get them, while /healthz, /readyz and /metrics answer everyone",
    )
    _injection_flags(s)
    s.set_defaults(run=_serve)

    b = sub.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap for a workload",
        description="Print the Envoy bootstrap that makes a stock Envoy a sidecar of this mesh: "
        "node identity, the xds-grpc cluster, ADS, admin on 127.0.0.1, Prometheus "
        "stats on 15090 and readiness on 15021.",
    )
    b.add_argument(
        "--xds-address",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help="where `meshctl serve` listens (its TLS port, or unix:/path); repeat it for several replicas, "
        "which Envoy tries in turn when one fails",
    )
    b.add_argument("--name", required=True, help="the workload (pod) name")
    b.add_argument("--namespace", required=True, help="the workload's namespace")
    b.add_argument("--service-account", default="default", help="the workload's service account (default: default)")
    b.add_argument("--ip", required=True, help="the workload's IP address")
    b.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="K=V",
        help="a workload label (repeat for several); services select workloads by label",
    )
    b.add_argument(
        "--admin-port", type=_port, default=15000, metavar="N", help="Envoy admin port on 127.0.0.1 (default: 15000)"
    )
    # Istio's ports by default; several sidecars sharing one host (tests, benchmarks) need others.
    b.add_argument("--stats-port", type=_port, default=15090, metavar="N", help="Prometheus metrics (default: 15090)")
    b.add_argument("--health-port", type=_port, default=15021, metavar="N", help="/healthz/ready (default: 15021)")
    b.add_argument(
        "--status-port",
        type=_port,
        default=15020,
        metavar="N",
        help="metrics and readiness as Istio's agent port (default: 15020; 0: none)",
    )
    b.add_argument(
        "--token-file",
        metavar="FILE",
        help="authenticate with the bearer token in FILE (meshctl token, or a projected service-account token); "
        "Envoy re-reads it on every connection. Without it the bootstrap is for an --insecure-trust-node-metadata "
        "server's plaintext port",
    )
    b.add_argument(
        "--xds-ca",
        metavar="FILE",
        help="the mesh root (CA_DIR/root-cert.pem) Envoy verifies the control plane's TLS certificate against; "
        "needed with --token-file and a HOST:PORT address (a unix: address uses local credentials)",
    )
    b.add_argument(
        "--xds-authority",
        metavar="NAME",
        help="with several --xds-address, the name the control plane's certificate is checked against "
        "(default: meshplane.mesh-system.svc, which every replica's certificate carries)",
    )
    b.add_argument(
        "--sotw",
        action="store_true",
        help="state-of-the-world xDS instead of incremental (delta) xDS, the default",
    )
    b.add_argument(
        "--on-demand-clusters",
        action="store_true",
        help="subscribe to no clusters: ask for each when a connection first needs it (Envoy's on-demand CDS; "
        "starts fast at any mesh size, the first call to each service waits one round trip to the control plane)",
    )
    b.add_argument("--format", choices=["json", "yaml"], default="json", help="output format (default: json)")
    b.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of standard output")
    b.set_defaults(run=_bootstrap)

    r = sub.add_parser(
        "ca-rotate",
        help="rotate the mesh CA's root, with an overlap in which both roots are trusted",
        description="Start a root rotation in --ca-dir: the current root becomes the previous one (still "
        "trusted, still signing the control plane's and webhook's serving certificates) and a new root is "
        "created. A running `meshctl serve` notices within seconds, pushes the trust bundle with both roots to "
        "every proxy, waits for their ACKs, then signs workload certificates with the new root. CA_DIR/"
        "trust-bundle.pem always holds every trusted root: give it to clients (meshctl bootstrap --xds-ca) and "
        "the webhook's caBundle. Once every client has the new bundle, run again with --finish to retire the "
        "previous root.",
    )
    r.add_argument("--ca-dir", type=Path, default=default_ca_dir(), metavar="DIR", help="the mesh CA (must exist)")
    r.add_argument("--trust-domain", default="cluster.local", help="named in the new root (default: cluster.local)")
    r.add_argument("--finish", action="store_true", help="retire the previous root: the rotation's last step")
    r.set_defaults(run=_ca_rotate)

    t = sub.add_parser(
        "token",
        help="mint a bearer token for a workload identity (outside Kubernetes)",
        description="Mint a token, signed by the mesh CA, that proves a workload identity to `meshctl serve` "
        "(it verifies it offline with the CA's key). Give it to a sidecar with `meshctl bootstrap --token-file`. "
        "Anyone holding the token can act as that identity until it expires: keep it as secret as a key.",
    )
    t.add_argument("--ca-dir", type=Path, default=default_ca_dir(), metavar="DIR", help="the mesh CA (must exist)")
    t.add_argument("--namespace", required=True, help="the workload's namespace")
    t.add_argument("--service-account", required=True, help="the workload's service account")
    t.add_argument("--ttl", default="24h", metavar="DURATION", help="how long the token is valid (default: 24h)")
    t.add_argument(
        "--audience", default="meshplane", metavar="AUD", help="the audience the server expects (default: meshplane)"
    )
    t.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write here (mode 0600) instead of standard output"
    )
    t.set_defaults(run=_token)

    d = sub.add_parser(
        "demo",
        help="run the control plane with real sidecar'd pods and live traffic (needs root)",
        description="Start the control plane with a mesh file, a backend and a frontend pod in containers "
        "(podman, or Docker where it runs), each with the capture init step and an Envoy sidecar, and send a "
        "request from frontend to backend every second, printing each request's path with its mTLS identities "
        "and the connected proxies. Ctrl-C stops and removes everything.",
    )
    d.add_argument(
        "--mesh",
        type=Path,
        default=Path("examples/mesh.yaml"),
        metavar="FILE",
        help="the mesh file (default: examples/mesh.yaml); edit it while the demo runs",
    )
    d.add_argument(
        "--duration",
        default="0",
        metavar="DURATION",
        help="stop by itself after this long (default: 0, run until Ctrl-C)",
    )
    d.add_argument(
        "--admin-port",
        type=_port,
        default=15014,
        metavar="N",
        help="the control plane's admin HTTP port on 127.0.0.1 (default: 15014)",
    )
    d.set_defaults(run=_demo)

    j = sub.add_parser(
        "inject",
        help="inject sidecars into Kubernetes manifests (like istioctl kube-inject)",
        description="Inject the mesh-init container and the Envoy sidecar into Pods and the pod templates of "
        "Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs in multi-document YAML, exactly "
        "as the webhook would. Other documents pass through; comments are kept outside rewritten pod specs.",
    )
    j.add_argument("-f", "--filename", required=True, metavar="FILE", help="the manifests, or - for standard input")
    j.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of standard output")
    _injection_flags(j)
    j.set_defaults(run=_inject)

    w = sub.add_parser(
        "webhook-config",
        help="print the MutatingWebhookConfiguration for this injector",
        description="Print the MutatingWebhookConfiguration that sends pods to the injector, with the mesh CA's "
        "root as caBundle. The CA must already exist in --ca-dir (`meshctl serve` creates it on first start), "
        "unless --create is given.",
    )
    w.add_argument(
        "--ca-dir",
        type=Path,
        default=default_ca_dir(),
        metavar="DIR",
        help=f"the mesh CA's directory, as given to `meshctl serve` (default: {default_ca_dir()})",
    )
    w.add_argument(
        "--create",
        action="store_true",
        help="create a new CA in --ca-dir if there is none (to make the root before a first install)",
    )
    w.add_argument("--trust-domain", default="cluster.local", help="the trust domain, if --create makes a new CA")
    w.add_argument(
        "--service",
        default="meshplane.mesh-system",
        metavar="NAME.NAMESPACE",
        help="the Service in front of `meshctl serve` (default: meshplane.mesh-system)",
    )
    w.add_argument("--port", type=_port, default=443, help="the Service's webhook port (default: 443)")
    w.add_argument("--revision", default="default", help="matched against istio.io/rev labels (default: default)")
    w.add_argument(
        "--failure-policy",
        choices=["Fail", "Ignore"],
        default="Fail",
        help="what the API server does when the webhook cannot answer (default: Fail)",
    )
    w.add_argument("--timeout", type=int, default=10, metavar="SECONDS", help="timeoutSeconds (default: 10)")
    w.set_defaults(run=_webhook_config)

    t = sub.add_parser(
        "wait",
        help="wait until the local Envoy sidecar is ready (a postStart hook)",
        description="Poll the sidecar's readiness endpoint until it answers 200; used as the proxy's "
        "postStart hook when applications wait for their sidecar.",
    )
    t.add_argument("--url", default="http://127.0.0.1:15021/healthz/ready", help="the readiness URL")
    t.add_argument("--timeout", default="60s", metavar="DURATION", help="give up after this long (default: 60s)")
    t.set_defaults(run=_wait)

    dr = sub.add_parser(
        "drain",
        help="drain the local Envoy sidecar before it is stopped (the proxy's preStop hook)",
        description="Ask the local Envoy to drain its inbound listeners gracefully (admin POST "
        "/drain_listeners?graceful&inboundonly), then wait --duration so in-flight requests finish before the "
        "kubelet sends SIGTERM, on which Envoy exits at once. Like Istio's terminationDrainDuration.",
    )
    dr.add_argument(
        "--admin-url", default="http://127.0.0.1:15000", metavar="URL", help="Envoy's admin API (default: %(default)s)"
    )
    dr.add_argument("--admin-socket", type=Path, metavar="PATH", help="Envoy's admin API on a unix socket instead")
    dr.add_argument("--duration", default="5s", metavar="DURATION", help="how long to drain (default: 5s)")
    dr.set_defaults(run=_drain)

    a = sub.add_parser(
        "app",
        help="run a small demo workload (HTTP and TCP echo)",
        description="A demo workload: HTTP ports answer with JSON naming the pod, the caller's address and the "
        "request headers; TCP ports greet with '<pod> <port> <caller>' and then echo.",
    )
    a.add_argument("--name", required=True, help="the pod name it reports")
    a.add_argument("--http", type=_port, action="append", default=[], metavar="PORT", help="an HTTP port (repeatable)")
    a.add_argument("--tcp", type=_port, action="append", default=[], metavar="PORT", help="a TCP port (repeatable)")
    a.set_defaults(run=_app)

    import os

    def env(name: str, default: str) -> str:
        """istio-iptables reads its flags from these variables too; a flag given wins."""
        return os.environ.get(name, default)

    i = sub.add_parser(
        "iptables",
        help="apply (or print) the traffic-capture rules of a pod",
        description="Install the rules that send a pod's TCP traffic through its sidecar, with istio-iptables' "
        "flags and semantics, in one atomic iptables-restore. Idempotent; --cleanup removes exactly what "
        "was added. Lists are comma-separated; '*' means all. Each flag's default comes from the environment "
        "variable istio-iptables reads for it, named in its help.",
    )
    i.add_argument(
        "-p",
        "--envoy-port",
        default=env("ENVOY_PORT", "15001"),
        metavar="PORT",
        help="outbound capture port (15001; $ENVOY_PORT)",
    )
    i.add_argument(
        "-z",
        "--inbound-capture-port",
        default=env("INBOUND_CAPTURE_PORT", "15006"),
        metavar="PORT",
        help="inbound capture port (15006; $INBOUND_CAPTURE_PORT)",
    )
    i.add_argument(
        "-u",
        "--proxy-uid",
        default=env("PROXY_UID", "1337"),
        metavar="UIDS",
        help="the proxy's uid(s), never captured (1337; $PROXY_UID)",
    )
    i.add_argument(
        "-g",
        "--proxy-gid",
        default=env("PROXY_GID", "1337"),
        metavar="GIDS",
        help="the proxy's gid(s), never captured (1337; $PROXY_GID)",
    )
    i.add_argument(
        "-b",
        "--inbound-ports",
        default=env("ISTIO_INBOUND_PORTS", "*"),
        metavar="PORTS",
        help="inbound ports to capture, or '*' (default); 15090, 15021 and 15020 never are. With '' none is, "
        "but the proxy calling its own pod IP still reaches the inbound capture port ($ISTIO_INBOUND_PORTS)",
    )
    i.add_argument(
        "-d",
        "--exclude-inbound-ports",
        default=env("ISTIO_LOCAL_EXCLUDE_PORTS", ""),
        metavar="PORTS",
        help="inbound ports not to capture ($ISTIO_LOCAL_EXCLUDE_PORTS)",
    )
    i.add_argument(
        "-i",
        "--outbound-ip-ranges",
        default=env("ISTIO_SERVICE_CIDR", "*"),
        metavar="CIDRS",
        help="outbound destinations to capture, or '*' (default) ($ISTIO_SERVICE_CIDR)",
    )
    i.add_argument(
        "-x",
        "--exclude-outbound-ip-ranges",
        default=env("ISTIO_SERVICE_EXCLUDE_CIDR", ""),
        metavar="CIDRS",
        help="outbound destinations not to capture ($ISTIO_SERVICE_EXCLUDE_CIDR)",
    )
    i.add_argument(
        "-o",
        "--exclude-outbound-ports",
        default=env("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", ""),
        metavar="PORTS",
        help="outbound ports not to capture ($ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE)",
    )
    i.add_argument(
        "-q",
        "--include-outbound-ports",
        default=env("ISTIO_OUTBOUND_PORTS", ""),
        metavar="PORTS",
        help="outbound ports to capture whatever the destination, even outside -i's ranges; "
        "-x and -o still win ($ISTIO_OUTBOUND_PORTS)",
    )
    i.add_argument(
        "--include-outbound-owner-groups",
        default=env("ISTIO_OUTBOUND_OWNER_GROUPS", "*"),
        metavar="GROUPS",
        help="groups (names or gids) whose outbound traffic is captured, or '*' (default); at most 64 "
        "($ISTIO_OUTBOUND_OWNER_GROUPS, which istio-iptables reads with no flag)",
    )
    i.add_argument(
        "--exclude-outbound-owner-groups",
        default=env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", ""),
        metavar="GROUPS",
        help="groups whose outbound traffic is not captured; only when the included groups are '*' "
        "($ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)",
    )
    i.add_argument(
        "-c",
        "--exclude-interfaces",
        default=env("ISTIO_EXCLUDE_INTERFACES", ""),
        metavar="IFACES",
        help="interfaces whose traffic is never captured, either way ($ISTIO_EXCLUDE_INTERFACES)",
    )
    i.add_argument(
        "-k",
        "--kube-virt-interfaces",
        default=env("KUBE_VIRT_INTERFACES", ""),
        metavar="IFACES",
        help="virtual interfaces (KubeVirt) whose inbound traffic, from a VM, is captured as outbound, "
        "within -i's ranges ($KUBE_VIRT_INTERFACES)",
    )
    i.add_argument(
        "--ipv4-loopback-cidr",
        default=env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/32"),
        metavar="CIDR",
        help="the IPv4 loopback range that stays local, in 127.0.0.0/8 with a prefix of 8 to 32 "
        "(127.0.0.1/32; $ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR, which istio-iptables reads with no flag)",
    )
    i.add_argument(
        "--drop-invalid",
        action="store_true",
        default=_env_bool(env("DROP_INVALID", env("INVALID_DROP", ""))),
        help="drop packets conntrack finds INVALID (mangle table) rather than let them reset "
        "connections; a later run without it keeps the drop, --cleanup removes it ($INVALID_DROP)",
    )
    i.add_argument(
        "--redirect-dns",
        action="store_true",
        default=_env_bool(env("REDIRECT_DNS", env("ISTIO_META_DNS_CAPTURE", ""))),
        help="send the app's UDP DNS queries to the pod's nameservers (read from /etc/resolv.conf) to the "
        "sidecar's DNS listener on 15053, which answers mesh names and forwards the rest; the proxy's own "
        "queries are never captured. TCP DNS is not redirected ($REDIRECT_DNS, $ISTIO_META_DNS_CAPTURE)",
    )
    i.add_argument(
        "--capture-all-dns",
        action="store_true",
        default=_env_bool(env("CAPTURE_ALL_DNS", "")),
        help="with --redirect-dns: capture every query to port 53, not only those to the pod's nameservers "
        "($CAPTURE_ALL_DNS)",
    )
    i.add_argument(
        "-m",
        "--inbound-interception-mode",
        default=env("ISTIO_INBOUND_INTERCEPTION_MODE", "") or "REDIRECT",
        metavar="MODE",
        help="REDIRECT (default: nat, the app sees connections from 127.0.0.6) or TPROXY (mangle and policy "
        "routing: the app sees the client's address; the proxy needs CAP_NET_ADMIN) "
        "($ISTIO_INBOUND_INTERCEPTION_MODE)",
    )
    i.add_argument(
        "-t",
        "--tproxy-mark",
        default=env("ISTIO_INBOUND_TPROXY_MARK", "1337"),
        metavar="MARK",
        help="TPROXY: the packet mark of captured inbound traffic; the control plane configures the proxy with "
        "1337 (1337; $ISTIO_INBOUND_TPROXY_MARK)",
    )
    i.add_argument(
        "-r",
        "--tproxy-route-table",
        default=env("ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "133"),
        metavar="TABLE",
        help="TPROXY: the routing table that delivers marked packets locally (133; $ISTIO_INBOUND_TPROXY_ROUTE_TABLE)",
    )
    i.add_argument(
        "--ipv6",
        choices=["auto", "on", "off"],
        default="auto",
        help="also apply ip6tables rules: auto (when the pod has a global IPv6 address), on, off",
    )
    i.add_argument("--dry-run", action="store_true", help="print the exact iptables-restore input; change nothing")
    i.add_argument("--cleanup", action="store_true", help="remove the rules this command added")
    i.set_defaults(run=_iptables)

    import textwrap

    from .status import STATES

    ps = sub.add_parser(
        "proxy-status",
        help="show whether each connected proxy has the latest config (like istioctl proxy-status)",
        description=textwrap.fill(
            "One row per proxy connected to the control plane: its id, SPIFFE identity, the control plane replica "
            "it talks to, and for each xDS type (CDS clusters, EDS endpoints, LDS listeners, RDS routes, SDS "
            "certificates) one of these states:"
        )
        + "\n\n"
        + "".join(
            textwrap.fill(m, initial_indent=f"  {s:10}", subsequent_indent=" " * 12) + "\n" for s, m in STATES.items()
        )
        + "\n"
        + textwrap.fill(
            "With PROXY_ID: that proxy's versions and resource counts per type and, for a NACK, the rejected "
            "version, Envoy's error, the rejected resources and the version the proxy still runs. Reads the admin "
            "API's /debug/syncz, which answers callers on the control plane's host only (unless it runs with "
            "--debug-from-anywhere)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps.add_argument(
        "proxy_id", nargs="?", metavar="PROXY_ID", help="show the details of this proxy (an id from the table)"
    )
    ps.add_argument(
        "--admin", default=ADMIN_URL, metavar="URL", help="the control plane's admin API (default: %(default)s)"
    )
    ps.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="table for people (default), json for scripts",
    )
    ps.set_defaults(run=_proxy_status)

    ex = sub.add_parser(
        "explain",
        help="explain what the mesh does with a pod: injection, capture rules, identity, mTLS, services",
        description="Explain one pod. With -f POD.yaml (a Pod, or a Deployment or other workload with a pod "
        "template): whether it would get a sidecar and why, the traffic-capture rules its init container installs "
        "(the exact iptables-restore input), and with --mesh what its sidecar would be sent: its SPIFFE identity, "
        "inbound ports with their mTLS mode, and outbound services (host:port, cluster, protocol, endpoints, "
        "the identities it accepts from servers). With PROXY_ID instead: the same mesh view for a connected "
        "proxy, read from the running control plane's admin API (the config it last sent).",
    )
    ex.add_argument("proxy_id", nargs="?", metavar="PROXY_ID", help="a connected proxy (see `meshctl proxy-status`)")
    ex.add_argument("-f", "--filename", metavar="FILE", help="the pod manifest, or - for standard input")
    ex.add_argument("-n", "--namespace", help="the pod's namespace when the manifest names none (default: default)")
    ex.add_argument("--mesh", type=Path, metavar="FILE", help="the mesh file, to show identity, mTLS and services")
    ex.add_argument("--admin", default=ADMIN_URL, metavar="URL", help="admin API, for PROXY_ID (default: %(default)s)")
    ex.add_argument("-o", "--output", choices=["text", "json"], default="text", help="text (default) or json")
    _injection_flags(ex)
    ex.set_defaults(run=_explain)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.run(args))
    except MeshError as e:
        print(f"meshctl {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"meshctl {args.command}: {e}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    from .app import serve

    settings = Settings(
        mesh_file=args.mesh,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        namespaces=args.namespaces,
        ca_secret=args.ca_secret,
        webhook_configuration=args.webhook_configuration,
        bind=args.bind,
        xds_port=args.xds_port,
        xds_tls_port=args.xds_tls_port,
        xds_mtls_port=args.xds_mtls_port,
        insecure_trust_node_metadata=args.insecure_trust_node_metadata,
        xds_socket_group=args.xds_socket_group,
        token_audience=args.token_audience,
        xds_socket=args.xds_socket,
        admin_port=args.admin_port,
        webhook_port=args.webhook_port,
        ca_dir=args.ca_dir,
        cert_ttl=parse_duration(args.cert_ttl),
        proxy_grace=parse_duration(args.proxy_grace).total_seconds(),
        shutdown_delay=parse_duration(args.shutdown_delay).total_seconds(),
        state_dir=args.state_dir,
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
        webhook_dns_names=tuple(args.webhook_dns_name or WEBHOOK_DNS_NAMES),
        xds_dns_names=tuple(args.xds_dns_name or WEBHOOK_DNS_NAMES),
        debug_from_anywhere=args.debug_from_anywhere,
    )
    if (args.webhook_cert is None) != (args.webhook_key is None):
        raise ConfigError("--webhook-cert and --webhook-key go together")
    asyncio.run(serve(settings, _injection(args)))
    return 0


def _emit(text: str, output: Path | None) -> int:
    """Write a command's result to -o FILE, or to standard output."""
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _injection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--injection-config",
        type=Path,
        metavar="FILE",
        help="YAML with Istio-style injector settings: policy, neverInjectSelector, alwaysInjectSelector, "
        "nativeSidecars, holdApplicationUntilProxyStarts, rewriteAppHTTPProbers, proxyImage, xdsAddress",
    )
    p.add_argument("--proxy-image", metavar="IMAGE", help="the sidecar image (default: meshplane-proxy:1.40.0)")
    p.add_argument(
        "--init-image",
        metavar="IMAGE",
        help="the capture init container's image, which needs meshctl and iptables, as the control plane "
        "image has (default: the sidecar image)",
    )
    p.add_argument(
        "--injected-xds-address",
        metavar="HOST:PORT",
        help="where injected sidecars reach xDS: its TLS port or unix:/path (default: meshplane.mesh-system.svc:15012)",
    )
    p.add_argument(
        "--injected-xds-ca",
        type=Path,
        metavar="FILE",
        help="the mesh roots injected sidecars verify the control plane with, carried in their bootstrap "
        "(CA_DIR/trust-bundle.pem; `meshctl serve` uses its own CA's)",
    )
    p.add_argument(
        "--native-sidecars",
        action="store_true",
        default=None,
        help="inject the proxy as a native sidecar (initContainers, restartPolicy: Always)",
    )


def _injection(args: argparse.Namespace) -> InjectionConfig:
    from meshplane.webhook.config import InjectionConfig
    from meshplane.webhook.selector import InjectionConfigError

    try:
        xds_ca = args.injected_xds_ca.read_text() if args.injected_xds_ca else None
        return InjectionConfig.load(
            args.injection_config,
            proxy_image=args.proxy_image,
            init_image=args.init_image,
            xds_address=args.injected_xds_address,
            xds_ca=xds_ca,
            native_sidecars=args.native_sidecars,
        )
    except InjectionConfigError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"cannot read --injected-xds-ca {args.injected_xds_ca}: {e.strerror}") from None


def _inject(args: argparse.Namespace) -> int:
    from meshplane.webhook.manifests import ManifestError, inject_manifests

    source = "<stdin>" if args.filename == "-" else args.filename
    try:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {args.filename}: {e.strerror}") from None
    try:
        out, report = inject_manifests(text, _injection(args), source)
    except ManifestError as e:
        raise ConfigError(str(e)) from None
    for line in report:
        log.info("%s", line)
    return _emit(out, args.output)


def _webhook_config(args: argparse.Namespace) -> int:
    import yaml

    from meshplane.webhook.registration import webhook_configuration

    from .ca import CertificateAuthority
    from .errors import CANotFoundError

    name, _, namespace = args.service.partition(".")
    if not name or not namespace:
        raise ConfigError(f"--service {args.service!r} must be NAME.NAMESPACE")
    try:
        ca = CertificateAuthority(args.ca_dir, args.trust_domain, create=args.create)
    except CANotFoundError as e:
        raise ConfigError(
            f"{e}. Pass the --ca-dir that `meshctl serve` uses; `meshctl serve --ca-dir {args.ca_dir}` creates a "
            "CA there on first start, as does this command with --create"
        ) from None
    doc = webhook_configuration(
        ca_bundle=ca.trust_bundle_pem,
        service=name,
        namespace=namespace,
        port=args.port,
        revision=args.revision,
        failure_policy=args.failure_policy,
        timeout_seconds=args.timeout,
    )
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
    return 0


def _wait(args: argparse.Namespace) -> int:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + parse_duration(args.timeout).total_seconds()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(args.url, timeout=2) as r:
                if r.status == 200:
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    print(f"meshctl wait: {args.url} was not ready within {args.timeout}", file=sys.stderr)
    return 1


def _drain(args: argparse.Namespace) -> int:
    """Stdlib only: it runs in the proxy image."""
    import http.client
    import socket
    import time
    import urllib.parse

    seconds = parse_duration(args.duration).total_seconds()
    path = "/drain_listeners?graceful&inboundonly"
    if args.admin_socket:
        where = str(args.admin_socket)

        class _Unix(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(self.timeout)
                self.sock.connect(where)

        conn: http.client.HTTPConnection = _Unix("localhost", timeout=5)
    else:
        url = urllib.parse.urlsplit(args.admin_url)
        where = args.admin_url
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 15000, timeout=5)
    try:
        conn.request("POST", path)
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
    except OSError as e:
        print(f"meshctl drain: cannot reach Envoy's admin API at {where}: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if response.status != 200:
        print(f"meshctl drain: {path} answered {response.status}: {body}", file=sys.stderr)
        return 1
    log.info("draining inbound listeners for %gs", seconds)
    time.sleep(seconds)
    return 0


def _app(args: argparse.Namespace) -> int:
    from meshplane.sandbox.demoapp import serve as serve_app

    serve_app(args.name, args.http, args.tcp)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from meshplane.sandbox.demo import run

    settings = Settings(mesh_file=args.mesh, bind="127.0.0.1", xds_port=0, admin_port=args.admin_port, webhook_port=0)
    asyncio.run(run(settings, duration=parse_duration(args.duration).total_seconds()))
    return 0


def _ca_rotate(args: argparse.Namespace) -> int:
    from .ca import TRUST_BUNDLE, CertificateAuthority

    ca = CertificateAuthority(args.ca_dir, args.trust_domain, create=False)
    if args.finish:
        ca.finish_rotation()
        print(f"previous root retired; {args.ca_dir / TRUST_BUNDLE} now holds the current root only")
    else:
        ca.rotate_root()
        print(
            f"new root created; {args.ca_dir / TRUST_BUNDLE} holds both roots. Running control planes switch "
            "within seconds; run with --finish once every client has the new bundle"
        )
    return 0


def _token(args: argparse.Namespace) -> int:
    import datetime as dt

    from .ca import CertificateAuthority

    ttl = parse_duration(args.ttl)
    if ttl <= dt.timedelta(0):
        raise ConfigError("--ttl must be positive")
    ca = CertificateAuthority(args.ca_dir, "unused", create=False)
    try:
        token = ca.mint_token(args.namespace, args.service_account, ttl, audiences=(args.audience,))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.output:
        args.output.touch(mode=0o600)
        args.output.chmod(0o600)
        args.output.write_text(token)
        return 0
    print(token)
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, XdsCredentials, bootstrap, render

    identity = WorkloadIdentity(
        name=args.name,
        namespace=args.namespace,
        service_account=args.service_account,
        ip=args.ip,
        labels=dict(args.label),
    )
    try:
        if args.xds_ca and not args.token_file:
            raise ConfigError("--xds-ca goes with --token-file")
        credentials = (
            XdsCredentials(args.token_file, args.xds_ca or "", authority=args.xds_authority or "")
            if args.token_file
            else None
        )
        address = ",".join(args.xds_address)
        config = bootstrap(
            identity,
            address,
            Ports(admin=args.admin_port, stats=args.stats_port, health=args.health_port, status=args.status_port),
            (),
            credentials,
            delta=not args.sotw,
            on_demand_clusters=args.on_demand_clusters,
        )
        text = render(config, args.format)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return _emit(text, args.output)


def _iptables(args: argparse.Namespace) -> int:
    from meshplane.bootstrap import iptables

    try:
        ipv6 = {"on": True, "off": False}.get(args.ipv6)
        if ipv6 is None:
            ipv6 = iptables.has_ipv6()
        if args.cleanup:
            removed = iptables.cleanup(ipv6=ipv6, run=_dry_run if args.dry_run else iptables.run_command)
            log.info("capture rules removed" if removed else "no capture rules to remove")
            return 0
        config = iptables.CaptureConfig.from_flags(
            envoy_port=args.envoy_port,
            inbound_capture_port=args.inbound_capture_port,
            proxy_uid=args.proxy_uid,
            proxy_gid=args.proxy_gid,
            inbound_ports=args.inbound_ports,
            exclude_inbound_ports=args.exclude_inbound_ports,
            outbound_ip_ranges=args.outbound_ip_ranges,
            exclude_outbound_ip_ranges=args.exclude_outbound_ip_ranges,
            exclude_outbound_ports=args.exclude_outbound_ports,
            exclude_interfaces=args.exclude_interfaces,
            include_outbound_ports=args.include_outbound_ports,
            include_outbound_owner_groups=args.include_outbound_owner_groups,
            exclude_outbound_owner_groups=args.exclude_outbound_owner_groups,
            kube_virt_interfaces=args.kube_virt_interfaces,
            ipv4_loopback_cidr=args.ipv4_loopback_cidr,
            drop_invalid=args.drop_invalid,
            redirect_dns=args.redirect_dns,
            capture_all_dns=args.capture_all_dns,
            dns_servers=_resolv_conf_nameservers() if args.redirect_dns and not args.capture_all_dns else "",
            inbound_mode=args.inbound_interception_mode,
            tproxy_mark=args.tproxy_mark,
            tproxy_route_table=args.tproxy_route_table,
        )
        if args.redirect_dns and not args.capture_all_dns and not config.dns_servers:
            log.warning("--redirect-dns: /etc/resolv.conf names no nameserver, so no DNS is captured")
        if args.dry_run:
            for route in iptables.routes(config, ipv6=ipv6):
                sys.stdout.write("".join(f"# {command}\n" for command in route.commands()))
            for v6 in (False, True) if ipv6 else (False,):
                sys.stdout.write(f"# {'ip6tables' if v6 else 'iptables'}-restore --noflush\n")
                sys.stdout.write(iptables.rules(config, ipv6=v6))
            return 0
        iptables.apply(config, ipv6=ipv6)
        log.info("capture rules applied (%s, inbound %s)", "IPv4 and IPv6" if ipv6 else "IPv4", config.inbound_mode)
        return 0
    except iptables.CaptureError as e:
        raise ConfigError(str(e)) from None


def _env_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "t", "true")


def _resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> str:
    """The pod's nameservers, as istio-iptables reads them; none when the file cannot be read."""
    from meshplane.bootstrap import iptables

    try:
        with open(path) as f:
            return iptables.nameservers(f.read())
    except OSError as e:
        log.warning("--redirect-dns: cannot read %s (%s)", path, e)
        return ""


ADMIN_URL = "http://127.0.0.1:15014"


def _admin_get(base: str, path: str) -> Any:
    """GET `path` from the control plane's admin API as JSON; errors say what to check."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    url = base.rstrip("/") + "/" + urllib.parse.quote(path.lstrip("/"), safe="/")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            body = {}
        if isinstance(body, dict) and e.code == 404 and "connected" in body:
            known = ", ".join(body["connected"]) or "none"
            raise ConfigError(f"{body.get('error')}; connected proxies: {known}") from None
        message = body.get("error") if isinstance(body, dict) else None
        raise ConfigError(f"{url} answered {e.code}: {message or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"cannot reach the control plane's admin API at {base} ({reason}). Check that `meshctl serve` runs and "
            f"that --admin matches its --admin-port (default 15014); in Kubernetes, first run "
            f"`kubectl -n mesh-system port-forward deploy/meshplane 15014`."
        ) from None


def _proxy_status(args: argparse.Namespace) -> int:
    import json

    from . import status

    doc = _admin_get(args.admin, "/debug/syncz")
    if args.proxy_id is None:
        out = json.dumps(doc, indent=2, sort_keys=True) + "\n" if args.output == "json" else status.table(doc)
        return _emit(out, None)
    proxy = status.find(doc, args.proxy_id)
    if proxy is None:
        known = ", ".join(sorted({p["id"] for p in doc.get("proxies", [])})) or "none"
        raise ConfigError(f"no connected proxy {args.proxy_id!r} (connected: {known})")
    return _emit(
        json.dumps(proxy, indent=2, sort_keys=True) + "\n" if args.output == "json" else status.detail(proxy), None
    )


def _explain(args: argparse.Namespace) -> int:
    import json

    import yaml

    from . import explain, meshfile

    if (args.proxy_id is None) == (args.filename is None):
        raise ConfigError("give either -f POD.yaml (a manifest) or PROXY_ID (a connected proxy), not both or neither")
    if args.proxy_id is not None:
        proxies = _admin_get(args.admin, "/debug/proxies")
        streams = [p for p in proxies if p["id"] == args.proxy_id]
        if not streams:
            known = ", ".join(sorted({p["id"] for p in proxies})) or "none"
            raise ConfigError(f"no connected proxy {args.proxy_id!r} (connected: {known})")
        config = _admin_get(args.admin, f"/debug/config/{args.proxy_id}")
        report = explain.explain_live(max(streams, key=lambda p: p["stream"]), config)
    else:
        try:
            text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {args.filename}: {e.strerror}") from None
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            raise ConfigError(f"{args.filename}: not valid YAML: {e}") from None
        if len(docs) != 1:
            raise ConfigError(f"{args.filename}: expected one manifest, found {len(docs)}")
        model = meshfile.load(args.mesh) if args.mesh else None
        try:
            pod, namespace = explain.pod_of(docs[0], args.namespace)
        except explain.ExplainError as e:
            raise ConfigError(f"{args.filename}: {e}") from None
        report = explain.explain_pod(pod, namespace, _injection(args), model)
    return _emit(json.dumps(report, indent=2) + "\n" if args.output == "json" else explain.render(report), None)


def _dry_run(argv: Sequence[str], stdin: str | None) -> str:
    """For --cleanup --dry-run: read the real table, print what would be restored."""
    from meshplane.bootstrap import iptables

    if stdin is None:
        return iptables.run_command(argv, stdin)
    sys.stdout.write(f"# {' '.join(argv)}\n{stdin}")
    return ""


if __name__ == "__main__":
    sys.exit(main())
