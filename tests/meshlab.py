"""A small mesh lab for fault tests: `meshctl serve` as a subprocess (killable, restartable with the
same CA and state), network-namespace pods with the real capture rules, a tiny app run as a
non-proxy uid, and a stock Envoy (uid 1337) from the shipped bootstrap (token file, unix socket).

Pods are joined by a bridge in a hub namespace of their own. Services select pods by labels; the
pods' endpoints come from self-registration only. Everything the lab starts is stopped by PID and
every namespace it made is deleted, also when a test fails half-way.

Replicas over TCP (`lab.add_plane(...)`, `lab.fake_kube()`): further `meshctl serve --kubernetes`
processes run inside the hub namespace, listening on its bridge (GATEWAY), sharing one CA and one
`FakeKube` API server that also lives in the hub namespace (started from a thread that entered it),
and pods whose sidecars dial them over TLS with a pod-bound token (`add_pod(..., xds=..., token=...)`).

Synchronous on purpose: tests drive processes and poll, and nothing here holds an event loop.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509

from meshplane.controlplane.settings import WEBHOOK_DNS_NAMES
from tests.fakekube import FakeKube
from tests.harness import envoy_binary, free_port
from tests.netns import require_netns, sh

T = TypeVar("T")

PROXY_UID = 1337
APP_UID = 1000
SUBNET = "10.251.0"
GATEWAY = f"{SUBNET}.1"
BACKEND_VIP = "10.96.0.20"
FRONTEND_VIP = "10.96.0.10"
MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli"]
SYSTEM_PYTHON = "/usr/bin/python3"
TYPES = ("CDS", "EDS", "LDS", "RDS", "SDS")

MESH = """\
trustDomain: cluster.local
mtls: {mtls}
services:
  - name: backend
    namespace: demo
    ports: [{{port: 9080, name: http}}]
    selector: {{app: backend}}
    addresses: [10.96.0.20]
  - name: frontend
    namespace: demo
    ports: [{{port: 8080, name: http}}]
    selector: {{app: frontend}}
    addresses: [10.96.0.10]
{extra}"""

OTHER = """\
  - name: other
    namespace: demo
    ports: [{port: 9080, name: http}]
    selector: {app: other}
    addresses: [10.96.0.30]
"""
"""A second service on the backend's port: it shares the outbound listener and route `9080`, so
adding or removing it rewrites the very route the frontend's traffic to the backend uses."""


def mesh_text(mtls: str = "STRICT", *, other: bool = True, extra: str = "") -> str:
    return MESH.format(mtls=mtls, extra=(OTHER if other else "") + extra)


# The app: answers every GET with its pod name; bounded lifetime, in case a kill is missed.
APP = """
import http.server, sys, time
name, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
server.timeout = 0.5
deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    server.handle_request()
"""

# The request loop: `count` GETs at `rate` per second (a new connection each), stopping after
# `limit` seconds whatever happens; one JSON line per request.
CLIENT = """
import json, sys, time, urllib.error, urllib.request
url, count, rate, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
for i in range(count):
    due = start + i / rate
    if time.monotonic() - start > limit:
        print(json.dumps({"i": i, "ok": False, "reason": "client time limit"}), flush=True)
        break
    if due > time.monotonic():
        time.sleep(due - time.monotonic())
    t0 = time.monotonic()
    rec = {"i": i, "t": round(t0 - start, 3)}
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            rec.update(ok=r.status == 200, status=r.status, body=r.read().decode()[:40])
    except urllib.error.HTTPError as e:
        rec.update(ok=False, status=e.code, reason=f"HTTP {e.code}: {e.read()[:160].decode(errors='replace')}")
    except Exception as e:
        rec.update(ok=False, reason=f"{type(e).__name__}: {e}"[:200])
    rec["ms"] = round((time.monotonic() - t0) * 1000, 1)
    print(json.dumps(rec), flush=True)
"""


