"""Golden files for the capture rules. UPDATE_GOLDEN=1 rewrites them; a golden file no case uses fails."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from meshplane.bootstrap.iptables import (
    CaptureConfig,
    CaptureError,
    Route,
    apply,
    cleanup_rules,
    nameservers,
    routes,
    rules,
)

GOLDEN = Path(__file__).parents[1] / "golden" / "iptables"

CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "default": ({}, False),
    "inbound-ports": ({"inbound_ports": "8080,9090,15021", "exclude_inbound_ports": "9090"}, False),
    "exclude-inbound": ({"exclude_inbound_ports": "22,8081"}, False),
    "outbound-ranges": ({"outbound_ip_ranges": "10.96.0.0/12,10.244.0.0/16"}, False),
    "exclusions": (
        {
            "exclude_outbound_ip_ranges": "169.254.169.254/32,10.1.0.0/16",
            "exclude_outbound_ports": "5432,6379",
            "exclude_interfaces": "eth1,net2",
        },
        False,
    ),
    "custom-ports-and-ids": (
        {"envoy_port": "16001", "inbound_capture_port": "16006", "proxy_uid": "1337,1338", "proxy_gid": "1337"},
        False,
    ),
    "no-inbound": ({"inbound_ports": ""}, False),
    "ipv6": (
        {"outbound_ip_ranges": "10.96.0.0/12,fd00:10:96::/112", "exclude_outbound_ip_ranges": "fd00::1/128"},
        True,
    ),
    "include-outbound-ports": (
        {"outbound_ip_ranges": "", "include_outbound_ports": "3306,8443", "exclude_outbound_ip_ranges": "10.1.0.0/16"},
        False,
    ),
    "drop-invalid": ({"drop_invalid": True}, False),
    "drop-invalid-ipv6": ({"drop_invalid": "true"}, True),
    "outbound-owner-groups": ({"include_outbound_owner_groups": "1000,root"}, False),
    "outbound-owner-groups-none": ({"include_outbound_owner_groups": ""}, False),
    "outbound-owner-groups-exclude": ({"exclude_outbound_owner_groups": "1000,2000"}, False),
    "outbound-owner-groups-include-wins": (
        {"include_outbound_owner_groups": "1000", "exclude_outbound_owner_groups": "2000"},
        False,
    ),
    "kube-virt-interfaces": ({"kube_virt_interfaces": "eth1,eth2", "exclude_interfaces": "net2"}, False),
    "kube-virt-interfaces-ranges": (
        {"kube_virt_interfaces": "eth1", "outbound_ip_ranges": "10.96.0.0/12,fd00:10:96::/112"},
        True,
    ),
    "ipv4-loopback-cidr": ({"ipv4_loopback_cidr": "127.0.0.1/8"}, False),
    "ipv4-loopback-cidr-ipv6": ({"ipv4_loopback_cidr": "127.0.0.1/8"}, True),
    "redirect-dns": ({"redirect_dns": True, "dns_servers": "10.96.0.10,127.0.0.53,fd00:10:96::a"}, False),
    "redirect-dns-ipv6": ({"redirect_dns": True, "dns_servers": "10.96.0.10,127.0.0.53,fd00:10:96::a"}, True),
    "capture-all-dns": ({"redirect_dns": "true", "capture_all_dns": "true", "proxy_gid": "1337,1338"}, False),
    "tproxy": ({"inbound_mode": "TPROXY"}, False),
    "tproxy-ipv6": ({"inbound_mode": "TPROXY"}, True),
    "tproxy-inbound-ports": (
        {
            "inbound_mode": "TPROXY",
            "inbound_ports": "8080,9090,15021",
            "exclude_inbound_ports": "9090",
            "tproxy_mark": "0x100",
            "exclude_interfaces": "eth1",
            "kube_virt_interfaces": "net2",
        },
        False,
    ),
    "tproxy-drop-invalid": ({"inbound_mode": "TPROXY", "drop_invalid": True, "exclude_inbound_ports": "22"}, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rules_match_golden(name: str) -> None:
    flags, ipv6 = CASES[name]
    text = rules(CaptureConfig.from_flags(**flags), ipv6=ipv6)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"regenerate with UPDATE_GOLDEN=1 pytest {__file__} if intended"


def test_every_golden_file_is_used() -> None:
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(CASES)


def test_existing_jumps_are_not_added_twice() -> None:
    config = CaptureConfig()
    once = rules(config)
    again = rules(
        config, existing_jumps=frozenset({"-A PREROUTING -p tcp -j MESH_INBOUND", "-A OUTPUT -p tcp -j MESH_OUTPUT"})
    )
    assert "-A PREROUTING" in once and "-A PREROUTING" not in again and "-A OUTPUT -p tcp -j MESH_OUTPUT" not in again


def test_cleanup_removes_only_ours() -> None:
    saved = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MESH_INBOUND - [0:0]
:MESH_OUTPUT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j MESH_INBOUND
-A PREROUTING -p tcp -j OTHER
-A OUTPUT -p tcp -j MESH_OUTPUT
COMMIT
"""
    text = cleanup_rules(saved)
    assert text is not None
    assert "-D PREROUTING -p tcp -j MESH_INBOUND" in text and "OTHER" not in text
    assert "-X MESH_INBOUND" in text and "-X MESH_REDIRECT" not in text
    assert cleanup_rules("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"envoy_port": "0"}, "-p/--envoy-port: '0' is not a port number"),
        ({"inbound_ports": "80,http"}, "-b/--inbound-ports: 'http' is not a port number"),
        ({"outbound_ip_ranges": "10.0.0.0/33"}, "-i/--outbound-ip-ranges: '10.0.0.0/33' is not an IP range"),
        ({"proxy_uid": "envoy"}, "-u/--proxy-uid: 'envoy' is not a numeric id"),
        ({"exclude_interfaces": "eth0;reboot"}, "-c/--exclude-interfaces: 'eth0;reboot' is not an interface name"),
        ({"include_outbound_ports": "0"}, "-q/--include-outbound-ports: '0' is not a port number"),
        ({"kube_virt_interfaces": "a b"}, "-k/--kube-virt-interfaces: 'a b' is not an interface name"),
        (
            {"exclude_outbound_owner_groups": "no-such-group-here"},
            "--exclude-outbound-owner-groups: 'no-such-group-here' is neither a numeric gid nor a known group",
        ),
        (
            {"include_outbound_owner_groups": ",".join(map(str, range(65)))},
            "--include-outbound-owner-groups: at most 64 groups, got 65",
        ),
        ({"ipv4_loopback_cidr": "10.0.0.1/32"}, "--ipv4-loopback-cidr: '10.0.0.1/32' is not an IPv4 loopback range"),
        ({"ipv4_loopback_cidr": "127.0.0.1/7"}, "--ipv4-loopback-cidr: '127.0.0.1/7' is not an IPv4 loopback range"),
        ({"ipv4_loopback_cidr": "::1/128"}, "--ipv4-loopback-cidr: '::1/128' is not an IPv4 loopback range"),
        ({"ipv4_loopback_cidr": "loopback"}, "--ipv4-loopback-cidr: 'loopback' is not an IP range"),
        ({"drop_invalid": "maybe"}, "--drop-invalid: 'maybe' is not true or false"),
        ({"redirect_dns": "yes please"}, "--redirect-dns: 'yes please' is not true or false"),
        ({"dns_servers": "10.0.0.1,kube-dns"}, "nameserver: 'kube-dns' is not an IP address"),
        ({"inbound_mode": "tproxy"}, "-m/--inbound-interception-mode: 'tproxy' is not REDIRECT or TPROXY"),
        ({"tproxy_mark": "0"}, "-t/--tproxy-mark: '0' is not a number from 1 to 0xffffffff"),
        ({"tproxy_mark": "1338"}, "-t/--tproxy-mark: 1338 marks the proxy's calls to its own pod"),
        ({"tproxy_route_table": "main"}, "-r/--tproxy-route-table: 'main' is not a number"),
        ({"tproxy_route_table": "254"}, "-r/--tproxy-route-table: 254 is a table the kernel uses"),
    ],
)
def test_bad_flags_are_rejected(flags: dict[str, str], message: str) -> None:
    with pytest.raises(CaptureError) as e:
        CaptureConfig.from_flags(**flags)
    assert message in str(e.value)


