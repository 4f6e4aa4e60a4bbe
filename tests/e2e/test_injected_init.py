"""The injected mesh-init container, run as the kubelet would run it: its exact command, args and env, in
a pod's network namespace, with a read-only root filesystem, on both iptables backends.

The proxy image ships the nf_tables backend, which takes no lock; the legacy backend (still the default
on some distributions and kernels) locks /run/xtables.lock, which a read-only root refuses. The rootfs
is reproduced with a private mount namespace whose /run, /tmp and /var/tmp are read-only.
"""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from tests.harness import MESH_ROOT
from tests.netns import require_netns, sh, two_hosts

BACKENDS = {"nft": "xtables-nft-multi", "legacy": "xtables-legacy-multi"}


def injected_init() -> dict[str, object]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080}]}]},
    }
    init = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).pod["spec"]["initContainers"][0]
    assert init["name"] == "mesh-init" and init["securityContext"]["readOnlyRootFilesystem"] is True
    return init  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_injected_init_container_applies_its_rules_on_a_read_only_root(backend: str, tmp_path: Path) -> None:
    require_netns()
    tool = shutil.which(BACKENDS[backend]) or shutil.which(BACKENDS[backend], path="/usr/sbin:/sbin")
    if not tool:
        pytest.skip(f"{BACKENDS[backend]} is not installed")
    # The image's PATH: iptables tools of one backend, and `meshctl` as the image runs it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"):
        (bin_dir / name).symlink_to(tool)
    meshctl = bin_dir / "meshctl"
    meshctl.write_text(f'#!/bin/sh\nexec {sys.executable} -m meshplane.controlplane.cli "$@"\n')
    meshctl.chmod(0o755)
    init = injected_init()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    env |= {e["name"]: e["value"] for e in init.get("env") or []}  # type: ignore[attr-defined]
    argv = [*init["command"], *init["args"]]  # type: ignore[misc]
    # Each writable place of a root filesystem made read-only in place (contents kept, writes refused).
    read_only = " && ".join(
        f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" for d in ("/run", "/tmp", "/var/tmp")
    )
    with two_hosts() as net:
        done = subprocess.run(
            ["ip", "netns", "exec", net.pod, "unshare", "-m", "sh", "-c", f"{read_only} && exec {shlex.join(argv)}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"mesh-init failed on a read-only root ({backend}): {done.stderr}{done.stdout}"
        saved = sh(str(bin_dir / "iptables-save"), "-t", "nat", ns=net.pod)
        assert "-A PREROUTING -p tcp -j MESH_INBOUND" in saved and "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT" in saved


def test_the_injected_init_container_skips_ipv6_where_the_pod_has_none() -> None:
    """`--ipv6 auto` (the injected default) in a pod with only loopback and link-local IPv6: IPv4 rules only."""
    require_netns()
    init = injected_init()
    assert "--ipv6" not in init["args"]  # type: ignore[operator]
    with two_hosts() as net:
        meshctl = str(Path(sys.executable).parent / "meshctl")
        out = sh(meshctl, *init["args"], "--dry-run", ns=net.pod)  # type: ignore[misc]
        assert "# iptables-restore" in out and "ip6tables" not in out