def wait_for(check: Callable[[], T | None], *, timeout: float = 10.0, interval: float = 0.1, what: str = "it") -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, KeyError, ValueError, http.client.HTTPException) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else "")
    )


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, wait: float = 5) -> None:
    """Signal the process group `proc` leads (started with start_new_session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait)


_CLONE_NEWNET = 0x40000000


def _enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace `ns`; threads it starts inherit it."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def netns_executor(ns: str) -> ThreadPoolExecutor:
    """A one-thread executor whose thread lives in namespace `ns`: sockets it opens (and threads it
    starts, such as a FakeKube's server) are that namespace's. The caller shuts it down."""
    return ThreadPoolExecutor(1, thread_name_prefix=f"netns-{ns}", initializer=_enter_netns, initargs=(ns,))


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("envoy", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Admin:
    """Envoy's admin API on a unix socket (the sidecar's admin lives in the pod's namespace)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, path: str, timeout: float = 5) -> str:
        conn = _UnixHTTP(str(self.path), timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read().decode()
            if r.status != 200:
                raise OSError(f"{path}: HTTP {r.status} {body[:200]}")
            return body
        finally:
            conn.close()

    def stats(self, filter: str = "") -> dict[str, int]:
        out = {}
        for line in self.get(f"/stats?filter={filter}" if filter else "/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int:
        return self.stats(f"^{name.replace('.', '[.]')}$").get(name, 0)

    def config_dump(self) -> dict[str, Any]:
        doc = json.loads(self.get("/config_dump?include_eds"))
        return {c["@type"].rsplit(".", 1)[-1]: c for c in doc["configs"]}

    def resource_versions(self) -> dict[str, str]:
        """`cluster:<name>`, `listener:<name>`, `route:<name>`, `secret:<name>` -> the version Envoy
        accepted it at, from /config_dump (active resources only)."""
        dump = self.config_dump()
        out = {}
        for c in dump.get("ClustersConfigDump", {}).get("dynamic_active_clusters", []):
            out[f"cluster:{c['cluster']['name']}"] = c.get("version_info", "")
        for lst in dump.get("ListenersConfigDump", {}).get("dynamic_listeners", []):
            if "active_state" in lst:
                out[f"listener:{lst['name']}"] = lst["active_state"].get("version_info", "")
        for r in dump.get("RoutesConfigDump", {}).get("dynamic_route_configs", []):
            out[f"route:{r['route_config']['name']}"] = r.get("version_info", "")
        for sec in dump.get("SecretsConfigDump", {}).get("dynamic_active_secrets", []):
            out[f"secret:{sec['name']}"] = sec.get("version_info", "")
        return out

    def healthy_endpoints(self, cluster: str) -> list[str]:
        """Addresses of `cluster`'s healthy hosts, from /clusters."""
        hosts: dict[str, bool] = {}
        for line in self.get("/clusters").splitlines():
            if not line.startswith(cluster + "::"):
                continue
            parts = line.split("::")
            if len(parts) >= 4 and parts[2] == "health_flags":
                hosts[parts[1]] = parts[3] == "healthy"
        return sorted(h for h, ok in hosts.items() if ok)

    def certificate_serials(self) -> dict[str, str]:
        """SDS secret name -> the serial (hex) of the first certificate Envoy holds under it, from
        /config_dump (`default`: the workload certificate, `ROOTCA`: the mesh root)."""
        out = {}
        dump = self.config_dump().get("SecretsConfigDump", {})
        for entry in dump.get("dynamic_active_secrets", []):
            secret = entry["secret"]
            tls = secret.get("tls_certificate") or {}
            pem = (tls.get("certificate_chain") or {}).get("inline_bytes")
            if pem is None:
                pem = ((secret.get("validation_context") or {}).get("trusted_ca") or {}).get("inline_bytes")
            if pem is not None:
                cert = x509.load_pem_x509_certificate(base64.b64decode(pem))
                out[secret["name"]] = f"{cert.serial_number:x}"
        return out


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    service_account: str
    labels: dict[str, str]
    dir: Path
    admin: Admin
    app_port: int | None
    app: subprocess.Popen[str] | None = None
    envoy: subprocess.Popen[str] | None = None

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.name}.demo~demo.svc.cluster.local"

    def log(self, tail: int = 3000) -> str:
        path = self.dir / "envoy.log"
        return path.read_text()[-tail:] if path.exists() else "(no Envoy log)"


@dataclass
class Result:
    """What a request loop saw: one record per request."""

    records: list[dict[str, Any]]
    wanted: int

    @property
    def ok(self) -> int:
        return sum(1 for r in self.records if r.get("ok"))

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r.get("ok")]

    def reasons(self) -> Counter[str]:
        return Counter(str(r.get("reason") or r.get("status")) for r in self.failed)

    def answered_by(self) -> Counter[str]:
        return Counter(str(r.get("body")) for r in self.records if r.get("ok"))

    def summary(self) -> str:
        slowest = max((r.get("ms", 0) for r in self.records), default=0)
        text = (
            f"{len(self.records)}/{self.wanted} requests made, {self.ok} ok, {len(self.failed)} failed; "
            f"answered by {dict(self.answered_by())}; slowest {slowest} ms"
        )
        if self.failed:
            text += f"; failures: {dict(self.reasons())}; first: {self.failed[:3]}"
        return text

    def assert_clean(self) -> None:
        assert len(self.records) == self.wanted and not self.failed, self.summary()


class Traffic:
    """A bounded request loop from a pod's app side (uid APP_UID, so its connections are captured)."""

    def __init__(self, lab: MeshLab, pod: Pod, url: str, count: int, rate: float) -> None:
        self.count, self.rate = count, rate
        self.records: list[dict[str, Any]] = []
        limit = count / rate + 10
        self.proc = lab.spawn(pod.ns, SYSTEM_PYTHON, "-c", CLIENT, url, str(count), str(rate), str(limit), uid=APP_UID)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.records.append(json.loads(line))

    def done(self) -> int:
        return len(self.records)

    def wait_requests(self, n: int, timeout: float = 30) -> None:
        wait_for(lambda: len(self.records) >= n or self.proc.poll() is not None, timeout=timeout, what=f"{n} requests")

    def stop(self) -> Result:
        """End the loop early (it was sized generously); what it saw until then."""
        kill_group(self.proc, signal.SIGTERM, wait=5)
        self._reader.join(5)
        return Result(list(self.records), len(self.records))

    def result(self) -> Result:
        """Wait for the loop to end (it is bounded), then what it saw."""
        try:
            self.proc.wait(self.count / self.rate + 20)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
        self._reader.join(5)
        return Result(list(self.records), self.count)


class ControlPlane:
    """`meshctl serve` as a subprocess; `kill()` and `start()` again keep the CA, state and ports.

    With `settings`, a few lines of Python run `serve()` with those Settings fields instead of the
    CLI (for fields the CLI does not expose, such as min_ping_interval); the rest is the same.

    A replica (`netns` set, made by `MeshLab.add_plane`): `meshctl serve --kubernetes --kubeconfig`
    run in namespace `netns` on all its addresses (`--bind 0.0.0.0` there: the bridge address the pods
    dial, and loopback, where /debug/* answers), TLS only, its certificate also naming `advertise`;
    `ca_dir` may be shared with other replicas. Its admin API is queried from a thread in `netns`."""

    def __init__(
        self,
        root: Path,
        mesh: Path | None,
        *,
        cert_ttl: str = "1h",
        shutdown_delay: str = "0s",
        settings: Mapping[str, Any] | None = None,
        kubeconfig: Path | None = None,
        netns: str | None = None,
        advertise: str = "127.0.0.1",
        ca_dir: Path | None = None,
    ) -> None:
        self.root, self.mesh = root, mesh
        self.ca_dir, self.state_dir, self.socket = ca_dir or root / "ca", root / "state", root / "xds.sock"
        self.tls_port, self.admin_port, self.webhook_port = free_port(), free_port(), free_port()
        self.cert_ttl, self.shutdown_delay, self.settings = cert_ttl, shutdown_delay, dict(settings or {})
        self.kubeconfig, self.netns, self.advertise = kubeconfig, netns, advertise
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._executor = netns_executor(netns) if netns is not None else None
        assert settings is None or netns is None, "settings= runs serve() in this namespace only"

    @property
    def xds_address(self) -> str:
        """HOST:PORT a sidecar dials for xDS over TLS."""
        return f"{self.advertise}:{self.tls_port}"

    @property
    def trust_bundle(self) -> Path:
        return self.ca_dir / "trust-bundle.pem"

    def close(self) -> None:
        """Kill the process (if running) and stop the namespace thread."""
        self.kill()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    @property
    def log_path(self) -> Path:
        return self.root / f"controlplane-{self.starts}.log"

    def argv(self) -> list[str]:
        if self.settings:
            return self._python_argv()
        if self.netns is not None:
            return self._replica_argv()
        return [
            *MESHCTL, "serve", "--mesh", str(self.mesh), "--bind", "127.0.0.1",
            "--xds-tls-port", str(self.tls_port),
            "--xds-socket", str(self.socket), "--xds-socket-group", str(PROXY_UID),
            "--admin-port", str(self.admin_port), "--webhook-port", str(self.webhook_port),
            "--ca-dir", str(self.ca_dir), "--state-dir", str(self.state_dir),
            "--cert-ttl", self.cert_ttl, "--shutdown-delay", self.shutdown_delay, "--proxy-grace", "5s",
        ]  # fmt: skip

    def _replica_argv(self) -> list[str]:
        source = ["--kubernetes", "--kubeconfig", str(self.kubeconfig)] if self.kubeconfig else []
        if self.mesh is not None:
            source += ["--mesh", str(self.mesh)]
        # The names a sidecar may verify: the defaults (the Service's DNS names, loopback) and the
        # bridge address it dials.
        names = [a for n in dict.fromkeys((self.advertise, *WEBHOOK_DNS_NAMES)) for a in ("--xds-dns-name", n)]
        return [
            "ip", "netns", "exec", str(self.netns), *MESHCTL, "serve", *source, "--bind", "0.0.0.0",
            "--xds-tls-port", str(self.tls_port), *names,
            "--admin-port", str(self.admin_port), "--webhook-port", str(self.webhook_port),
            "--ca-dir", str(self.ca_dir), "--state-dir", str(self.state_dir),
            "--cert-ttl", self.cert_ttl, "--shutdown-delay", self.shutdown_delay, "--proxy-grace", "5s",
        ]  # fmt: skip

    def _python_argv(self) -> list[str]:
        fields = dict(
            mesh_file=str(self.mesh), bind="127.0.0.1", xds_tls_port=self.tls_port, xds_socket=str(self.socket),
            xds_socket_group=PROXY_UID, admin_port=self.admin_port, webhook_port=self.webhook_port,
            ca_dir=str(self.ca_dir), state_dir=str(self.state_dir), proxy_grace=5.0,
        )  # fmt: skip
        fields.update(self.settings)
        code = (
            "import asyncio, datetime, faulthandler, json, logging, signal, sys\n"
            "faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks on demand, for hangs\n"
            "from pathlib import Path\n"
            "from meshplane.controlplane.app import serve\n"
            "from meshplane.controlplane.settings import Settings, parse_duration\n"
            "kw = json.loads(sys.argv[1])\n"
            "for k in ('mesh_file', 'xds_socket', 'ca_dir', 'state_dir'):\n"
            "    kw[k] = Path(kw[k])\n"
            "kw['cert_ttl'] = parse_duration(kw.pop('cert_ttl'))\n"
            "kw['shutdown_delay'] = parse_duration(kw.pop('shutdown_delay')).total_seconds()\n"
            "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
            "asyncio.run(serve(Settings(**kw)))\n"
        )
        fields.setdefault("cert_ttl", self.cert_ttl)
        fields.setdefault("shutdown_delay", self.shutdown_delay)
        return [sys.executable, "-c", code, json.dumps(fields)]

    def start(self, timeout: float = 20) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, timeout=timeout, what="the control plane's /readyz")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"meshctl serve exited with {self.proc.returncode}:\n{self.log()}")
        return self.readyz() == 200

    def _in_netns(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            return fn()
        return self._executor.submit(fn).result(timeout=30)

    def readyz(self) -> int:
        def read() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        return self._in_netns(read)

    def get(self, path: str) -> Any:
        def read() -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
                body = r.read().decode()
                return json.loads(body) if r.headers.get_content_type() == "application/json" else body

        return self._in_netns(read)

    def metric(self, name: str, label: str) -> dict[str, float]:
        """One labelled counter of this process's /metrics: label value -> count."""
        out: dict[str, float] = {}
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + "{"):
                value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
                out[value] = float(line.rsplit(" ", 1)[1])
        return out

    def pushes(self) -> dict[str, float]:
        """xDS responses sent by this process so far, per type (meshplane_xds_pushes_total)."""
        return self.metric("meshplane_xds_pushes_total", "type")

    def streams(self) -> dict[str, list[int]]:
        """Proxy id -> its open stream ids, from /debug/proxies."""
        out: dict[str, list[int]] = {}
        for p in self.get("/debug/proxies"):
            out.setdefault(p["id"], []).append(p["stream"])
        return out

    def synced(self, proxy_ids: list[str]) -> dict[str, dict[str, str]] | None:
        """Each proxy's per-type state from /debug/syncz if every one has exactly one stream with
        every type SYNCED; else None."""
        doc = self.get("/debug/syncz")
        states: dict[str, list[dict[str, str]]] = {}
        for p in doc["proxies"]:
            states.setdefault(p["id"], []).append({k: v["state"] for k, v in p["types"].items()})
        if any(len(states.get(pid, [])) != 1 for pid in proxy_ids):
            return None
        if any(s != "SYNCED" for pid in proxy_ids for s in states[pid][0].values()):
            return None
        return {pid: states[pid][0] for pid in proxy_ids}

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text()[-tail:] if self.log_path.exists() else "(no log)"

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)


