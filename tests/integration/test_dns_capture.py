"""DNS capture through a real sidecar: `meshctl iptables --redirect-dns` in a pod's network namespace,
a real Envoy (uid 1337) whose DNS listener a ControlPlane pushes, and a small upstream DNS server on
the peer that the pod's /etc/resolv.conf names. Real queries from an app uid; assertions on the
answers, on what the upstream server received, and on Envoy's own dns_filter stats."""

import asyncio
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshplane.bootstrap.envoy import WorkloadIdentity
from tests.harness import EnvoyAdmin, wait_until
from tests.netns import Net, pod_sidecar, require_netns, sh, two_hosts

MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli", "iptables"]
APP_UID = 1000
MESH = """
trustDomain: cluster.local
services:
  - name: reviews
    namespace: demo
    ports: [{port: 9080, name: http}]
    addresses: ["10.96.0.20", "fd00:96::20"]
  - name: db
    namespace: data
    ports: [{port: 5432, name: tcp-db}]
    addresses: ["10.96.0.40"]
"""
RATINGS = """  - name: ratings
    namespace: demo
    ports: [{port: 9080, name: http}]
    addresses: ["10.96.0.30"]
"""

# DNS messages built and read by hand (RFC 1035): enough for A/AAAA questions and answers.
WIRE = r"""
import socket, struct, sys, time

def encode(name):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"

def read_name(msg, off):
    labels = []
    while msg[off]:
        if msg[off] >= 192:
            labels.append(read_name(msg, ((msg[off] & 63) << 8) | msg[off + 1])[0])
            return ".".join(labels), off + 2
        labels.append(msg[off + 1 : off + 1 + msg[off]].decode())
        off += 1 + msg[off]
    return ".".join(labels), off + 1
"""
# Ask sys.argv[1]:53 for name sys.argv[2] of type sys.argv[3] over UDP (or TCP with a 4th argument "tcp");
# print '<rcode> <answered from> <addresses>'.
CLIENT = (
    WIRE
    + r"""
qtype = {"A": 1, "AAAA": 28}[sys.argv[3]]
query = struct.pack("!6H", 4242, 0x0100, 1, 0, 0, 0) + encode(sys.argv[2]) + struct.pack("!HH", qtype, 1)
try:
    if sys.argv[4:] == ["tcp"]:
        s = socket.create_connection((sys.argv[1], 53), timeout=3)
        s.sendall(struct.pack("!H", len(query)) + query)
        stream = s.makefile("rb")
        msg, peer = stream.read(struct.unpack("!H", stream.read(2))[0]), s.getpeername()
    else:
        s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(query, (sys.argv[1], 53))
        msg, peer = s.recvfrom(4096)
except OSError as e:
    print("failed", e)
    sys.exit()
_, flags, qd, an, _, _ = struct.unpack_from("!6H", msg)
off = 12
for _ in range(qd):
    off = read_name(msg, off)[1] + 4
found = []
for _ in range(an):
    off = read_name(msg, off)[1]
    rtype, _, _, size = struct.unpack_from("!HHIH", msg, off)
    data = msg[off + 10 : off + 10 + size]
    off += 10 + size
    if rtype in (1, 28):
        found.append(socket.inet_ntop(socket.AF_INET if rtype == 1 else socket.AF_INET6, data))
print(flags & 15, f"{peer[0]}:{peer[1]}", ",".join(sorted(found)) or "-")
"""
)
# The pod's upstream resolver: answers A queries for argv[2:] (name=address), NXDOMAIN for other
# names, and appends every question it gets to the file argv[1].
SERVER = (
    WIRE
    + r"""
import selectors
table = dict(item.split("=") for item in sys.argv[2:])
log = open(sys.argv[1], "a")

def answer(msg):
    name, off = read_name(msg, 12)
    qtype = struct.unpack_from("!H", msg, off)[0]
    log.write(f"{name} {qtype}\n")
    log.flush()
    address = table.get(name.lower())
    record = b""
    if address and qtype == 1:
        record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    header = struct.pack("!6H", msg[0] << 8 | msg[1], 0x8180 | (0 if address else 3), 1, 1 if record else 0, 0, 0)
    return header + msg[12 : off + 4] + record

udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", 53))
tcp = socket.create_server(("::", 53), family=socket.AF_INET6, dualstack_ipv6=True)
sel = selectors.DefaultSelector()
sel.register(udp, selectors.EVENT_READ)
sel.register(tcp, selectors.EVENT_READ)
print("ready", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    for key, _ in sel.select(0.5):
        if key.fileobj is udp:
            msg, peer = udp.recvfrom(4096)
            udp.sendto(answer(msg), peer)
            continue
        conn = tcp.accept()[0]
        with conn:
            conn.settimeout(3)
            stream = conn.makefile("rb")
            msg = stream.read(struct.unpack("!H", stream.read(2))[0])
            reply = answer(msg)
            conn.sendall(struct.pack("!H", len(reply)) + reply)
"""
)


