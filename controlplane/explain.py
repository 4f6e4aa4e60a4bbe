"""`meshctl explain`: what the mesh does with one pod, and why. Pure: data in, a report (data) out.

For a pod manifest: the injection decision and its reason (`webhook.policy.decide`, through the
injector's own entry point), the capture rules its init container installs (its args turned into
the iptables-restore text by `bootstrap.iptables`), and, given a mesh file, what its sidecar is sent.

The mesh part is read from xDS config as /debug/config/<proxy-id> serves it (protobuf JSON): for a
manifest the generators' output for the pod's view is converted to that form first, so a planned
pod and a live proxy are explained by the same code from the same kind of data.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from meshplane.bootstrap import iptables
from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from meshplane.webhook.sidecar import INIT

from . import scope
from .generate import MeshConfig, view_of
from .generate.common import INBOUND_PASSTHROUGH, PASSTHROUGH, VIRTUAL_INBOUND, VIRTUAL_OUTBOUND
from .model import InterceptionMode, MeshModel, Workload, labels
from .resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, short

Doc = Mapping[str, Any]

TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

_CAPTURE_FLAGS = {
    "-p": "envoy_port",
    "-z": "inbound_capture_port",
    "-u": "proxy_uid",
    "-g": "proxy_gid",
    "-b": "inbound_ports",
    "-d": "exclude_inbound_ports",
    "-i": "outbound_ip_ranges",
    "-x": "exclude_outbound_ip_ranges",
    "-o": "exclude_outbound_ports",
    "-c": "exclude_interfaces",
    "-m": "inbound_mode",
}
"""The init container's istio-iptables flags (`meshctl iptables`) -> CaptureConfig.from_flags arguments."""
_CAPTURE_SWITCHES = {"--redirect-dns": "redirect_dns", "--capture-all-dns": "capture_all_dns"}
"""Its flags without a value."""

_HCM = "envoy.filters.network.http_connection_manager"
_TCP_PROXY = "envoy.filters.network.tcp_proxy"
_MODES = {
    frozenset({"tls"}): "STRICT",
    frozenset({"tls", "raw_buffer"}): "PERMISSIVE",
    frozenset({"raw_buffer"}): "DISABLE",
}


class ExplainError(ValueError):
    """The input is not something explain understands (the message says what it expected)."""