class MeshLab:
    """Use as `with MeshLab(tmp) as lab:`; `lab.plane.start()`, then `lab.add_pod(...)`."""

    def __init__(
        self,
        *,
        mesh: str | None = None,
        cert_ttl: str = "1h",
        shutdown_delay: str = "0s",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        require_netns()
        self.tag = uuid.uuid4().hex[:6]
        self.root = Path(tempfile.mkdtemp(prefix=f"meshlab-{self.tag}-"))
        self.root.chmod(0o755)  # uid 1337 reaches the xDS socket and its own directory through it
        self.mesh_file = self.root / "mesh.yaml"
        self.mesh_file.write_text(mesh if mesh is not None else mesh_text())
        self.plane = ControlPlane(
            self.root, self.mesh_file, cert_ttl=cert_ttl, shutdown_delay=shutdown_delay, settings=settings
        )
        self.hub = f"ml-hub-{self.tag}"
        self.planes: dict[str, ControlPlane] = {}
        self.kube: FakeKube | None = None
        self._hub_thread: ThreadPoolExecutor | None = None
        self.pods: dict[str, Pod] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.namespaces: list[str] = []
        self._next_ip = 11
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> MeshLab:
        try:
            self._add_ns(self.hub)
            sh("ip", "link", "add", "br0", "type", "bridge", ns=self.hub)
            sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", "br0", ns=self.hub)
            sh("ip", "link", "set", "br0", "up", ns=self.hub)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            kill_group(proc)
        self.plane.kill()
        for plane in self.planes.values():
            plane.close()
        if self.kube is not None:
            with contextlib.suppress(Exception):  # the namespaces below go whatever happens here
                self.kube.stop()
        if self._hub_thread is not None:
            self._hub_thread.shutdown(wait=False)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        if os.environ.get("MESHLAB_KEEP"):
            print(f"meshlab: kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)

    def spawn(self, ns: str, *argv: str, uid: int | None = None, log: Path | None = None) -> subprocess.Popen[str]:
        """Start `argv` in namespace `ns` (as `uid`); stopped by PID when the lab closes."""
        prefix = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if uid is not None else []
        out = log.open("w") if log is not None else None
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *prefix, *argv],
                stdout=out or subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        self.procs.append(proc)
        return proc

    # -- replicas over TCP, a Kubernetes API server ---------------------------------------

    def in_hub(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Run `fn` on a thread inside the hub namespace (where the replicas and FakeKube listen)."""
        if self._hub_thread is None:
            self._hub_thread = netns_executor(self.hub)
        return self._hub_thread.submit(fn).result(timeout=timeout)

    def fake_kube(self) -> FakeKube:
        """A FakeKube API server listening on the hub namespace's loopback (its server thread is
        started from inside the hub), stopped when the lab closes. Its kubeconfig is `kube_config`."""
        assert self.kube is None, "one API server per lab"
        kube = FakeKube()
        self.in_hub(kube.start)
        self.kube = kube
        kube.write_kubeconfig(self.kube_config)
        return kube

    @property
    def kube_config(self) -> Path:
        return self.root / "kubeconfig"

    def add_plane(self, name: str, *, ca_dir: Path | None = None, mesh: Path | None = None) -> ControlPlane:
        """A `meshctl serve --kubernetes` replica in the hub namespace (not started): TLS on the
        bridge address, the lab's FakeKube as its cluster, the shared CA `ca_dir` (default: the
        lab's CA directory), state of its own."""
        assert self.kube is not None, "call fake_kube() first"
        root = self.root / name
        root.mkdir()
        plane = ControlPlane(
            root, mesh, kubeconfig=self.kube_config, netns=self.hub, advertise=GATEWAY,
            ca_dir=ca_dir or self.root / "ca", shutdown_delay="0s",
        )  # fmt: skip
        self.planes[name] = plane
        return plane

    # -- pods -------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        labels: Mapping[str, str],
        *,
        service_account: str,
        app_port: int | None = 9080,
        keepalive_ms: int | None = None,
        sidecar: bool = True,
        xds: Sequence[ControlPlane] = (),
        token: str | None = None,
        xds_authority: str | None = None,
        capture: bool = True,
        on_demand_clusters: bool = False,
    ) -> Pod:
        """A pod: namespace on the bridge, capture rules, the app, and (unless not `sidecar`) its
        sidecar, not yet waited for. Processes must be started from the main thread (see below).
        Without `capture`, a plain pod outside the mesh: no capture rules and no sidecar.

        By default the sidecar dials `lab.plane` on its unix socket with a `meshctl token`. With
        `xds`, it dials those replicas over TLS instead (one `--xds-address` each, in that order,
        the trust bundle of the first one's CA) and sends `token` (e.g. one registered with FakeKube);
        `xds_authority` sets the channel's `grpc.default_authority`, the name gRPC sends as :authority
        and checks the replicas' certificates against. `on_demand_clusters`: a sidecar that asks for
        each cluster when it first needs it (`meshctl bootstrap --on-demand-clusters`)."""
        with self._lock:
            n, self._next_ip = self._next_ip, self._next_ip + 1
        ns, ip = f"ml-{self.tag}-{n}", f"{SUBNET}.{n}"
        pod_dir = self.root / name
        pod_dir.mkdir()
        shutil.chown(pod_dir, PROXY_UID, PROXY_UID)
        pod = Pod(name, ns, ip, service_account, dict(labels), pod_dir, Admin(pod_dir / "admin.sock"), app_port)
        self._add_ns(ns)
        host_dev, pod_dev = f"h{self.tag}{ip.rsplit('.', 1)[1]}", f"p{self.tag}{ip.rsplit('.', 1)[1]}"
        sh("ip", "link", "add", pod_dev, "netns", ns, "type", "veth", "peer", "name", host_dev, "netns", self.hub)
        sh("ip", "link", "set", host_dev, "master", "br0", "up", ns=self.hub)
        sh("ip", "addr", "add", f"{ip}/24", "dev", pod_dev, ns=ns)
        sh("ip", "link", "set", pod_dev, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", GATEWAY, ns=ns)
        self.pods[name] = pod
        if not capture:
            if app_port is not None:
                self.start_app(pod)
            return pod
        sh(*MESHCTL, "iptables", ns=ns)  # the init container's step
        self._write_bootstrap(pod, keepalive_ms, xds, token, xds_authority, on_demand_clusters)
        if sidecar:
            self.start_sidecar(pod)
        return pod

    def _write_bootstrap(
        self,
        pod: Pod,
        keepalive_ms: int | None,
        xds: Sequence[ControlPlane] = (),
        token_text: str | None = None,
        xds_authority: str | None = None,
        on_demand_clusters: bool = False,
    ) -> None:
        token = pod.dir / "token"
        if token_text is not None:
            token.write_text(token_text)
        else:
            sh(*MESHCTL, "token", "--ca-dir", str(self.plane.ca_dir), "--namespace", "demo",
               "--service-account", pod.service_account, "--ttl", "1h", "-o", str(token))  # fmt: skip
        shutil.chown(token, PROXY_UID, PROXY_UID)
        if xds:
            # The CA directory is not for uid 1337: the pod gets its own copy of the trust bundle.
            bundle = pod.dir / "trust-bundle.pem"
            shutil.copyfile(xds[0].trust_bundle, bundle)
            shutil.chown(bundle, PROXY_UID, PROXY_UID)
            where = [a for p in xds for a in ("--xds-address", p.xds_address)] + ["--xds-ca", str(bundle)]
        else:
            where = ["--xds-address", f"unix:{self.plane.socket}"]
        labels = [a for k, v in pod.labels.items() for a in ("--label", f"{k}={v}")]
        config = pod.dir / "bootstrap.json"
        sh(*MESHCTL, "bootstrap", *where, "--name", pod.name,
           "--namespace", "demo", "--service-account", pod.service_account, "--ip", pod.ip, *labels,
           "--token-file", str(token), "-o", str(config),
           *(["--on-demand-clusters"] if on_demand_clusters else []))  # fmt: skip
        doc = json.loads(config.read_text())
        # Admin on a unix socket, so the test (outside the pod) can reach it.
        doc["admin"]["address"] = {"pipe": {"path": str(pod.admin.path)}}
        if keepalive_ms is not None:
            grpc = doc["dynamicResources"]["adsConfig"]["grpcServices"][0]["googleGrpc"]
            args = grpc["channelArgs"]["args"]
            assert "grpc.keepalive_time_ms" in args, f"the shipped bootstrap's channel args changed: {args}"
            args["grpc.keepalive_time_ms"] = {"intValue": str(keepalive_ms)}
        if xds_authority is not None:
            grpc = doc["dynamicResources"]["adsConfig"]["grpcServices"][0]["googleGrpc"]
            grpc.setdefault("channelArgs", {}).setdefault("args", {})["grpc.default_authority"] = {
                "stringValue": xds_authority
            }
        config.write_text(json.dumps(doc, indent=2))

    def start_app(self, pod: Pod) -> None:
        """Start the pod's app if it has one and it is not running."""
        if pod.app_port is not None and (pod.app is None or pod.app.poll() is not None):
            pod.app = self.spawn(
                pod.ns, SYSTEM_PYTHON, "-c", APP, pod.name, str(pod.app_port), uid=APP_UID, log=pod.dir / "app.log"
            )

    def start_sidecar(self, pod: Pod) -> None:
        """Start the pod's app (if it has one and it is not running) and its Envoy."""
        self.start_app(pod)
        pod.admin.path.unlink(missing_ok=True)
        pod.envoy = self.spawn(
            pod.ns,
            envoy_binary(), "-c", str(pod.dir / "bootstrap.json"), "--disable-hot-restart", "-l", "warning",
            "--log-path", str(pod.dir / "envoy.log"), "--drain-time-s", "2",
            uid=PROXY_UID, log=pod.dir / "envoy.stdout",
        )  # fmt: skip

    def stop_pod(self, pod: Pod) -> None:
        """The pod goes away as kubelet deletes an injected pod: the sidecar's preStop hook (`meshctl
        drain`, which the webhook injects) first, then SIGTERM, then SIGKILL. Without the hook Envoy
        exits on SIGTERM at once and resets a request in flight, which no retry policy may replay."""
        if pod.envoy is not None and pod.envoy.poll() is None:
            sh(*MESHCTL, "drain", "--admin-socket", str(pod.admin.path), "--duration", "2s")
        for proc in (pod.envoy, pod.app):
            if proc is not None:
                kill_group(proc, signal.SIGTERM, wait=3)
                kill_group(proc)

    def wait_sidecar(self, pod: Pod, timeout: float = 20) -> None:
        def ready() -> bool:
            assert pod.envoy is not None
            if pod.envoy.poll() is not None:
                raise AssertionError(f"{pod.name}'s Envoy exited with {pod.envoy.returncode}:\n{pod.log()}")
            if not pod.admin.path.exists() or pod.admin.get("/ready").strip() != "LIVE":
                return False
            dump = pod.admin.config_dump()
            listeners = {
                lst["name"] for lst in dump["ListenersConfigDump"].get("dynamic_listeners", []) if "active_state" in lst
            }
            return "virtualInbound" in listeners and not dump["ClustersConfigDump"].get("dynamic_warming_clusters")

        try:
            wait_for(ready, timeout=timeout, what=f"{pod.name}'s sidecar")
        except AssertionError as e:
            planes = [self.plane, *self.planes.values()]
            logs = "\n".join(f"control plane {p.root.name}:\n{p.log()}" for p in planes if p.starts)
            raise AssertionError(f"{e}\n{pod.log()}\n{logs}") from None

    def wait_endpoints(self, pod: Pod, cluster: str, ips: list[str], timeout: float = 15) -> None:
        want = sorted(f"{ip}:9080" for ip in ips)
        wait_for(
            lambda: pod.admin.healthy_endpoints(cluster) == want,
            timeout=timeout,
            what=f"{pod.name}: {cluster} endpoints {want}",
        )

    def wait_synced(
        self, pods: list[Pod] | None = None, timeout: float = 15, *, plane: ControlPlane | None = None
    ) -> dict[str, dict[str, str]]:
        ids = [p.node_id for p in (pods if pods is not None else self.pods.values())]
        plane = plane or self.plane
        return wait_for(lambda: plane.synced(ids), timeout=timeout, what=f"{ids} all SYNCED in /debug/syncz")

    def traffic(self, count: int, rate: float = 20, *, source: str = "frontend", url: str | None = None) -> Traffic:
        return Traffic(self, self.pods[source], url or f"http://{BACKEND_VIP}:9080/", count, rate)

    def edit_mesh(self, text: str) -> None:
        """Replace the mesh file atomically (the watcher never sees half a file)."""
        tmp = self.mesh_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.mesh_file)


