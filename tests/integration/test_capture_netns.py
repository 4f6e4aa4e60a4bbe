"""Capture rules applied by `meshctl iptables` in real network namespaces, proven with real connections."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import MESH_ROOT
from tests.netns import Net, require_netns, sh, two_hosts

PROBE = str(Path(__file__).parents[1] / "probe.py")
MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli", "iptables"]


@pytest.fixture
def net() -> Iterator[Net]:
    require_netns()
    with two_hosts() as net:
        # The pod: its capture ports, an app on 8080 and the health port; the peer: a few servers.
        for ns, ports in ((net.pod, ["15001", "15006", "8080", "15021"]), (net.peer, ["80", "5432"])):
            proc = net.start(ns, sys.executable, PROBE, *ports, "--lifetime", "60")
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield net


def nat_table(ns: str) -> list[str]:
    """iptables-save's nat table without its timestamped comments."""
    return [ln for ln in sh("iptables-save", "-t", "nat", ns=ns).splitlines() if not ln.startswith("#")]


def capture(net: Net, *flags: str) -> str:
    return sh(*MESHCTL, *flags, ns=net.pod)


# Run by Debian's python3 so that uid 1337 can run it too (no file to read: the code is in argv).
CLIENT = """
import socket, sys
s = socket.socket()
s.settimeout(2)
if sys.argv[3]:
    s.bind((sys.argv[3], 0))
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.makefile().readline().strip())
"""


def call(net: Net, ns: str, ip: str, port: int, *, uid: int | None = None, source: str | None = None) -> str:
    """Connect from `ns` and return the probe's answer: '<port that accepted> <original destination>'."""
    argv = ["/usr/bin/python3", "-c", CLIENT, ip, str(port), source or ""]
    if uid is not None:
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *argv]
    return sh(*argv, ns=ns, timeout=10, check=False).strip()


def test_default_capture(net: Net) -> None:
    capture(net)
    # Inbound to an app port lands on 15006, original destination kept.
    assert call(net, net.peer, net.pod_ip, 8080) == f"15006 {net.pod_ip}:8080"
    # The health port is never captured.
    assert call(net, net.peer, net.pod_ip, 15021) == f"15021 {net.pod_ip}:15021"
    # The app's outbound lands on 15001 with the original destination.
    assert call(net, net.pod, net.peer_ip, 80) == f"15001 {net.peer_ip}:80"
    # The proxy's own traffic (uid 1337, or gid 1337) goes out as it is.
    assert call(net, net.pod, net.peer_ip, 80, uid=1337) == f"80 {net.peer_ip}:80"
    # The proxy forwarding to the app from 127.0.0.6 reaches the app, not 15006 again.
    assert call(net, net.pod, net.pod_ip, 8080, uid=1337, source="127.0.0.6") == f"8080 {net.pod_ip}:8080"
    # The proxy calling its own pod IP otherwise is inbound traffic.
    assert call(net, net.pod, net.pod_ip, 8080, uid=1337) == f"15006 {net.pod_ip}:8080"
    # The app calling itself over loopback stays local.
    assert call(net, net.pod, "127.0.0.1", 8080) == "8080 127.0.0.1:8080"


def test_exclusions(net: Net) -> None:
    capture(net, "-d", "8080", "-o", "5432", "-x", "10.250.1.0/24")
    assert call(net, net.peer, net.pod_ip, 8080) == f"8080 {net.pod_ip}:8080"  # excluded inbound port
    assert call(net, net.pod, net.peer_ip, 5432) == f"5432 {net.peer_ip}:5432"  # excluded outbound port
    assert call(net, net.pod, net.peer_ip2, 80) == f"80 {net.peer_ip2}:80"  # excluded outbound range
    assert call(net, net.pod, net.peer_ip, 80) == f"15001 {net.peer_ip}:80"  # everything else still captured


def test_included_ports_and_ranges_only(net: Net) -> None:
    capture(net, "-b", "15021", "-i", "10.250.1.0/24")
    # Only listed inbound ports would be captured, and 15021 never is: so nothing inbound is.
    assert call(net, net.peer, net.pod_ip, 8080) == f"8080 {net.pod_ip}:8080"
    assert call(net, net.pod, net.peer_ip2, 80) == f"15001 {net.peer_ip2}:80"
    assert call(net, net.pod, net.peer_ip, 80) == f"80 {net.peer_ip}:80"