def pod_of(doc: Any, namespace: str | None = None) -> tuple[dict[str, Any], str]:
    """The pod in a manifest (a Pod, or the template of a Deployment, StatefulSet, DaemonSet, ReplicaSet,
    Job or CronJob) with its namespace; a template without a name takes its owner's."""
    if not isinstance(doc, dict):
        raise ExplainError("expected a Kubernetes manifest (a YAML mapping with kind: Pod, Deployment, ...)")
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    ns = namespace or meta.get("namespace") or "default"
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return dict(doc), ns
    template = None
    if kind in TEMPLATE_KINDS:
        template = spec.get("template")
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    if not isinstance(template, dict):
        raise ExplainError(f"kind {kind!r} has no pod to explain (expected a Pod or a workload with a pod template)")
    tmeta = {"name": meta.get("name", "pod"), **(template.get("metadata") or {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": tmeta, "spec": template.get("spec") or {}}, ns


def explain_pod(
    pod: dict[str, Any], namespace: str, injection: InjectionConfig, model: MeshModel | None = None
) -> dict[str, Any]:
    """The whole report for a pod manifest; the mesh part only with a `model` and when injected."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    workload = Workload(
        name=str(meta.get("name", "")),
        namespace=namespace,
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        address=str((pod.get("status") or {}).get("podIP") or ""),
        labels=labels({str(k): str(v) for k, v in (meta.get("labels") or {}).items()}),
    )
    scope_note = ""
    if (hosts := (meta.get("annotations") or {}).get(scope.ANNOTATION)) is not None:
        try:
            workload = dataclasses.replace(workload, egress=scope.parse_hosts(str(hosts)))
        except ValueError as e:
            scope_note = f"annotation {scope.ANNOTATION}: {e}; the sidecar is not scoped by it"
    outcome = inject(pod, namespace, injection)
    report: dict[str, Any] = {
        "pod": {
            "name": workload.name,
            "namespace": namespace,
            "service_account": workload.service_account,
            "labels": dict(workload.labels),
            "ip": workload.address or None,
        },
        "injection": {
            "inject": outcome.decision.inject and outcome.error is None,
            "reason": outcome.decision.reason,
            "error": None if outcome.error is None else str(outcome.error),
        },
        "capture": None,
        "mesh": None,
        "notes": [scope_note] if scope_note else [],
    }
    if not report["injection"]["inject"]:
        report["notes"].append(
            "no sidecar, so no capture rules and no mesh config: the pod's traffic bypasses the mesh"
        )
        return report
    report["capture"] = capture_of(outcome.pod)
    if model is None:
        report["notes"].append("no mesh file given (--mesh): services, identities and mTLS are not shown")
        return report
    known = model.workload(namespace, workload.name)
    if known is not None and known.service_account == workload.service_account:
        workload = known  # the mesh file's entry (its address, its mTLS override) is the one the mesh uses
    if workload.address:
        model = model.with_workloads((workload,))
    else:
        report["notes"].append(
            "the pod has no IP yet (status.podIP): it is not among its own services' endpoints below"
        )
    config = MeshConfig(model)
    args = report["capture"]["args"] if report["capture"] else []
    tproxy = "-m" in args[:-1] and args[args.index("-m") + 1] == InterceptionMode.TPROXY
    view = view_of(model, workload, interception=InterceptionMode.TPROXY if tproxy else InterceptionMode.REDIRECT)
    resources = config.resources(view)
    as_json = {short(t): [json_format.MessageToDict(m) for m in resources[t]] for t in resources}
    mesh = sidecar_view(as_json)
    mesh["identity"] = workload.spiffe_id(model.trust_domain)
    mesh["services"] = [f"{s.hostname(model.domain_suffix)}" for s in model.services_of(workload)]
    mesh["source"] = "mesh file"
    mesh["scope"] = None if view.egress is None else [str(h) for h in view.egress]
    report["mesh"] = mesh
    return report


def explain_live(proxy: Doc, config: Mapping[str, Sequence[Doc]]) -> dict[str, Any]:
    """The report for a connected proxy: an entry of /debug/proxies and its /debug/config/<id>."""
    w = proxy.get("workload") or {}
    mesh = sidecar_view(config)
    mesh["identity"] = proxy.get("identity", "")
    mesh["services"] = None
    mesh["source"] = "live config last sent"
    return {
        "pod": {
            "name": w.get("name", ""),
            "namespace": w.get("namespace", ""),
            "service_account": w.get("service_account", ""),
            "labels": w.get("labels") or {},
            "ip": w.get("address") or None,
            "proxy_id": proxy.get("id", ""),
        },
        "injection": None,
        "capture": None,
        "mesh": mesh,
        "notes": [
            "injection and capture rules are decided when a pod is created: explain its manifest with -f to see them"
        ],
    }


def capture_of(pod: Doc) -> dict[str, Any] | None:
    """The init container's capture flags, what they mean, and the exact iptables-restore input."""
    spec = pod.get("spec") or {}
    init = next((c for c in spec.get("initContainers") or [] if c.get("name") == INIT), None)
    if init is None:
        return None
    args = list(init.get("args") or [])
    flags: dict[str, str] = {}
    rest = args[1:] if args and args[0] == "iptables" else args
    rest = [a for a in rest if a not in _CAPTURE_SWITCHES]
    flags |= {_CAPTURE_SWITCHES[a]: "true" for a in args if a in _CAPTURE_SWITCHES}
    for flag, value in zip(rest[::2], rest[1::2], strict=False):
        if flag in _CAPTURE_FLAGS:
            flags[_CAPTURE_FLAGS[flag]] = value
    try:
        cfg = iptables.CaptureConfig.from_flags(**flags)
    except iptables.CaptureError as e:
        return {"args": args, "error": str(e), "summary": [], "iptables": ""}
    return {"args": args, "error": None, "summary": _capture_summary(cfg), "iptables": iptables.rules(cfg)}


def _capture_summary(c: iptables.CaptureConfig) -> list[str]:
    def listed(v: tuple[Any, ...] | str, everything: str) -> str:
        return everything if v == iptables.ALL else (", ".join(map(str, v)) or "none")

    out = [
        f"outbound TCP to {listed(c.outbound_ip_ranges, 'any address')} goes to the sidecar on {c.envoy_port}",
        f"inbound TCP to {listed(c.inbound_ports, 'every port')} goes to the sidecar on {c.inbound_capture_port}",
    ]
    if c.tproxy:
        out.append(
            f"inbound is captured with TPROXY (mark {c.tproxy_mark}, table {c.tproxy_route_table}): "
            "the app sees each client's own address"
        )
    if c.exclude_inbound_ports:
        out.append(f"inbound ports never captured: {', '.join(map(str, c.exclude_inbound_ports))}")
    if c.exclude_outbound_ip_ranges:
        out.append(f"outbound destinations never captured: {', '.join(c.exclude_outbound_ip_ranges)}")
    if c.exclude_outbound_ports:
        out.append(f"outbound ports never captured: {', '.join(map(str, c.exclude_outbound_ports))}")
    if c.exclude_interfaces:
        out.append(f"interfaces never captured: {', '.join(c.exclude_interfaces)}")
    if c.redirect_dns:
        to = "every DNS server" if c.capture_all_dns else "the pod's nameservers (its /etc/resolv.conf when it starts)"
        out.append(f"outbound UDP DNS to {to} goes to the sidecar's DNS listener on {iptables.DNS_CAPTURE_PORT}")
    ids = ", ".join(map(str, c.proxy_uids)), ", ".join(map(str, c.proxy_gids))
    out.append(f"the sidecar's own traffic (uid {ids[0]}, gid {ids[1]}) is never captured")
    return out


def sidecar_view(config: Mapping[str, Sequence[Doc]]) -> dict[str, Any]:
    """Outbound services, inbound ports and their mTLS, from xDS config as protobuf JSON
    (keys CDS, EDS, LDS, RDS, as /debug/config/<proxy-id> serves it)."""
    clusters = {c.get("name", ""): c for c in config.get(short(CLUSTER), [])}
    assignments = {a.get("clusterName", ""): a for a in config.get(short(ENDPOINT), [])}
    listeners = {item.get("name", ""): item for item in config.get(short(LISTENER), [])}
    http_routes: dict[str, list[str]] = {}
    for rc in config.get(short(ROUTE), []):
        for vh in rc.get("virtualHosts", []):
            for r in vh.get("routes", []):
                cluster = (r.get("route") or {}).get("cluster")
                if cluster:
                    http_routes.setdefault(cluster, []).extend(vh.get("domains", []))
    tcp_matches: dict[str, list[str]] = {}
    for name, listener in listeners.items():
        if name in (VIRTUAL_INBOUND, VIRTUAL_OUTBOUND):
            continue
        for chain in listener.get("filterChains", []):
            cluster = _tcp_cluster(chain)
            ranges = (chain.get("filterChainMatch") or {}).get("prefixRanges")
            if cluster and ranges:
                tcp_matches.setdefault(cluster, []).extend(r.get("addressPrefix", "") for r in ranges)

    outbound = []
    for name, cluster in sorted(clusters.items(), key=lambda kv: _outbound_key(kv[0])):
        parts = name.split("|")
        if len(parts) != 4 or parts[0] != "outbound":
            continue
        http2 = "explicitHttpConfig" in str(cluster.get("typedExtensionProtocolOptions", {}))
        if name in http_routes:
            protocol, matched_by = ("HTTP2" if http2 else "HTTP"), sorted(set(http_routes[name]))
        elif name in tcp_matches:
            protocol, matched_by = "TCP", tcp_matches[name]
        else:
            protocol, matched_by = "TCP", []
        tls = _upstream_sans(cluster)
        outbound.append(
            {
                "host": parts[3],
                "port": int(parts[1]),
                "cluster": name,
                "protocol": protocol,
                "matched_by": matched_by,
                "endpoints": _endpoints(assignments.get(name)),
                "mtls": tls is not None,
                "sans": tls or [],
            }
        )

    inbound: dict[Any, dict[str, Any]] = {}
    for chain in (listeners.get(VIRTUAL_INBOUND) or {}).get("filterChains", []):
        match = chain.get("filterChainMatch") or {}
        port = match.get("destinationPort")
        entry = inbound.setdefault(port, {"port": port, "transports": set(), "protocol": "TCP", "peers": []})
        entry["transports"].add(match.get("transportProtocol", "raw_buffer"))
        if any(f.get("name") == _HCM for f in chain.get("filters", [])):
            entry["protocol"] = "HTTP"
        if "transportSocket" in chain:
            entry["peers"] = _matchers(chain["transportSocket"])
    inbound_rows = []
    for port, entry in sorted(inbound.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        inbound_rows.append(
            {
                "port": port,
                "cluster": f"inbound|{port}||" if port is not None else INBOUND_PASSTHROUGH,
                "protocol": entry["protocol"],
                "mtls": _MODES.get(frozenset(entry["transports"]), "?"),
                "peers": entry["peers"],
            }
        )
    unknown = next(
        (
            _tcp_cluster(chain)
            for chain in (listeners.get(VIRTUAL_OUTBOUND) or {}).get("filterChains", [])
            if _tcp_cluster(chain)
        ),
        None,
    )
    return {
        "outbound": outbound,
        "inbound": inbound_rows,
        "unknown_destinations": unknown,
        "counts": {k: len(v) for k, v in config.items()},
    }


def _outbound_key(name: str) -> tuple[str, int]:
    parts = name.split("|")
    return (parts[3], int(parts[1])) if len(parts) == 4 and parts[1].isdigit() else ("", 0)


def _tcp_cluster(chain: Doc) -> str | None:
    for f in chain.get("filters", []):
        if f.get("name") == _TCP_PROXY:
            cluster = (f.get("typedConfig") or {}).get("cluster")
            return str(cluster) if cluster else None
    return None


def _endpoints(cla: Doc | None) -> list[dict[str, Any]]:
    out = []
    for group in (cla or {}).get("endpoints", []):
        for lb in group.get("lbEndpoints", []):
            sock = ((lb.get("endpoint") or {}).get("address") or {}).get("socketAddress") or {}
            meta = ((lb.get("metadata") or {}).get("filterMetadata") or {}).get("envoy.transport_socket_match") or {}
            out.append(
                {"address": f"{sock.get('address')}:{sock.get('portValue')}", "mtls": meta.get("tlsMode") == "istio"}
            )
    return out


def _upstream_sans(cluster: Doc) -> list[str] | None:
    """The peer identities the client accepts for mTLS endpoints; None when the cluster has no mTLS."""
    for m in cluster.get("transportSocketMatches", []):
        socket = m.get("transportSocket") or {}
        if socket.get("name") == "envoy.transport_sockets.tls":
            return _matchers(socket)
    return None


def _matchers(socket: Doc) -> list[str]:
    """URI SAN matchers of a TLS transport socket: exact IDs as they are, prefixes with a trailing *."""
    ctx = (socket.get("typedConfig") or {}).get("commonTlsContext") or {}
    validation = (ctx.get("combinedValidationContext") or {}).get("defaultValidationContext") or {}
    out = []
    for m in validation.get("matchTypedSubjectAltNames", []):
        matcher = m.get("matcher") or {}
        if "exact" in matcher:
            out.append(str(matcher["exact"]))
        elif "prefix" in matcher:
            out.append(f"{matcher['prefix']}*")
    return out


# -- text ---------------------------------------------------------------------------------------------


def render(report: Doc) -> str:
    """The report as plain text with a heading per section."""
    pod = report["pod"]
    title = pod.get("proxy_id") or f"{pod['namespace']}/{pod['name']}"
    lines = [f"Pod {title}", f"  service account: {pod['service_account']}"]
    if pod.get("labels"):
        lines.append("  labels:          " + ", ".join(f"{k}={v}" for k, v in sorted(pod["labels"].items())))
    if pod.get("ip"):
        lines.append(f"  IP:              {pod['ip']}")

    inj = report.get("injection")
    if inj is not None:
        lines += ["", "Injection"]
        verdict = "yes" if inj["inject"] else "no"
        lines.append(f"  sidecar injected: {verdict}, because {inj['reason']}")
        if inj.get("error"):
            lines.append(f"  but the webhook would deny the pod: {inj['error']}")

    cap = report.get("capture")
    if cap is not None:
        lines += ["", "Capture rules (init container mesh-init)"]
        lines.append("  args: " + shlex.join(cap["args"]))
        if cap.get("error"):
            lines.append(f"  the init container would fail: {cap['error']}")
        lines += [f"  - {s}" for s in cap["summary"]]
        if cap.get("iptables"):
            lines += [
                "  iptables-restore input (IPv4):",
                *("    " + r for r in cap["iptables"].rstrip("\n").split("\n")),
            ]

    mesh = report.get("mesh")
    if mesh is not None:
        lines += ["", f"Identity and mTLS ({mesh['source']})", f"  identity: {mesh['identity']}"]
        if mesh.get("services") is not None:
            lines.append(
                "  member of: " + (", ".join(mesh["services"]) or "no service (no selector matches its labels)")
            )
        lines += ["", "Inbound (virtualInbound, port 15006)"]
        rows = [["PORT", "PROTOCOL", "MTLS", "CLUSTER", "ACCEPTS PEERS"]]
        for r in mesh["inbound"]:
            port = str(r["port"]) if r["port"] is not None else "other"
            rows.append([port, r["protocol"], r["mtls"], r["cluster"], ", ".join(r["peers"]) or "any (plaintext)"])
        lines += _indent(_table(rows))
        lines += ["", "Outbound (virtualOutbound, port 15001)"]
        if "scope" in mesh:
            hosts = mesh["scope"]
            lines.append("  scope: " + ("every service" if hosts is None else ", ".join(hosts) or "no service (~/*)"))
        if not mesh["outbound"]:
            lines.append("  no services in the mesh" if mesh.get("scope") is None else "  no service in its scope")
        rows = [["HOST:PORT", "PROTOCOL", "CLUSTER", "ENDPOINTS", "MTLS: ACCEPTED SERVER IDENTITIES"]]
        for r in mesh["outbound"]:
            eps = ", ".join(e["address"] + ("" if e["mtls"] else " (plaintext)") for e in r["endpoints"]) or "none"
            sans = ", ".join(r["sans"]) if r["mtls"] else "plaintext (no endpoint has a sidecar)"
            rows.append([f"{r['host']}:{r['port']}", r["protocol"], r["cluster"], eps, sans])
        if mesh["outbound"]:
            lines += _indent(_table(rows))
        if mesh.get("unknown_destinations"):
            where = mesh["unknown_destinations"]
            meaning = "let through (ALLOW_ANY)" if where == PASSTHROUGH else "dropped (REGISTRY_ONLY)"
            lines.append(f"  anything else: {where}, {meaning}")
    for note in report.get("notes") or []:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]