def test_owner_groups_by_name_are_numbers_as_iptables_save_prints_them() -> None:
    config = CaptureConfig.from_flags(include_outbound_owner_groups="root", exclude_outbound_owner_groups="root")
    assert config.include_outbound_owner_groups == (0,) and config.exclude_outbound_owner_groups == (0,)


def test_cleanup_also_removes_the_invalid_drop() -> None:
    saved = """*nat
:MESH_OUTPUT - [0:0]
-A OUTPUT -p tcp -j MESH_OUTPUT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:MESH_DROP - [0:0]
:OTHER - [0:0]
-A PREROUTING -m conntrack --ctstate INVALID -j MESH_DROP
-A PREROUTING -j OTHER
-A MESH_DROP -j DROP
COMMIT
"""
    assert cleanup_rules(saved) == (
        "*nat\n-D OUTPUT -p tcp -j MESH_OUTPUT\n-F MESH_OUTPUT\n-X MESH_OUTPUT\nCOMMIT\n"
        "*mangle\n-D PREROUTING -m conntrack --ctstate INVALID -j MESH_DROP\n-F MESH_DROP\n-X MESH_DROP\nCOMMIT\n"
    )
    assert cleanup_rules("*nat\nCOMMIT\n*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") is None


def test_existing_invalid_drop_jump_is_not_added_twice() -> None:
    again = rules(
        CaptureConfig(drop_invalid=True),
        existing_jumps=frozenset({"-A PREROUTING -m conntrack --ctstate INVALID -j MESH_DROP"}),
    )
    assert ":MESH_DROP - [0:0]" in again and "-j MESH_DROP" not in again