def test_apply_is_idempotent_and_cleanup_is_exact(net: Net) -> None:
    sh("iptables", "-t", "nat", "-N", "SOMEONE_ELSE", ns=net.pod)
    sh("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "SOMEONE_ELSE", ns=net.pod)
    before = nat_table(net.pod)
    capture(net)
    capture(net, "-o", "5432")  # a second run replaces the rules rather than stacking them
    saved = "\n".join(nat_table(net.pod))
    assert saved.count("-j MESH_INBOUND") == 1 and saved.count("-j MESH_OUTPUT") == 1
    assert saved.count("--to-ports 15001") == 1 and "--dport 5432 -j RETURN" in saved
    capture(net, "--cleanup")
    assert nat_table(net.pod) == before
    assert call(net, net.peer, net.pod_ip, 8080) == f"8080 {net.pod_ip}:8080"


def test_bad_flags_change_nothing(net: Net) -> None:
    before = nat_table(net.pod)
    done = subprocess.run(
        ["ip", "netns", "exec", net.pod, *MESHCTL, "-b", "80,eighty"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "-b/--inbound-ports: 'eighty' is not a port number" in done.stderr
    assert nat_table(net.pod) == before


def test_dry_run_prints_exactly_what_apply_restores(net: Net) -> None:
    printed = capture(net, "--dry-run", "--ipv6", "off", "-o", "5432")
    assert printed.startswith("# iptables-restore --noflush\n*nat\n")
    assert not [ln for ln in nat_table(net.pod) if "MESH_" in ln]
    capture(net, "--ipv6", "off", "-o", "5432")
    installed = {ln for ln in nat_table(net.pod) if ln.startswith("-A ")}
    assert {ln for ln in printed.splitlines() if ln.startswith("-A ")} == installed


def test_the_injected_init_container_captures_what_its_annotations_say(net: Net) -> None:
    from meshplane.webhook.config import InjectionConfig
    from meshplane.webhook.inject import inject

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "annotations": {
                "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.250.1.0/24",
                "traffic.sidecar.istio.io/excludeInboundPorts": "15021",
            },
        },
        "spec": {"containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080}]}]},
    }
    init = inject(pod, "demo", InjectionConfig(xds_ca=MESH_ROOT)).pod["spec"]["initContainers"][0]
    assert init["command"] == ["meshctl"]
    sh(*MESHCTL[:-1], *init["args"], "--ipv6", "off", ns=net.pod)  # exactly the container's arguments
    assert call(net, net.peer, net.pod_ip, 8080) == f"15006 {net.pod_ip}:8080"  # the declared port
    assert call(net, net.peer, net.pod_ip, 15021) == f"15021 {net.pod_ip}:15021"
    assert call(net, net.pod, net.peer_ip, 80) == f"15001 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip, 5432) == f"5432 {net.peer_ip}:5432"
    assert call(net, net.pod, net.peer_ip2, 80) == f"80 {net.peer_ip2}:80"
    assert call(net, net.pod, net.peer_ip, 80, uid=1337) == f"80 {net.peer_ip}:80"


def test_ipv6_rules_go_through_ip6tables(net: Net) -> None:
    sh("ip", "-6", "addr", "add", "fd00:250::2/64", "dev", net.pod_dev, "nodad", ns=net.pod)
    capture(net, "--ipv6", "auto", "-x", "fd00:1::/64,10.250.1.0/24")  # a global IPv6 address: auto applies both
    v6 = sh("ip6tables-save", "-t", "nat", ns=net.pod)
    assert "-A MESH_OUTPUT -s ::6/128 -o lo -j RETURN" in v6 and "-A MESH_OUTPUT -d fd00:1::/64 -j RETURN" in v6
    assert "10.250.1.0/24" not in v6 and "-A OUTPUT -p tcp -j MESH_OUTPUT" in v6
    assert "-A MESH_OUTPUT -d 10.250.1.0/24 -j RETURN" in "\n".join(nat_table(net.pod))
    # ::6, the proxy's IPv6 source towards the app, is made local (127.0.0.6 is by itself); again is fine.
    assert "inet6 ::6/128 scope global" in sh("ip", "-6", "addr", "show", "dev", "lo", ns=net.pod)
    capture(net, "--ipv6", "on")
    sh("/usr/bin/python3", "-c", "import socket; socket.socket(socket.AF_INET6).bind(('::6', 0))", ns=net.pod)
    capture(net, "--cleanup", "--ipv6", "on")
    assert "MESH_" not in sh("ip6tables-save", "-t", "nat", ns=net.pod)


def test_included_outbound_ports_are_captured_outside_the_included_ranges(net: Net) -> None:
    capture(net, "-i", "", "-q", "5432", "-x", "10.250.1.0/24")
    assert call(net, net.pod, net.peer_ip, 5432) == f"15001 {net.peer_ip}:5432"  # -q, though -i captures nothing
    assert call(net, net.pod, net.peer_ip, 80) == f"80 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip2, 5432) == f"5432 {net.peer_ip2}:5432"  # as in Istio, -x still wins
    assert call(net, net.pod, net.peer_ip, 5432, uid=1337) == f"5432 {net.peer_ip}:5432"  # never the proxy's


def test_outbound_owner_groups(net: Net) -> None:
    # `call(uid=N)` runs the client with uid and gid N and no other group.
    capture(net, "--include-outbound-owner-groups", "1000,1001")
    assert call(net, net.pod, net.peer_ip, 80, uid=1000) == f"15001 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip, 80, uid=2000) == f"80 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip, 80) == f"80 {net.peer_ip}:80"  # root, group 0: not included
    capture(net, "--exclude-outbound-owner-groups", "2000")
    assert call(net, net.pod, net.peer_ip, 80, uid=2000) == f"80 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip, 80, uid=1000) == f"15001 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip, 80) == f"15001 {net.peer_ip}:80"
    # istio-iptables reads the groups from the environment (it has no flag for them): so does meshctl.
    sh("env", "ISTIO_OUTBOUND_OWNER_GROUPS=2000", *MESHCTL, ns=net.pod)
    assert call(net, net.pod, net.peer_ip, 80, uid=2000) == f"15001 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip, 80, uid=1000) == f"80 {net.peer_ip}:80"


