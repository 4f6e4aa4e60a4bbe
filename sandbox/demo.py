"""`meshctl demo`: the control plane with a mesh file and real sidecar'd pods, with live traffic.

Starts the control plane on this host, a backend and a frontend pod on a container engine
(each written as a plain Kubernetes Pod and injected as the webhook injects it: app,
mesh-init, Envoy sidecar), and sends a request from the frontend's app to the
backend every second. It prints, as it goes, each request's path with the identities
that mTLS verified, and the connected proxies with their pushes and ACKs. Ctrl-C (or
--duration) stops it and removes every container and the network it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.errors import ConfigError
from meshplane.controlplane.settings import Settings

from .engine import Engine, open_engine
from .pods import MintToken, Pod, PodRunner, app_pod, remove_leftovers

log = logging.getLogger("meshplane.demo")

PREFIX = "mp-demo"
PROXY_GID = 1337
# Run inside the frontend pod by its app's user: a plain HTTP call, which its sidecar captures.
CALL = """
import json, sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())
except Exception as e:
    print(json.dumps({"error": repr(e)}))
"""


async def run(settings: Settings, *, duration: float, interval: float = 1.0) -> None:
    if os.geteuid() != 0:
        raise ConfigError("the demo starts containers and applies iptables rules in them: run it as root")
    model_services = {"backend", "frontend"}
    runtime = Path(tempfile.mkdtemp(prefix="meshplane-demo-"))
    os.chmod(runtime, 0o755)  # the sidecars (uid 1337) reach their sockets through it
    engine: Engine | None = None
    runner: PodRunner | None = None
    plane = ControlPlane(_with_runtime(settings, runtime))
    try:
        print("starting the control plane and the container engine (the first run builds the sidecar image)...")
        await plane.start()
        missing = model_services - {s.name for s in plane.registry.model.services}
        if missing:
            raise ConfigError(
                f"{settings.mesh_file} has no service named {', '.join(sorted(missing))}: the demo "
                "runs a frontend calling a backend (see examples/mesh.yaml)"
            )
        engine = await asyncio.to_thread(open_engine, runtime)
        await asyncio.to_thread(remove_leftovers, engine.client, PREFIX)
        backend = next(s for s in plane.registry.model.services if s.name == "backend")
        hosts = _hosts(backend.name, backend.namespace, backend.addresses)
        runner = await asyncio.to_thread(PodRunner, engine, runtime, prefix=PREFIX, hosts=hosts, tokens=_tokens(plane))
        manifests = [
            app_pod(
                "backend-1",
                namespace=backend.namespace,
                service_account="backend",
                labels={"app": "backend"},
                http=(9080,),
                tcp=(9090,),
            ),
            app_pod(
                "frontend-1",
                namespace=backend.namespace,
                service_account="frontend",
                labels={"app": "frontend"},
                http=(8080,),
            ),
        ]
        pods = [await asyncio.to_thread(runner.start, m) for m in manifests]
        print(
            f"pods: {', '.join(f'{p.name} {p.ip}' for p in pods)}; engine: {engine.kind}; "
            f"control plane admin: http://{settings.bind}:{plane.admin_port}/debug/proxies"
        )
        await _traffic(plane, pods[1], duration, interval)
    finally:
        print("stopping: removing the pods, the network and the control plane...")
        if runner:
            await asyncio.to_thread(runner.close)
        await plane.stop()
        if engine:
            engine.close()
        shutil.rmtree(runtime, ignore_errors=True)
        print("stopped; nothing left behind")


async def _traffic(plane: ControlPlane, frontend: Pod, duration: float, interval: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    deadline = time.monotonic() + duration if duration > 0 else None
    sent = failed = 0
    last_status = 0.0
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        code, out = await asyncio.to_thread(frontend.exec, ["python3", "-c", CALL, "http://backend:9080/"])
        sent += 1
        answer: dict[str, Any] = _json(out)
        if code != 0 or "error" in answer:
            failed += 1
            print(f"request {sent}: frontend-1 -> backend:9080 FAILED: {answer.get('error', out.strip())}")
        else:
            xfcc = _xfcc(answer.get("headers", {}).get("x-forwarded-client-cert", ""))
            print(
                f"request {sent}: frontend-1 app -> [frontend-1 sidecar, {xfcc.get('URI', '?')}] =mTLS=> "
                f"[{answer.get('pod')} sidecar, {xfcc.get('By', '?')}] -> {answer.get('pod')} app "
                f"(app sees caller {answer.get('peer')})"
            )
        if time.monotonic() - last_status > 5:
            last_status = time.monotonic()
            _status(plane, sent, failed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    _status(plane, sent, failed)


def _status(plane: ControlPlane, sent: int, failed: int) -> None:
    proxies = plane.xds.describe()
    pushes = sum(s.value for m in plane.metrics.pushes.collect() for s in m.samples if s.name.endswith("_total"))
    print(f"--- {len(proxies)} proxies connected, {pushes:.0f} xDS responses sent; {sent} requests, {failed} failed")
    for p in proxies:
        types = p["types"]
        assert isinstance(types, dict)
        acked = " ".join(
            f"{t}={'ok' if v['acked_version'] == v['sent_version'] else 'pending'}" for t, v in sorted(types.items())
        )
        print(f"    {p['id']}  {p['identity']}  {acked}")


def _xfcc(header: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in header.split(";") if "=" in part)


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"error": text.strip()[-300:]}
    return value if isinstance(value, dict) else {"error": text.strip()}


def _hosts(name: str, namespace: str, addresses: tuple[str, ...]) -> dict[str, str]:
    if not addresses:
        raise ConfigError(f"service {name} needs a virtual IP (addresses) for the demo's pods to resolve it")
    return {host: addresses[0] for host in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc.cluster.local")}


def _with_runtime(settings: Settings, runtime: Path) -> Settings:
    # The sidecars (gid 1337) reach the socket; they prove who they are with CA-minted tokens.
    return replace(
        settings, xds_socket=runtime / "xds.sock", xds_socket_group=PROXY_GID, xds_tls_port=0, ca_dir=runtime / "ca"
    )


def _tokens(plane: ControlPlane) -> MintToken:
    """The pods' projected service-account tokens, minted by the mesh CA (as `meshctl token`)."""

    def mint(namespace: str, service_account: str, audience: str, seconds: int) -> str:
        return plane.ca.mint_token(namespace, service_account, dt.timedelta(seconds=seconds), audiences=(audience,))

    return mint
