"""`meshctl`: parses flags into settings and calls into the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, MeshError
from .settings import WEBHOOK_DNS_NAMES, Settings, default_ca_dir, parse_duration

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
    s.add_argument("--mesh", required=True, type=Path, metavar="FILE", help="the YAML mesh file (watched for edits)")
    s.add_argument(
        "--bind",
        default="0.0.0.0",
        metavar="ADDRESS",
        help="address to listen on (default: 0.0.0.0, all interfaces, as istiod)",
    )
    s.add_argument("--xds-port", type=_port, default=15010, metavar="N", help="gRPC xDS and CA port (default: 15010)")
    s.add_argument(
        "--xds-socket",
        type=Path,
        metavar="PATH",
        help="also serve xDS on this unix socket (for sidecars that cannot reach the host)",
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
    _injection_flags(s)
    s.set_defaults(run=_serve)

    b = sub.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap for a workload",
        description="Print the Envoy bootstrap that makes a stock Envoy a sidecar of this mesh: "
        "node identity, the xds-grpc cluster, ADS, admin on 127.0.0.1, Prometheus "
        "stats on 15090 and readiness on 15021.",
    )
    b.add_argument("--xds-address", required=True, metavar="HOST:PORT", help="where `meshctl serve` listens")
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
    b.add_argument("--format", choices=["json", "yaml"], default="json", help="output format (default: json)")
    b.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of standard output")
    b.set_defaults(run=_bootstrap)

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
        "root as caBundle (the CA is created in --ca-dir if it does not exist yet).",
    )
    w.add_argument("--ca-dir", type=Path, default=default_ca_dir(), metavar="DIR", help="the mesh CA's directory")
    w.add_argument("--trust-domain", default="cluster.local", help="the trust domain, if the CA is new")
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

    i = sub.add_parser(
        "iptables",
        help="apply (or print) the traffic-capture rules of a pod",
        description="Install the nat rules that send a pod's TCP traffic through its sidecar, with istio-iptables' "
        "flags and semantics, in one atomic iptables-restore. Idempotent; --cleanup removes exactly what "
        "was added. Lists are comma-separated; '*' means all.",
    )
    i.add_argument("-p", "--envoy-port", default="15001", metavar="PORT", help="outbound capture port (15001)")
    i.add_argument("-z", "--inbound-capture-port", default="15006", metavar="PORT", help="inbound capture port (15006)")
    i.add_argument(
        "-u", "--proxy-uid", default="1337", metavar="UIDS", help="the proxy's uid(s), never captured (1337)"
    )
    i.add_argument(
        "-g", "--proxy-gid", default="1337", metavar="GIDS", help="the proxy's gid(s), never captured (1337)"
    )
    i.add_argument(
        "-b",
        "--inbound-ports",
        default="*",
        metavar="PORTS",
        help="inbound ports to capture, or '*' (default); 15090, 15021 and 15020 never are",
    )
    i.add_argument("-d", "--exclude-inbound-ports", default="", metavar="PORTS", help="inbound ports not to capture")
    i.add_argument(
        "-i",
        "--outbound-ip-ranges",
        default="*",
        metavar="CIDRS",
        help="outbound destinations to capture, or '*' (default)",
    )
    i.add_argument(
        "-x", "--exclude-outbound-ip-ranges", default="", metavar="CIDRS", help="outbound destinations not to capture"
    )
    i.add_argument("-o", "--exclude-outbound-ports", default="", metavar="PORTS", help="outbound ports not to capture")
    i.add_argument(
        "-c",
        "--exclude-interfaces",
        default="",
        metavar="IFACES",
        help="interfaces whose traffic is never captured, either way",
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
        bind=args.bind,
        xds_port=args.xds_port,
        xds_socket=args.xds_socket,
        admin_port=args.admin_port,
        webhook_port=args.webhook_port,
        ca_dir=args.ca_dir,
        cert_ttl=parse_duration(args.cert_ttl),
        proxy_grace=parse_duration(args.proxy_grace).total_seconds(),
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
        webhook_dns_names=tuple(args.webhook_dns_name or WEBHOOK_DNS_NAMES),
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
        "--injected-xds-address",
        metavar="HOST:PORT",
        help="where injected sidecars reach xDS (default: meshplane.mesh-system.svc:15010)",
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
        return InjectionConfig.load(
            args.injection_config,
            proxy_image=args.proxy_image,
            xds_address=args.injected_xds_address,
            native_sidecars=args.native_sidecars,
        )
    except InjectionConfigError as e:
        raise ConfigError(str(e)) from None


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

    name, _, namespace = args.service.partition(".")
    if not name or not namespace:
        raise ConfigError(f"--service {args.service!r} must be NAME.NAMESPACE")
    ca = CertificateAuthority(args.ca_dir, args.trust_domain)
    doc = webhook_configuration(
        ca_bundle=ca.root_pem,
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


def _app(args: argparse.Namespace) -> int:
    from meshplane.sandbox.demoapp import serve as serve_app

    serve_app(args.name, args.http, args.tcp)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from meshplane.sandbox.demo import run

    settings = Settings(mesh_file=args.mesh, bind="127.0.0.1", xds_port=0, admin_port=args.admin_port, webhook_port=0)
    asyncio.run(run(settings, duration=parse_duration(args.duration).total_seconds()))
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, bootstrap, render

    identity = WorkloadIdentity(
        name=args.name,
        namespace=args.namespace,
        service_account=args.service_account,
        ip=args.ip,
        labels=dict(args.label),
    )
    try:
        text = render(bootstrap(identity, args.xds_address, Ports(admin=args.admin_port)), args.format)
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
        )
        if args.dry_run:
            for v6 in (False, True) if ipv6 else (False,):
                sys.stdout.write(f"# {'ip6tables' if v6 else 'iptables'}-restore --noflush\n")
                sys.stdout.write(iptables.rules(config, ipv6=v6))
            return 0
        iptables.apply(config, ipv6=ipv6)
        log.info("capture rules applied (%s)", "IPv4 and IPv6" if ipv6 else "IPv4")
        return 0
    except iptables.CaptureError as e:
        raise ConfigError(str(e)) from None


def _dry_run(argv: Sequence[str], stdin: str | None) -> str:
    """For --cleanup --dry-run: read the real table, print what would be restored."""
    from meshplane.bootstrap import iptables

    if stdin is None:
        return iptables.run_command(argv, stdin)
    sys.stdout.write(f"# {' '.join(argv)}\n{stdin}")
    return ""


if __name__ == "__main__":
    sys.exit(main())
