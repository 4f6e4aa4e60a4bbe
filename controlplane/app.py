"""`meshctl serve`: wires the mesh file, registry, CA, cache, xDS server and admin HTTP together."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

from aiohttp import web

from meshplane.webhook.app import ServingCertificate
from meshplane.webhook.app import make_app as make_webhook
from meshplane.webhook.config import InjectionConfig

from . import admin
from .ca import CertificateAuthority
from .cache import ConfigCache
from .generate import MeshConfig
from .metrics import Metrics
from .model import MeshModel
from .registry import MeshFileWatcher, Registry
from .server import XdsServer
from .settings import Settings

log = logging.getLogger("meshplane")


@dataclass
class ControlPlane:
    """A running control plane; `start()` then `stop()`. Ports are the bound ones (0 picks a free one)."""

    settings: Settings
    config: type[MeshConfig] = MeshConfig
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    metrics: Metrics = field(default_factory=Metrics)
    xds_port: int = 0
    admin_port: int = 0
    webhook_port: int = 0

    async def start(self) -> None:
        s = self.settings
        self.watcher = MeshFileWatcher(
            s.mesh_file,
            self._file_changed,
            interval=s.poll_interval,
            settle=s.mesh_settle,
            on_error=lambda e: self.metrics.reloads.labels("rejected").inc(),
        )
        model = self.watcher.load_initial()
        self.ca = CertificateAuthority(s.ca_dir, model.trust_domain, workload_ttl=s.cert_ttl)
        self.cache = ConfigCache(model, self.ca, self.config)
        self.registry = Registry(model, lambda m: self.xds.model_changed(m))
        self.xds = XdsServer(
            self.cache,
            self.registry,
            self.ca,
            self.metrics,
            debounce=s.debounce,
            debounce_max=s.debounce_max,
            proxy_grace=s.proxy_grace,
            shutdown_delay=s.shutdown_delay,
        )
        self.xds_port = await self.xds.start(s.bind, s.xds_port, s.xds_socket)
        self._runner = web.AppRunner(admin.make_app(self.xds, self.metrics, lambda: self.xds.serving), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.bind, s.admin_port)
        await site.start()
        self.admin_port = self._runner.addresses[0][1]
        self.webhook_certificate = ServingCertificate(
            self.ca, s.webhook_dns_names, ttl=s.webhook_cert_ttl, cert_file=s.webhook_cert, key_file=s.webhook_key
        )
        self._webhook = web.AppRunner(make_webhook(self.injection, self.metrics.webhook), access_log=None)
        await self._webhook.setup()
        await web.TCPSite(self._webhook, s.bind, s.webhook_port, ssl_context=self.webhook_certificate.context).start()
        self.webhook_port = self._webhook.addresses[0][1]
        log.info("injection webhook on https://%s:%d/inject", s.bind, self.webhook_port)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.watcher.run()), loop.create_task(self.webhook_certificate.run())]
        log.info(
            "admin HTTP on %s:%d (/healthz /readyz /metrics /debug/proxies /debug/config/<proxy-id>)",
            s.bind,
            self.admin_port,
        )

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
        """Stop whatever `start()` got to start (it may have failed half-way)."""
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if webhook := getattr(self, "_webhook", None):
            await webhook.cleanup()
        if xds := getattr(self, "xds", None):
            await xds.stop(self.settings.shutdown_grace)
        if runner := getattr(self, "_runner", None):
            await runner.cleanup()


async def serve(settings: Settings, injection: InjectionConfig | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly."""
    plane = ControlPlane(settings, injection=injection or InjectionConfig())
    await plane.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "serving %s; point a sidecar at %s:%d (meshctl bootstrap --xds-address ...)",
        settings.mesh_file,
        settings.bind,
        plane.xds_port,
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await plane.stop()
