"""`meshctl` as a user runs it: real processes, real Envoy."""

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from tests.harness import Envoy, admin_json, envoy_binary, free_port, wait_until

from .conftest import MESH

MESHCTL = [sys.executable, "-m", "meshplane.controlplane.cli"]


def test_bootstrap_command_output_is_valid_for_envoy(tmp_path: Path) -> None:
    for fmt in ("json", "yaml"):
        out = tmp_path / f"b.{fmt}"
        subprocess.run(
            [
                *MESHCTL,
                "bootstrap",
                "--xds-address",
                "meshplane.mesh-system.svc:15010",
                "--name",
                "web-0",
                "--namespace",
                "shop",
                "--service-account",
                "web",
                "--ip",
                "10.1.2.3",
                "--label",
                "app=web",
                "--label",
                "version=v1",
                "--format",
                fmt,
                "-o",
                str(out),
            ],
            check=True,
        )
        check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(out)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["node"]["id"] == "sidecar~10.1.2.3~web-0.shop~shop.svc.cluster.local"
    assert doc["node"]["metadata"]["LABELS"] == {"app": "web", "version": "v1"}
    assert doc["admin"]["address"]["socketAddress"] == {"address": "127.0.0.1", "portValue": 15000}
    xds = next(c for c in doc["staticResources"]["clusters"] if c["name"] == "xds-grpc")
    assert xds["type"] == "STRICT_DNS"
    assert {lst["address"]["socketAddress"]["portValue"] for lst in doc["staticResources"]["listeners"]} == {
        15090,
        15021,
        15020,
    }


