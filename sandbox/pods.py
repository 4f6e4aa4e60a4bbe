"""Kubernetes pods on a container engine, injected exactly as the webhook injects them.

A pod is described as a Kubernetes Pod manifest (the app as a user writes it), run through
`meshplane.webhook.inject.inject`, and the INJECTED pod is translated to containers: a
"pause" container holds the network namespace (as the kubelet's sandbox does) and every
container of the pod joins it, with the command, args, env (Downward API and `$(VAR)`
expansion), user, capabilities, read-only root, volumes, resources and lifecycle hooks the
manifest says; init containers run to completion in order first; readiness and startup
probes are honoured. What the harness cannot express raises `PodError` naming the field:
nothing injected is silently dropped.

All pods share one internal network (nothing routes out of it). The xDS server is a unix
socket in a directory the harness mounts into the proxy container (a node-level mount, like
a hostPath); each proxy's admin API is a unix socket in its pod's `mesh-admin` emptyDir
(`InjectionConfig.admin_socket`), which the host reads through the per-pod directory that
backs the emptyDir.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshplane.controlplane.errors import MeshError
from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from meshplane.webhook.sidecar import PROXY

from .engine import Engine

log = logging.getLogger("meshplane.pods")

MOUNT = "/run/meshplane"
XDS_SOCKET = "xds.sock"
ADMIN_SOCKET = "/run/meshplane-admin/admin.sock"
SUBNET = "10.96.0.0/16"
POD_RANGE = "10.96.128.0/17"
"""Pods get addresses from the upper half; service VIPs (e.g. 10.96.0.20) live in the lower half.
VIPs must be on the pod network: with no default route, a connection to an off-subnet VIP fails
before the capture rules see it; on-subnet, an uncaptured VIP just finds no one (nothing leaves)."""
APP_UID = 1000
MAX_WAIT = 120.0
"""No probe or init container is waited on longer than this, whatever the manifest says."""
PROBE_INTERVAL = 0.25
"""Probes are polled this often (faster than periodSeconds); the deadline follows the manifest."""

MintToken = Callable[[str, str, str, int], str]
"""(namespace, service account, audience, seconds) -> a bearer token proving that identity (what the
kubelet gets from the API server for a projected serviceAccountToken; here the mesh CA mints it)."""
StartContainer = Callable[[str, list[str] | None, dict[str, Any]], Any]
"""(image, args, docker-py run keywords) -> a started docker-py Container."""

# A probe from inside the pod's network namespace (run in the pause container): kubelet's httpGet.
_HTTP_PROBE = """
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        sys.exit(0 if 200 <= r.status < 400 else 1)
except Exception as e:
    print(repr(e)); sys.exit(1)
"""
_TCP_PROBE = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
"""

# What the translation understands; any other key is an error, not a silent drop.
_POD_KEYS = {
    "containers",
    "initContainers",
    "volumes",
    "serviceAccountName",
    "serviceAccount",
    "securityContext",
    "terminationGracePeriodSeconds",
    "restartPolicy",
}
_CONTAINER_KEYS = {
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "ports",
    "resources",
    "securityContext",
    "volumeMounts",
    "readinessProbe",
    "livenessProbe",
    "startupProbe",
    "lifecycle",
    "restartPolicy",
    "workingDir",
    "terminationMessagePolicy",
}
_SECURITY_KEYS = {
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "readOnlyRootFilesystem",
    "allowPrivilegeEscalation",
    "privileged",
    "capabilities",
}
_FIELD_REFS: dict[str, Callable[[Mapping[str, Any], str], str]] = {
    "metadata.name": lambda pod, ip: pod["metadata"]["name"],
    "metadata.namespace": lambda pod, ip: pod["metadata"].get("namespace", "default"),
    "status.podIP": lambda pod, ip: ip,
    "status.podIPs": lambda pod, ip: ip,
    "spec.serviceAccountName": lambda pod, ip: _service_account(pod),
}
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodError(MeshError):
    """A pod could not start, or its manifest holds something the harness cannot run; says which."""