@dataclass
class Pod:
    net: Net
    nameserver: str
    """The peer's address in the pod's resolv.conf: IPv4, or IPv6 in a dual-stack pod."""
    admin: EnvoyAdmin
    mesh_file: Path
    upstream_log: Path

    def query(self, name: str, qtype: str = "A", *, uid: int = APP_UID, tcp: bool = False) -> str:
        """A query from the pod to its nameserver (the peer), sent by `uid`."""
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
        argv += ["/usr/bin/python3", "-c", CLIENT, self.nameserver, name, qtype, *(["tcp"] if tcp else [])]
        return sh(*argv, ns=self.net.pod, timeout=10, check=False).strip()

    def upstream_saw(self) -> list[str]:
        return [ln.split()[0] for ln in self.upstream_log.read_text().splitlines()]


@pytest.fixture(params=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> str:
    """The family of the pod's nameserver; with ipv6 the pod is dual-stack and both families are captured."""
    return str(request.param)


def nameserver(net: Net, family: str) -> str:
    return net.peer_ip6 if family == "ipv6" else net.peer_ip


@pytest.fixture
def net(family: str) -> Iterator[Net]:
    require_netns()
    if family == "ipv6" and not shutil.which("ip6tables-restore"):
        pytest.skip("needs ip6tables (make system-deps installs it)")
    with two_hosts(ipv6=family == "ipv6") as net:
        # `ip netns exec` bind-mounts /etc/netns/<name>/resolv.conf on /etc/resolv.conf: the pod's resolver.
        etc = Path("/etc/netns") / net.pod
        etc.mkdir(parents=True)
        try:
            resolv = f"search demo.svc.cluster.local\nnameserver {nameserver(net, family)}\n"
            (etc / "resolv.conf").write_text(resolv)
            yield net
        finally:
            shutil.rmtree(etc, ignore_errors=True)


def tables(ns: str, family: str) -> dict[str, list[str]]:
    """ip(6)tables-save's nat and raw tables of `family` without their timestamped comments."""
    save = "ip6tables-save" if family == "ipv6" else "iptables-save"
    return {t: [ln for ln in sh(save, "-t", t, ns=ns).splitlines() if not ln.startswith("#")] for t in ("nat", "raw")}


def test_dns_rules_are_applied_once_for_the_pods_nameserver_and_cleaned_up_exactly(net: Net, family: str) -> None:
    before = tables(net.pod, family)
    for _ in range(2):
        sh(*MESHCTL, "--redirect-dns", "--ipv6", "auto", ns=net.pod)
    after = {t: "\n".join(lines) for t, lines in tables(net.pod, family).items()}
    assert after["raw"].count("-j MESH_OUTPUT_DNS") == 1 and after["raw"].count("-j MESH_INBOUND_DNS") == 1
    server = f"{nameserver(net, family)}/{128 if family == 'ipv6' else 32}"
    assert f"-A MESH_OUTPUT_DNS -d {server} -p udp -m udp --dport 53 -j CT --zone 2" in after["raw"]
    assert after["nat"].count("--to-ports 15053") == 1
    sh(*MESHCTL, "--cleanup", "--ipv6", "auto", ns=net.pod)
    assert tables(net.pod, family) == before


@pytest.fixture
async def pod(net: Net, family: str) -> AsyncIterator[Pod]:
    runtime = Path(tempfile.mkdtemp(prefix="meshplane-dns-"))
    runtime.chmod(0o755)
    upstream_log = runtime / "upstream.log"
    upstream_log.write_text("")
    server = net.start(
        net.peer, "/usr/bin/python3", "-c", SERVER, str(upstream_log), "outside.example=192.0.2.7",
        "proxy-only.example=192.0.2.8",
    )  # fmt: skip
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    # The init container's step; the nameserver comes from the pod's resolv.conf.
    sh(*MESHCTL, "--redirect-dns", "--ipv6", "auto", ns=net.pod)
    # What the injector renders for a pod with proxyMetadata ISTIO_META_DNS_CAPTURE: "true".
    identity = WorkloadIdentity(
        name="app-1", namespace="demo", service_account="app", ip=net.pod_ip, metadata={"DNS_CAPTURE": "true"}
    )
    dns = ("dns::0.0.0.0:15053",)
    async with pod_sidecar(net, MESH, identity, listeners=dns, runtime=runtime) as admin:
        yield Pod(net, nameserver(net, family), admin, runtime / "mesh.yaml", upstream_log)


async def grown(pod: Pod, name: str, qtype: str = "A", *, uid: int = APP_UID) -> tuple[str, dict[str, int]]:
    """One query; the answer and the dns_filter counters that grew meanwhile."""
    before = await pod.admin.stats()
    answer = await asyncio.to_thread(pod.query, name, qtype, uid=uid)
    after = await pod.admin.stats()
    prefix = "dns_filter.dns."
    return answer, {k[len(prefix) :]: v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix) and v}


