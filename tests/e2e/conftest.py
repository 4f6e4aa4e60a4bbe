"""Pods of real containers started with testcontainers, next to a control plane on the host.

The engine is Docker where one answers, else podman's Docker-compatible API started here.
Every container is removed after the test, also when it fails; containers left by a run that
was killed outright are removed at the start of the next one.
"""

import asyncio
import datetime as dt
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.settings import Settings
from meshplane.sandbox.engine import Engine, EngineUnavailable, open_engine
from meshplane.sandbox.pods import MintToken, Pod, PodRunner, app_pod, remove_leftovers
from tests.harness import EnvoyAdmin, wait_until

PREFIX = "mp-e2e"
PROXY_GID = 1337
VIP = "10.96.0.20"
MESH = f"""
trustDomain: cluster.local
mtls: STRICT
services:
  - name: backend
    namespace: demo
    ports: [{{port: 9080, name: http}}, {{port: 9090, name: tcp-echo}}]
    selector: {{app: backend}}
    addresses: [{VIP}]
  - name: frontend
    namespace: demo
    ports: [{{port: 8080, name: http}}]
    selector: {{app: frontend}}
"""
HOSTS = {"backend": VIP, "backend.demo": VIP, "backend.demo.svc.cluster.local": VIP}


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    root = Path(tempfile.mkdtemp(prefix="meshplane-e2e-"))
    root.chmod(0o755)  # the sidecars (uid 1337) reach their sockets through it
    try:
        found = open_engine(root)
    except EngineUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the container tests: {e}")
        pytest.skip(f"no container engine: {e}")
    # testcontainers uses the same engine; there is no reaper image to pull here, so cleanup is ours.
    os.environ.update(
        DOCKER_HOST=found.docker_host, TESTCONTAINERS_RYUK_DISABLED="true", TESTCONTAINERS_CONNECTION_MODE="docker_host"
    )
    remove_leftovers(found.client, PREFIX)
    found.runtime_root = root  # type: ignore[attr-defined]
    yield found
    remove_leftovers(found.client, PREFIX)
    found.close()
    shutil.rmtree(root, ignore_errors=True)


def _testcontainers_start(started: list[Any]) -> Any:
    from testcontainers.core.container import DockerContainer

    def start(image: str, args: list[str] | None, kwargs: dict[str, Any]) -> Any:
        kwargs = dict(kwargs)
        container = DockerContainer(image).with_name(kwargs.pop("name"))
        if args is not None:
            container = container.with_command(args)
        container.tmpfs.update(kwargs.pop("tmpfs", {}))  # options, e.g. "ro" (with_tmpfs_mount sets a size)
        for key, value in kwargs.pop("environment", {}).items():
            container = container.with_env(key, value)
        for host, mount in kwargs.pop("volumes", {}).items():
            container = container.with_volume_mapping(host, mount["bind"], mount["mode"])
        container = container.with_kwargs(**kwargs).start()
        started.append(container)
        return container.get_wrapped_container()

    return start


def mint(plane: ControlPlane) -> MintToken:
    """Projected service-account tokens for the pods, minted by the mesh CA (as `meshctl token`)."""

    def token(namespace: str, service_account: str, audience: str, seconds: int) -> str:
        return plane.ca.mint_token(namespace, service_account, dt.timedelta(seconds=seconds), audiences=(audience,))

    return token


@dataclass
class Mesh:
    plane: ControlPlane
    runner: PodRunner
    mesh_file: Path

    async def pod(
        self,
        name: str,
        app: str,
        sa: str,
        *,
        http: tuple[int, ...] = (),
        tcp: tuple[int, ...] = (),
        sidecar: bool = True,
        **manifest: Any,
    ) -> Pod:
        """A pod from a manifest as a user writes it, injected as the webhook does; returns once its probes
        pass and its sidecar is connected with nothing warming."""
        spec = app_pod(name, service_account=sa, labels={"app": app}, http=http, tcp=tcp, sidecar=sidecar, **manifest)
        pod = await asyncio.to_thread(self.runner.start, spec)
        assert pod.injected == sidecar, f"{name}: injected={pod.injected}, wanted {sidecar}"
        if sidecar:
            await wait_until(lambda: self.ready(pod), timeout=20, what=f"{name}'s sidecar to be ready")
        return pod

    async def ready(self, pod: Pod) -> bool:
        if not pod.admin_socket or not pod.admin_socket.exists() or await self.admin(pod).warming():
            return False
        connected = any(c.node.workload.name == pod.name for c in self.plane.xds.connections.values())
        return connected and self.plane.xds.settled

    def admin(self, pod: Pod) -> EnvoyAdmin:
        return EnvoyAdmin(socket=pod.admin_socket)

    async def exec(self, pod: Pod, *argv: str) -> tuple[int, str]:
        return await asyncio.to_thread(pod.exec, list(argv))


@pytest.fixture
async def mesh(engine: Engine) -> AsyncIterator[Mesh]:
    runtime = Path(tempfile.mkdtemp(dir=engine.runtime_root))  # type: ignore[attr-defined]
    runtime.chmod(0o755)
    mesh_file = runtime / "mesh.yaml"
    mesh_file.write_text(MESH)
    plane = ControlPlane(
        Settings(
            mesh_file=mesh_file,
            bind="127.0.0.1",
            xds_port=0,
            admin_port=0,
            webhook_port=0,
            xds_socket=runtime / "xds.sock",
            xds_socket_group=PROXY_GID,
            xds_tls_port=0,
            ca_dir=runtime / "ca",
            debounce=0.05,
            proxy_grace=1.0,
            poll_interval=0.1,
        )
    )
    await plane.start()
    started: list[Any] = []
    runner = await asyncio.to_thread(
        PodRunner,
        engine,
        runtime,
        prefix=f"{PREFIX}-{uuid.uuid4().hex[:6]}",
        hosts=HOSTS,
        start=_testcontainers_start(started),
        tokens=mint(plane),
    )
    try:
        yield Mesh(plane, runner, mesh_file)
    finally:
        await asyncio.to_thread(runner.close)
        await plane.stop()
