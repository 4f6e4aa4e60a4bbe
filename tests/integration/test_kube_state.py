"""The state Meshplane keeps in Kubernetes, against the fake API server (tests/fakekube.py) with the
real `kubernetes` client: the CA root shared by every replica through a Secret (`--ca-secret`,
`kube.load_ca_secret`) and the webhook configuration's caBundle (`--webhook-configuration`,
`kube.patch_webhook_ca_bundle`, `ControlPlane._keep_webhook_ca_bundle`).

The control plane's own loop patches every 30 s; the tests that need several rounds run that same
loop (`_keep_webhook_ca_bundle`) with a short interval next to the running control plane.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from kubernetes import client

from meshplane.controlplane import kube as kubeapi
from meshplane.controlplane.ca import ROOT_CERT, ROOT_KEY, TRUST_BUNDLE, CertificateAuthority
from meshplane.controlplane.errors import ConfigError
from tests.fakekube import (
    MERGE_PATCH,
    ApiError,
    FakeKube,
    mutating_webhook_configuration,
    namespace,
)

from .test_kubernetes import start_plane

NS, NAME = "mesh-system", "meshplane-ca"
SECRET = f"/api/v1/namespaces/{NS}/secrets/{NAME}"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
WEBHOOK = "meshplane-sidecar-injector-default"
WEBHOOK_PATH = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOK}"
TRUST_DOMAIN = "cluster.local"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as k:
        k.create(namespace(NS))
        yield k


@pytest.fixture
def api(kube: FakeKube) -> Iterator[Any]:
    with kube.new_client() as api_client:
        yield api_client


def create_root(directory: Path) -> None:
    """What `ControlPlane.start` passes to `load_ca_secret`."""
    CertificateAuthority(directory, TRUST_DOMAIN)


def files(directory: Path) -> tuple[bytes, bytes]:
    return (directory / ROOT_CERT).read_bytes(), (directory / ROOT_KEY).read_bytes()


def secret_files(kube: FakeKube) -> tuple[bytes, bytes]:
    stored = kube.get("Secret", NAME, NS)
    assert stored is not None
    return tuple(base64.b64decode(stored["data"][f]) for f in (ROOT_CERT, ROOT_KEY))  # type: ignore[return-value]


def ca_bundles(kube: FakeKube) -> list[bytes]:
    """Every webhook's caBundle, decoded (b"" where none is set)."""
    stored = kube.get("MutatingWebhookConfiguration", WEBHOOK)
    assert stored is not None
    return [base64.b64decode(w["clientConfig"].get("caBundle", "")) for w in stored["webhooks"]]


def certificates(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle) if bundle else []


