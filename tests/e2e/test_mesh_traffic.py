"""Real Envoy sidecars in containers intercept and encrypt traffic between pods.

Evidence comes from outside the apps: each Envoy's own stats and config, and what the
receiving app saw (the caller's address, and the identity header its sidecar added).
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from meshplane.sandbox.engine import Engine
from meshplane.sandbox.pods import Pod
from tests.harness import wait_until

from .conftest import MESH, Mesh

BACKEND_HTTP = "outbound|9080||backend.demo.svc.cluster.local"
BACKEND_TCP = "outbound|9090||backend.demo.svc.cluster.local"
FRONTEND_ID = "spiffe://cluster.local/ns/demo/sa/frontend"
BACKEND_ID = "spiffe://cluster.local/ns/demo/sa/backend"


async def two_pods(mesh: Mesh) -> tuple[Pod, Pod]:
    backend = await mesh.pod("backend-1", "backend", "backend", http=(9080,), tcp=(9090,))
    frontend = await mesh.pod("frontend-1", "frontend", "frontend", http=(8080,))
    return frontend, backend


# An HTTP client for inside a pod (the image's busybox wget crashes on errors instead of reporting them).
GET = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())
except Exception as e:
    print(f"FAILED {e!r}")
    sys.exit(1)
"""


async def call(mesh: Mesh, pod: Pod, url: str, timeout: float = 5) -> tuple[int, str]:
    return await mesh.exec(pod, "python3", "-c", GET, url, str(timeout))


async def get(mesh: Mesh, pod: Pod, url: str) -> dict[str, object]:
    code, out = await call(mesh, pod, url)
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


async def test_http_call_is_intercepted_and_mutually_authenticated(mesh: Mesh) -> None:
    frontend, backend = await two_pods(mesh)
    answer = await get(mesh, frontend, "http://backend:9080/hello")
    # (3) B's Envoy took the connection before the app: the app's caller is the proxy's 127.0.0.6.
    assert answer["pod"] == "backend-1" and answer["peer"] == "127.0.0.6"
    # (2) The hop was mTLS: B's Envoy verified A's certificate and says whose it was.
    xfcc = answer["headers"]["x-forwarded-client-cert"]  # type: ignore[index]
    assert f"URI={FRONTEND_ID}" in xfcc and f"By={BACKEND_ID}" in xfcc
    # (1) A's Envoy intercepted the plain call and sent it over TLS to B's endpoint.
    a = await mesh.admin(frontend).stats()
    assert a[f"cluster.{BACKEND_HTTP}.upstream_rq_200"] >= 1
    assert a[f"cluster.{BACKEND_HTTP}.ssl.handshake"] >= 1
    b = await mesh.admin(backend).stats()
    assert b["listener.0.0.0.0_15006.ssl.handshake"] >= 1
    assert b["cluster.inbound|9080||.upstream_cx_total"] >= 1


async def test_a_tproxy_pod_sees_its_caller_s_own_address_over_mtls(mesh: Mesh) -> None:
    # Injected as the webhook does for interceptionMode TPROXY: mesh-init with -m TPROXY, the proxy as
    # root with only NET_ADMIN, group 1337. The caller is the frontend pod itself, not 127.0.0.6.
    tproxy = {"sidecar.istio.io/interceptionMode": "TPROXY"}
    backend = await mesh.pod("backend-1", "backend", "backend", http=(9080,), annotations=tproxy)
    frontend = await mesh.pod("frontend-1", "frontend", "frontend", http=(8080,))
    answer = await get(mesh, frontend, "http://backend:9080/hello")
    assert answer["pod"] == "backend-1" and answer["peer"] == frontend.ip
    assert f"URI={FRONTEND_ID}" in answer["headers"]["x-forwarded-client-cert"]  # type: ignore[index]
    b = await mesh.admin(backend).stats()
    assert b["listener.0.0.0.0_15006.ssl.handshake"] >= 1 and b["cluster.inbound|9080||.upstream_cx_total"] >= 1


