"""`meshctl serve` in a process of its own for the benchmarks, so load and server never share a core's GIL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Server:
    work: Path
    mesh_file: Path
    xds_port: int
    admin_port: int
    webhook_port: int
    pid: int

    @property
    def root_cert(self) -> Path:
        return self.work / "ca" / "root-cert.pem"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def meshctl_serve(mesh: str) -> AsyncIterator[Server]:
    """Start `meshctl serve` on loopback with `mesh` as its mesh file; stop it (by process group) after."""
    work = Path(tempfile.mkdtemp(prefix="meshplane-bench-"))
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(mesh)
    ports = {"xds": free_port(), "admin": free_port(), "webhook": free_port()}
    argv = [
        sys.executable,
        "-m",
        "meshplane.controlplane.cli",
        "--log-level",
        "warning",
        "serve",
        "--mesh",
        str(mesh_file),
        "--bind",
        "127.0.0.1",
        "--ca-dir",
        str(work / "ca"),
    ]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    process = subprocess.Popen(argv, cwd=TOP, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not all(_listening(p) for p in ports.values()):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("meshctl serve did not start")
            await asyncio.sleep(0.1)
        yield Server(work, mesh_file, ports["xds"], ports["admin"], ports["webhook"], process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
