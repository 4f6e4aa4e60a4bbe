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
from typing import Any

TOP = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    work: Path
    mesh_file: Path
    xds_port: int
    admin_port: int
    webhook_port: int
    process: subprocess.Popen[bytes]
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def root_cert(self) -> Path:
        return self.work / "ca" / "root-cert.pem"

    async def restart(self) -> float:
        """Stop the server as Kubernetes would (SIGTERM: it drains, then closes every stream), start it
        again on the same ports, CA and mesh file; returns the wall-clock time the old one exited."""
        os.killpg(self.process.pid, signal.SIGTERM)
        await asyncio.to_thread(self.process.wait, 30)
        exited = time.time()
        self.process = subprocess.Popen(self.argv, cwd=TOP, start_new_session=True)
        await _until_listening(self.process, [self.xds_port, self.admin_port, self.webhook_port])
        return exited


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def meshctl_serve(mesh: str, *extra: str) -> AsyncIterator[Server]:
    """Start `meshctl serve` on loopback with `mesh` as its mesh file and `extra` flags; stop it (by
    process group) after."""
    work = Path(tempfile.mkdtemp(prefix="meshplane-bench-"))
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(mesh)
    # Every port its own free one, so a benchmark never meets a server someone else runs.
    ports = {"xds": free_port(), "xds-tls": free_port(), "admin": free_port(), "webhook": free_port()}
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
        "--state-dir",  # its own: registrations must not leak into the next run (or the user's own)
        str(work / "state"),
        # The simulated sidecars speak plaintext on loopback and say who they are in their node
        # metadata, as the insecure local-experiment mode allows; no tokens, no TLS on their streams.
        "--insecure-trust-node-metadata",
    ]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    argv += extra
    server = Server(
        work,
        mesh_file,
        ports["xds"],
        ports["admin"],
        ports["webhook"],
        subprocess.Popen(argv, cwd=TOP, start_new_session=True),
        argv,
    )
    try:
        await _until_listening(server.process, list(ports.values()))
        yield server
    finally:
        process = server.process  # the latest, if it was restarted
        with contextlib.suppress(ProcessLookupError):  # already gone: it failed, and said why
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


async def _until_listening(process: subprocess.Popen[bytes], ports: list[int], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not all(_listening(p) for p in ports):
        if process.poll() is not None:
            raise RuntimeError(f"meshctl serve exited with status {process.returncode} (its output is above)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"meshctl serve did not listen on its ports within {within:.0f} s")
        await asyncio.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How busy the machine was with processes other than this one and the server, over a span.

    The machine is shared and noisy; each result line says how much of its CPU others took
    meanwhile (in % of all cores), so a bad figure can be told from a busy neighbour.
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(cpu[:8]) - cpu[3] - cpu[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        return time.monotonic(), busy, cpu_seconds(self.server_pid) + time.process_time()

    def percent(self) -> float:
        t1, busy1, ours1 = self._sample()
        t0, busy0, ours0 = self._start
        others = (busy1 - busy0) - (ours1 - ours0)
        return max(0.0, 100 * others / ((t1 - t0) * (os.cpu_count() or 1)))


def first_string(value: bytes) -> str:
    """Field 1 of a serialized message (a ClusterLoadAssignment's cluster_name) without parsing it all."""
    if not value or value[0] != 0x0A:
        return ""
    length, shift, i = 0, 0, 1
    while True:
        b = value[i]
        length |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            break
        shift += 7
    return value[i : i + length].decode()


async def requests_with_node(queue: Any, node: Any) -> Any:
    """A simulated sidecar's request stream: what it queues, the node on the first message only (as Envoy
    sends it with set_node_on_first_message_only); None in the queue ends it."""
    first = True
    while (req := await queue.get()) is not None:
        if first:
            req.node.CopyFrom(node)
            first = False
        yield req