async def test_strict_rejects_plaintext_and_permissive_admits_it(mesh: Mesh) -> None:
    frontend, backend = await two_pods(mesh)
    outsider = await mesh.pod("outsider", "outsider", "default", http=(8080,), sidecar=False)
    code, out = await call(mesh, outsider, f"http://{backend.ip}:9080/", 3)
    assert code != 0, f"plaintext got through STRICT mTLS: {out}"
    assert (await mesh.admin(backend).stats())["listener.0.0.0.0_15006.no_filter_chain_match"] >= 1

    mesh.mesh_file.write_text(MESH.replace("mtls: STRICT", "mtls: PERMISSIVE"))

    async def admitted() -> dict[str, object] | None:
        code, out = await call(mesh, outsider, f"http://{backend.ip}:9080/", 3)
        return json.loads(out) if code == 0 else None

    answer = await wait_until(admitted, timeout=10, interval=0.3, what="PERMISSIVE to admit plaintext")
    assert answer["peer"] == "127.0.0.6"  # still through B's sidecar
    assert "x-forwarded-client-cert" not in answer["headers"]  # type: ignore[operator]
    # Mesh traffic is still mutually authenticated.
    meshed = await get(mesh, frontend, "http://backend:9080/")
    assert f"URI={FRONTEND_ID}" in meshed["headers"]["x-forwarded-client-cert"]  # type: ignore[index]


async def test_strict_covers_ports_the_pod_does_not_declare(mesh: Mesh) -> None:
    """Inbound capture is every port (Istio's `-b '*'`), not the declared ones: an app also listening on
    an undeclared port is not reachable in plaintext under STRICT."""
    backend = await mesh.pod(
        "backend-1",
        "backend",
        "backend",
        http=(9080,),
        command=["meshctl", "app", "--name", "backend-1", "--http", "9080", "--http", "7070"],
    )
    declared = [p["containerPort"] for p in backend.manifest["spec"]["containers"][0]["ports"]]
    assert declared == [9080]
    code, out = await mesh.exec(backend, "python3", "-c", GET, "http://127.0.0.1:7070/", "3")
    assert code == 0 and json.loads(out)["port"] == 7070, f"the app does not listen on 7070: {out}"
    outsider = await mesh.pod("outsider", "outsider", "default", http=(8080,), sidecar=False)
    before = (await mesh.admin(backend).stats()).get("listener.0.0.0.0_15006.no_filter_chain_match", 0)
    code, out = await call(mesh, outsider, f"http://{backend.ip}:7070/", 3)
    assert code != 0, f"plaintext reached an undeclared port under STRICT mTLS: {out}"
    # Refused by the sidecar (its inbound capture listener took the connection), not by a missing app.
    assert (await mesh.admin(backend).stats())["listener.0.0.0.0_15006.no_filter_chain_match"] > before


async def test_tcp_service_is_intercepted_and_encrypted(mesh: Mesh) -> None:
    frontend, backend = await two_pods(mesh)
    code, out = await mesh.exec(frontend, "sh", "-c", "echo ping | nc -w 3 backend 9090")
    assert code == 0 and out.splitlines() == ["backend-1 9090 127.0.0.6", "ping"], out
    a = await mesh.admin(frontend).stats()
    assert a[f"cluster.{BACKEND_TCP}.ssl.handshake"] >= 1 and a[f"cluster.{BACKEND_TCP}.upstream_cx_total"] >= 1
    assert (await mesh.admin(backend).stats())["listener.0.0.0.0_15006.ssl.handshake"] >= 1


async def endpoints(mesh: Mesh, pod: Pod, cluster: str = BACKEND_HTTP) -> list[str]:
    """The endpoint addresses `pod`'s Envoy holds for `cluster`, from its own config dump."""
    return sorted(
        e["endpoint"]["address"]["socket_address"]["address"]
        for cfg in (await mesh.admin(pod).config_dump())["EndpointsConfigDump"]["dynamic_endpoint_configs"]
        if cfg["endpoint_config"]["cluster_name"] == cluster
        for group in cfg["endpoint_config"].get("endpoints", [])
        for e in group.get("lb_endpoints", [])
    )