def test_bootstrap_bad_input_is_a_clear_error() -> None:
    result = subprocess.run(
        [*MESHCTL, "bootstrap", "--xds-address", "nohostport", "--name", "w", "--namespace", "n", "--ip", "1.2.3.4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "must be HOST:PORT" in result.stderr
    result = subprocess.run(
        [*MESHCTL, "bootstrap", "--xds-address", "h:1", "--name", "w", "--namespace", "n", "--ip", "not-an-ip"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "is not an IP address" in result.stderr


def test_serve_refuses_a_broken_mesh_file(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  - name: x\n    ports: [{port: nope}]\n")
    result = subprocess.run(
        [
            *MESHCTL,
            "serve",
            "--mesh",
            str(mesh),
            "--ca-dir",
            str(tmp_path / "ca"),
            "--xds-port",
            "0",
            "--admin-port",
            "0",
            "--webhook-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "mesh.yaml:3: services[0].ports[0].port: must be an integer from 1 to 65535, got 'nope'" in result.stderr


async def test_envoy_with_meshctl_bootstrap_connects_to_meshctl_serve(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    xds, admin, envoy_admin = free_port(), free_port(), free_port()
    log = (tmp_path / "serve.log").open("wb")
    serve = await asyncio.create_subprocess_exec(
        *MESHCTL,
        "serve",
        "--mesh",
        str(mesh),
        "--ca-dir",
        str(tmp_path / "ca"),
        "--state-dir",
        str(tmp_path / "state"),
        "--bind",
        "127.0.0.1",
        "--xds-tls-port",
        str(xds),
        "--admin-port",
        str(admin),
        "--webhook-port",
        "0",
        "--shutdown-delay",
        "0s",
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        await wait_until(lambda: admin_json(admin, "/healthz"), timeout=20, what="meshctl serve")
        # The documented flow: a token for the workload, then a bootstrap that uses it over TLS.
        token = await asyncio.create_subprocess_exec(
            *MESHCTL,
            "token",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--namespace",
            "demo",
            "--service-account",
            "backend",
            "--ttl",
            "1h",
            "-o",
            str(tmp_path / "token"),
        )
        assert await token.wait() == 0
        assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
        bootstrap = await asyncio.create_subprocess_exec(
            *MESHCTL,
            "bootstrap",
            "--token-file",
            str(tmp_path / "token"),
            "--xds-ca",
            str(tmp_path / "ca" / "root-cert.pem"),
            "--xds-address",
            f"127.0.0.1:{xds}",
            "--name",
            "backend-1",
            "--namespace",
            "demo",
            "--service-account",
            "backend",
            "--ip",
            "127.0.0.1",
            "--label",
            "app=backend",
            "--admin-port",
            str(envoy_admin),
            "-o",
            str(tmp_path / "b.json"),
        )
        assert await bootstrap.wait() == 0
        # The stats and health listeners need free ports of their own when tests run beside other Envoys.
        doc = json.loads((tmp_path / "b.json").read_text())
        for listener in doc["staticResources"]["listeners"]:
            listener["address"]["socketAddress"]["portValue"] = free_port()
        (tmp_path / "b.json").write_text(json.dumps(doc))
        async with Envoy(tmp_path / "b.json", envoy_admin, tmp_path / "envoy.log") as envoy:

            async def connected() -> bool:
                return (await envoy.stats()).get("control_plane.connected_state") == 1 and bool(
                    (await envoy.clusters()).get("outbound|9080||backend.demo.svc.cluster.local")
                )

            await wait_until(connected, timeout=10, what="Envoy to connect and get clusters")
            proxies = await admin_json(admin, "/debug/proxies")
            assert [p["identity"] for p in proxies] == ["spiffe://cluster.local/ns/demo/sa/backend"]
            metrics = await admin_json(admin, "/metrics")
            assert "meshplane_xds_connected_proxies 1.0" in metrics
            assert 'meshplane_xds_acks_total{type="CDS"}' in metrics

            async def all_acked() -> bool:
                return "meshplane_xds_unacked_streams 0.0" in await admin_json(admin, "/metrics")

            await wait_until(all_acked, timeout=10, what="the metric of streams behind to fall to 0")
        os.killpg(serve.pid, signal.SIGINT)
        assert await asyncio.wait_for(serve.wait(), 10) == 0
    finally:
        if serve.returncode is None:
            os.killpg(serve.pid, signal.SIGKILL)
            await serve.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "proxy sidecar~127.0.0.1~backend-1.demo~demo.svc.cluster.local connected" in text
    assert "shutting down" in text and "Traceback" not in text


def test_webhook_config_carries_the_mesh_ca(tmp_path: Path) -> None:
    import base64

    import yaml

    done = subprocess.run(
        [
            *MESHCTL,
            "webhook-config",
            "--create",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--service",
            "meshplane.istio-system",
            "--failure-policy",
            "Ignore",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load(done.stdout)
    assert doc["kind"] == "MutatingWebhookConfiguration"
    root = (tmp_path / "ca" / "root-cert.pem").read_bytes()
    for hook in doc["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == root
        assert hook["clientConfig"]["service"] == {
            "name": "meshplane",
            "namespace": "istio-system",
            "path": "/inject",
            "port": 443,
        }
        assert (
            hook["failurePolicy"],
            hook["sideEffects"],
            hook["admissionReviewVersions"],
            hook["reinvocationPolicy"],
        ) == ("Ignore", "None", ["v1"], "IfNeeded")
    selectors = {h["name"].split(".")[0]: h["namespaceSelector"] for h in doc["webhooks"]}
    assert selectors["namespace"] == {"matchLabels": {"istio-injection": "enabled"}}
    bad = subprocess.run(
        [*MESHCTL, "webhook-config", "--ca-dir", str(tmp_path / "ca"), "--service", "nodot"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "must be NAME.NAMESPACE" in bad.stderr


def test_webhook_config_never_creates_a_ca_by_mistake(tmp_path: Path) -> None:
    wrong = tmp_path / "typo" / "ca"
    done = subprocess.run([*MESHCTL, "webhook-config", "--ca-dir", str(wrong)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert f"no mesh CA in {wrong}" in done.stderr
    assert f"meshctl serve --ca-dir {wrong}" in done.stderr and "--create" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "typo").exists()


def test_webhook_config_uses_an_existing_ca_or_creates_one_when_asked(tmp_path: Path) -> None:
    import base64

    import yaml

    def bundle(*flags: str) -> bytes:
        done = subprocess.run(
            [*MESHCTL, "webhook-config", "--ca-dir", str(tmp_path / "ca"), *flags], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return base64.b64decode(yaml.safe_load(done.stdout)["webhooks"][0]["clientConfig"]["caBundle"])

    created = bundle("--create")
    assert created == (tmp_path / "ca" / "root-cert.pem").read_bytes()
    assert bundle() == bundle("--create") == created


def test_webhook_config_refuses_a_root_key_others_can_read(tmp_path: Path) -> None:
    subprocess.run([*MESHCTL, "webhook-config", "--create", "--ca-dir", str(tmp_path)], capture_output=True, check=True)
    (tmp_path / "root-key.pem").chmod(0o644)
    done = subprocess.run([*MESHCTL, "webhook-config", "--ca-dir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and f"chmod 600 {tmp_path / 'root-key.pem'}" in done.stderr
    assert "Traceback" not in done.stderr


def test_bootstrap_ports_can_move_so_that_sidecars_share_a_host() -> None:
    argv = [*MESHCTL, "bootstrap", "--xds-address", "127.0.0.1:15012", "--name", "a", "--namespace", "b"]
    argv += ["--ip", "10.0.0.1", "--stats-port", "19090", "--health-port", "19021", "--status-port", "0"]
    doc = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    ports = {lst["name"]: lst["address"]["socketAddress"]["portValue"] for lst in doc["staticResources"]["listeners"]}
    assert ports == {"prometheus": 19090, "health": 19021}  # status 0: no status listener
