from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, bootstrap, render
from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.generate import MeshConfig
from meshplane.controlplane.settings import Settings
from tests.harness import Envoy, free_port

MESH = """
trustDomain: cluster.local
mtls: STRICT
services:
  - name: backend
    namespace: demo
    ports: [{port: 9080, name: http}, {port: 9090, name: tcp-echo}]
    selector: {app: backend}
  - name: frontend
    namespace: demo
    ports: [{port: 8080, name: http}]
    selector: {app: frontend}
workloads:
  - {name: frontend-1, namespace: demo, serviceAccount: frontend, labels: {app: frontend}, address: 10.0.0.5}
"""


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    return path


PlaneFactory = Callable[..., "ControlPlane"]


@pytest.fixture
async def plane_factory(tmp_path: Path, mesh_file: Path) -> AsyncIterator[Callable[..., object]]:
    started: list[ControlPlane] = []

    async def start(config: type[MeshConfig] = MeshConfig, **settings: object) -> ControlPlane:
        values: dict[str, object] = dict(
            mesh_file=mesh_file,
            bind="127.0.0.1",
            xds_port=0,
            admin_port=0,
            webhook_port=0,
            ca_dir=tmp_path / "ca",
            debounce=0.05,
            proxy_grace=0.5,
            poll_interval=0.1,
            mesh_settle=0.2,
            shutdown_delay=0,
            shutdown_grace=1,
        )
        values.update(settings)
        plane = ControlPlane(Settings(**values), config=config)  # type: ignore[arg-type]
        await plane.start()
        started.append(plane)
        return plane

    yield start
    for plane in started:
        await plane.stop()


@pytest.fixture
async def plane(plane_factory: Callable[..., object]) -> ControlPlane:
    return await plane_factory()  # type: ignore[misc, no-any-return]


def write_bootstrap(
    tmp_path: Path, xds_port: int, *, name: str = "backend-1", sa: str = "backend", labels: dict[str, str] | None = None
) -> tuple[Path, int]:
    admin = free_port()
    identity = WorkloadIdentity(
        name=name,
        namespace="demo",
        service_account=sa,
        ip="127.0.0.1",
        labels=labels if labels is not None else {"app": "backend"},
    )
    path = tmp_path / f"{name}.json"
    path.write_text(
        render(bootstrap(identity, f"127.0.0.1:{xds_port}", Ports(admin=admin, stats=free_port(), health=free_port())))
    )
    return path, admin


@pytest.fixture
async def envoy(tmp_path: Path, plane: ControlPlane) -> AsyncIterator[Envoy]:
    path, admin = write_bootstrap(tmp_path, plane.xds_port)
    async with Envoy(path, admin, tmp_path / "envoy.log") as proxy:
        yield proxy
