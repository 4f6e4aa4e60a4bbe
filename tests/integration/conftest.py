import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshplane.bootstrap.envoy import Ports, WorkloadIdentity, XdsCredentials, bootstrap, render
from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.ca import TRUST_BUNDLE
from meshplane.controlplane.generate import MeshConfig
from tests.harness import Envoy, free_port, plane_settings

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
            ca_dir=tmp_path / "ca",
            debounce=0.05,
            proxy_grace=0.5,
            poll_interval=0.1,
            mesh_settle=0.2,
        )
        values.update(settings)
        plane = ControlPlane(plane_settings(**values), config=config)
        await plane.start()
        started.append(plane)
        return plane

    yield start
    for plane in started:
        await plane.stop()


@pytest.fixture
async def plane(plane_factory: Callable[..., object]) -> ControlPlane:
    return await plane_factory()  # type: ignore[misc, no-any-return]


def token_file(plane: ControlPlane, directory: Path, namespace: str = "demo", sa: str = "backend") -> Path:
    """A mesh token for namespace/sa, as `meshctl token` writes it (readable by the Envoy that runs here)."""
    path = directory / f"token-{namespace}-{sa}"
    path.write_text(plane.ca.mint_token(namespace, sa, dt.timedelta(hours=1)))
    return path


def write_bootstrap(
    tmp_path: Path,
    plane: ControlPlane,
    *,
    name: str = "backend-1",
    sa: str = "backend",
    labels: dict[str, str] | None = None,
    delta: bool = True,
) -> tuple[Path, int]:
    """A sidecar bootstrap as shipped: TLS to the control plane, verified against the mesh root, and a token."""
    admin = free_port()
    identity = WorkloadIdentity(
        name=name,
        namespace="demo",
        service_account=sa,
        ip="127.0.0.1",
        labels=labels if labels is not None else {"app": "backend"},
    )
    credentials = XdsCredentials(
        str(token_file(plane, tmp_path, "demo", sa)), str(plane.settings.ca_dir / TRUST_BUNDLE)
    )
    path = tmp_path / f"{name}.json"
    ports = Ports(admin=admin, stats=free_port(), health=free_port(), status=free_port())
    path.write_text(render(bootstrap(identity, f"127.0.0.1:{plane.xds_tls_port}", ports, (), credentials, delta=delta)))
    return path, admin


def localize_injected(
    pod: dict[str, Any], plane: ControlPlane, tmp_path: Path, *, name: str, namespace: str = "demo"
) -> tuple[Path, int, dict[str, int]]:
    """The injected proxy's own bootstrap, runnable here: $(VAR)s expanded as the Downward API would,
    the pod's token (a mesh token for its identity, as kubelet would write the projected one), and
    free ports instead of the pod's. Returns the bootstrap, the admin port and each static listener's port."""
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    proxy = next(c for c in containers if c["name"] == "mesh-proxy")
    text = proxy["args"][proxy["args"].index("--config-yaml") + 1]
    doc = json.loads(text.replace("$(INSTANCE_IP)", "127.0.0.1").replace("$(POD_NAME)", name))
    token = tmp_path / f"token-{name}"
    account = pod["spec"].get("serviceAccountName", "default")
    token.write_text(plane.ca.mint_token(namespace, account, dt.timedelta(hours=1)))
    google = doc["dynamicResources"]["adsConfig"]["grpcServices"][0]["googleGrpc"]
    google["callCredentials"][0]["fromPlugin"]["typedConfig"]["secretData"]["filename"] = str(token)
    admin = free_port()
    doc["admin"]["address"]["socketAddress"]["portValue"] = admin
    for cluster in doc["staticResources"]["clusters"]:
        if cluster["name"] == "prometheus_stats":
            endpoint = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]
            endpoint["address"]["socketAddress"]["portValue"] = admin
    ports = {}
    for listener in doc["staticResources"]["listeners"]:
        ports[listener["name"]] = listener["address"]["socketAddress"]["portValue"] = free_port()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path, admin, ports


def call_token(plane: ControlPlane, namespace: str = "demo", sa: str = "web") -> grpc.CallCredentials:
    return grpc.access_token_call_credentials(plane.ca.mint_token(namespace, sa, dt.timedelta(hours=1)))


def xds_channel(
    plane: ControlPlane, namespace: str | None = "demo", sa: str = "web", **options: object
) -> grpc.aio.Channel:
    """A gRPC channel to the TLS port, as a proxy of namespace/sa (no token when namespace is None)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=plane.ca.root_pem)
    if namespace is not None:
        credentials = grpc.composite_channel_credentials(credentials, call_token(plane, namespace, sa))
    return grpc.aio.secure_channel(f"127.0.0.1:{plane.xds_tls_port}", credentials, options=list(options.items()))


@pytest.fixture
async def envoy(tmp_path: Path, plane: ControlPlane) -> AsyncIterator[Envoy]:
    path, admin = write_bootstrap(tmp_path, plane)
    async with Envoy(path, admin, tmp_path / "envoy.log") as proxy:
        yield proxy