@dataclass
class Pod:
    name: str
    namespace: str
    ip: str
    manifest: dict[str, Any]
    """The pod as injected (what the kubelet would have been given)."""
    containers: dict[str, Any] = field(default_factory=dict)
    """Started containers by name, the pause container as "pause"."""
    volumes: dict[str, Path] = field(default_factory=dict)
    """emptyDir name -> the host directory that backs it."""
    admin_socket: Path | None = None
    """The sidecar's admin API, as the host reaches it (None without a sidecar)."""

    @property
    def injected(self) -> bool:
        return PROXY in self.containers

    def exec(self, argv: list[str], *, uid: int = APP_UID) -> tuple[int, str]:
        """Run a command in the first app container (or the pause container if there is none)."""
        apps = [n for n in _names(self.manifest["spec"].get("containers")) if n != PROXY]
        target = self.containers[apps[0]] if apps else self.containers["pause"]
        code, output = target.exec_run(argv, user=f"{uid}:{uid}")
        return code, output.decode(errors="replace")


def app_pod(
    name: str,
    *,
    namespace: str = "demo",
    service_account: str = "default",
    labels: Mapping[str, str] | None = None,
    http: Sequence[int] = (),
    tcp: Sequence[int] = (),
    sidecar: bool = True,
    annotations: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A Pod manifest as a user writes it: one app container (`meshctl app` by default) declaring its ports."""
    argv = list(command) if command else ["meshctl", "app", "--name", name]
    if not command:
        argv += [a for p in http for a in ("--http", str(p))] + [a for p in tcp for a in ("--tcp", str(p))]
    notes = dict(annotations or {})
    if not sidecar:
        notes["sidecar.istio.io/inject"] = "false"
    ports = [{"name": f"http-{p}", "containerPort": p} for p in http]
    ports += [{"name": f"tcp-{p}", "containerPort": p} for p in tcp]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}), "annotations": notes},
        "spec": {
            "serviceAccountName": service_account,
            "containers": [
                {
                    "name": "app",
                    "image": "app",  # replaced by the runner's image: the one image holds the demo apps
                    "command": argv,
                    "ports": ports,
                    "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
                }
            ],
        },
    }


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
        injection: InjectionConfig | None = None,
        tokens: MintToken | None = None,
    ) -> None:
        self.engine = engine
        self.runtime_dir = runtime_dir
        self.prefix = prefix
        self.hosts = dict(hosts)
        self.injection = injection or InjectionConfig(
            proxy_image=engine.image, xds_address=f"unix:{MOUNT}/{XDS_SOCKET}", admin_socket=ADMIN_SOCKET
        )
        self.tokens = tokens
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

    def _run(self, image: str, args: list[str] | None, kwargs: dict[str, Any]) -> Any:
        return self.engine.client.containers.run(image, args, detach=True, **kwargs)

    def _container(self, pod: str, role: str, image: str, args: list[str] | None, kwargs: dict[str, Any]) -> Any:
        kwargs.setdefault("labels", {}).update({"meshplane": self.prefix, "meshplane.pod": pod})
        if self.engine.ulimits:
            kwargs["ulimits"] = self.engine.ulimits
        try:
            container = self._start(image, args, {"name": f"{self.prefix}-{pod}-{role}", **kwargs})
        except Exception as e:  # the engine's own error, with the pod and container named
            raise PodError(f"pod {pod}: container {role} did not start: {e}") from e
        self._containers.append(container)
        return container

    def inject(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The pod as the webhook would admit it (unchanged when the policy says not to inject)."""
        pod = _with_image(manifest, self.engine.image)
        namespace = pod["metadata"].get("namespace", "default")
        outcome = inject(pod, namespace, self.injection)
        if outcome.error is not None:
            raise PodError(f"pod {pod['metadata']['name']}: the webhook would deny it: {outcome.error}")
        return outcome.pod

    def start(self, manifest: Mapping[str, Any], *, wait: bool = True) -> Pod:
        """Inject `manifest`, run the injected pod, and (with `wait`) return once its probes pass."""
        injected = self.inject(manifest)
        meta, spec = injected["metadata"], injected["spec"]
        name = meta["name"]
        _check_keys(spec, _POD_KEYS, f"pod {name}: spec")
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
            _check_container(name, c)
        pause = self._container(
            name,
            "pause",
            self.engine.image,
            ["sleep", "2147483647"],
            {"network": self.network.name, "extra_hosts": self.hosts, "hostname": name},
        )
        pause.reload()
        ip = pause.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]
        pod = Pod(name, meta.get("namespace", "default"), ip, injected, {"pause": pause})
        pod.volumes = self._volumes(pod)
        for c in spec.get("initContainers") or []:
            started = self._start_container(pod, c, pause)
            if c.get("restartPolicy") == "Always":  # a native sidecar: started, then its startup probe
                self._wait_probes(pod, c, ("startupProbe",))
                continue
            status = started.wait(timeout=MAX_WAIT)
            if status.get("StatusCode") != 0:
                output = started.logs().decode(errors="replace")
                raise PodError(f"pod {name}: init container {c['name']} failed ({status}): {output}")
        for c in spec["containers"]:
            self._start_container(pod, c, pause)
        if PROXY in pod.containers:
            pod.admin_socket = self._admin_socket(pod)
        log.info("pod %s started at %s%s", name, ip, " with a sidecar" if pod.injected else "")
        if wait:
            for c in spec["containers"]:
                self._wait_probes(pod, c, ("startupProbe", "readinessProbe", "livenessProbe"))
        return pod

    def ready(self, pod: Pod) -> bool:
        """Every container's readiness probe passes now (one try each)."""
        return all(
            self._probe(pod, c, c["readinessProbe"])
            for c in pod.manifest["spec"]["containers"]
            if "readinessProbe" in c
        )

    def stop(self, pod: Pod, *, pre_stop: bool = True) -> None:
        """Terminate as the kubelet does: every container at once runs its preStop hook, then gets SIGTERM,
        then SIGKILL when terminationGracePeriodSeconds is over. `pre_stop=False` skips the hooks."""
        grace = float(pod.manifest["spec"].get("terminationGracePeriodSeconds", 30))
        deadline = time.monotonic() + grace
        spec = pod.manifest["spec"]
        running = [c for c in [*(spec.get("initContainers") or []), *spec["containers"]] if c["name"] in pod.containers]
        running = [c for c in running if c in spec["containers"] or c.get("restartPolicy") == "Always"]

        def terminate(c: dict[str, Any]) -> None:
            container = pod.containers[c["name"]]
            hook = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec")
            if pre_stop and hook:
                result: list[tuple[int, bytes]] = []
                runner = threading.Thread(
                    target=lambda: result.append(container.exec_run(hook["command"])), daemon=True
                )
                runner.start()
                runner.join(max(0.0, deadline - time.monotonic()))
                if result and result[0][0] != 0:  # the kubelet only records a failed hook, and so do we
                    log.warning("pod %s: %s preStop hook failed: %s", pod.name, c["name"], result[0][1][-500:])
            try:
                container.stop(timeout=max(0, round(deadline - time.monotonic())))
            except Exception as e:  # already gone is fine; anything else is logged and removal goes on
                log.warning("pod %s: stopping %s: %s", pod.name, c["name"], e)

        threads = [threading.Thread(target=terminate, args=(c,), daemon=True) for c in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join(grace + 30)
        for container in reversed(pod.containers.values()):
            _remove(container)

    def close(self) -> None:
        for container in reversed(self._containers):
            _remove(container)
        try:
            self.network.remove()
        except Exception as e:  # cleanup goes on whatever the engine says
            log.warning("could not remove network %s: %s", self.network.name, e)

    # -- translation of the injected pod -------------------------------------------------------------

    def _volumes(self, pod: Pod) -> dict[str, Path]:
        """Each volume as a per-pod host directory: emptyDir (world-writable, shared by the pod's
        containers; medium: Memory is not reproduced) and projected service-account tokens."""
        out = {}
        for volume in pod.manifest["spec"].get("volumes") or []:
            kinds = set(volume) - {"name"}
            where = f"pod {pod.name}: volume {volume.get('name')}"
            path = self.runtime_dir / "pods" / pod.name / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if kinds == {"emptyDir"}:
                path.chmod(0o777)
            elif kinds == {"projected"}:
                path.chmod(0o755)
                for source in volume["projected"].get("sources") or []:
                    token = source.get("serviceAccountToken")
                    if set(source) != {"serviceAccountToken"} or token is None or "/" in token["path"]:
                        raise PodError(f"{where}: only serviceAccountToken projections run here ({source})")
                    if self.tokens is None:
                        raise PodError(f"{where}: a service-account token is needed but the runner mints none")
                    seconds = int(token.get("expirationSeconds", 3600))
                    text = self.tokens(pod.namespace, _service_account(pod.manifest), token["audience"], seconds)
                    (path / token["path"]).write_text(text)
                    (path / token["path"]).chmod(0o644)  # projected files' default mode
            else:
                raise PodError(f"{where}: only emptyDir and projected token volumes run here ({sorted(kinds)})")
            out[volume["name"]] = path
        return out

    def _admin_socket(self, pod: Pod) -> Path | None:
        address = self.injection.admin_socket
        if not address:
            return None
        proxy = next(c for c in _all_containers(pod.manifest) if c["name"] == PROXY)
        for mount in proxy.get("volumeMounts") or []:
            base = mount["mountPath"].rstrip("/")
            if address.startswith(base + "/") and mount["name"] in pod.volumes:
                return pod.volumes[mount["name"]] / address[len(base) + 1 :]
        raise PodError(f"pod {pod.name}: the admin socket {address} is in no volume of {PROXY}")

    def _start_container(self, pod: Pod, c: dict[str, Any], pause: Any) -> Any:
        where = f"pod {pod.name}: container {c['name']}"
        env = _env(pod, c, where)
        kwargs: dict[str, Any] = {"network_mode": f"container:{pause.id}", "environment": env}
        if self.engine.kind == "podman":  # the pod's hostname in every container (Docker refuses it here)
            kwargs["hostname"] = pod.name
        if c.get("command"):
            kwargs["entrypoint"] = [_expand(a, env) for a in c["command"]]
        args = [_expand(a, env) for a in c["args"]] if c.get("args") is not None else None
        if c.get("workingDir"):
            kwargs["working_dir"] = c["workingDir"]
        kwargs.update(_security(pod.manifest["spec"].get("securityContext") or {}, c.get("securityContext"), where))
        kwargs.update(_resources(c.get("resources") or {}, where))
        volumes: dict[str, dict[str, str]] = {}
        for mount in c.get("volumeMounts") or []:
            extra = set(mount) - {"name", "mountPath", "readOnly"}
            if extra:
                raise PodError(f"{where}: volumeMount {mount['name']}: {sorted(extra)} not supported here")
            if mount["name"] not in pod.volumes:
                raise PodError(f"{where}: volumeMount {mount['name']} names no volume of the pod")
            volumes[str(pod.volumes[mount["name"]])] = {
                "bind": mount["mountPath"],
                "mode": "ro" if mount.get("readOnly") else "rw",
            }
        if c["name"] == PROXY:
            volumes[str(self.runtime_dir)] = {"bind": MOUNT, "mode": "rw"}  # the xDS socket (node-level mount)
        if volumes:
            kwargs["volumes"] = volumes
        container = self._container(pod.name, c["name"], c["image"], args, kwargs)
        pod.containers[c["name"]] = container
        hook = ((c.get("lifecycle") or {}).get("postStart") or {}).get("exec")
        if hook:
            code, output = container.exec_run(hook["command"])
            if code != 0:
                raise PodError(f"{where}: postStart hook failed ({code}): {output.decode(errors='replace')}")
        return container

    def _wait_probes(self, pod: Pod, c: dict[str, Any], kinds: Sequence[str]) -> None:
        for kind in kinds:
            probe = c.get(kind)
            if not probe:
                continue
            budget = int(probe.get("initialDelaySeconds", 0)) + int(probe.get("periodSeconds", 10)) * int(
                probe.get("failureThreshold", 3)
            )
            deadline = time.monotonic() + min(float(budget), MAX_WAIT)
            while not self._probe(pod, c, probe):
                if time.monotonic() > deadline:
                    logs = pod.containers[c["name"]].logs(tail=30).decode(errors="replace")
                    raise PodError(f"pod {pod.name}: {c['name']}'s {kind} did not pass within {budget}s:\n{logs}")
                time.sleep(PROBE_INTERVAL)

    def _probe(self, pod: Pod, c: dict[str, Any], probe: Mapping[str, Any]) -> bool:
        """One try of a probe, as the kubelet runs it: httpGet and tcpSocket to the pod IP, exec in the container."""
        timeout = str(probe.get("timeoutSeconds", 1))
        named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        pause = pod.containers["pause"]
        if "httpGet" in probe:
            h = probe["httpGet"]
            port = named.get(h["port"], h["port"])
            url = f"{str(h.get('scheme', 'HTTP')).lower()}://{h.get('host') or pod.ip}:{port}{h.get('path', '/')}"
            code, _ = pause.exec_run(["python3", "-c", _HTTP_PROBE, url, timeout], user="65534:65534")
            return bool(code == 0)
        if "tcpSocket" in probe:
            port = named.get(probe["tcpSocket"]["port"], probe["tcpSocket"]["port"])
            code, _ = pause.exec_run(["python3", "-c", _TCP_PROBE, pod.ip, str(port), timeout], user="65534:65534")
            return bool(code == 0)
        if "exec" in probe:
            code, _ = pod.containers[c["name"]].exec_run(probe["exec"]["command"])
            return bool(code == 0)
        raise PodError(f"pod {pod.name}: container {c['name']}: probe {sorted(probe)} is not supported here")


def _check_keys(value: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(value) - known)
    if unknown:
        raise PodError(f"{where}: {', '.join(unknown)}: not supported by the local pod runner")


def _check_container(pod: str, c: Mapping[str, Any]) -> None:
    where = f"pod {pod}: container {c.get('name')}"
    _check_keys(c, _CONTAINER_KEYS, where)
    for port in c.get("ports") or []:
        if "hostPort" in port or "hostIP" in port:
            raise PodError(f"{where}: hostPort is not supported by the local pod runner")
    for name in ("preStop", "postStart"):
        hook = (c.get("lifecycle") or {}).get(name)
        if hook is not None and set(hook) != {"exec"}:
            raise PodError(f"{where}: lifecycle.{name}: only exec hooks are supported here")
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = c.get(kind)
        if probe is not None and not {"httpGet", "tcpSocket", "exec"} & set(probe):
            raise PodError(f"{where}: {kind}: only httpGet, tcpSocket and exec probes are supported here")


def _env(pod: Pod, c: Mapping[str, Any], where: str) -> dict[str, str]:
    """The container's environment, in order, each value expanded against the ones before it (as Kubernetes)."""
    if c.get("envFrom"):
        raise PodError(f"{where}: envFrom is not supported by the local pod runner")
    env: dict[str, str] = {}
    for item in c.get("env") or []:
        if "value" in item or "valueFrom" not in item:
            env[item["name"]] = _expand(str(item.get("value", "")), env)
            continue
        ref = item["valueFrom"].get("fieldRef")
        path = ref.get("fieldPath") if ref else None
        resolve = _FIELD_REFS.get(path or "")
        if resolve is not None:
            env[item["name"]] = resolve(pod.manifest, pod.ip)
            continue
        labels = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path or "")
        if labels:
            env[item["name"]] = (pod.manifest["metadata"].get(labels.group(1)) or {}).get(labels.group(2), "")
            continue
        raise PodError(f"{where}: env {item['name']}: valueFrom {item['valueFrom']} is not supported here")
    return env


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a defined VAR is replaced, an undefined one kept, `$$` is `$`."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(one, text)


