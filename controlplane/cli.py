"""`meshctl`: parses flags into settings and calls into the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import MeshError
from .settings import Settings, default_ca_dir, parse_duration

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

    a = sub.add_parser(
        "app",
        help="run a small demo workload (HTTP and TCP echo)",
        description="A demo workload: HTTP ports answer with JSON naming the pod, the caller's address and the "
        "request headers; TCP ports greet with '<pod> <port> <caller>' and then echo.",
    )
    a.add_argument("--name", required=True, help="the pod name it reports")
    a.add_argument("--http", type=_port, action="append", default=[], metavar="PORT", help="an HTTP port (repeatable)")
    a.add_argument("--tcp", type=_port, action="append", default=[], metavar="PORT", help="a TCP port (repeatable)")

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "bootstrap":
            return _bootstrap(args)
        if args.command == "iptables":
            return _iptables(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "app":
            from .demoapp import serve as serve_app

            serve_app(args.name, args.http, args.tcp)
            return 0
    except MeshError as e:
        print(f"meshctl {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"meshctl {args.command}: {e}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


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
    )
    asyncio.run(serve(settings))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    settings = Settings(mesh_file=args.mesh, bind="127.0.0.1", xds_port=0, admin_port=args.admin_port)
    asyncio.run(run(settings, duration=parse_duration(args.duration).total_seconds()))
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from bootstrap.envoy import Ports, WorkloadIdentity, bootstrap, render

    from .errors import ConfigError

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
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _iptables(args: argparse.Namespace) -> int:
    from bootstrap import iptables

    from .errors import ConfigError

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
    from bootstrap import iptables

    if stdin is None:
        return iptables.run_command(argv, stdin)
    sys.stdout.write(f"# {' '.join(argv)}\n{stdin}")
    return ""


if __name__ == "__main__":
    sys.exit(main())