def in_threads(*calls: Callable[[], None]) -> list[BaseException | None]:
    """Run each call in a thread of its own; what each raised (None: returned)."""
    outcomes: list[BaseException | None] = [None] * len(calls)

    def run(i: int, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
        assert not t.is_alive(), "load_ca_secret did not return"
    return outcomes


async def eventually(check: Callable[[], object], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a plain predicate from async code (FakeKube's controls never block)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


# --- the fake server's new kinds, through the typed client -----------------------------------------


def test_secrets_and_webhook_configurations_have_the_api_shapes(kube: FakeKube, api: Any) -> None:
    core, admission = client.CoreV1Api(api), client.AdmissionregistrationV1Api(api)
    with pytest.raises(client.ApiException) as missing:
        core.read_namespaced_secret(NAME, NS)
    body = json.loads(missing.value.body)
    assert (missing.value.status, body["kind"], body["reason"]) == (404, "Status", "NotFound")
    assert body["message"] == f'secrets "{NAME}" not found'
    assert body["details"] == {"name": NAME, "kind": "secrets"}

    made = core.create_namespaced_secret(
        NS, client.V1Secret(metadata=client.V1ObjectMeta(name=NAME), data={"a": base64.b64encode(b"x").decode()})
    )
    assert (made.kind, made.type, made.metadata.namespace) == ("Secret", "Opaque", NS)
    assert made.metadata.uid and made.metadata.resource_version
    with pytest.raises(client.ApiException) as exists:
        core.create_namespaced_secret(NS, client.V1Secret(metadata=client.V1ObjectMeta(name=NAME)))
    body = json.loads(exists.value.body)
    assert (exists.value.status, body["reason"], body["details"]["kind"]) == (409, "AlreadyExists", "secrets")
    with pytest.raises(client.ApiException) as no_namespace:
        core.create_namespaced_secret("nowhere", client.V1Secret(metadata=client.V1ObjectMeta(name="s")))
    assert no_namespace.value.status == 404
    assert json.loads(no_namespace.value.body)["message"] == 'namespaces "nowhere" not found'
    with pytest.raises(client.ApiException) as not_base64:
        core.create_namespaced_secret(NS, client.V1Secret(metadata=client.V1ObjectMeta(name="b"), data={"a": "%%"}))
    assert not_base64.value.status == 400
    assert [s.metadata.name for s in core.list_namespaced_secret(NS).items] == [NAME]

    with pytest.raises(client.ApiException) as no_config:
        admission.read_mutating_webhook_configuration(WEBHOOK)
    body = json.loads(no_config.value.body)
    assert no_config.value.status == 404
    assert body["details"] == {
        "name": WEBHOOK,
        "group": "admissionregistration.k8s.io",
        "kind": body["details"]["kind"],
    }
    assert body["message"] == f'mutatingwebhookconfigurations.admissionregistration.k8s.io "{WEBHOOK}" not found'

    kube.create(mutating_webhook_configuration(WEBHOOK, webhooks=["a.meshplane.io", "b.meshplane.io"]))
    config = admission.read_mutating_webhook_configuration(WEBHOOK)
    assert config.metadata.generation == 1
    assert [w.client_config.ca_bundle for w in config.webhooks] == [None, None]
    assert config.webhooks[0].client_config.service.port == 443 and config.webhooks[0].timeout_seconds == 10
    patched = admission.patch_mutating_webhook_configuration(
        WEBHOOK, [{"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "Zm9v"}]
    )
    assert patched.webhooks[1].client_config.ca_bundle == "Zm9v" and patched.metadata.generation == 2
    with pytest.raises(client.ApiException) as bad_op:  # replace needs the key to exist
        admission.patch_mutating_webhook_configuration(
            WEBHOOK, [{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": "Zm9v"}]
        )
    assert bad_op.value.status == 422
    with pytest.raises(client.ApiException) as gone:
        admission.patch_mutating_webhook_configuration("other", [{"op": "test", "path": "/kind", "value": "x"}])
    assert gone.value.status == 404
    with pytest.raises(ApiError):
        kube.create(mutating_webhook_configuration(WEBHOOK))
    merged = json.loads(
        kubeapi._http(
            api, "PATCH", WEBHOOK_PATH, body={"metadata": {"labels": {"a": "b"}}}, content_type=MERGE_PATCH
        ).read()
    )
    assert merged["metadata"]["labels"] == {"a": "b"} and merged["metadata"]["generation"] == 2
    with pytest.raises(kubeapi.HttpError) as unsupported:
        kubeapi._http(api, "PATCH", WEBHOOK_PATH, body={"metadata": {}}, content_type="application/json")
    assert unsupported.value.status == 415

    # The test controls for staging races: a delayed answer, a failure of one method only.
    kube.fail("/api/v1/namespaces/mesh-system/secrets", 0, method="POST", delay=0.3)
    started = time.monotonic()
    core.create_namespaced_secret(NS, client.V1Secret(metadata=client.V1ObjectMeta(name="slow")))
    assert time.monotonic() - started >= 0.3
    kube.fail(f"/api/v1/namespaces/{NS}/secrets/slow", 503, method="GET")
    with pytest.raises(client.ApiException) as failed:
        core.read_namespaced_secret("slow", NS)
    assert failed.value.status == 503
    assert core.read_namespaced_secret("slow", NS).metadata.name == "slow"


# --- the CA root in a Secret ------------------------------------------------------------------------


def test_two_replicas_racing_on_an_empty_cluster_end_with_one_root(
    kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both replicas see 404 and both POST (the POSTs are held in the server until both have been
    sent): one Secret is created, the other replica gets 409 and takes the winner's root."""
    held = kube.hold(SECRETS, method="POST", times=2)
    dirs = [tmp_path / "replica-a", tmp_path / "replica-b"]
    clients = [kube.new_client() for _ in dirs]
    caplog.set_level(logging.INFO, logger="meshplane")
    try:
        calls = [
            lambda d=d, c=c: kubeapi.load_ca_secret(c, NS, NAME, d, create_root)
            for d, c in zip(dirs, clients, strict=True)
        ]
        outcomes: list[BaseException | None] = []
        runner = threading.Thread(target=lambda: outcomes.extend(in_threads(*calls)), daemon=True)
        runner.start()
        held.wait(2, timeout=15)  # both POSTs are in: so both GETs answered 404
        assert kube.count(SECRET, method="GET") == 2
        assert kube.get("Secret", NAME, NS) is None
        assert files(dirs[0]) != files(dirs[1])  # each made a root of its own
        held.release()
        runner.join(timeout=20)
        assert not runner.is_alive()
    finally:
        held.release()
        for c in clients:
            c.close()
    assert outcomes == [None, None]

    assert kube.count(SECRETS, method="POST") == 2
    assert len(kube.objects("Secret")) == 1
    assert kube.count(SECRET, method="GET") == 3  # the loser read the winner's Secret after its 409
    winner = secret_files(kube)
    assert files(dirs[0]) == files(dirs[1]) == winner  # byte-equal, and what the Secret holds
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("created the CA Secret") for m in messages) == 1
    assert sum(m.startswith("another replica created the CA Secret") for m in messages) == 1

    for d in dirs:
        assert stat.S_IMODE(os.stat(d / ROOT_KEY).st_mode) == 0o600
        ca = CertificateAuthority(d, TRUST_DOMAIN, create=False)  # what the control plane does next
        assert ca.root_pem == winner[0]
        assert (d / TRUST_BUNDLE).read_bytes() == winner[0]  # the loser's own root is not trusted


def test_a_replica_starting_later_reads_the_secret_and_creates_nothing(
    kube: FakeKube, api: Any, tmp_path: Path
) -> None:
    kubeapi.load_ca_secret(api, NS, NAME, tmp_path / "first", create_root)
    assert kube.count(SECRETS, method="POST") == 1
    made: list[Path] = []

    def must_not_create(directory: Path) -> None:
        made.append(directory)
        create_root(directory)

    kubeapi.load_ca_secret(api, NS, NAME, tmp_path / "later", must_not_create)
    assert made == []
    assert kube.count(SECRETS, method="POST") == 1
    assert files(tmp_path / "later") == files(tmp_path / "first") == secret_files(kube)
    assert stat.S_IMODE(os.stat(tmp_path / "later").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "later" / ROOT_KEY).st_mode) == 0o600


def test_a_failed_create_is_a_config_error_and_nothing_is_half_shared(kube: FakeKube, api: Any, tmp_path: Path) -> None:
    kube.fail(SECRETS, 500, method="POST")
    with pytest.raises(ConfigError, match="cannot create the CA Secret"):
        kubeapi.load_ca_secret(api, NS, NAME, tmp_path / "a", create_root)
    assert kube.get("Secret", NAME, NS) is None
    # The next start shares the root this one made (it is still in the directory): nothing is lost.
    kubeapi.load_ca_secret(api, NS, NAME, tmp_path / "a", create_root)
    assert secret_files(kube) == files(tmp_path / "a")


async def test_control_planes_share_the_root_of_the_secret(kube: FakeKube, tmp_path: Path) -> None:
    first = await start_plane(kube, tmp_path / "a", ca_secret=f"{NS}/{NAME}")
    try:
        second = await start_plane(kube, tmp_path / "b", ca_secret=f"{NS}/{NAME}")
        try:
            assert first.ca.root_pem == second.ca.root_pem == secret_files(kube)[0]
            assert kube.count(SECRETS, method="POST") == 1
        finally:
            await second.stop()
    finally:
        await first.stop()


# --- the webhook configuration's caBundle ------------------------------------------------------------


def test_patch_webhook_ca_bundle(kube: FakeKube, api: Any, tmp_path: Path) -> None:
    bundle = CertificateAuthority(tmp_path / "ca", TRUST_DOMAIN).trust_bundle_pem
    assert kubeapi.patch_webhook_ca_bundle(api, WEBHOOK, bundle) is False
    assert kube.count(WEBHOOK_PATH, method="PATCH") == 0

    config = mutating_webhook_configuration(WEBHOOK, webhooks=["a.meshplane.io", "b.meshplane.io"])
    config["webhooks"][1]["clientConfig"]["caBundle"] = base64.b64encode(b"stale").decode()
    kube.create(config)
    assert kubeapi.patch_webhook_ca_bundle(api, WEBHOOK, bundle) is True
    assert ca_bundles(kube) == [bundle, bundle]  # one without a caBundle (add), one with a stale one (replace)
    assert kube.count(WEBHOOK_PATH, method="PATCH") == 1
    assert kubeapi.patch_webhook_ca_bundle(api, WEBHOOK, bundle) is True
    assert kube.count(WEBHOOK_PATH, method="PATCH") == 1  # already right: not patched again

    # After a root rotation on disk, the next patch carries both roots.
    old_root = CertificateAuthority(tmp_path / "ca", TRUST_DOMAIN).root_pem
    CertificateAuthority(tmp_path / "ca", TRUST_DOMAIN).rotate_root()
    rotated = CertificateAuthority(tmp_path / "ca", TRUST_DOMAIN)
    assert kubeapi.patch_webhook_ca_bundle(api, WEBHOOK, rotated.trust_bundle_pem) is True
    for patched in ca_bundles(kube):
        roots = certificates(patched)
        assert len(roots) == 2 and {r.public_bytes(Encoding.PEM) for r in roots} == {old_root, rotated.root_pem}


async def test_control_plane_without_the_configuration_runs_and_patches_once_it_exists(
    kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshplane")
    plane = await start_plane(kube, tmp_path, webhook_configuration=WEBHOOK)
    keeper: asyncio.Task[None] | None = None
    try:

        def missing_warnings() -> int:
            return sum(
                f"MutatingWebhookConfiguration {WEBHOOK} does not exist" in r.getMessage() for r in caplog.records
            )

        await eventually(lambda: missing_warnings() == 1, timeout=10, what="the control plane's first attempt")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{plane.admin_port}/healthz") as r:
            assert r.status == 200

        # The same loop, with a short interval (the control plane's own waits 30 s): many attempts, one warning.
        keeper = asyncio.get_running_loop().create_task(plane._keep_webhook_ca_bundle(WEBHOOK, interval=0.05))
        await eventually(lambda: kube.count(WEBHOOK_PATH, method="GET") >= 6, timeout=10, what="several attempts")
        assert missing_warnings() == 2  # one for each loop, not one per attempt

        kube.create(mutating_webhook_configuration(WEBHOOK))
        await eventually(
            lambda: ca_bundles(kube) == [plane.ca.trust_bundle_pem], timeout=10, what="the caBundle patched"
        )
        assert certificates(ca_bundles(kube)[0])[0].public_bytes(Encoding.PEM) == plane.ca.root_pem

        # A root rotation on the control plane's CA directory: the control plane picks it up (within
        # 2 s) and the next patch carries both roots.
        old_root = plane.ca.root_pem
        CertificateAuthority(plane.settings.ca_dir, TRUST_DOMAIN, create=False).rotate_root()
        new_root = (plane.settings.ca_dir / ROOT_CERT).read_bytes()

        def both_roots() -> bool:
            return {c.public_bytes(Encoding.PEM) for c in certificates(ca_bundles(kube)[0])} == {old_root, new_root}

        await eventually(both_roots, timeout=15, what="both roots in the caBundle")
        assert ca_bundles(kube) == [plane.ca.trust_bundle_pem]
        assert missing_warnings() == 2
        assert plane.xds.serving
    finally:
        if keeper is not None:
            keeper.cancel()
        await plane.stop()


async def test_control_plane_patches_at_start_and_survives_api_errors(
    kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kube.create(mutating_webhook_configuration(WEBHOOK))
    kube.fail(WEBHOOK_PATH, 500, method="PATCH")  # the first patch fails: logged, retried, not fatal
    caplog.set_level(logging.INFO, logger="meshplane")
    plane = await start_plane(kube, tmp_path, webhook_configuration=WEBHOOK, ca_secret=f"{NS}/{NAME}")
    keeper: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: kube.count(WEBHOOK_PATH, method="PATCH") == 1, timeout=10, what="the first patch")
        assert ca_bundles(kube) == [b""]
        assert any("cannot patch the caBundle" in r.getMessage() for r in caplog.records)
        keeper = asyncio.get_running_loop().create_task(plane._keep_webhook_ca_bundle(WEBHOOK, interval=0.05))
        await eventually(
            lambda: ca_bundles(kube) == [plane.ca.trust_bundle_pem], timeout=10, what="the caBundle patched"
        )
        assert plane.ca.trust_bundle_pem == secret_files(kube)[0]  # the shared root
    finally:
        if keeper is not None:
            keeper.cancel()
        await plane.stop()

    # A restart with the configuration already right patches nothing.
    patches, looks = kube.count(WEBHOOK_PATH, method="PATCH"), kube.count(WEBHOOK_PATH, method="GET")
    again = await start_plane(kube, tmp_path, webhook_configuration=WEBHOOK, ca_secret=f"{NS}/{NAME}")
    try:
        await eventually(
            lambda: kube.count(WEBHOOK_PATH, method="GET") > looks, timeout=10, what="the restarted plane's first look"
        )
        assert kube.count(WEBHOOK_PATH, method="PATCH") == patches
    finally:
        await again.stop()


# --- known problems -----------------------------------------------------------------------------------


def test_a_restart_after_a_rotation_keeps_the_rotated_root(kube: FakeKube, api: Any, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    kubeapi.load_ca_secret(api, NS, NAME, ca_dir, create_root)
    old_root = (ca_dir / ROOT_CERT).read_bytes()
    CertificateAuthority(ca_dir, TRUST_DOMAIN, create=False).rotate_root()  # meshctl ca-rotate --ca-dir
    new_root = (ca_dir / ROOT_CERT).read_bytes()

    kubeapi.load_ca_secret(api, NS, NAME, ca_dir, create_root)  # the container restarts
    restarted = CertificateAuthority(ca_dir, TRUST_DOMAIN, create=False)
    assert {c.public_bytes(Encoding.PEM) for c in certificates(restarted.trust_bundle_pem)} == {old_root, new_root}


def test_a_rotation_in_one_replica_reaches_the_caBundle_every_replica_patches(
    kube: FakeKube, api: Any, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    kubeapi.load_ca_secret(api, NS, NAME, a, create_root)
    kubeapi.load_ca_secret(api, NS, NAME, b, create_root)
    kube.create(mutating_webhook_configuration(WEBHOOK))
    synced = kubeapi.load_ca_secret(api, NS, NAME, a, create_root)
    CertificateAuthority(a, TRUST_DOMAIN, create=False).rotate_root()  # meshctl ca-rotate, in replica a
    kubeapi.sync_ca_secret(api, NS, NAME, a, synced)  # a's sync round writes the rotation to the Secret

    # Each replica's loop patches with its own CA's trust bundle; b restarts in between.
    assert kubeapi.patch_webhook_ca_bundle(api, WEBHOOK, CertificateAuthority(a, TRUST_DOMAIN).trust_bundle_pem)
    assert len(certificates(ca_bundles(kube)[0])) == 2
    kubeapi.load_ca_secret(api, NS, NAME, b, create_root)
    assert kubeapi.patch_webhook_ca_bundle(api, WEBHOOK, CertificateAuthority(b, TRUST_DOMAIN).trust_bundle_pem)
    assert len(certificates(ca_bundles(kube)[0])) == 2  # b has the rotation too: both roots, never the old alone