def _security(pod_context: Mapping[str, Any], context: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """securityContext -> engine keywords. The pod's runAs* apply where the container does not say."""
    _check_keys(pod_context, {"runAsUser", "runAsGroup", "runAsNonRoot"}, f"{where}: pod securityContext")
    sc = {**{k: v for k, v in pod_context.items()}, **(context or {})}
    _check_keys(sc, _SECURITY_KEYS, f"{where}: securityContext")
    out: dict[str, Any] = {}
    uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    if sc.get("runAsNonRoot") and not uid:
        raise PodError(f"{where}: runAsNonRoot needs a non-zero runAsUser here (the image runs as root)")
    if uid is not None:
        out["user"] = f"{uid}:{gid if gid is not None else 0}"
    elif gid is not None:
        raise PodError(f"{where}: runAsGroup without runAsUser is not supported here")
    if sc.get("readOnlyRootFilesystem"):
        # podman adds writable tmpfs on /run, /tmp and /var/tmp to read-only containers; Kubernetes does not.
        out["read_only"] = True
        out["tmpfs"] = {path: "ro" for path in ("/run", "/tmp", "/var/tmp")}
    if sc.get("allowPrivilegeEscalation") is False:
        out["security_opt"] = ["no-new-privileges"]
    if sc.get("privileged"):
        out["privileged"] = True
    caps = sc.get("capabilities") or {}
    _check_keys(caps, {"add", "drop"}, f"{where}: capabilities")
    if caps.get("drop"):
        out["cap_drop"] = list(caps["drop"])
    if caps.get("add"):
        out["cap_add"] = list(caps["add"])
    return out


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SCALE = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def _resources(resources: Mapping[str, Any], where: str) -> dict[str, Any]:
    """limits -> engine limits (requests only matter to a scheduler)."""
    _check_keys(resources, {"requests", "limits"}, f"{where}: resources")
    limits = resources.get("limits") or {}
    _check_keys(limits, {"cpu", "memory"}, f"{where}: resources.limits")
    out: dict[str, Any] = {}
    if "memory" in limits:
        m = _QUANTITY.match(str(limits["memory"]))
        if not m or m.group(2) == "m":
            raise PodError(f"{where}: memory limit {limits['memory']!r} is not supported here")
        out["mem_limit"] = int(float(m.group(1)) * _SCALE[m.group(2)])
    if "cpu" in limits:
        m = _QUANTITY.match(str(limits["cpu"]))
        if not m or m.group(2) not in (None, "m"):
            raise PodError(f"{where}: cpu limit {limits['cpu']!r} is not supported here")
        cores = float(m.group(1)) / (1000 if m.group(2) == "m" else 1)
        out["nano_cpus"] = int(cores * 1e9)
    return out


def _service_account(pod: Mapping[str, Any]) -> str:
    spec = pod.get("spec") or {}
    return str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")


def _names(containers: Any) -> list[str]:
    return [c["name"] for c in containers or []]


def _all_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*(spec.get("initContainers") or []), *spec["containers"]]


