"""docker-compose.yml runs for real: podman-compose on podman, with locally built images in place of pulled ones.

The file itself is run unchanged; only the image names come from the environment it documents
(MESHPLANE_IMAGE: the control plane image built from the top-level Dockerfile's steps by test_images.py;
MESHPLANE_PROXY_IMAGE: the local sidecar image from deploy/proxy-image/build-local.sh), and podman-compose
passes explicit ulimits to every container (podman here cannot raise rlimits: notes/containers.md).

Evidence, from outside our own code: what the backend app saw (its caller is its sidecar, and the client
certificate that sidecar verified is the frontend's SPIFFE identity), both Envoys' own stats (TLS handshakes
on the frontend's outbound cluster and the backend's inbound listener), and the control plane's view of
who connected (two proxies, each authenticated as its own identity over the TLS port).

NOT exercised here: Docker's engine and `docker compose` (v2) themselves, and the images' `build:` sections
(no registry: their base images cannot be pulled; test_images.py follows the control plane Dockerfile's steps).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from meshplane.sandbox.pods import remove_stale_bridges

from .test_images import BuildError, ensure_controlplane_image, podman_argv, require_engine

TOP = Path(__file__).resolve().parents[2]
COMPOSE = TOP / "docker-compose.yml"
PREFIX = "mpcompose"
ULIMITS = "--ulimit nofile=1024:4096 --ulimit nproc=1024:4096"
FRONTEND_ID = "spiffe://cluster.local/ns/demo/sa/frontend"
BACKEND_ID = "spiffe://cluster.local/ns/demo/sa/backend"
BACKEND_HTTP = "outbound|9080||backend.demo.svc.cluster.local"
UP_TIMEOUT = 300
TRAFFIC_TIMEOUT = 120

GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


def podman_compose() -> list[str]:
    """podman-compose (PyPI), from PATH or this interpreter's environment; skipped without it, failed under CI."""
    found = shutil.which("podman-compose") or shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    if found:
        return [found]
    reason = "podman-compose is not installed (pip install podman-compose)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run docker-compose.yml: {reason}")
    pytest.skip(reason)


def podman(*argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*podman_argv(), *argv], capture_output=True, text=True, timeout=timeout, check=check)


def create_networks(project: str, timeout: float = 180) -> None:
    """Create the file's networks as podman-compose would (it then finds them there). podman refuses a subnet
    that overlaps another network's, and the e2e pods' network uses the same one (10.96.0.0/16): wait for a
    concurrent run to finish and retry, then give up loudly."""
    doc = yaml.safe_load(COMPOSE.read_text())
    deadline = time.monotonic() + timeout
    for name, net in doc["networks"].items():
        argv = ["network", "create", "--label", f"io.podman.compose.project={project}"]
        argv += ["--label", f"com.docker.compose.project={project}"]
        argv += ["--internal"] if net.get("internal") else []
        for config in net.get("ipam", {}).get("config", []):
            argv += ["--subnet", config["subnet"]] + (
                ["--ip-range", config["ip_range"]] if "ip_range" in config else []
            )
        while (done := podman(*argv, f"{project}_{name}")).returncode != 0:
            if "already used on the host" in done.stderr:  # a bridge a killed run left behind?
                listed = json.loads(podman("network", "ls", "--format", "json").stdout or "[]")
                in_use = {str(s.get("subnet")) for n in listed for s in n.get("subnets") or []}
                for config in net.get("ipam", {}).get("config", []):
                    remove_stale_bridges(config["subnet"], in_use)
            if time.monotonic() > deadline:
                message = f"cannot create the compose network {name}: {done.stderr.strip()}"
                if os.environ.get("CI"):
                    pytest.fail(message)
                pytest.skip(message)
            time.sleep(2)


def proxy_image() -> str:
    from meshplane.sandbox.engine import EngineUnavailable, build_local_image, local_image

    tag = local_image()
    if podman("image", "exists", tag).returncode != 0:
        try:
            build_local_image(tag)
        except EngineUnavailable as e:
            pytest.fail(f"building the local sidecar image failed: {e}")
    return tag


@dataclass
class Stack:
    project: str
    containers: dict[str, str]
    """service name -> container name."""

    def logs(self, service: str) -> str:
        done = podman("logs", self.containers[service], timeout=30)
        return done.stdout + done.stderr

    def exec(self, service: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.containers[service], *argv, timeout=30)

    def get(self, service: str, url: str) -> str:
        done = self.exec(service, "python3", "-c", GET, url)
        assert done.returncode == 0, f"GET {url} in {service}: {done.stderr}"
        return done.stdout

    def exit_code(self, service: str) -> int | None:
        state = json.loads(podman("inspect", self.containers[service]).stdout)[0]["State"]
        return None if state["Running"] else int(state["ExitCode"])

    def diagnostics(self) -> str:
        return "\n".join(f"--- {s}:\n{self.logs(s)[-2000:]}" for s in sorted(self.containers))


