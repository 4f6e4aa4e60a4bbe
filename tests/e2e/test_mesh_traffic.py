"""Real Envoy sidecars in containers intercept and encrypt traffic between pods.

Evidence comes from outside the apps: each Envoy's own stats and config, and what the
receiving app saw (the caller's address, and the identity header its sidecar added).
"""

import asyncio
import json
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


async def test_tcp_service_is_intercepted_and_encrypted(mesh: Mesh) -> None:
    frontend, backend = await two_pods(mesh)
    code, out = await mesh.exec(frontend, "sh", "-c", "echo ping | nc -w 3 backend 9090")
    assert code == 0 and out.splitlines() == ["backend-1 9090 127.0.0.6", "ping"], out
    a = await mesh.admin(frontend).stats()
    assert a[f"cluster.{BACKEND_TCP}.ssl.handshake"] >= 1 and a[f"cluster.{BACKEND_TCP}.upstream_cx_total"] >= 1
    assert (await mesh.admin(backend).stats())["listener.0.0.0.0_15006.ssl.handshake"] >= 1


async def test_scaling_up_reaches_callers_without_failed_requests(mesh: Mesh, tmp_path: Path) -> None:
    frontend, _ = await two_pods(mesh)
    # A bounded loop inside A's app: 150 requests, each with a 5 s timeout, one line per request.
    loop = """
import json, time, urllib.request
for _ in range(150):
    try:
        print(json.loads(urllib.request.urlopen("http://backend:9080/", timeout=5).read())["pod"], flush=True)
    except Exception as e:
        print(f"FAILED {e!r}", flush=True)
    time.sleep(0.05)
"""
    traffic = asyncio.create_task(mesh.exec(frontend, "python3", "-c", loop))
    await asyncio.sleep(1.5)
    await mesh.pod("backend-2", "backend", "backend", http=(9080,), tcp=(9090,))
    code, out = await asyncio.wait_for(traffic, 120)
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == 150 and not [ln for ln in lines if ln.startswith("FAILED")], out
    served = set(lines)
    assert served == {"backend-1", "backend-2"}, f"traffic did not follow the change: {served}"
    endpoints = [
        e["endpoint"]["address"]["socket_address"]["address"]
        for cfg in (await mesh.admin(frontend).config_dump())["EndpointsConfigDump"]["dynamic_endpoint_configs"]
        if cfg["endpoint_config"]["cluster_name"] == BACKEND_HTTP
        for group in cfg["endpoint_config"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert len(endpoints) == 2


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
