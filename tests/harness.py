"""Real Envoy for tests: processes started from a bootstrap (always stopped by PID), and the admin API
of any Envoy, over TCP on 127.0.0.1 or over a unix socket (sidecars in pods)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from meshplane.controlplane.settings import Settings
from meshplane.sandbox import engine

T = TypeVar("T")


def envoy_binary() -> str:
    return str(engine.envoy_binary())


def plane_settings(**settings: Any) -> Settings:
    """Settings of an in-process control plane in a test: loopback, free ports, stopping at once;
    `settings` (its `ca_dir` at least) add to these or override them."""
    values: dict[str, Any] = dict(
        bind="127.0.0.1",
        xds_tls_port=0,
        admin_port=0,
        webhook_port=0,
        shutdown_delay=0,
        shutdown_grace=1,
    )
    values.update(settings)
    return Settings(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(
    check: Callable[[], Awaitable[T | None]], *, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except (aiohttp.ClientError, OSError, KeyError, StopIteration, TimeoutError) as e:
            last_error = e
        await asyncio.sleep(interval)
    error = f" (last error: {last_error!r})" if last_error else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{error}")


class EnvoyAdmin:
    """Envoy's admin API over TCP on 127.0.0.1:`port`, or over the unix socket `socket`."""

    def __init__(self, *, port: int = 0, socket: Path | None = None) -> None:
        self.admin_port, self.socket = port, socket

    async def get(self, path: str) -> str:
        connector = aiohttp.UnixConnector(path=str(self.socket)) if self.socket else None
        base = "http://envoy" if self.socket else f"http://127.0.0.1:{self.admin_port}"
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get(f"{base}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            r.raise_for_status()
            return await r.text()

    async def config_dump(self) -> dict[str, Any]:
        doc = json.loads(await self.get("/config_dump?include_eds"))
        return {c["@type"].rsplit(".", 1)[-1]: c for c in doc["configs"]}

    async def stats(self) -> dict[str, int]:
        out = {}
        for line in (await self.get("/stats")).splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    async def clusters(self) -> dict[str, dict[str, Any]]:
        dump = await self.config_dump()
        return {c["cluster"]["name"]: c for c in dump["ClustersConfigDump"].get("dynamic_active_clusters", [])}

    async def warming(self) -> list[str]:
        dump = await self.config_dump()
        return [c["cluster"]["name"] for c in dump["ClustersConfigDump"].get("dynamic_warming_clusters", [])]


class Envoy(EnvoyAdmin):
    """One Envoy process. Use as `async with Envoy(...) as envoy:`; it is killed by PID on exit."""

    def __init__(self, bootstrap: Path, admin_port: int, log: Path) -> None:
        super().__init__(port=admin_port)
        self.bootstrap, self.log = bootstrap, log
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Envoy:
        self._log = self.log.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            envoy_binary(), "-c", str(self.bootstrap), "--disable-hot-restart", "-l", "warning",
            "--drain-time-s", "1", "--parent-shutdown-time-s", "2",
            stdout=self._log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        await wait_until(self._alive_and_admin, timeout=15, what=f"Envoy admin on {self.admin_port}")
        return self

    async def _alive_and_admin(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"Envoy exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        await self.get("/server_info")
        return True

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()


async def admin_json(port: int, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        return await r.json() if r.content_type == "application/json" else await r.text()


def _mesh_root() -> str:
    """A CA certificate to inject as the mesh's roots where no control plane runs (rendering only)."""

    from meshplane.controlplane.ca import CertificateAuthority

    with tempfile.TemporaryDirectory() as tmp:
        return CertificateAuthority(Path(tmp) / "ca", "cluster.local").trust_bundle_pem.decode()


MESH_ROOT = _mesh_root()
"""PEM roots for `InjectionConfig(xds_ca=...)` in tests that render sidecars without a control plane."""


def endpoints(dump: dict[str, Any], cluster: str) -> list[str]:
    """`address:port` of each endpoint Envoy holds for `cluster`, from `EnvoyAdmin.config_dump()`."""
    for cfg in dump["EndpointsConfigDump"].get("dynamic_endpoint_configs", []):
        cla = cfg["endpoint_config"]
        if cla["cluster_name"] == cluster:
            return sorted(
                f"{e['endpoint']['address']['socket_address']['address']}:"
                f"{e['endpoint']['address']['socket_address']['port_value']}"
                for group in cla.get("endpoints", [])
                for e in group.get("lb_endpoints", [])
            )
    raise KeyError(cluster)
