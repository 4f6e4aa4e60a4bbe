"""Traffic capture: the nat rules that send a pod's TCP traffic through its sidecar, as istio-iptables does.

Inbound connections to the pod's ports go to the inbound capture port (15006), the app's
outbound connections to the outbound capture port (15001). The proxy's own traffic (its
uid/gid) is never captured, except when it calls its own pod IP over loopback, which goes
back to inbound (even with no inbound port captured, as istio-iptables does with an empty `-b`).
Traffic the proxy forwards to the app comes from 127.0.0.6 (IPv6: ::6) and passes.
With IPv6, ::6/128 is first assigned to lo, as Istio's init does: 127.0.0.0/8 is local by
default, ::6 is not, and the proxy could not bind it otherwise.

Also as istio-iptables: `-q` ports are captured outbound even outside `-i`'s ranges (`-x` and `-o`
still win); outbound owner groups (ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]) limit which apps' traffic
is captured; `-k` interfaces (KubeVirt) have their inbound traffic captured as outbound; the IPv4
loopback CIDR (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR) is what counts as local; `--drop-invalid`
(INVALID_DROP) drops packets conntrack finds INVALID, in the mangle table, instead of letting
them reset connections.

`--redirect-dns` (REDIRECT_DNS, ISTIO_META_DNS_CAPTURE) sends the app's UDP DNS queries to the
sidecar's DNS listener (15053): those to the pod's nameservers (its /etc/resolv.conf), or every
query to port 53 with `--capture-all-dns`. The proxy's own queries are never captured, and
raw-table conntrack zones keep the app's redirected flow (zone 2) apart from the proxy's query
upstream (zone 1), which can share its addresses and ports. TCP DNS is left to the ordinary TCP
capture: Envoy's DNS filter answers UDP only (see docs/istio-compatibility.md).

With `-m TPROXY` (ISTIO_INBOUND_INTERCEPTION_MODE), inbound is captured in the mangle table instead:
new connections are handed to the inbound capture port by the TPROXY target with the tproxy mark
(1337), packets of established ones are marked and diverted, and policy routing (`ip rule fwmark
1337 lookup 133`, `ip route add local default dev lo table 133`) delivers marked packets locally.
The proxy then sees, and forwards from, the client's own address. Its forwards to the app carry
the mark (Envoy's original_src filter); the connection mark restores it on the app's replies, so
they too route back to the proxy, not out to the client. Outbound stays REDIRECT in nat.

`rules()` is pure: config in, iptables-restore input out, written in the canonical form
iptables-save prints, so a dry run reads exactly like the installed table. `apply()` and `cleanup()` run
iptables-save/iptables-restore; both change the table in one atomic restore.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import os
import re
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

INBOUND = "MESH_INBOUND"
REDIRECT = "MESH_REDIRECT"
IN_REDIRECT = "MESH_IN_REDIRECT"
OUTPUT = "MESH_OUTPUT"
CHAINS = (INBOUND, REDIRECT, IN_REDIRECT, OUTPUT)
DROP = "MESH_DROP"
"""In the mangle table, only with drop_invalid."""
TPROXY_INBOUND = "MESH_TPROXY_INBOUND"
"""Mangle PREROUTING's chain in TPROXY mode (Istio's mangle ISTIO_INBOUND): own names in mangle keep
the jumps from the built-in chains distinct from nat's."""
TPROXY_OUTPUT = "MESH_TPROXY_OUTPUT"
DIVERT = "MESH_DIVERT"
TPROXY = "MESH_TPROXY"
MANGLE_CHAINS = (DROP, TPROXY_INBOUND, DIVERT, TPROXY, TPROXY_OUTPUT)
MODES = ("REDIRECT", "TPROXY")
TPROXY_MARK = 1337
"""The default tproxy mark (Istio's), which the control plane also gives the proxy's forwards to the app."""
OUTBOUND_MARK = 1338
"""Istio's mark on the proxy's own calls to its pod over lo: they go to inbound, unlike other lo traffic."""
_RESERVED_TABLES = (0, 253, 254, 255)
"""unspec, default, main and local: never the tproxy route table."""
OUTPUT_DNS = "MESH_OUTPUT_DNS"
INBOUND_DNS = "MESH_INBOUND_DNS"
RAW_CHAINS = (OUTPUT_DNS, INBOUND_DNS)
"""In the raw table, only with redirect_dns: the conntrack zones of DNS packets."""
DNS_CAPTURE_PORT = 15053
"""The sidecar's DNS listener, Istio's agent port."""
ALWAYS_EXCLUDED_INBOUND = (15090, 15021, 15020)
"""Prometheus, health and the agent's merged-metrics port: never captured, as in Istio."""
ALL = "*"
INBOUND_SOURCE6 = "::6"
"""The proxy's source address when it forwards IPv6 to the app (127.0.0.6 for IPv4)."""
DEFAULT_IPV4_LOOPBACK = "127.0.0.1/32"
MAX_OWNER_GROUPS = 64
"""Included owner groups make one rule of that many matches; Istio's limit."""
_IFACE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")

