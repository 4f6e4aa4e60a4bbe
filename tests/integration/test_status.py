"""`meshctl proxy-status` and `meshctl explain PROXY_ID` through the real CLI, against a real Envoy."""

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from meshplane.controlplane.app import ControlPlane
from tests.harness import Envoy, wait_until

from .conftest import MESH, write_bootstrap
from .test_xds_envoy import NackOnDemand, synced

MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli"]
TYPES = ("CDS", "EDS", "LDS", "RDS", "SDS")
BACKEND_ID = "sidecar~127.0.0.1~backend-1.demo~demo.svc.cluster.local"


async def meshctl(*args: str) -> tuple[int, str, str]:
    """Run meshctl without blocking the event loop the control plane runs on."""
    proc = await asyncio.create_subprocess_exec(
        *MESHCTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status_json(plane: ControlPlane, *extra: str) -> Any:
    code, out, err = await meshctl(
        "proxy-status", "--admin", f"http://127.0.0.1:{plane.admin_port}", "-o", "json", *extra
    )
    assert code == 0, err
    return json.loads(out)


async def test_a_real_envoy_is_synced(plane: ControlPlane, envoy: Envoy) -> None:
    await synced(envoy, plane)
    doc = await status_json(plane)
    (proxy,) = doc["proxies"]
    assert proxy["id"] == BACKEND_ID
    assert proxy["identity"] == "spiffe://cluster.local/ns/demo/sa/backend"
    assert {k: proxy["types"][k]["state"] for k in TYPES} == dict.fromkeys(TYPES, "SYNCED")
    assert proxy["types"]["SDS"]["resources"] == 2  # default and ROOTCA

    code, table, _ = await meshctl("proxy-status", "--admin", f"http://127.0.0.1:{plane.admin_port}")
    header, row = table.splitlines()
    assert header.split()[:3] == ["NAME", "IDENTITY", "REPLICA"]
    assert row.startswith(BACKEND_ID) and row.count("SYNCED (") == 5 and doc["replica"] in row

    code, detail, _ = await meshctl("proxy-status", BACKEND_ID, "--admin", f"http://127.0.0.1:{plane.admin_port}")
    assert code == 0 and f"Proxy:      {BACKEND_ID}" in detail and "NACKED" not in detail

    code, explained, err = await meshctl("explain", BACKEND_ID, "--admin", f"http://127.0.0.1:{plane.admin_port}")
    assert code == 0, err
    assert "identity: spiffe://cluster.local/ns/demo/sa/backend" in explained
    assert "9080   HTTP      STRICT" in explained
    assert "outbound|9090||backend.demo.svc.cluster.local" in explained


async def test_a_rejected_push_shows_as_nacked_with_envoys_error(
    plane_factory: Any, tmp_path: Path, mesh_file: Path
) -> None:
    plane = await plane_factory(config=NackOnDemand)
    path, admin = write_bootstrap(tmp_path, plane)
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
        await synced(envoy, plane)
        before = (await status_json(plane))["proxies"][0]["types"]["CDS"]
        mesh_file.write_text(
            MESH.replace(
                "workloads:\n", "  - {name: nack-me, namespace: demo, ports: [{port: 7777, name: http}]}\nworkloads:\n"
            )
        )

        async def nacked() -> Any:
            cds = (await status_json(plane))["proxies"][0]["types"]["CDS"]
            return cds if cds["state"] == "NACKED" else None

        cds = await wait_until(nacked, timeout=10, what="proxy-status to show the NACK")
        assert cds["nack"]["accepted_version"] == before["sent_version"]  # what Envoy still runs
        assert cds["nack"]["rejected_version"] == cds["sent_version"] != before["sent_version"]
        assert "nack-me" in cds["nack"]["resources"] and "Expected positive duration" in cds["nack"]["message"]

        code, table, _ = await meshctl("proxy-status", "--admin", f"http://127.0.0.1:{plane.admin_port}")
        assert code == 0 and "NACKED (" in table
        code, detail, _ = await meshctl("proxy-status", BACKEND_ID, "--admin", f"http://127.0.0.1:{plane.admin_port}")
        assert f"keeps running version {before['sent_version']}" in detail
        assert "nack-me" in detail and "Expected positive duration" in detail

        mesh_file.write_text(MESH)

        async def recovered() -> bool:
            return (await status_json(plane))["proxies"][0]["types"]["CDS"]["state"] == "SYNCED"

        await wait_until(recovered, timeout=10, what="the fix to be ACKed")


async def test_unknown_proxy_and_unreachable_admin_are_clear_errors(plane: ControlPlane) -> None:
    code, _, err = await meshctl("proxy-status", "nobody", "--admin", f"http://127.0.0.1:{plane.admin_port}")
    assert code == 2 and "no connected proxy 'nobody'" in err
    code, _, err = await meshctl("explain", "nobody", "--admin", f"http://127.0.0.1:{plane.admin_port}")
    assert code == 2 and "no connected proxy 'nobody'" in err
    code, _, err = await meshctl("proxy-status", "--admin", "http://127.0.0.1:1")
    assert code == 1 and "cannot reach the control plane's admin API at http://127.0.0.1:1" in err
    assert "--admin-port" in err