def project_containers(project: str) -> dict[str, str]:
    listed = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={project}", "--format", "json")
    return {c["Labels"]["com.docker.compose.service"]: c["Names"][0] for c in json.loads(listed.stdout or "[]")}


def remove_project(compose: list[str], project: str, env: dict[str, str]) -> None:
    """`down -v`, then whatever it left (containers, pods, networks, volumes of the project)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [*compose, "-p", project, "-f", str(COMPOSE), "down", "-v", "-t", "2"],
            capture_output=True,
            env=env,
            cwd=TOP,
            timeout=180,
            check=False,
        )
    label = f"label=io.podman.compose.project={project}"
    ids = podman("ps", "-aq", "--filter", label).stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, timeout=120)
    for pod in podman("pod", "ps", "-q", "--filter", f"name={project}").stdout.split():
        podman("pod", "rm", "-f", pod, timeout=60)
    for net in podman("network", "ls", "--format", "{{.Name}}").stdout.split():
        if net.startswith(f"{project}_"):
            podman("network", "rm", "-f", net, timeout=60)
    for vol in podman("volume", "ls", "--format", "{{.Name}}").stdout.split():
        if vol.startswith(f"{project}_"):
            podman("volume", "rm", "-f", vol, timeout=60)


@pytest.fixture
def stack() -> Iterator[Stack]:
    require_engine()
    compose = podman_compose()
    try:
        controlplane = ensure_controlplane_image()
    except BuildError as e:
        pytest.fail(f"building the control plane image from the Dockerfile's steps failed: {e}")
    env = {**os.environ, "MESHPLANE_IMAGE": controlplane, "MESHPLANE_PROXY_IMAGE": proxy_image()}
    # Leftovers of a run that was killed before its cleanup.
    for leftover in {n.split("_")[0] for n in podman("network", "ls", "--format", "{{.Name}}").stdout.split()}:
        if leftover.startswith(PREFIX):
            remove_project(compose, leftover, env)
    project = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    argv = [
        *compose,
        "-p",
        project,
        "-f",
        str(COMPOSE),
        *(["--podman-args", "--runtime runc"] if shutil.which("runc") else []),
        "--podman-run-args",
        ULIMITS,
    ]
    try:
        create_networks(project)
        if podman_version() >= (4, 4):
            up(argv, env, "up", "-d", "--no-build")
        else:
            staged_up(argv, env, project)
        yield Stack(project, project_containers(project))
    finally:
        remove_project(compose, project, env)


def up(argv: list[str], env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [*argv, *args], capture_output=True, text=True, env=env, cwd=TOP, timeout=UP_TIMEOUT, check=False
    )
    assert done.returncode == 0, (
        f"podman-compose {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )


def podman_version() -> tuple[int, int]:
    text = podman("version", "--format", "{{.Client.Version}}").stdout.strip()
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def dependencies() -> dict[str, dict[str, str]]:
    """Each service's dependencies and their conditions, as docker-compose.yml declares them
    (a `network_mode: service:X` is a dependency on X being started)."""
    out: dict[str, dict[str, str]] = {}
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        declared = service.get("depends_on") or {}
        deps = (
            {d: "service_started" for d in declared}
            if isinstance(declared, list)
            else {d: c.get("condition", "service_started") for d, c in declared.items()}
        )
        network = service.get("network_mode", "")
        if network.startswith("service:"):
            deps.setdefault(network.removeprefix("service:"), "service_started")
        out[name] = deps
    return out


def staged_up(argv: list[str], env: dict[str, str], project: str) -> None:
    """podman-compose up, one service at a time in the file's dependency order, each started once the
    conditions its depends_on names hold. podman 4.3 cannot start a container whose --requires include an
    exited container that itself requires a running one (`podman start`: "generating dependency graph for
    container ...: container <init> depends on container <pause> not found in input list"), which is what
    podman-compose's --requires makes of an init step sharing the pause container's network (fixed in later
    podman releases, where a plain `up -d` is used). --no-deps drops the --requires; the order and the
    conditions are still the file's."""
    deps = dependencies()
    done: list[str] = []
    while len(done) < len(deps):
        ready = [s for s in deps if s not in done and set(deps[s]) <= set(done)]
        assert ready, f"a dependency cycle among {set(deps) - set(done)}"
        for service in ready:
            for dep, condition in deps[service].items():
                wait_condition(project, dep, condition)
            up(argv, env, "up", "-d", "--no-build", "--no-deps", service)
            done.append(service)


def wait_condition(project: str, service: str, condition: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        name = project_containers(project).get(service)
        state = json.loads(podman("inspect", name).stdout)[0]["State"] if name else None
        if state and condition == "service_started" and (state["Running"] or state["Status"] == "exited"):
            return
        if state and condition == "service_completed_successfully" and state["Status"] == "exited":
            assert state["ExitCode"] == 0, f"{service} failed:\n{podman('logs', name).stderr[-3000:]}"
            return
        assert condition in {"service_started", "service_completed_successfully"}, condition
        time.sleep(0.5)
    pytest.fail(f"{service} did not reach {condition} within {timeout}s")


def wait_for_reply(stack: Stack) -> dict[str, object]:
    deadline = time.monotonic() + TRAFFIC_TIMEOUT
    while time.monotonic() < deadline:
        for line in stack.logs("frontend-traffic").splitlines():
            if line.startswith("{"):
                return json.loads(line)  # type: ignore[no-any-return]
        time.sleep(1)
    pytest.fail(f"no reply from the backend within {TRAFFIC_TIMEOUT}s:\n{stack.diagnostics()}")


def stats(stack: Stack, service: str) -> dict[str, int]:
    """Envoy's own counters, from its admin API on the pod's loopback (read from the app container)."""
    text = stack.get(service, "http://127.0.0.1:15000/stats")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


@pytest.mark.timeout(UP_TIMEOUT + TRAFFIC_TIMEOUT + 300)
def test_compose_frontend_calls_backend_over_mtls(stack: Stack) -> None:
    expected = set(yaml.safe_load(COMPOSE.read_text())["services"])
    assert set(stack.containers) == expected, stack.containers
    answer = wait_for_reply(stack)
    # The backend app answered, and its caller was its own sidecar (inbound capture), not the frontend.
    assert answer["pod"] == "backend-1" and answer["peer"] == "127.0.0.6", answer
    # The hop between the sidecars was mTLS: the backend's Envoy verified the frontend's certificate.
    xfcc = answer["headers"]["x-forwarded-client-cert"]  # type: ignore[index]
    assert f"URI={FRONTEND_ID}" in xfcc and f"By={BACKEND_ID}" in xfcc, xfcc

    # Envoy's own account: the frontend's outbound call went over TLS, the backend's inbound listener shook hands.
    front = stats(stack, "frontend-app")
    assert front[f"cluster.{BACKEND_HTTP}.upstream_rq_200"] >= 1
    assert front[f"cluster.{BACKEND_HTTP}.ssl.handshake"] >= 1
    back = stats(stack, "backend-app")
    assert back["listener.0.0.0.0_15006.ssl.handshake"] >= 1
    assert back["cluster.inbound|9080||.upstream_cx_total"] >= 1

    # The secure path: each sidecar connected over TLS with its own token and got its own identity.
    proxies = json.loads(stack.get("controlplane", "http://127.0.0.1:15014/debug/proxies"))
    identities = {p["workload"]["name"]: p["identity"] for p in proxies}
    assert identities == {"backend-1": BACKEND_ID, "frontend-1": FRONTEND_ID}, proxies
    peers = {p["workload"]["name"]: p["peer"] for p in proxies}
    assert "10.96.128.10:" in peers["backend-1"] and "10.96.128.11:" in peers["frontend-1"], peers
    # ...as the bootstrap says: TLS to the control plane's name, verified with the trust bundle, and the token.
    bootstrap = json.dumps(json.loads(stack.exec("frontend-proxy", "cat", "/etc/meshplane/bootstrap.json").stdout))
    for expected in ("meshplane.mesh-system.svc:15012", "/etc/meshplane/trust-bundle.pem", "/etc/meshplane/token"):
        assert expected in bootstrap
    assert re.search(r"ssl_?[cC]redentials", bootstrap)
    # Run-once steps finished cleanly; the control plane runs as its image's unprivileged user.
    for job in ("mesh-setup", "backend-init", "frontend-init"):
        assert stack.exit_code(job) == 0, f"{job}:\n{stack.logs(job)}"
    uid = stack.exec("controlplane", "python3", "-c", "import os; print(os.getuid())").stdout.strip()
    assert uid == "10001"