def test_kube_virt_interfaces_capture_a_vms_traffic_as_outbound(net: Net) -> None:
    # The peer plays the VM behind the pod's interface: the pod is its gateway to 10.250.9.0/24.
    sh("ip", "route", "add", "10.250.9.0/24", "via", net.pod_ip, ns=net.peer)
    capture(net, "-k", net.pod_dev)
    assert call(net, net.peer, "10.250.9.9", 80) == "15001 10.250.9.9:80"
    assert call(net, net.peer, net.pod_ip, 8080) == f"15001 {net.pod_ip}:8080"  # outbound, not inbound
    capture(net, "-k", net.pod_dev, "-i", "10.250.9.0/24")  # only -i's ranges are captured
    assert call(net, net.peer, "10.250.9.9", 80) == "15001 10.250.9.9:80"
    assert call(net, net.peer, net.pod_ip, 8080) == f"8080 {net.pod_ip}:8080"
    assert call(net, net.pod, net.peer_ip, 80) == f"80 {net.peer_ip}:80"  # the pod's own outbound: -i as usual


def test_empty_inbound_ports_still_send_the_proxy_calling_its_pod_ip_inbound(net: Net) -> None:
    capture(net, "-b", "")
    assert call(net, net.peer, net.pod_ip, 8080) == f"8080 {net.pod_ip}:8080"  # no inbound capture
    # As istio-iptables with an empty -b: the proxy calling its own pod IP goes to the inbound port.
    assert call(net, net.pod, net.pod_ip, 8080, uid=1337) == f"15006 {net.pod_ip}:8080"
    assert call(net, net.pod, net.pod_ip, 8080) == f"8080 {net.pod_ip}:8080"  # the app calling itself
    assert call(net, net.pod, net.peer_ip, 80) == f"15001 {net.peer_ip}:80"


def test_ipv4_loopback_cidr(net: Net) -> None:
    capture(net)
    # By default only 127.0.0.1 is loopback: the proxy calling 127.0.0.2 is a call to its own pod.
    assert call(net, net.pod, "127.0.0.2", 8080, uid=1337) == "15006 127.0.0.2:8080"
    capture(net, "--ipv4-loopback-cidr", "127.0.0.1/8")
    assert call(net, net.pod, "127.0.0.2", 8080, uid=1337) == "8080 127.0.0.2:8080"
    assert call(net, net.pod, net.pod_ip, 8080, uid=1337) == f"15006 {net.pod_ip}:8080"


