"""Network namespaces for tests: made here, connected only to each other, always deleted."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, XdsCredentials, bootstrap, render
from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.settings import Settings
from tests.harness import EnvoyAdmin, envoy_binary, plane_settings, wait_until


def require_netns() -> None:
    """Skip (loudly) where namespaces and iptables cannot be had; in CI, fail instead."""
    missing = [tool for tool in ("ip", "iptables-restore", "setpriv", "/usr/bin/python3") if not shutil.which(tool)]
    reason = None
    if os.geteuid() != 0:
        reason = "needs root for network namespaces and iptables"
    elif missing:
        reason = f"needs {', '.join(missing)} (make system-deps installs them)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the capture tests, but this machine {reason}")
        pytest.skip(reason)


def sh(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 10) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {done.stderr or done.stdout}")
    return done.stdout


# A dual-stack TCP server: on every connection it replies '<port> <client address>' and closes.
ADDRESS_SERVER = """
import selectors, socket, sys, time
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    sel.register(s, selectors.EVENT_READ, port)
print("ready", flush=True)
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    for key, _ in sel.select(0.5):
        conn, peer = key.fileobj.accept()
        with conn:
            conn.sendall(f"{key.data} {peer[0].removeprefix('::ffff:')}\\n".encode())
"""
_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
    s.settimeout(3)
    print(s.makefile().readline().strip())
"""


def ask(ns: str, ip: str, port: int) -> str:
    """Connect from `ns` (as root: an app, captured) and return the server's answer, '' if none."""
    return sh("/usr/bin/python3", "-c", _CLIENT, ip, str(port), ns=ns, timeout=10, check=False).strip()


@dataclass
class Net:
    """Two hosts joined by a veth pair: `pod` (10.250.0.2) and `peer` (10.250.0.1, also 10.250.1.1).

    With `two_hosts(ipv6=True)` they are dual-stack: `pod` also has fd00:250::2 and `peer`
    fd00:250::1 and fd00:251::1, global addresses on the same veth pair.
    """

    pod: str
    peer: str
    pod_ip: str = "10.250.0.2"
    peer_ip: str = "10.250.0.1"
    peer_ip2: str = "10.250.1.1"
    pod_ip6: str = "fd00:250::2"
    peer_ip6: str = "fd00:250::1"
    peer_ip6_2: str = "fd00:251::1"
    pod_dev: str = ""
    peer_dev: str = ""
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(
        self, ns: str, *argv: str, uid: int | None = None, gid: int | None = None, caps: Sequence[str] = ()
    ) -> subprocess.Popen[str]:
        """Run `argv` in `ns`, as `uid` and `gid` (default: the uid) if given, with the capabilities `caps`
        (e.g. net_admin): ambient ones for a non-root uid (how it keeps them across exec); for root, the
        only ones left, as in a container that drops ALL and adds them."""
        prefix = []
        if uid is not None:
            prefix = ["setpriv", "--reuid", str(uid), "--regid", str(uid if gid is None else gid), "--clear-groups"]
        if caps:
            wanted = ",".join(f"+{c}" for c in caps)
            if uid == 0:
                prefix += ["--bounding-set", f"-all,{wanted}"]
            else:
                prefix += ["--inh-caps", wanted, "--ambient-caps", wanted]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *prefix, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc


@contextmanager
def two_hosts(*, ipv6: bool = False) -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    net = Net(pod=f"mp-pod-{tag}", peer=f"mp-peer-{tag}", pod_dev=f"v{tag}a", peer_dev=f"v{tag}b")
    try:
        for ns in (net.pod, net.peer):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh(
            "ip",
            "link",
            "add",
            f"v{tag}a",
            "netns",
            net.pod,
            "type",
            "veth",
            "peer",
            "name",
            f"v{tag}b",
            "netns",
            net.peer,
        )
        sh("ip", "addr", "add", f"{net.pod_ip}/24", "dev", f"v{tag}a", ns=net.pod)
        sh("ip", "addr", "add", f"{net.peer_ip}/24", "dev", f"v{tag}b", ns=net.peer)
        sh("ip", "addr", "add", f"{net.peer_ip2}/24", "dev", f"v{tag}b", ns=net.peer)
        for ns, dev in ((net.pod, f"v{tag}a"), (net.peer, f"v{tag}b")):
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", net.peer_ip, ns=net.pod)
        if ipv6:
            # nodad: usable at once, no duplicate address detection delay.
            sh("ip", "-6", "addr", "add", f"{net.pod_ip6}/64", "dev", net.pod_dev, "nodad", ns=net.pod)
            for ip in (net.peer_ip6, net.peer_ip6_2):
                sh("ip", "-6", "addr", "add", f"{ip}/64", "dev", net.peer_dev, "nodad", ns=net.peer)
            sh("ip", "-6", "route", "add", "default", "via", net.peer_ip6, ns=net.pod)
        yield net
    finally:
        for proc in net.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.wait(5)
        for ns in (net.pod, net.peer):
            sh("ip", "netns", "del", ns, check=False)