def _with_image(manifest: Mapping[str, Any], image: str) -> dict[str, Any]:
    """The manifest with the placeholder app image `app` replaced by the local image that carries the apps."""
    pod: dict[str, Any] = json.loads(json.dumps(manifest))
    for c in _all_containers(pod):
        if c.get("image") == "app":
            c["image"] = image
    return pod


def remove_leftovers(client: Any, prefix: str) -> None:
    """Remove containers and networks labelled by an earlier run that was killed before its cleanup."""
    for container in client.containers.list(all=True, filters={"label": "meshplane"}):
        if container.labels.get("meshplane", "").startswith(prefix):
            _remove(container)
    for network in client.networks.list(filters={"label": "meshplane"}):
        if network.attrs.get("Labels", {}).get("meshplane", "").startswith(prefix):
            network.remove()
    in_use = {
        str(config.get("Subnet"))
        for network in client.networks.list()
        for config in ((network.attrs.get("IPAM") or {}).get("Config") or [])
    }
    remove_stale_bridges(SUBNET, in_use)


def remove_stale_bridges(subnet: str, in_use: set[str]) -> None:
    """Delete podman bridges left holding `subnet` by a network that is gone (`in_use`: the subnets of
    the networks that exist). A run killed mid-removal leaves one, and podman then refuses the subnet
    as "already used on the host". Only links named like podman's bridges are touched."""
    if subnet in in_use:
        return
    try:
        done = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
        links = json.loads(done.stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return
    wanted = ipaddress.ip_network(subnet)
    for link in links:
        name = str(link.get("ifname", ""))
        addresses = [a.get("local", "") for a in link.get("addr_info", [])]
        if name.startswith(("podman", "cni-podman")) and any(ipaddress.ip_address(a) in wanted for a in addresses if a):
            log.warning("removing the stale bridge %s, left holding %s by a network that is gone", name, subnet)
            subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


def _remove(container: Any) -> None:
    try:
        container.remove(force=True)
    except Exception as e:  # already gone is fine; anything else is only logged
        if "No such container" not in str(e) and "404" not in str(e):
            log.warning("could not remove container %s: %s", getattr(container, "name", container), e)
