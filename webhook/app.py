"""The injection webhook over HTTPS (aiohttp): POST /inject (AdmissionReview v1), GET /healthz.

Input errors are HTTP 400 with a message saying what was wrong; an invalid annotation denies
the pod with the annotation's name and accepted forms; nothing a client sends gives a 500.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from . import review
from .config import InjectionConfig
from .inject import inject

log = logging.getLogger("meshplane.webhook")

MAX_BODY = 2 * 1024 * 1024
"""Larger than any object the API server stores (etcd's limit is 1.5 MiB)."""


class Issued(Protocol):
    @property
    def cert_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...

    def renew_at(self) -> dt.datetime: ...


class Issuer(Protocol):
    """What the webhook needs of a CA (the mesh CA is one): serving certificates and their chain."""

    def server_certificate(self, dns_names: Sequence[str], ttl: dt.timedelta) -> Issued: ...

    def server_chain(self, cert_pem: bytes) -> bytes: ...


class WebhookMetrics:
    """The webhook's Prometheus metrics, registered in the registry of whoever serves it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.injections = Counter(
            "meshplane_webhook_requests", "Injection webhook answers", ["result"], registry=registry
        )
        self.seconds = Histogram(
            "meshplane_webhook_latency_seconds",
            "Time to answer an AdmissionReview",
            registry=registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )


class ServingCertificate:
    """The webhook's TLS certificate: given files (reloaded when they change on disk), or issued
    by the mesh CA for `dns_names` and renewed at half-life. New handshakes use the new one."""

    def __init__(
        self,
        ca: Issuer,
        dns_names: Sequence[str],
        *,
        ttl: dt.timedelta,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.ca, self.dns_names, self.ttl = ca, list(dns_names), ttl
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: object = None
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self.refresh()

    def refresh(self) -> bool:
        """Load a new certificate if one is due or the files changed; True when it did."""
        if self.cert_file and self.key_file:
            stamp = tuple(os.stat(p).st_mtime_ns for p in (self.cert_file, self.key_file))
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
            self._stamp = stamp
            log.info("webhook serving certificate loaded from %s", self.cert_file)
            return True
        if dt.datetime.now(dt.UTC) < self._renew_at:
            return False
        issued = self.ca.server_certificate(self.dns_names, self.ttl)
        # ssl loads certificates from files only: write them where only we can read, load, remove.
        with tempfile.TemporaryDirectory(prefix="meshplane-webhook-") as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(self.ca.server_chain(issued.cert_pem))
            key.touch(mode=0o600)
            key.write_bytes(issued.key_pem)
            self.context.load_cert_chain(cert, key)
        self._renew_at = issued.renew_at()
        log.info(
            "webhook serving certificate issued for %s, renewed at %s",
            ", ".join(self.dns_names),
            self._renew_at.isoformat(timespec="seconds"),
        )
        return True

    async def run(self) -> None:
        interval = min(5.0, self.ttl.total_seconds() / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                self.refresh()
            except (OSError, ssl.SSLError, ValueError) as e:
                log.error("webhook serving certificate not reloaded, keeping the current one: %s", e)


def make_app(
    config: InjectionConfig | Callable[[], InjectionConfig], metrics: WebhookMetrics | None = None
) -> web.Application:
    """The webhook's routes. `config` may be a function, read for every request: a control plane
    passes one so that injected sidecars always carry its current trust bundle."""
    current = config if callable(config) else lambda: config

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _bad(f"the body is larger than {MAX_BODY} bytes")
        try:
            req = review.parse(body)
        except review.ReviewError as e:
            log.warning("bad AdmissionReview from %s: %s", request.remote, e)
            return _bad(str(e))
        try:
            answer, result = _answer(req, current())
        except Exception:  # a bug must not let a pod in without its sidecar, nor hang the API server
            log.exception("injection failed for %s/%s", req.namespace, _name(req.pod))
            answer, result = review.deny(req.uid, "internal error in the injector; see its logs", 500), "error"
        if metrics is not None:
            metrics.injections.labels(result).inc()
            metrics.seconds.observe(time.perf_counter() - started)
        return web.json_response(answer)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/inject", handle)
    return app


def _answer(req: review.Request, config: InjectionConfig) -> tuple[dict[str, Any], str]:
    if req.operation != "CREATE":
        return review.allow(req.uid), "skipped"
    outcome = inject(req.pod, req.namespace, config)
    name = f"{req.namespace}/{_name(req.pod)}"
    if outcome.error is not None:
        log.warning("denied %s: %s", name, outcome.error)
        return review.deny(req.uid, str(outcome.error)), "denied"
    log.info("%s %s: %s", "injected" if outcome.decision.inject else "skipped", name, outcome.decision.reason)
    if not outcome.decision.inject:
        return review.allow(req.uid), "skipped"
    for warning in outcome.warnings:
        log.info("%s: %s", name, warning)
    return review.allow(req.uid, outcome.patch, outcome.warnings), "injected"


def _name(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(meta.get("name") or (meta.get("generateName") or "") + "*")


def _bad(message: str) -> web.Response:
    return web.Response(status=400, text=message + "\n")
