"""The harness turns the INJECTED pod into containers, field by field, and refuses what it cannot express.

No container engine here: a fake engine records what would be started, so every field of the injected
pod can be checked against the engine keywords it became.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshplane.sandbox.engine import Engine
from meshplane.sandbox.pods import PodError, PodRunner, _expand, app_pod

IP = "10.96.128.5"


@dataclass
class FakeContainer:
    name: str
    kwargs: dict[str, Any]
    events: list[str]
    id: str = "c0ffee"
    attrs: dict[str, Any] = field(default_factory=dict)

    def reload(self) -> None:
        self.attrs = {"NetworkSettings": {"Networks": {"t-net": {"IPAddress": IP}}}}

    def wait(self, timeout: float) -> dict[str, int]:
        return {"StatusCode": 0}

    def logs(self, **_: Any) -> bytes:
        return b""

    def exec_run(self, argv: list[str], user: str | None = None) -> tuple[int, bytes]:
        self.events.append(f"exec {self.name} {' '.join(argv[:2])}")
        return 0, b""

    def stop(self, timeout: int) -> None:
        self.events.append(f"stop {self.name} {timeout}")

    def remove(self, force: bool) -> None:
        self.events.append(f"remove {self.name}")


class FakeNetworks:
    def create(self, name: str, **_: Any) -> Any:
        return type("Network", (), {"name": name, "remove": lambda self: None})()


@pytest.fixture
def runner(tmp_path: Path) -> tuple[PodRunner, dict[str, tuple[str, list[str] | None, dict[str, Any]]], list[str]]:
    started: dict[str, tuple[str, list[str] | None, dict[str, Any]]] = {}
    events: list[str] = []

    def start(image: str, args: list[str] | None, kwargs: dict[str, Any]) -> FakeContainer:
        role = kwargs["name"].removeprefix(f"t-{kwargs['labels']['meshplane.pod']}-")
        started[role] = (image, args, kwargs)
        return FakeContainer(role, kwargs, events)

    client = type("Client", (), {"networks": FakeNetworks()})()
    engine = Engine(client=client, docker_host="", image="local/proxy:1", kind="podman")
    run = PodRunner(
        engine,
        tmp_path,
        prefix="t",
        hosts={},
        start=start,
        tokens=lambda ns, sa, aud, seconds: f"token {ns} {sa} {aud} {seconds}",
    )
    return run, started, events


def test_the_injected_pod_becomes_containers_field_by_field(runner: Any, tmp_path: Path) -> None:
    run, started, _ = runner
    pod = run.start(app_pod("web", service_account="web", labels={"app": "web"}, http=(8080,)), wait=False)
    assert pod.ip == IP and pod.injected
    init_image, init_args, init = started["mesh-init"]
    injected_init = pod.manifest["spec"]["initContainers"][0]
    assert init_image == "local/proxy:1" == injected_init["image"]
    assert init["entrypoint"] == ["meshctl"] and init_args == injected_init["args"]
    assert (init["user"], init["cap_add"], init["cap_drop"]) == ("0:0", ["NET_ADMIN", "NET_RAW"], ["ALL"])
    assert init["read_only"] is True and init["tmpfs"] == {"/run": "ro", "/tmp": "ro", "/var/tmp": "ro"}
    assert init["security_opt"] == ["no-new-privileges"]
    assert init["environment"] == {"XTABLES_LOCKFILE": "/dev/shm/xtables.lock"}
    assert (init["nano_cpus"], init["mem_limit"]) == (100_000_000, 64 * 2**20)

    _, proxy_args, proxy = started["mesh-proxy"]
    assert proxy["entrypoint"] == ["envoy"] and proxy["user"] == "1337:1337"
    assert proxy["environment"] == {
        "POD_NAME": "web",
        "POD_NAMESPACE": "demo",
        "INSTANCE_IP": IP,
        "SERVICE_ACCOUNT": "web",
    }
    assert proxy_args is not None
    bootstrap = json.loads(proxy_args[proxy_args.index("--config-yaml") + 1])  # $(VAR)s expanded
    assert bootstrap["node"]["id"] == f"sidecar~{IP}~web.demo~demo.svc.cluster.local"
    assert bootstrap["admin"]["address"]["pipe"]["path"] == "/run/meshplane-admin/admin.sock"
    mounts = {v["bind"]: Path(k) for k, v in proxy["volumes"].items()}
    assert mounts["/run/meshplane"] == tmp_path  # the xDS socket's directory
    assert (mounts["/var/run/secrets/tokens"] / "istio-token").read_text() == "token demo web meshplane 43200"
    assert pod.admin_socket == mounts["/run/meshplane-admin"] / "admin.sock"
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]

    _, app_args, app = started["app"]
    assert app["entrypoint"] == ["meshctl", "app", "--name", "web", "--http", "8080"] and app_args is None
    assert app["user"] == "1000:1000" and "read_only" not in app
    assert {kw["network_mode"] for _, _, kw in (started["mesh-init"], started["mesh-proxy"], started["app"])} == {
        "container:c0ffee"
    }


def test_a_tproxy_pod_keeps_the_proxy_s_capability_and_user(runner: Any) -> None:
    run, started, _ = runner
    annotations = {"sidecar.istio.io/interceptionMode": "TPROXY"}
    pod = run.start(app_pod("web", http=(8080,), annotations=annotations), wait=False)
    _, init_args, _ = started["mesh-init"]
    assert init_args is not None and init_args[init_args.index("-m") + 1] == "TPROXY"
    _, proxy_args, proxy = started["mesh-proxy"]
    # Root with NET_ADMIN only (IP_TRANSPARENT), group 1337 so its own traffic stays uncaptured.
    assert (proxy["user"], proxy["cap_add"], proxy["cap_drop"]) == ("0:1337", ["NET_ADMIN"], ["ALL"])
    assert proxy_args is not None and pod.injected
    assert json.loads(proxy_args[proxy_args.index("--config-yaml") + 1])["node"]["metadata"]["INTERCEPTION_MODE"] == (
        "TPROXY"
    )


def test_termination_runs_pre_stop_hooks_then_sigterm_within_the_grace_period(runner: Any) -> None:
    run, _, events = runner
    pod = run.start(app_pod("web", http=(8080,)), wait=False)
    run.stop(pod)
    assert "exec mesh-proxy meshctl drain" in events
    assert events.index("exec mesh-proxy meshctl drain") < next(
        i for i, e in enumerate(events) if "stop mesh-proxy" in e
    )
    events.clear()
    pod = run.start(app_pod("web2", http=(8080,)), wait=False)
    run.stop(pod, pre_stop=False)
    assert not [e for e in events if e.startswith("exec")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, s: c.update(envFrom=[{"configMapRef": {"name": "x"}}]), "envFrom"),
        (lambda c, s: c.update(securityContext={"seccompProfile": {"type": "RuntimeDefault"}}), "seccompProfile"),
        (lambda c, s: c.update(lifecycle={"preStop": {"httpGet": {"port": 80}}}), "lifecycle.preStop"),
        (lambda c, s: c.update(ports=[{"containerPort": 80, "hostPort": 80}]), "hostPort"),
        (lambda c, s: s.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]), "hostPath"),
        (lambda c, s: s.update(nodeSelector={"a": "b"}), "nodeSelector"),
        (lambda c, s: c.update(env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]), "X"),
        (lambda c, s: c.update(resources={"limits": {"nvidia.com/gpu": "1"}}), "nvidia.com/gpu"),
    ],
)
def test_what_the_harness_cannot_express_is_an_error_not_dropped(runner: Any, change: Any, message: str) -> None:
    run, _, _ = runner
    manifest = app_pod("web", http=(8080,))
    change(manifest["spec"]["containers"][0], manifest["spec"])
    with pytest.raises(PodError, match=message.replace(".", r"\.")):
        run.start(manifest, wait=False)


def test_kubernetes_variable_expansion() -> None:
    env = {"A": "1", "B": "two"}
    assert _expand("$(A)-$$(A)-$(C)-$(B)$$", env) == "1-$(A)-$(C)-two$"
