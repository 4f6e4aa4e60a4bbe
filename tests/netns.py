"""Network namespaces for tests: made here, connected only to each other, always deleted."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest


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

    def start(self, ns: str, *argv: str, uid: int | None = None) -> subprocess.Popen[str]:
        prefix = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if uid is not None else []
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