class FakeHost:
    """Records what `apply` does: commands run and addresses assigned, in order."""

    def __init__(self, address_error: str = "") -> None:
        self.done: list[str] = []
        self.address_error = address_error

    def run(self, argv: Sequence[str], stdin: str | None) -> str:
        self.done.append(" ".join(argv))
        return "*nat\nCOMMIT\n" if argv[0].endswith("-save") else ""

    def add_address(self, address: str) -> None:
        if self.address_error:
            raise CaptureError(self.address_error)
        self.done.append(f"lo += {address}/128")


def test_ipv6_capture_first_makes_6_local() -> None:
    host = FakeHost()
    v4, v6 = apply(CaptureConfig(), ipv6=True, run=host.run, add_address=host.add_address)
    assert host.done == [
        "lo += ::6/128",
        "iptables-save -t nat",
        "iptables-restore --noflush",
        "ip6tables-save -t nat",
        "ip6tables-restore --noflush",
    ]
    # The rule that lets the proxy's forwards from ::6 reach the app, before any capture of lo.
    lines = v6.splitlines()
    assert lines.index("-A MESH_OUTPUT -s ::6/128 -o lo -j RETURN") < min(
        i for i, ln in enumerate(lines) if "-o lo" in ln and "MESH_IN_REDIRECT" in ln
    )
    assert "::6" not in v4


def test_ipv4_only_capture_assigns_nothing() -> None:
    host = FakeHost()
    apply(CaptureConfig(), ipv6=False, run=host.run, add_address=host.add_address)
    assert host.done == ["iptables-save -t nat", "iptables-restore --noflush"]


def test_no_rules_when_6_cannot_be_assigned() -> None:
    host = FakeHost(address_error="cannot assign ::6/128 to lo: Permission denied")
    with pytest.raises(CaptureError, match="::6/128"):
        apply(CaptureConfig(), ipv6=True, run=host.run, add_address=host.add_address)
    assert host.done == []


def test_drop_invalid_reads_and_restores_mangle_too() -> None:
    host = FakeHost()
    (v4,) = apply(CaptureConfig(drop_invalid=True), ipv6=False, run=host.run, add_address=host.add_address)
    assert host.done == ["iptables-save -t nat", "iptables-save -t mangle", "iptables-restore --noflush"]
    assert v4.startswith("*mangle\n") and "\n*nat\n" in v4


def test_nameservers_of_resolv_conf() -> None:
    text = """# Kubernetes
search ns1.svc.cluster.local svc.cluster.local cluster.local
nameserver 10.96.0.10
nameserver fd00:10:96::a
nameserver fe80::1%eth0
nameserver 10.96.0.10
options ndots:5
"""
    assert nameservers(text) == "10.96.0.10,fd00:10:96::a"
    assert nameservers("") == ""


@pytest.mark.parametrize(
    ("flags", "ipv6"),
    [
        ({"redirect_dns": True}, False),  # no nameserver: istio-iptables captures no DNS either
        ({"redirect_dns": True, "dns_servers": "10.96.0.10"}, True),  # none of this family
        ({"redirect_dns": True, "dns_servers": "10.96.0.10", "exclude_outbound_ports": "53"}, False),
        ({"capture_all_dns": True}, False),  # only with redirect_dns
    ],
)
def test_no_dns_rules_without_a_nameserver_to_capture(flags: dict[str, Any], ipv6: bool) -> None:
    base = CaptureConfig.from_flags(exclude_outbound_ports=flags.get("exclude_outbound_ports", ""))
    assert rules(CaptureConfig.from_flags(**flags), ipv6=ipv6) == rules(base, ipv6=ipv6)