async def test_mesh_names_are_answered_by_the_sidecar(pod: Pod) -> None:
    peer = f"{pod.nameserver}:53"  # the answer seems to come from the nameserver the app asked
    answer, stats = await grown(pod, "reviews.demo.svc.cluster.local")
    assert answer == f"0 {peer} 10.96.0.20"
    assert stats.get("local_a_record_answers") == 1 and stats.get("downstream_rx_queries") == 1
    assert await asyncio.to_thread(pod.query, "reviews.demo.svc.cluster.local", "AAAA") == f"0 {peer} fd00:96::20"
    # The short forms a pod of namespace demo asks for, and another namespace's service.
    for name in ("reviews", "reviews.demo", "reviews.demo.svc", "db.data", "db.data.svc.cluster.local"):
        expected = "10.96.0.40" if name.startswith("db") else "10.96.0.20"
        assert await asyncio.to_thread(pod.query, name) == f"0 {peer} {expected}", name
    assert pod.upstream_saw() == []  # none of them left the pod


async def test_other_names_are_forwarded_to_the_pods_resolver(pod: Pod) -> None:
    peer = f"{pod.nameserver}:53"
    answer, stats = await grown(pod, "outside.example")
    assert answer == f"0 {peer} 192.0.2.7"
    assert stats.get("external_a_record_answers") == 1 and not stats.get("local_a_record_answers")
    assert pod.upstream_saw() == ["outside.example"]  # asked once, by the sidecar, as the app asked it
    answer, _ = await grown(pod, "missing.example")
    assert answer.startswith("3 ") and pod.upstream_saw()[-1] == "missing.example"
    # A name beside the mesh's own (a Service the mesh does not know) is the upstream's to answer too.
    answer, _ = await grown(pod, "legacy.demo.svc.cluster.local")
    assert answer.startswith("3 ") and pod.upstream_saw()[-1] == "legacy.demo.svc.cluster.local"


async def test_the_proxys_own_queries_are_not_captured(pod: Pod) -> None:
    answer, stats = await grown(pod, "proxy-only.example", uid=1337)
    # Straight to the upstream server: its own answer (TTL and all), and the DNS listener saw nothing.
    assert answer == f"0 {pod.nameserver}:53 192.0.2.8"
    assert stats == {} and pod.upstream_saw() == ["proxy-only.example"]


async def test_a_new_service_becomes_resolvable(pod: Pod) -> None:
    assert (await asyncio.to_thread(pod.query, "ratings.demo.svc.cluster.local")).startswith("3 ")
    pod.mesh_file.write_text(MESH + RATINGS)

    async def resolved() -> bool:
        return await asyncio.to_thread(pod.query, "ratings.demo.svc.cluster.local") == (
            f"0 {pod.nameserver}:53 10.96.0.30"
        )

    await wait_until(resolved, timeout=15, interval=0.2, what="ratings in the sidecar's DNS table")
    answer, stats = await grown(pod, "ratings")
    assert answer == f"0 {pod.nameserver}:53 10.96.0.30" and stats.get("local_a_record_answers") == 1


async def test_tcp_dns_is_not_answered_by_the_sidecar(pod: Pod) -> None:
    """Envoy's DNS filter is UDP only: a TCP query takes the ordinary TCP capture to the real nameserver."""
    passthrough = "cluster.PassthroughCluster.upstream_cx_total"
    before = await pod.admin.stats()
    answer = await asyncio.to_thread(pod.query, "reviews.demo.svc.cluster.local", tcp=True)
    after = await pod.admin.stats()
    assert answer == f"3 {pod.nameserver}:53 -"  # the upstream's NXDOMAIN, not the mesh's address
    assert after.get(passthrough, 0) - before.get(passthrough, 0) == 1
    assert pod.upstream_saw() == ["reviews.demo.svc.cluster.local"]


async def test_the_pods_own_resolver_finds_a_mesh_service_by_its_short_name(pod: Pod) -> None:
    """glibc, as an app uses it: `reviews` through the search path of the pod's resolv.conf."""
    argv = ["setpriv", "--reuid", str(APP_UID), "--regid", str(APP_UID), "--clear-groups", "getent", "ahostsv4"]
    before = await pod.admin.stats()
    found = await asyncio.to_thread(sh, *argv, "reviews", ns=pod.net.pod, check=False)
    after = await pod.admin.stats()
    assert found.split()[:1] == ["10.96.0.20"]
    answers = "dns_filter.dns.local_a_record_answers"
    assert after.get(answers, 0) > before.get(answers, 0) and pod.upstream_saw() == []