async def counted(admin: EnvoyAdmin, ns: str, ip: str, port: int, *stats: str) -> tuple[str, list[int]]:
    """Make one connection; return the answer and how much each of `stats` grew meanwhile."""
    before = await admin.stats()
    answer = await asyncio.to_thread(ask, ns, ip, port)
    after = await admin.stats()
    return answer, [after.get(s, 0) - before.get(s, 0) for s in stats]


def pod_plane_settings(runtime: Path, mesh_file: Path) -> Settings:
    """A control plane for sidecars in the tests' network namespaces: its unix socket in `runtime`
    (reachable by uid 1337), quick to push, to poll the mesh file and to stop."""
    return plane_settings(
        ca_dir=runtime / "ca",
        mesh_file=mesh_file,
        xds_socket=runtime / "xds.sock",
        xds_socket_group=1337,
        debounce=0.05,
        proxy_grace=0.5,
        poll_interval=0.1,
    )


@contextlib.asynccontextmanager
async def pod_sidecar(
    net: Net,
    mesh: str,
    identity: WorkloadIdentity,
    *,
    listeners: Sequence[str] = ("virtualInbound",),
    caps: Sequence[str] = (),
    user: tuple[int, int] = (1337, 1337),
    runtime: Path | None = None,
) -> AsyncIterator[EnvoyAdmin]:
    """A real Envoy as `user` (uid, gid) in the pod's namespace, with capabilities `caps`, fed over a unix
    socket by a ControlPlane that serves `mesh` (written to `runtime`/mesh.yaml, where a test may edit
    it; `runtime` is made if not given, and removed after); yields its admin API once `listeners` are
    active."""
    if runtime is None:
        runtime = Path(tempfile.mkdtemp(prefix="meshplane-pod-"))
    runtime.chmod(0o755)
    (runtime / "mesh.yaml").write_text(mesh)
    plane = ControlPlane(pod_plane_settings(runtime, runtime / "mesh.yaml"))
    envoy = None
    try:
        await plane.start()
        envoy_dir = runtime / "envoy"
        envoy_dir.mkdir()
        shutil.chown(envoy_dir, *user)
        config = envoy_dir / "bootstrap.json"
        token = envoy_dir / "token"
        token.write_text(plane.ca.mint_token(identity.namespace, identity.service_account, dt.timedelta(hours=1)))
        shutil.chown(token, *user)
        ports = Ports(admin_socket=str(envoy_dir / "admin.sock"))
        credentials = XdsCredentials(str(token))
        config.write_text(render(bootstrap(identity, f"unix:{runtime}/xds.sock", ports, (), credentials)))
        envoy = net.start(
            net.pod,
            envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning",
            "--log-path", str(envoy_dir / "envoy.log"), "--drain-time-s", "1",
            uid=user[0], gid=user[1], caps=caps,
        )  # fmt: skip
        admin = EnvoyAdmin(socket=envoy_dir / "admin.sock")

        async def ready() -> bool:
            if not admin.socket or not admin.socket.exists() or (await admin.get("/ready")).strip() != "LIVE":
                return False
            active = await admin.get("/listeners")
            return all(name in active for name in listeners) and not await admin.warming()

        try:
            await wait_until(ready, timeout=20, what="the sidecar's listeners")
        except AssertionError:
            log = envoy_dir / "envoy.log"
            raise AssertionError(log.read_text()[-3000:] if log.exists() else "no Envoy log") from None
        yield admin
    finally:
        if envoy is not None and envoy.poll() is None:
            os.killpg(envoy.pid, 9)  # first, or the plane waits for its stream to end
        await plane.stop()
        shutil.rmtree(runtime, ignore_errors=True)
