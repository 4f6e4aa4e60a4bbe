"""Pods on a container engine, shaped like Kubernetes pods with an injected sidecar.

A pod is a "pause" container that holds the network namespace, and containers that join
it: the app (`meshctl app`), the run-once init step `mesh-init` (`meshctl iptables`, with
NET_ADMIN and NET_RAW only) and the sidecar `mesh-proxy` (stock Envoy as uid 1337). All
pods share one internal network (nothing routes out of it). xDS and each Envoy's admin API
go over unix sockets in a directory mounted into every pod, so the control plane may run
on the host with no route from the pods to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, bootstrap, render
from meshplane.controlplane.errors import MeshError

from .engine import Engine

log = logging.getLogger("meshplane.pods")

MOUNT = "/run/meshplane"
XDS_SOCKET = "xds.sock"
SUBNET = "10.96.0.0/16"
POD_RANGE = "10.96.128.0/17"
"""Pods get addresses from the upper half; service VIPs (e.g. 10.96.0.20) live in the lower half.
VIPs must be on the pod network: with no default route, a connection to an off-subnet VIP fails
before the capture rules see it; on-subnet, an uncaptured VIP just finds no one (nothing leaves)."""
PROXY_UID = 1337
APP_UID = 1000

StartContainer = Callable[[str, list[str], dict[str, Any]], Any]
"""(image, command, docker-py run keywords) -> a started docker-py Container."""


class PodError(MeshError):
    """A pod could not start; the message carries the failing container's output."""


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str = "demo"
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    http_ports: tuple[int, ...] = ()
    tcp_ports: tuple[int, ...] = ()
    sidecar: bool = True


@dataclass
class Pod:
    spec: PodSpec
    ip: str
    containers: dict[str, Any]
    admin_socket: Path | None

    def exec(self, argv: list[str], *, uid: int = APP_UID) -> tuple[int, str]:
        """Run a command in the app container (or the pause container if there is none)."""
        target = self.containers.get("app") or self.containers["pause"]
        code, output = target.exec_run(argv, user=f"{uid}:{uid}")
        return code, output.decode(errors="replace")


class PodRunner:
    """Starts pods on `engine` in network `network`; `close()` removes every container and the network."""

    def __init__(
        self,
        engine: Engine,
        runtime_dir: Path,
        *,
        prefix: str,
        hosts: Mapping[str, str],
        start: StartContainer | None = None,
    ) -> None:
        self.engine = engine
        self.runtime_dir = runtime_dir
        self.prefix = prefix
        self.hosts = dict(hosts)
        self._start = start or self._run
        self._containers: list[Any] = []
        from docker.types import IPAMConfig, IPAMPool

        self.network = engine.client.networks.create(
            f"{prefix}-net",
            driver="bridge",
            internal=True,
            labels={"meshplane": prefix},
            ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=SUBNET, iprange=POD_RANGE)]),
        )

    @property
    def xds_socket(self) -> Path:
        return self.runtime_dir / XDS_SOCKET

    def _run(self, image: str, command: list[str], kwargs: dict[str, Any]) -> Any:
        return self.engine.client.containers.run(image, command, detach=True, **kwargs)

    def _container(self, role: str, spec: PodSpec, command: list[str], **kwargs: Any) -> Any:
        kwargs.setdefault("labels", {}).update({"meshplane": self.prefix, "meshplane.pod": spec.name})
        if self.engine.ulimits:
            kwargs["ulimits"] = self.engine.ulimits
        container = self._start(self.engine.image, command, {"name": f"{self.prefix}-{spec.name}-{role}", **kwargs})
        self._containers.append(container)
        return container

    def start(self, spec: PodSpec) -> Pod:
        pause = self._container(
            "pause",
            spec,
            ["sleep", "2147483647"],
            network=self.network.name,
            extra_hosts=self.hosts,
            hostname=spec.name,
        )
        pause.reload()
        ip = pause.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]
        shared = {"network_mode": f"container:{pause.id}"}
        containers = {"pause": pause}
        if spec.http_ports or spec.tcp_ports:
            app = ["meshctl", "app", "--name", spec.name]
            app += [a for p in spec.http_ports for a in ("--http", str(p))]
            app += [a for p in spec.tcp_ports for a in ("--tcp", str(p))]
            containers["app"] = self._container("app", spec, app, user=f"{APP_UID}:{APP_UID}", **shared)
        admin = None
        if spec.sidecar:
            init = self._container(
                "mesh-init",
                spec,
                ["meshctl", "iptables", "--ipv6", "off"],
                cap_drop=["ALL"],
                cap_add=["NET_ADMIN", "NET_RAW"],
                user="0:0",
                **shared,
            )
            status = init.wait(timeout=60)
            if status.get("StatusCode") != 0:
                raise PodError(f"pod {spec.name}: mesh-init failed: {init.logs().decode(errors='replace')}")
            containers["mesh-init"] = init
            # The proxy's own directory: it creates its admin socket there, as uid 1337.
            own = self.runtime_dir / spec.name
            own.mkdir(mode=0o755, exist_ok=True)
            os.chown(own, PROXY_UID, PROXY_UID)
            admin, config = own / "admin.sock", own / "bootstrap.json"
            identity = WorkloadIdentity(
                name=spec.name,
                namespace=spec.namespace,
                service_account=spec.service_account,
                ip=ip,
                labels=dict(spec.labels),
            )
            config.write_text(
                render(
                    bootstrap(
                        identity, f"unix:{MOUNT}/{XDS_SOCKET}", Ports(admin_socket=f"{MOUNT}/{spec.name}/admin.sock")
                    )
                )
            )
            config.chmod(0o644)
            containers["mesh-proxy"] = self._container(
                "mesh-proxy",
                spec,
                ["envoy", "-c", f"{MOUNT}/{spec.name}/bootstrap.json", "-l", "warning", "--drain-time-s", "1"],
                user=f"{PROXY_UID}:{PROXY_UID}",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                volumes={str(self.runtime_dir): {"bind": MOUNT, "mode": "rw"}},
                **shared,
            )
        log.info("pod %s started at %s%s", spec.name, ip, " with a sidecar" if spec.sidecar else "")
        return Pod(spec, ip, containers, admin)

    def stop(self, pod: Pod) -> None:
        for container in reversed(pod.containers.values()):
            _remove(container)

    def close(self) -> None:
        for container in reversed(self._containers):
            _remove(container)
        try:
            self.network.remove()
        except Exception as e:  # cleanup goes on whatever the engine says
            log.warning("could not remove network %s: %s", self.network.name, e)


def remove_leftovers(client: Any, prefix: str) -> None:
    """Remove containers and networks labelled by an earlier run that was killed before its cleanup."""
    for container in client.containers.list(all=True, filters={"label": "meshplane"}):
        if container.labels.get("meshplane", "").startswith(prefix):
            _remove(container)
    for network in client.networks.list(filters={"label": "meshplane"}):
        if network.attrs.get("Labels", {}).get("meshplane", "").startswith(prefix):
            network.remove()


def _remove(container: Any) -> None:
    try:
        container.remove(force=True)
    except Exception as e:  # already gone is fine; anything else is only logged
        if "No such container" not in str(e) and "404" not in str(e):
            log.warning("could not remove container %s: %s", getattr(container, "name", container), e)