# A TCP packet with SYN and FIN both set: conntrack finds it INVALID.
INVALID_PACKET = """
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x03, 1024, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
data = pseudo + tcp
total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
while total >> 16:
    total = (total & 0xFFFF) + (total >> 16)
tcp = tcp[:16] + struct.pack("!H", ~total & 0xFFFF) + tcp[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.bind((src, 0))
for _ in range(3):
    s.sendto(tcp, (dst, 0))
"""


def dropped(ns: str) -> int:
    """Packets counted by the drop rule of the mangle table."""
    for line in sh("iptables-save", "-c", "-t", "mangle", ns=ns).splitlines():
        if line.endswith("-A MESH_DROP -j DROP"):
            return int(line[1:].split(":")[0])
    raise AssertionError("no MESH_DROP rule")


def test_drop_invalid(net: Net) -> None:
    before = sh("iptables-save", "-t", "mangle", ns=net.pod)
    capture(net, "--drop-invalid")
    capture(net, "--drop-invalid")  # once only
    saved = sh("iptables-save", "-t", "mangle", ns=net.pod)
    assert saved.count("-A PREROUTING -m conntrack --ctstate INVALID -j MESH_DROP") == 1
    assert call(net, net.peer, net.pod_ip, 8080) == f"15006 {net.pod_ip}:8080"  # valid traffic flows
    assert call(net, net.pod, net.peer_ip, 80) == f"15001 {net.peer_ip}:80"
    assert dropped(net.pod) == 0
    sh("/usr/bin/python3", "-c", INVALID_PACKET, net.peer_ip, net.pod_ip, "8080", ns=net.peer)
    assert dropped(net.pod) == 3
    capture(net, "--cleanup")
    strip = [ln for ln in sh("iptables-save", "-t", "mangle", ns=net.pod).splitlines() if not ln.startswith("#")]
    assert strip == [ln for ln in before.splitlines() if not ln.startswith("#")]


def mangle_table(ns: str) -> list[str]:
    return [ln for ln in sh("iptables-save", "-t", "mangle", ns=ns).splitlines() if not ln.startswith("#")]


def test_tproxy_installs_once_keeps_redirect_semantics_elsewhere_and_cleans_up(net: Net) -> None:
    before_nat, before_mangle = nat_table(net.pod), mangle_table(net.pod)
    printed = capture(net, "-m", "TPROXY", "-d", "8080", "--ipv6", "off", "--dry-run")
    # As istio-iptables does, the mode may come from the environment; a second run adds no copy.
    sh("env", "ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY", *MESHCTL, "-d", "8080", "--ipv6", "off", ns=net.pod)
    capture(net, "-m", "TPROXY", "-d", "8080", "--ipv6", "off")
    installed = {ln for ln in [*nat_table(net.pod), *mangle_table(net.pod)] if ln.startswith("-A ")}
    assert {ln for ln in printed.splitlines() if ln.startswith("-A ")} == installed
    mangle = "\n".join(mangle_table(net.pod))
    assert mangle.count("-A PREROUTING -p tcp -j MESH_TPROXY_INBOUND") == 1
    assert "--on-port 15006" in mangle and "--dport 15006" not in "\n".join(nat_table(net.pod))
    rules = sh("ip", "rule", ns=net.pod)
    assert rules.count("fwmark 0x539 lookup 133") == 1 and "# ip -4 rule add fwmark 0x539 lookup 133" in printed
    assert sh("ip", "route", "show", "table", "133", ns=net.pod).strip() == "local default dev lo scope host"
    # Excluded inbound ports and outbound are as in REDIRECT mode.
    assert call(net, net.peer, net.pod_ip, 8080) == f"8080 {net.pod_ip}:8080"
    assert call(net, net.pod, net.peer_ip, 80) == f"15001 {net.peer_ip}:80"
    assert call(net, net.pod, net.peer_ip, 80, uid=1337) == f"80 {net.peer_ip}:80"
    capture(net, "--cleanup")
    assert (nat_table(net.pod), mangle_table(net.pod)) == (before_nat, before_mangle)
