"""`meshctl serve`: wires the mesh file, registry, CA, cache, xDS server and admin HTTP together."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from meshplane.webhook.app import ServingCertificate
from meshplane.webhook.app import make_app as make_webhook
from meshplane.webhook.config import InjectionConfig

from . import admin, kube, kubemodel, tokens
from .auth import Authenticator
from .ca import CertificateAuthority
from .cache import ConfigCache
from .generate import MeshConfig
from .kube import KubernetesSource
from .metrics import Metrics
from .model import MeshModel
from .registry import MeshFileWatcher, RegistrationStore, Registry
from .server import XdsServer
from .settings import Settings
from .tokens import Identity

log = logging.getLogger("meshplane")

REGISTRATIONS = "registrations.json"
CA_SYNC_INTERVAL = 10.0
"""Seconds between two comparisons of the CA directory with the shared Secret (Kubernetes mode)."""
CLUSTER_SETTLE = 0.1
"""Seconds a burst of cluster changes (a rollout) may last before the model is rebuilt once."""
GC_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation (Python's default: 700)."""


def tune_gc() -> None:
    """Collect garbage the way a server with a large long-lived heap wants it: what exists at start (the
    imported modules, among them Envoy's protobuf descriptors, 67 MiB) is frozen out of every
    collection, and collections run 14 times less often. With the defaults a parse of a 1,000-service
    mesh file spent 40% of its time in the collector, and a full config build 10-15%."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


@dataclass
class ControlPlane:
    """A running control plane; `start()` then `stop()`. Ports are the bound ones (0 picks a free one)."""

    settings: Settings
    config: type[MeshConfig] = MeshConfig
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    metrics: Metrics = field(default_factory=Metrics)
    xds_port: int = 0
    """The plaintext port, when served (`insecure_trust_node_metadata`), else 0."""
    xds_tls_port: int = 0
    xds_mtls_port: int = 0
    admin_port: int = 0
    webhook_port: int = 0
    _registrations_changed: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _cluster_task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _cluster_dirty: bool = field(default=False, init=False, repr=False)
    _skipped: set[str] = field(default_factory=set, init=False, repr=False)
    _injection_for: str = field(default="", init=False, repr=False)
    _ca_synced: dict[str, bytes] = field(default_factory=dict, init=False, repr=False)
    _pod_memo: kubemodel.PodMemo = field(default_factory=kubemodel.PodMemo, init=False, repr=False)
    _injection: InjectionConfig = field(default_factory=InjectionConfig, init=False, repr=False)

    async def start(self) -> None:
        s = self.settings
        self.watcher: MeshFileWatcher | None = None
        model = MeshModel()
        if s.mesh_file is not None:
            self.watcher = MeshFileWatcher(
                s.mesh_file,
                self._file_changed,
                interval=s.poll_interval,
                settle=s.mesh_settle,
                on_error=lambda e: self.metrics.reloads.labels("rejected").inc(),
            )
            model = self.watcher.load_initial()
        self.kube_api: Any = None
        self.source: KubernetesSource | None = None
        if s.kubernetes:
            self.kube_api = await asyncio.to_thread(kube.api_client, s.kubeconfig)
            if s.ca_secret:
                namespace, _, name = s.ca_secret.partition("/")
                trust_domain = model.trust_domain

                def create_root(directory: Path) -> None:
                    CertificateAuthority(directory, trust_domain)

                self._ca_synced = await asyncio.to_thread(
                    kube.load_ca_secret, self.kube_api, namespace, name, s.ca_dir, create_root
                )
        self.ca = CertificateAuthority(s.ca_dir, model.trust_domain, workload_ttl=s.cert_ttl)
        self.registry = Registry(model, self._registry_changed, self_registration=not s.kubernetes)
        self._store = RegistrationStore(s.state_dir / REGISTRATIONS) if s.state_dir else None
        if self._store is not None:
            restored = await asyncio.to_thread(self._store.load)
            if restored:
                log.info(
                    "restored %d registrations from before the restart; those whose proxy is not back in %.0fs "
                    "are dropped",
                    len(restored),
                    s.restore_grace,
                )
                self.registry.restore(restored)
        self.cache = ConfigCache(self.registry.model, self.ca, self.config)
        ca = self.ca

        reviewer = kube.TokenReviewer(self.kube_api, s.token_audience) if self.kube_api is not None else None

        async def verify_token(token: str) -> Identity:
            # Mesh tokens (meshctl token) are checked offline; Kubernetes' own by TokenReview.
            if reviewer is None or tokens.issuer(token) == tokens.ISSUER:
                return ca.verify_token(token, s.token_audience)
            return await reviewer.verify(token)

        authenticator = Authenticator(
            model.trust_domain, verify_token, trust_node_metadata=s.insecure_trust_node_metadata
        )
        self.xds = XdsServer(
            self.cache,
            self.registry,
            self.ca,
            self.metrics,
            authenticator,
            debounce=s.debounce,
            debounce_max=s.debounce_max,
            proxy_grace=s.proxy_grace,
            shutdown_delay=s.shutdown_delay,
        )
        self.xds_tls_port, self.xds_port = await self.xds.start(
            s.bind,
            tls_port=s.xds_tls_port,
            dns_names=s.xds_dns_names,
            plaintext_port=s.xds_port if s.insecure_trust_node_metadata else None,
            mtls_port=s.xds_mtls_port,
            socket_path=s.xds_socket,
            socket_group=s.xds_socket_group,
            ping_floor_ms=int(s.min_ping_interval * 1000),
        )
        self.xds_mtls_port = self.xds.mtls_port
        if s.kubernetes:
            self.source = KubernetesSource(self.kube_api, self._cluster_changed, namespaces=s.namespaces)
            self.source.start()
        else:
            self.xds.open()
        self._runner = web.AppRunner(
            admin.make_app(self.xds, self.metrics, self.ready, debug_from_anywhere=s.debug_from_anywhere),
            access_log=None,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.bind, s.admin_port)
        await site.start()
        self.admin_port = self._runner.addresses[0][1]
        self.webhook_certificate = ServingCertificate(
            self.ca, s.webhook_dns_names, ttl=s.webhook_cert_ttl, cert_file=s.webhook_cert, key_file=s.webhook_key
        )
        self._webhook = web.AppRunner(make_webhook(self.injection_config, self.metrics.webhook), access_log=None)
        await self._webhook.setup()
        await web.TCPSite(self._webhook, s.bind, s.webhook_port, ssl_context=self.webhook_certificate.context).start()
        self.webhook_port = self._webhook.addresses[0][1]
        log.info("injection webhook on https://%s:%d/inject", s.bind, self.webhook_port)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.webhook_certificate.run())]
        if self.watcher is not None:
            self._tasks.append(loop.create_task(self.watcher.run()))
        if self.kube_api is not None and s.ca_secret:
            self._tasks.append(loop.create_task(self._sync_ca_secret(s.ca_secret)))
            # Another replica's proxies learn a new root through the Secret (a sync round each side).
            self.xds.root_activation_delay = 3 * CA_SYNC_INTERVAL
        if self.kube_api is not None and s.webhook_configuration:
            self._tasks.append(loop.create_task(self._keep_webhook_ca_bundle(s.webhook_configuration)))
        if self._store is not None:
            self._tasks.append(loop.create_task(self._save_registrations()))
            self._expiry = loop.call_later(s.restore_grace, self._expire_restored)
        log.info(
            "admin HTTP on %s:%d (/healthz /readyz /metrics /debug/proxies /debug/config/<proxy-id>)",
            s.bind,
            self.admin_port,
        )

    def injection_config(self) -> InjectionConfig:
        """What the webhook injects: the given settings, with this control plane's current trust bundle
        (it changes in a root rotation) and token audience."""
        bundle = self.ca.trust_bundle_pem.decode()
        if self._injection_for != bundle:
            self._injection = dataclasses.replace(
                self.injection, xds_ca=self.injection.xds_ca or bundle, token_audience=self.settings.token_audience
            )
            self._injection_for = bundle
        return self._injection

    def ready(self) -> bool:
        """Serving xDS, and (in Kubernetes mode) built from a complete first list of every kind."""
        return self.xds.serving and self.xds.is_open

    def _cluster_changed(self) -> None:
        """A watched object changed: rebuild the cluster's part of the model once the burst settles."""
        if self.source is None or not self.source.synced.is_set():
            return  # nothing built from a partial view
        self._cluster_dirty = True
        if self._cluster_task is None or self._cluster_task.done():
            self._cluster_task = asyncio.get_running_loop().create_task(self._rebuild_clusters())

    async def _rebuild_clusters(self) -> None:
        """Rebuild until no change is left: one that arrives while a view is being built (a few hundred
        ms at a thousand services) marks the cluster dirty again and gets a rebuild of its own."""
        while self._cluster_dirty:
            await asyncio.sleep(CLUSTER_SETTLE)
            self._cluster_dirty = False
            await self._rebuild_cluster()

    async def _rebuild_cluster(self) -> None:
        assert self.source is not None
        stores = {k: dict(v) for k, v in self.source.stores.items()}  # objects are replaced, never changed
        namespaces = {name: obj for (_, name), obj in stores["Namespace"].items()}
        started = time.monotonic()
        found = await asyncio.to_thread(
            kubemodel.view, namespaces, stores["Service"], stores["EndpointSlice"], stores["Pod"], self._pod_memo
        )
        for line in sorted(set(found.skipped) - self._skipped):
            log.warning("skipped %s", line)
        self._skipped = set(found.skipped)
        # The informers' burst was coalesced by CLUSTER_SETTLE: the push need not wait for another.
        self.registry.set_cluster(found.services, found.workloads, settled=True)
        if not self.xds.is_open:
            log.info(
                "first view of the cluster: %d services, %d pods (%.0f ms); serving xDS",
                len(found.services),
                len(found.workloads),
                (time.monotonic() - started) * 1000,
            )
            self.xds.model_changed(self.registry.model)
            self.xds.open()

    async def _sync_ca_secret(self, secret: str) -> None:
        """Keep the CA directory and the shared Secret equal, so a root rotation done in any replica
        reaches every replica (the server notices the directory change and rolls the roots)."""
        namespace, _, name = secret.partition("/")
        while True:
            await asyncio.sleep(CA_SYNC_INTERVAL)
            try:
                self._ca_synced = await asyncio.to_thread(
                    kube.sync_ca_secret, self.kube_api, namespace, name, self.settings.ca_dir, self._ca_synced
                )
            except Exception as e:  # the API server's trouble: retried next round
                log.warning("cannot sync the CA with the Secret %s: %s", secret, e)

    async def _keep_webhook_ca_bundle(self, name: str, interval: float = 30.0) -> None:
        """Keep the webhook configuration's caBundle equal to the CA's trust bundle (also after a
        root rotation). A configuration that does not exist yet is retried, never fatal."""
        missing_logged = False
        while True:
            try:
                found = await asyncio.to_thread(
                    kube.patch_webhook_ca_bundle, self.kube_api, name, self.ca.trust_bundle_pem
                )
                if not found and not missing_logged:
                    log.warning(
                        "MutatingWebhookConfiguration %s does not exist (yet); will set its caBundle once it does", name
                    )
                missing_logged = not found
            except Exception as e:  # the API server's trouble: retried
                log.warning("cannot patch the caBundle of %s: %s", name, e)
            await asyncio.sleep(interval)

    def _registry_changed(self, model: MeshModel, settled: bool) -> None:
        if xds := getattr(self, "xds", None):
            xds.model_changed(model, settled=settled)
        self._registrations_changed.set()

    def _expire_restored(self) -> None:
        if gone := self.registry.expire_restored():
            log.info("dropped %d restored registrations whose proxies did not come back: %s", len(gone), gone)

    async def _save_registrations(self) -> None:
        """Keep the registrations on disk (at most once a second), so a restart starts from them."""
        assert self._store is not None
        while True:
            await self._registrations_changed.wait()
            self._registrations_changed.clear()
            try:
                await asyncio.to_thread(self._store.save, self.registry.registrations())
            except OSError as e:
                log.error("cannot save registrations to %s: %s", self._store.path, e)
            await asyncio.sleep(1)

    def _file_changed(self, model: MeshModel) -> None:
        if model.trust_domain != self.ca.trust_domain:
            log.error(
                "mesh file changes trustDomain from %s to %s: this needs a restart (the CA and every "
                "workload identity depend on it); keeping %s",
                self.ca.trust_domain,
                model.trust_domain,
                self.ca.trust_domain,
            )
            self.metrics.reloads.labels("rejected").inc()
            return
        self.metrics.reloads.labels("applied").inc()
        self.registry.set_static(model)

    async def stop(self) -> None:
        """Stop whatever `start()` got to start (it may have failed half-way). Readiness goes first:
        for `shutdown_delay` /readyz is 503 while everything else (xDS, the webhook, mesh-file edits)
        keeps working, so load balancers move away before anything is refused."""
        if (xds := getattr(self, "xds", None)) is not None and xds.serving:
            xds.serving = False
            if self.settings.shutdown_delay > 0:
                log.info("shutting down: not ready; still serving for %.1fs", self.settings.shutdown_delay)
                await asyncio.sleep(self.settings.shutdown_delay)
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if self._cluster_task is not None:
            self._cluster_task.cancel()
        if source := getattr(self, "source", None):
            await source.wait_stopped()
        if expiry := getattr(self, "_expiry", None):
            expiry.cancel()
        if webhook := getattr(self, "_webhook", None):
            await webhook.cleanup()
        if xds is not None:
            await xds.stop(self.settings.shutdown_grace, delay=0)
        if runner := getattr(self, "_runner", None):
            await runner.cleanup()


async def serve(settings: Settings, injection: InjectionConfig | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly."""
    tune_gc()
    plane = ControlPlane(settings, injection=injection or InjectionConfig())
    await plane.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "serving %s; point a sidecar at %s:%d with a token (meshctl token, then meshctl bootstrap --xds-address "
        "HOST:%d --token-file FILE --xds-ca %s)",
        settings.mesh_file or "the Kubernetes cluster",
        settings.bind,
        plane.xds_tls_port,
        plane.xds_tls_port,
        settings.ca_dir / "trust-bundle.pem",
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await plane.stop()