async def requests_to_backend(mesh: Mesh, pod: Pod) -> int:
    return int((await mesh.admin(pod).stats()).get(f"cluster.{BACKEND_HTTP}.upstream_rq_total", 0))


# A bounded loop inside A's app: at most 2000 requests and 120 s, each with a 5 s timeout, until the test
# creates STOP_TRAFFIC; one line per request: its wall-clock time and the pod that answered (or FAILED).
STOP_TRAFFIC = "/tmp/stop-traffic"
TRAFFIC = f"""
import json, os, time, urllib.request
end = time.monotonic() + 120
for _ in range(2000):
    if time.monotonic() > end or os.path.exists("{STOP_TRAFFIC}"):
        break
    try:
        pod = json.loads(urllib.request.urlopen("http://backend:9080/", timeout=5).read())["pod"]
    except Exception as e:
        pod = f"FAILED {{e!r}}"
    print(f"{{time.time():.3f}} {{pod}}", flush=True)
    time.sleep(0.05)
"""


async def test_scaling_up_and_down_follows_endpoints_without_failed_requests(mesh: Mesh) -> None:
    frontend, backend1 = await two_pods(mesh)
    traffic = asyncio.create_task(mesh.exec(frontend, "python3", "-c", TRAFFIC))
    try:
        await wait_until(at_least(lambda: requests_to_backend(mesh, frontend), 5), timeout=20, what="traffic to flow")
        # Up: a second backend joins while traffic flows.
        backend2 = await mesh.pod("backend-2", "backend", "backend", http=(9080,), tcp=(9090,))
        both = sorted([backend1.ip, backend2.ip])
        await wait_until(equal(lambda: endpoints(mesh, frontend), both), timeout=20, what="two endpoints")
        served_by_2 = await wait_until(
            at_least(lambda: _inbound_requests(mesh, backend2), 3), timeout=20, what="backend-2 to serve traffic"
        )
        up_done = time.time()
        # Down: backend-2 is terminated (its sidecar drains first) while traffic flows.
        removal = time.time()
        stopping = asyncio.create_task(asyncio.to_thread(mesh.runner.stop, backend2))
        await wait_until(equal(lambda: endpoints(mesh, frontend), [backend1.ip]), timeout=30, what="one endpoint")
        settled = time.time()
        await asyncio.wait_for(stopping, 60)
        # Some traffic after the change settled, then the loop is told to stop.
        after = await requests_to_backend(mesh, frontend)
        await wait_until(
            at_least(lambda: requests_to_backend(mesh, frontend), after + 20), timeout=20, what="traffic after"
        )
        stopped = await mesh.exec(frontend, "python3", "-c", f"open({STOP_TRAFFIC!r}, 'w').close()")
        assert stopped[0] == 0, stopped
        code, out = await asyncio.wait_for(traffic, 120)
    finally:
        if not traffic.done():
            traffic.cancel()
    assert code == 0, out[-2000:]
    lines = [ln.split(" ", 1) for ln in out.splitlines()]
    failed = [(float(t), what) for t, what in lines if what.startswith("FAILED")]
    assert not [f for f in failed if f[0] < up_done], f"requests failed while scaling up: {failed}"
    window = [f for f in failed if removal <= f[0] <= settled]
    assert not [f for f in failed if f[0] > settled], f"requests failed after the endpoints settled: {failed}"
    later = {what for t, what in lines if float(t) > settled + 0.5}
    assert later == {"backend-1"}, f"traffic after scale-down went to {later}"
    assert {"backend-1", "backend-2"} <= {what for _, what in lines}
    assert served_by_2 >= 3
    print(
        f"scale-down: endpoints settled {settled - removal:.1f}s after termination began; "
        f"{len(window)} of {sum(1 for t, _ in lines if removal <= float(t) <= settled)} requests in that window failed"
    )