def test_dns_capture_reads_and_restores_raw_and_cleanup_removes_it() -> None:
    host = FakeHost()
    config = CaptureConfig.from_flags(redirect_dns=True, dns_servers="10.96.0.10")
    (v4,) = apply(config, ipv6=False, run=host.run, add_address=host.add_address)
    assert host.done == ["iptables-save -t nat", "iptables-save -t raw", "iptables-restore --noflush"]
    assert v4.startswith("*raw\n") and "\n*nat\n" in v4
    again = rules(config, existing_jumps=frozenset(ln for ln in v4.splitlines() if ln.startswith("-A OUTPUT")))
    assert "-A OUTPUT" not in again
    installed = v4.replace("*raw\n", "*raw\n:OUTPUT ACCEPT [0:0]\n:PREROUTING ACCEPT [0:0]\n")
    removal = cleanup_rules(installed)
    assert removal is not None
    raw = removal[removal.index("*raw") : removal.index("COMMIT\n", removal.index("*raw")) + 7]
    assert raw == (
        "*raw\n-D OUTPUT -p udp -j MESH_OUTPUT_DNS\n-D PREROUTING -p udp -j MESH_INBOUND_DNS\n"
        "-F MESH_OUTPUT_DNS\n-F MESH_INBOUND_DNS\n-X MESH_OUTPUT_DNS\n-X MESH_INBOUND_DNS\nCOMMIT\n"
    )
    assert "-D OUTPUT -p udp -m udp --dport 53 -j MESH_OUTPUT" in removal


def test_tproxy_adds_its_policy_routing_first_then_restores_mangle_and_nat() -> None:
    host = FakeHost()
    added: list[Route] = []
    v4, v6 = apply(
        CaptureConfig.from_flags(inbound_mode="TPROXY", tproxy_route_table="0x85"),
        ipv6=True,
        run=host.run,
        add_address=host.add_address,
        add_route=added.append,
    )
    assert added == [Route(False, 1337, 133), Route(True, 1337, 133)]
    assert added[1].commands() == (
        "ip -6 rule add fwmark 0x539 lookup 133 priority 32765",
        "ip -6 route replace local default dev lo table 133",
    )
    assert host.done == [
        "lo += ::6/128",
        "iptables-save -t nat",
        "iptables-save -t mangle",
        "iptables-restore --noflush",
        "ip6tables-save -t nat",
        "ip6tables-save -t mangle",
        "ip6tables-restore --noflush",
    ]
    assert v4.startswith("*mangle\n") and "--on-ip 0.0.0.0" in v4 and "--on-ip ::" in v6


def test_redirect_mode_has_no_policy_routing_and_no_mangle() -> None:
    assert routes(CaptureConfig(), ipv6=True) == []
    assert "*mangle" not in rules(CaptureConfig(), ipv6=True)


def test_policy_routing_is_not_tried_when_6_cannot_be_assigned() -> None:
    host = FakeHost(address_error="cannot assign ::6/128 to lo: Permission denied")
    added: list[Route] = []
    with pytest.raises(CaptureError):
        apply(
            CaptureConfig(inbound_mode="TPROXY"),
            ipv6=True,
            run=host.run,
            add_address=host.add_address,
            add_route=added.append,
        )
    assert added == [] and host.done == []


def test_tproxy_jumps_are_kept_once_and_cleaned_up_exactly() -> None:
    config = CaptureConfig(inbound_mode="TPROXY")
    jumps = frozenset({"-A PREROUTING -p tcp -j MESH_TPROXY_INBOUND", "-A OUTPUT -p tcp -j MESH_TPROXY_OUTPUT"})
    again = rules(config, existing_jumps=jumps)
    # Only mangle's: the same jumps in nat are other rules, still added.
    mangle, nat = again.split("*nat\n")
    assert "-A PREROUTING" not in mangle and "-A OUTPUT" not in mangle
    assert "-A PREROUTING -p tcp -j MESH_INBOUND" in nat and "-A OUTPUT -p tcp -j MESH_OUTPUT" in nat
    saved = """*mangle
:PREROUTING ACCEPT [0:0]
:OTHER - [0:0]
:MESH_DIVERT - [0:0]
:MESH_TPROXY - [0:0]
:MESH_TPROXY_INBOUND - [0:0]
:MESH_TPROXY_OUTPUT - [0:0]
-A PREROUTING -p tcp -j MESH_TPROXY_INBOUND
-A PREROUTING -j OTHER
-A OUTPUT -p tcp -j MESH_TPROXY_OUTPUT
COMMIT
"""
    assert cleanup_rules(saved) == (
        "*mangle\n-D OUTPUT -p tcp -j MESH_TPROXY_OUTPUT\n-D PREROUTING -p tcp -j MESH_TPROXY_INBOUND\n"
        "-F MESH_TPROXY_INBOUND\n-F MESH_DIVERT\n-F MESH_TPROXY\n-F MESH_TPROXY_OUTPUT\n"
        "-X MESH_TPROXY_INBOUND\n-X MESH_DIVERT\n-X MESH_TPROXY\n-X MESH_TPROXY_OUTPUT\nCOMMIT\n"
    )