Run = Callable[[Sequence[str], str | None], str]
"""(argv, stdin) -> stdout; raises CaptureError on failure."""


class CaptureError(ValueError):
    """Bad capture flags, or iptables refused the rules. Nothing was changed."""


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    envoy_port: int = 15001
    inbound_capture_port: int = 15006
    proxy_uids: tuple[int, ...] = (1337,)
    proxy_gids: tuple[int, ...] = (1337,)
    inbound_ports: tuple[int, ...] | str = ALL
    """Ports whose inbound connections are captured; `*` for all, () for none."""
    exclude_inbound_ports: tuple[int, ...] = ()
    outbound_ip_ranges: tuple[str, ...] | str = ALL
    """Destinations whose outbound connections are captured; `*` for all, () for none."""
    exclude_outbound_ip_ranges: tuple[str, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    include_outbound_ports: tuple[int, ...] = ()
    """Outbound ports captured whatever the destination (but -x ranges and -o ports still pass)."""
    include_outbound_owner_groups: tuple[int, ...] | str = ALL
    """Groups whose outbound traffic is captured; `*` for all, () for none."""
    exclude_outbound_owner_groups: tuple[int, ...] = ()
    """Groups whose outbound traffic is not captured; only with include_outbound_owner_groups `*`."""
    kube_virt_interfaces: tuple[str, ...] = ()
    """Interfaces (KubeVirt VMs) whose inbound traffic is captured as outbound."""
    ipv4_loopback_cidr: str = DEFAULT_IPV4_LOOPBACK
    drop_invalid: bool = False
    redirect_dns: bool = False
    """Send the app's UDP DNS queries to the sidecar's DNS listener (DNS_CAPTURE_PORT)."""
    capture_all_dns: bool = False
    """With redirect_dns: every query to port 53, not only those to `dns_servers`."""
    dns_servers: tuple[str, ...] = ()
    """With redirect_dns: the pod's nameservers (`nameservers(resolv.conf)`), whose queries are captured."""
    inbound_mode: str = "REDIRECT"
    """REDIRECT (nat) or TPROXY (mangle and policy routing; the proxy sees the client's address)."""
    tproxy_mark: int = TPROXY_MARK
    tproxy_route_table: int = 133

    @property
    def tproxy(self) -> bool:
        return self.inbound_mode == "TPROXY"

    @classmethod
    def from_flags(
        cls,
        *,
        envoy_port: str = "15001",
        inbound_capture_port: str = "15006",
        proxy_uid: str = "1337",
        proxy_gid: str = "1337",
        inbound_ports: str = ALL,
        exclude_inbound_ports: str = "",
        outbound_ip_ranges: str = ALL,
        exclude_outbound_ip_ranges: str = "",
        exclude_outbound_ports: str = "",
        exclude_interfaces: str = "",
        include_outbound_ports: str = "",
        include_outbound_owner_groups: str = ALL,
        exclude_outbound_owner_groups: str = "",
        kube_virt_interfaces: str = "",
        ipv4_loopback_cidr: str = DEFAULT_IPV4_LOOPBACK,
        drop_invalid: bool | str = False,
        redirect_dns: bool | str = False,
        capture_all_dns: bool | str = False,
        dns_servers: str = "",
        inbound_mode: str = "REDIRECT",
        tproxy_mark: str = str(TPROXY_MARK),
        tproxy_route_table: str = "133",
    ) -> CaptureConfig:
        """Validate istio-iptables style flag values (comma-separated lists) into a config."""
        include_groups: tuple[int, ...] | str = ALL
        if include_outbound_owner_groups.strip() != ALL:
            flag = "--include-outbound-owner-groups"
            include_groups = tuple(_group(v, flag) for v in _items(include_outbound_owner_groups))
            if len(include_groups) > MAX_OWNER_GROUPS:
                raise CaptureError(f"{flag}: at most {MAX_OWNER_GROUPS} groups, got {len(include_groups)}")
        mode = inbound_mode.strip()
        if mode not in MODES:
            raise CaptureError(f"-m/--inbound-interception-mode: {inbound_mode!r} is not REDIRECT or TPROXY")
        mark = _number(tproxy_mark, "-t/--tproxy-mark", 1, 0xFFFFFFFF)
        if mark == OUTBOUND_MARK:
            raise CaptureError(f"-t/--tproxy-mark: {OUTBOUND_MARK} marks the proxy's calls to its own pod")
        table = _number(tproxy_route_table, "-r/--tproxy-route-table", 1, 0xFFFFFFFF)
        if table in _RESERVED_TABLES:
            raise CaptureError(f"-r/--tproxy-route-table: {table} is a table the kernel uses (default, main, local)")
        return cls(
            envoy_port=_port(envoy_port, "-p/--envoy-port"),
            inbound_capture_port=_port(inbound_capture_port, "-z/--inbound-capture-port"),
            proxy_uids=tuple(_id(v, "-u/--proxy-uid") for v in _items(proxy_uid)),
            proxy_gids=tuple(_id(v, "-g/--proxy-gid") for v in _items(proxy_gid)),
            inbound_ports=ALL
            if inbound_ports.strip() == ALL
            else tuple(_port(v, "-b/--inbound-ports") for v in _items(inbound_ports)),
            exclude_inbound_ports=tuple(_port(v, "-d/--exclude-inbound-ports") for v in _items(exclude_inbound_ports)),
            outbound_ip_ranges=ALL
            if outbound_ip_ranges.strip() == ALL
            else tuple(_cidr(v, "-i/--outbound-ip-ranges") for v in _items(outbound_ip_ranges)),
            exclude_outbound_ip_ranges=tuple(
                _cidr(v, "-x/--exclude-outbound-ip-ranges") for v in _items(exclude_outbound_ip_ranges)
            ),
            exclude_outbound_ports=tuple(
                _port(v, "-o/--exclude-outbound-ports") for v in _items(exclude_outbound_ports)
            ),
            exclude_interfaces=tuple(_iface(v, "-c/--exclude-interfaces") for v in _items(exclude_interfaces)),
            include_outbound_ports=tuple(
                _port(v, "-q/--include-outbound-ports") for v in _items(include_outbound_ports)
            ),
            include_outbound_owner_groups=include_groups,
            exclude_outbound_owner_groups=tuple(
                _group(v, "--exclude-outbound-owner-groups") for v in _items(exclude_outbound_owner_groups)
            ),
            kube_virt_interfaces=tuple(_iface(v, "-k/--kube-virt-interfaces") for v in _items(kube_virt_interfaces)),
            ipv4_loopback_cidr=_loopback(ipv4_loopback_cidr),
            drop_invalid=_bool(drop_invalid, "--drop-invalid"),
            redirect_dns=_bool(redirect_dns, "--redirect-dns"),
            capture_all_dns=_bool(capture_all_dns, "--capture-all-dns"),
            dns_servers=tuple(_address(v, "nameserver") for v in _items(dns_servers)),
            inbound_mode=mode,
            tproxy_mark=mark,
            tproxy_route_table=table,
        )


def rules(config: CaptureConfig, *, ipv6: bool = False, existing_jumps: frozenset[str] = frozenset()) -> str:
    """The iptables-restore input (nat; mangle with drop_invalid or TPROXY; raw with redirect_dns) for
    `config`; ip6tables' when `ipv6`.

    Jumps from the built-in chains listed in `existing_jumps` are left out, so applying
    twice leaves one copy (our own chains are flushed and refilled by their declaration).
    """
    loopback = "::1/128" if ipv6 else config.ipv4_loopback_cidr
    passthrough_source = f"{INBOUND_SOURCE6}/128" if ipv6 else "127.0.0.6/32"
    dns = _dns_destinations(config, ipv6)
    out: list[str] = []
    add = out.append
    if dns is not None:
        out += _dns_zones(config, dns, existing_jumps)
    if config.drop_invalid or config.tproxy:
        add("*mangle")
        out += [f":{DROP} - [0:0]"] if config.drop_invalid else []
        out += [f":{chain} - [0:0]" for chain in (TPROXY_INBOUND, DIVERT, TPROXY, TPROXY_OUTPUT) if config.tproxy]
        if config.drop_invalid:
            # mangle sees every packet (nat only a connection's first): drop what conntrack cannot place.
            add(f"-A {DROP} -j DROP")
            out += _new(existing_jumps, f"-A PREROUTING -m conntrack --ctstate INVALID -j {DROP}")
        if config.tproxy:
            out += _tproxy_rules(config, loopback, passthrough_source, existing_jumps)
        add("COMMIT")
    out += ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS)]
    add(f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {config.envoy_port}")
    add(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {config.inbound_capture_port}")

    # Inbound: PREROUTING sees connections arriving at the pod.
    # A KubeVirt VM's traffic arrives on its interface: it is the VM's outbound, captured as such.
    for iface in config.kube_virt_interfaces:
        if config.outbound_ip_ranges == ALL:
            add(f"-A {INBOUND} -i {iface} -j {REDIRECT}")
        else:
            for cidr in _family(config.outbound_ip_ranges, ipv6):
                add(f"-A {INBOUND} -d {cidr} -i {iface} -j {REDIRECT}")
        add(f"-A {INBOUND} -i {iface} -j RETURN")
    for iface in config.exclude_interfaces:
        add(f"-A {INBOUND} -i {iface} -j RETURN")
    # In TPROXY mode the inbound ports are captured in mangle instead (_tproxy_rules).
    inbound_ports = () if config.tproxy else config.inbound_ports
    if inbound_ports == ALL:
        for port in sorted({*ALWAYS_EXCLUDED_INBOUND, *config.exclude_inbound_ports}):
            add(f"-A {INBOUND} -p tcp -m tcp --dport {port} -j RETURN")
        add(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
    else:
        skip = {*ALWAYS_EXCLUDED_INBOUND, *config.exclude_inbound_ports}
        for captured in inbound_ports:
            if captured not in skip:
                add(f"-A {INBOUND} -p tcp -m tcp --dport {captured} -j {IN_REDIRECT}")

    # Outbound: OUTPUT sees connections made inside the pod, by the app and by the proxy.
    for iface in config.exclude_interfaces:
        add(f"-A {OUTPUT} -o {iface} -j RETURN")
    # The proxy's forwards to the app come from 127.0.0.6: never capture them (else they loop into 15006).
    add(f"-A {OUTPUT} -s {passthrough_source} -o lo -j RETURN")
    if config.tproxy:
        # TPROXY: the proxy forwards to the app from the client's address, with the tproxy mark (its
        # original_src filter). Istio's proxy runs as uid 0 there, which the uid rules below let pass;
        # this lets them pass whatever the proxy's uid (else they loop into the inbound port).
        add(f"-A {OUTPUT} -o lo -m mark --mark {config.tproxy_mark:#x} -j RETURN")
    for match, ids in (("--uid-owner", config.proxy_uids), ("--gid-owner", config.proxy_gids)):
        for owner in ids:
            # The proxy calling its own pod IP over loopback is inbound traffic to this pod,
            # even when no inbound port is captured (as istio-iptables with an empty -b);
            # with DNS capture, not its (TCP) queries to a nameserver on the pod's loopback.
            not_dns = "-m tcp ! --dport 53 " if dns is not None and match == "--uid-owner" else ""
            add(f"-A {OUTPUT} ! -d {loopback} -o lo -p tcp {not_dns}-m owner {match} {owner} -j {IN_REDIRECT}")
            # The app talking to itself over loopback stays local (but its DNS queries to a
            # nameserver on loopback, such as 127.0.0.53, are captured below).
            tcp = "-p tcp " if dns is not None else ""
            add(f"-A {OUTPUT} -o lo {tcp}-m owner ! {match} {owner} -j RETURN")
            add(f"-A {OUTPUT} -m owner {match} {owner} -j RETURN")
    # Outbound owner groups: only the included groups' traffic, or all but the excluded groups'.
    if config.include_outbound_owner_groups == ALL:
        for group in config.exclude_outbound_owner_groups:
            add(f"-A {OUTPUT} -m owner --gid-owner {group} -j RETURN")
    else:
        none_of = "".join(f"-m owner ! --gid-owner {g} " for g in config.include_outbound_owner_groups)
        add(f"-A {OUTPUT} {none_of}-j RETURN")
    # The app's DNS queries, after the proxy's own and the excluded owner groups' have returned.
    for server in dns or ():
        add(f"-A {OUTPUT} {server}-p udp -m udp --dport 53 -j REDIRECT --to-ports {DNS_CAPTURE_PORT}")
    add(f"-A {OUTPUT} -d {loopback} -j RETURN")
    for port in config.exclude_outbound_ports:
        add(f"-A {OUTPUT} -p tcp -m tcp --dport {port} -j RETURN")
    for cidr in _family(config.exclude_outbound_ip_ranges, ipv6):
        add(f"-A {OUTPUT} -d {cidr} -j RETURN")
    for port in config.include_outbound_ports:
        add(f"-A {OUTPUT} -p tcp -m tcp --dport {port} -j {REDIRECT}")
    if config.outbound_ip_ranges == ALL:
        add(f"-A {OUTPUT} -p tcp -j {REDIRECT}")
    else:
        for cidr in _family(config.outbound_ip_ranges, ipv6):
            add(f"-A {OUTPUT} -d {cidr} -p tcp -j {REDIRECT}")

    jumps = [f"-A PREROUTING -p tcp -j {INBOUND}", f"-A OUTPUT -p tcp -j {OUTPUT}"]
    if dns is not None:
        jumps.append(f"-A OUTPUT -p udp -m udp --dport 53 -j {OUTPUT}")
    out += _new(existing_jumps, *jumps)
    add("COMMIT")
    return "\n".join(out) + "\n"


def _dns_destinations(config: CaptureConfig, ipv6: bool) -> list[str] | None:
    """The `-d` matches of captured DNS queries for one family ("" for any); None: no DNS capture.

    As istio-iptables: only queries to the pod's nameservers unless capture_all_dns (so a local
    resolver's own upstream queries do not loop back), nothing with no nameserver of the family,
    and nothing when port 53 is an excluded outbound port.
    """
    if not config.redirect_dns or 53 in config.exclude_outbound_ports:
        return None
    if config.capture_all_dns:
        return [""]
    servers = [f"-d {s}/{128 if ipv6 else 32} " for s in config.dns_servers if (":" in s) == ipv6]
    return servers or None


def _dns_zones(config: CaptureConfig, dns: list[str], existing: frozenset[str]) -> list[str]:
    """The raw table: the proxy's queries upstream and their answers in conntrack zone 1, the app's
    redirected queries and the proxy's answers to them in zone 2, so that the two UDP flows (which
    can have the same addresses and ports) never share a conntrack entry."""
    out = ["*raw", f":{OUTPUT_DNS} - [0:0]", f":{INBOUND_DNS} - [0:0]"]
    for match, ids in (("--uid-owner", config.proxy_uids), ("--gid-owner", config.proxy_gids)):
        for owner in ids:
            out.append(f"-A {OUTPUT_DNS} -p udp -m udp --dport 53 -m owner {match} {owner} -j CT --zone 1")
            out.append(
                f"-A {OUTPUT_DNS} -p udp -m udp --sport {DNS_CAPTURE_PORT} -m owner {match} {owner} -j CT --zone 2"
            )
    for server in dns:
        out.append(f"-A {OUTPUT_DNS} {server}-p udp -m udp --dport 53 -j CT --zone 2")
        source = server.replace("-d ", "-s ", 1)
        out.append(f"-A {INBOUND_DNS} {source}-p udp -m udp --sport 53 -j CT --zone 1")
    out += _new(existing, f"-A PREROUTING -p udp -j {INBOUND_DNS}", f"-A OUTPUT -p udp -j {OUTPUT_DNS}")
    out.append("COMMIT")
    return out


def _tproxy_rules(config: CaptureConfig, loopback: str, passthrough_source: str, existing: frozenset[str]) -> list[str]:
    """Mangle rules of TPROXY mode: inbound capture, and the marks that keep the proxy's connections local."""
    mark, own = f"{config.tproxy_mark:#x}", f"{OUTBOUND_MARK:#x}"
    all_bits = "--nfmask 0xffffffff --ctmask 0xffffffff"
    on_ip = "::" if ":" in loopback else "0.0.0.0"
    out: list[str] = []
    add = out.append
    # A packet of a connection the proxy already holds: mark it, so policy routing delivers it locally.
    add(f"-A {DIVERT} -j MARK --set-xmark {mark}/0xffffffff")
    add(f"-A {DIVERT} -j ACCEPT")
    # A new connection: handed to the inbound capture port, its destination kept.
    tproxy = f"--on-port {config.inbound_capture_port} --on-ip {on_ip} --tproxy-mark {mark}/0xffffffff"
    add(f"-A {TPROXY} ! -d {loopback} -p tcp -j TPROXY {tproxy}")

    for iface in (*config.exclude_interfaces, *config.kube_virt_interfaces):  # a VM's traffic is outbound (nat)
        add(f"-A {TPROXY_INBOUND} -i {iface} -j RETURN")
    # The proxy's forwards to the app (marked by original_src): remember the mark on the connection
    # for the app's replies, and deliver them as they are.
    add(f"-A {TPROXY_INBOUND} -p tcp -m mark --mark {mark} -j CONNMARK --save-mark {all_bits}")
    add(f"-A {TPROXY_INBOUND} -p tcp -m mark --mark {mark} -j RETURN")
    add(f"-A {TPROXY_INBOUND} -s {passthrough_source} -i lo -p tcp -j RETURN")
    # Loopback traffic stays local, except the proxy's calls to its own pod (marked below).
    add(f"-A {TPROXY_INBOUND} -i lo -p tcp -m mark ! --mark {own} -j RETURN")
    established = "-m conntrack --ctstate RELATED,ESTABLISHED"
    if config.inbound_ports == ALL:
        for port in sorted({*ALWAYS_EXCLUDED_INBOUND, *config.exclude_inbound_ports}):
            add(f"-A {TPROXY_INBOUND} -p tcp -m tcp --dport {port} -j RETURN")
        add(f"-A {TPROXY_INBOUND} -p tcp {established} -j {DIVERT}")
        add(f"-A {TPROXY_INBOUND} -p tcp -j {TPROXY}")
    else:
        skip = {*ALWAYS_EXCLUDED_INBOUND, *config.exclude_inbound_ports}
        for captured in config.inbound_ports:
            if captured not in skip:
                add(f"-A {TPROXY_INBOUND} -p tcp -m tcp --dport {captured} {established} -j {DIVERT}")
                add(f"-A {TPROXY_INBOUND} -p tcp -m tcp --dport {captured} -j {TPROXY}")

    for iface in config.exclude_interfaces:
        add(f"-A {TPROXY_OUTPUT} -o {iface} -j RETURN")
    add(f"-A {TPROXY_OUTPUT} -o lo -p tcp -m mark --mark {mark} -j RETURN")
    for match, ids in (("--uid-owner", config.proxy_uids), ("--gid-owner", config.proxy_gids)):
        for owner in ids:
            owned = f"-m owner {match} {owner}"
            add(f"-A {TPROXY_OUTPUT} ! -d {loopback} -o lo -p tcp {owned} -j MARK --set-xmark {own}/0xffffffff")
    # The app's replies on a connection the proxy made from a client's address: back to the proxy.
    add(f"-A {TPROXY_OUTPUT} -p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark {all_bits}")
    return out + _new(existing, f"-A PREROUTING -p tcp -j {TPROXY_INBOUND}", f"-A OUTPUT -p tcp -j {TPROXY_OUTPUT}")


def _new(existing: frozenset[str], *jumps: str) -> list[str]:
    return [j for j in jumps if j not in existing]


_TABLES = {"nat": CHAINS, "mangle": MANGLE_CHAINS, "raw": RAW_CHAINS}


def cleanup_rules(saved: str) -> str | None:
    """The restore input that removes exactly what `rules()` added, given iptables-save output
    (of the nat table, and of mangle too when given)."""
    out = []
    for table, text in _split_tables(saved).items():
        chains = _TABLES.get(table)
        if chains is None:
            continue
        jumps = _jumps(text)
        present = [c for c in chains if f":{c} " in text]
        if jumps or present:
            out += [f"*{table}", *(j.replace("-A ", "-D ", 1) for j in sorted(jumps))]
            out += [f"-F {c}" for c in present] + [f"-X {c}" for c in present] + ["COMMIT"]
    return "\n".join(out) + "\n" if out else None


def _split_tables(saved: str) -> dict[str, str]:
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in saved.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) + "\n" for name, lines in tables.items()}


def _jumps(saved: str) -> frozenset[str]:
    """Rules in the built-in chains that jump into ours."""
    ours = tuple(
        f"-j {chain}" for chain in (INBOUND, OUTPUT, DROP, TPROXY_INBOUND, TPROXY_OUTPUT, OUTPUT_DNS, INBOUND_DNS)
    )
    return frozenset(
        line.strip()
        for line in saved.splitlines()
        if line.startswith(("-A PREROUTING ", "-A OUTPUT ")) and line.strip().endswith(ours)
    )


def run_command(argv: Sequence[str], stdin: str | None) -> str:
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise CaptureError(f"{argv[0]} not found: install iptables (Debian: apt-get install iptables)") from None
    except subprocess.TimeoutExpired:
        raise CaptureError(f"{argv[0]} did not finish within 30s (another iptables user holds the lock?)") from None
    if done.returncode != 0:
        raise CaptureError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def apply(
    config: CaptureConfig,
    *,
    ipv6: bool,
    run: Run = run_command,
    add_address: Callable[[str], None] | None = None,
    add_route: Callable[[Route], None] | None = None,
) -> list[str]:
    """Install the rules (IPv4, and IPv6 when `ipv6`); returns what was restored, per family.

    The mangle table is read and written only with drop_invalid or TPROXY, the raw table only with
    redirect_dns: a later run without them leaves their rules in place (`cleanup` removes them).
    With `ipv6`, ::6 is assigned to lo first (`add_address`, by default `add_loopback_address`),
    and in TPROXY mode the policy routing is added first too (`add_route`, by default
    `add_policy_route`), so that a failure there leaves the tables untouched.
    """
    if ipv6:
        (add_address or add_loopback_address)(INBOUND_SOURCE6)
    for route in routes(config, ipv6=ipv6):
        (add_route or add_policy_route)(route)
    applied = []
    for v6 in (False, True) if ipv6 else (False,):
        tool = "ip6tables" if v6 else "iptables"
        saved = run([f"{tool}-save", "-t", "nat"], None)
        if config.drop_invalid or config.tproxy:
            saved += run([f"{tool}-save", "-t", "mangle"], None)
        if config.redirect_dns:
            saved += run([f"{tool}-save", "-t", "raw"], None)
        text = rules(config, ipv6=v6, existing_jumps=_jumps(saved))
        run([f"{tool}-restore", "--noflush"], text)
        applied.append(text)
    return applied


def cleanup(*, ipv6: bool, run: Run = run_command) -> list[str]:
    """Remove exactly the rules `apply` added; a no-op where nothing is installed.

    ::6 stays on lo (as with Istio), and so does TPROXY's policy routing: harmless without the
    marks, and a running proxy may still be using them.
    """
    removed = []
    for v6 in (False, True) if ipv6 else (False,):
        tool = "ip6tables" if v6 else "iptables"
        saved = run([f"{tool}-save", "-t", "nat"], None)
        for table in ("mangle", "raw"):  # --drop-invalid's and --redirect-dns's; no such table, none to remove
            with contextlib.suppress(CaptureError):
                saved += run([f"{tool}-save", "-t", table], None)
        text = cleanup_rules(saved)
        if text:
            run([f"{tool}-restore", "--noflush"], text)
            removed.append(text)
    return removed


@dataclass(frozen=True, slots=True)
class Route:
    """TPROXY's policy routing for one family: packets with `mark` look up `table`, whose one
    route delivers everything locally (over lo)."""

    ipv6: bool
    mark: int
    table: int

    def commands(self) -> tuple[str, str]:
        """The same as `ip` commands, for --dry-run."""
        family = "-6" if self.ipv6 else "-4"
        return (
            f"ip {family} rule add fwmark {self.mark:#x} lookup {self.table} priority {RULE_PRIORITY}",
            f"ip {family} route replace local default dev lo table {self.table}",
        )


def routes(config: CaptureConfig, *, ipv6: bool) -> list[Route]:
    """The policy routing that TPROXY mode needs (none in REDIRECT mode), IPv4 and with `ipv6` IPv6."""
    if not config.tproxy:
        return []
    return [Route(v6, config.tproxy_mark, config.tproxy_route_table) for v6 in ((False, True) if ipv6 else (False,))]


RULE_PRIORITY = 32765
"""The fwmark rule's priority, before `main` (32766), where `ip rule add` puts a first rule. Fixed, so
that the kernel finds the rule of an earlier run and a second run adds no copy."""
_RTM_NEWADDR, _RTM_NEWROUTE, _RTM_NEWRULE = 20, 24, 32
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IFA_F_NODAD = 0x2
_RTA_OIF, _RTA_TABLE = 4, 15
_FRA_PRIORITY, _FRA_FWMARK, _FRA_TABLE = 6, 10, 15
_FR_ACT_TO_TBL = 1
_RTPROT_BOOT, _RT_SCOPE_HOST, _RTN_LOCAL = 3, 254, 2


def add_loopback_address(address: str) -> None:
    """`ip -6 addr add <address>/128 dev lo`, over rtnetlink; an address already there is fine.

    Stdlib only, so the init image needs no iproute2. Needs CAP_NET_ADMIN, like iptables.
    """
    packed = ipaddress.IPv6Address(address).packed
    what = f"cannot assign {address}/128 to lo"
    body = struct.pack("=BBBBI", socket.AF_INET6, 128, _IFA_F_NODAD, 0, _loopback_index(what))
    for kind in (_IFA_LOCAL, _IFA_ADDRESS):
        body += struct.pack("=HH", 4 + len(packed), kind) + packed
    code = _netlink(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, body, what)
    if code and code != errno.EEXIST:
        hint = " (is IPv6 disabled on lo? sysctl net.ipv6.conf.lo.disable_ipv6)" if code == errno.EACCES else ""
        raise CaptureError(f"{what}: {os.strerror(code)}{hint}")


def add_policy_route(route: Route) -> None:
    """`ip rule add fwmark M lookup T priority 32765` (unless that rule is there) and `ip route replace
    local default dev lo table T`, over rtnetlink like `add_loopback_address`."""
    family = socket.AF_INET6 if route.ipv6 else socket.AF_INET
    what = f"cannot add the TPROXY policy routing ({'; '.join(route.commands())})"
    table = route.table if route.table < 256 else 0  # the header's byte; RTA_TABLE/FRA_TABLE carry any table
    rule = struct.pack("=BBBBBBBBI", family, 0, 0, 0, table, 0, 0, _FR_ACT_TO_TBL, 0)
    rule += _u32_attr(_FRA_PRIORITY, RULE_PRIORITY) + _u32_attr(_FRA_FWMARK, route.mark)
    rule += _u32_attr(_FRA_TABLE, route.table)
    code = _netlink(_RTM_NEWRULE, _NLM_F_CREATE | _NLM_F_EXCL, rule, what)  # EXCL: no second copy
    if code and code != errno.EEXIST:
        raise CaptureError(f"{what}: {os.strerror(code)}")
    local = struct.pack("=BBBBBBBBI", family, 0, 0, 0, table, _RTPROT_BOOT, _RT_SCOPE_HOST, _RTN_LOCAL, 0)
    local += _u32_attr(_RTA_TABLE, route.table) + _u32_attr(_RTA_OIF, _loopback_index(what))
    code = _netlink(_RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_REPLACE, local, what)
    if code:
        raise CaptureError(f"{what}: {os.strerror(code)}")


def _u32_attr(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)


def _loopback_index(what: str) -> int:
    try:
        return socket.if_nametoindex("lo")
    except OSError as e:
        raise CaptureError(f"{what}: {e}") from None


def _netlink(kind: int, flags: int, body: bytes, what: str) -> int:
    """Send one rtnetlink request and return the kernel's answer: 0, or an errno."""
    flags |= _NLM_F_REQUEST | _NLM_F_ACK
    request = struct.pack("=IHHII", 16 + len(body), kind, flags, 1, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            nl.settimeout(5)
            nl.sendto(request, (0, 0))
            reply = nl.recv(65536)
    except OSError as e:
        raise CaptureError(f"{what}: {e}") from None
    _, answer, _, _, _ = struct.unpack_from("=IHHII", reply)
    return -struct.unpack_from("=i", reply, 16)[0] if answer == _NLMSG_ERROR else 0


def has_ipv6(if_inet6: Path = Path("/proc/net/if_inet6")) -> bool:
    """Whether the pod has a global IPv6 address (not loopback, not link-local)."""
    try:
        lines = if_inet6.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5] != "lo" and not fields[0].startswith("fe80") and fields[0] != "0" * 32:
            return True
    return False


def _items(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _port(text: str, flag: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise CaptureError(f"{flag}: {text!r} is not a port number (1-65535)")
    return int(text)


def _id(text: str, flag: str) -> int:
    if not text.isdigit():
        raise CaptureError(f"{flag}: {text!r} is not a numeric id")
    return int(text)


def _cidr(text: str, flag: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise CaptureError(f"{flag}: {text!r} is not an IP range (e.g. 10.0.0.0/8 or fd00::/8)") from None


def _address(text: str, flag: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise CaptureError(f"{flag}: {text!r} is not an IP address") from None


def nameservers(resolv_conf: str) -> str:
    """The `nameserver` addresses of a resolv.conf text, comma-separated (as `dns_servers` takes them).

    Entries that are not IP addresses (or carry an IPv6 zone) are skipped, as resolvers skip them.
    """
    found = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and "%" not in fields[1]:
            with contextlib.suppress(ValueError):
                found.append(str(ipaddress.ip_address(fields[1])))
    return ",".join(dict.fromkeys(found))


def _iface(text: str, flag: str) -> str:
    if not _IFACE.match(text):
        raise CaptureError(f"{flag}: {text!r} is not an interface name")
    return text


def _bool(value: bool | str, flag: str) -> bool:
    """A boolean, or its text as Go's strconv.ParseBool (and so istio-iptables) reads it."""
    if isinstance(value, bool):
        return value
    if value.strip().lower() in ("1", "t", "true"):
        return True
    if value.strip().lower() in ("", "0", "f", "false"):
        return False
    raise CaptureError(f"{flag}: {value!r} is not true or false")


def _number(text: str, flag: str, low: int, high: int) -> int:
    """A number as istio-iptables takes marks and tables: decimal, or hex with 0x."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        value = -1
    if not low <= value <= high:
        raise CaptureError(f"{flag}: {text!r} is not a number from {low} to {high:#x}")
    return value


def _group(text: str, flag: str) -> int:
    """A group by number or by name (resolved here, as iptables would: iptables-save prints numbers)."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise CaptureError(f"{flag}: {text!r} is neither a numeric gid nor a known group") from None


def _loopback(text: str) -> str:
    """Istio's rule for ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: an IPv4 loopback range, prefix 8 to 32."""
    flag = "--ipv4-loopback-cidr"
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise CaptureError(f"{flag}: {text!r} is not an IP range") from None
    if not isinstance(net, ipaddress.IPv4Network) or not net.network_address.is_loopback or net.prefixlen < 8:
        raise CaptureError(f"{flag}: {text!r} is not an IPv4 loopback range with a prefix of 8 to 32")
    return str(net)


def _family(cidrs: tuple[str, ...] | str, ipv6: bool) -> list[str]:
    if isinstance(cidrs, str):
        return []
    return [c for c in cidrs if (":" in c) == ipv6]