async def _inbound_requests(mesh: Mesh, pod: Pod) -> int:
    return int((await mesh.admin(pod).stats()).get("cluster.inbound|9080||.upstream_rq_total", 0))


def at_least(read: Callable[[], Awaitable[int]], n: int) -> Callable[[], Awaitable[int | None]]:
    """A wait_until check: `read()` once it reaches `n`."""

    async def check() -> int | None:
        got = await read()
        return got if got >= n else None

    return check


def equal(read: Callable[[], Awaitable[list[str]]], wanted: list[str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await read() == wanted

    return check


# A user's app that takes its time: GET /slow?s=N answers after N seconds. On SIGTERM it stops accepting,
# finishes the requests in flight and exits, as a well-behaved app does.
SLOW_APP = """
import json, signal, socket, sys, threading, time, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name = socket.gethostname()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        time.sleep(float(q.get("s", ["0"])[0]))
        body = json.dumps({"pod": name, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = ThreadingHTTPServer(("0.0.0.0", 9080), H)
server.daemon_threads = False  # server_close() waits for the requests in flight
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
server.server_close()
"""


async def test_terminating_pod_drains_its_sidecar_so_in_flight_requests_finish(mesh: Mesh) -> None:
    """The injected preStop hook (`meshctl drain`) keeps the sidecar up while in-flight requests finish;
    without it Envoy exits on SIGTERM at once and cuts them."""
    frontend = await mesh.pod("frontend-1", "frontend", "frontend", http=(8080,))
    outcomes: dict[bool, tuple[int, str, float]] = {}
    for index, drain in enumerate((False, True)):
        name = f"backend-{index + 1}"
        backend = await mesh.pod(name, "backend", "backend", http=(9080,), command=["python3", "-c", SLOW_APP])
        hook = next(c for c in backend.manifest["spec"]["containers"] if c["name"] == "mesh-proxy")["lifecycle"]
        assert hook["preStop"]["exec"]["command"][:2] == ["meshctl", "drain"]
        await wait_until(equal(lambda: endpoints(mesh, frontend), [backend.ip]), timeout=20, what="its endpoint")
        request = asyncio.create_task(call(mesh, frontend, "http://backend:9080/slow?s=3", 20))
        # The request is in flight once the backend's sidecar has handed it to the app.
        await wait_until(at_least(lambda b=backend: _active(mesh, b), 1), timeout=10, what="the request in flight")
        began = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(mesh.runner.stop, backend, pre_stop=drain))
        code, out = await asyncio.wait_for(request, 30)
        outcomes[drain] = (code, out, time.monotonic() - began)
        await asyncio.wait_for(stopping, 60)
    code, out, _ = outcomes[False]
    assert code != 0, f"without the drain the in-flight request should have been cut: {out}"
    code, out, took = outcomes[True]
    assert code == 0 and json.loads(out)["pod"] == "backend-2", out
    print(f"drain: the in-flight request finished {took:.1f}s into the pod's termination")


async def _active(mesh: Mesh, pod: Pod) -> int:
    return int((await mesh.admin(pod).stats()).get("cluster.inbound|9080||.upstream_rq_active", 0))


def test_the_readme_demo_runs_and_cleans_up(engine: Engine) -> None:
    """`meshctl demo` as the README runs it (via make demo), for a few seconds."""
    import subprocess
    import sys

    top = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "meshplane.controlplane.cli", "demo", "--duration", "6s", "--admin-port", "0"],
        cwd=top,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    requests = [ln for ln in done.stdout.splitlines() if ln.startswith("request ")]
    assert requests and all("=mTLS=>" in ln for ln in requests), done.stdout
    assert "spiffe://cluster.local/ns/demo/sa/frontend" in requests[0]
    assert "2 proxies connected" in done.stdout and ", 0 failed" in done.stdout
    assert done.stdout.rstrip().endswith("stopped; nothing left behind")
    left = subprocess.run(
        ["podman", "ps", "-a", "--filter", "label=meshplane=mp-demo", "-q"], capture_output=True, text=True, check=False
    )
    assert left.stdout.strip() == ""