BACKEND_CLUSTER = "outbound|9080||backend.demo.svc.cluster.local"


@contextlib.contextmanager
def standard_lab(*, backends: int = 2, **kwargs: Any) -> Iterator[MeshLab]:
    """The control plane, a frontend and `backends` backends, all synced, with the frontend's
    sidecar holding every backend as a healthy endpoint."""
    with MeshLab(**kwargs) as lab:
        lab.plane.start()
        with ThreadPoolExecutor(4) as pool:  # each pod is a few CLI runs: in parallel
            front_job = pool.submit(
                lab.add_pod, "frontend", {"app": "frontend"}, service_account="frontend", app_port=8080
            )
            jobs = [
                pool.submit(lab.add_pod, f"backend-{i}", {"app": "backend"}, service_account="backend")
                for i in range(1, backends + 1)
            ]
            front, backs = front_job.result(), [j.result() for j in jobs]
        for pod in (front, *backs):
            lab.wait_sidecar(pod)
        lab.wait_endpoints(front, BACKEND_CLUSTER, [b.ip for b in backs])
        lab.wait_synced()
        yield lab


@dataclass
class Sampler:
    """Samples `probe` every `interval` seconds in a thread until stopped; keeps (time, value)."""

    probe: Callable[[], Any]
    interval: float = 0.25
    samples: list[tuple[float, Any]] = field(default_factory=list)

    def __enter__(self) -> Sampler:
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.probe()
            except Exception as e:
                value = f"error: {e!r}"
            self.samples.append((round(time.monotonic() - self._start, 2), value))
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
