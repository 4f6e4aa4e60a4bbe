"""Admin HTTP (aiohttp): /healthz, /readyz, /metrics from anywhere; /debug/* from loopback only.

/debug/proxies, /debug/config/<proxy-id> and /debug/syncz show every proxy's identity and config, so
by default they answer only callers on this host (`debug_from_anywhere` opens them). The check is on
the TCP peer address: a reverse proxy on this host would make every caller look local.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import status
from .metrics import Metrics
from .server import XdsServer

DEBUG_PREFIX = "/debug/"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=2, sort_keys=True))


def is_loopback(peer: str | None) -> bool:
    """Whether `peer` (a request's remote address) is this host's loopback: 127.0.0.0/8, ::1, or
    127.x mapped into IPv6. Anything else, including an unknown peer, is not."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def debug_allowed(path: str, peer: str | None, *, from_anywhere: bool) -> bool:
    """Only /debug/* is guarded; health, readiness and metrics answer everyone."""
    return from_anywhere or not path.startswith(DEBUG_PREFIX) or is_loopback(peer)


def replica_name() -> str:
    """How this control plane replica calls itself: the pod name in Kubernetes, else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


def make_app(
    xds: XdsServer,
    metrics: Metrics,
    ready: Callable[[], bool],
    *,
    debug_from_anywhere: bool = False,
    replica: str | None = None,
) -> web.Application:
    """The admin application. `replica` names this control plane in /debug/syncz (default: replica_name())."""
    name = replica or replica_name()

    @web.middleware
    async def loopback_debug(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # The route that matched, not the raw path: no spelling of a /debug/ URL gets around the check.
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else request.path
        if debug_allowed(path, request.remote, from_anywhere=debug_from_anywhere):
            return await handler(request)
        return _json(
            {
                "error": f"{request.path} shows every proxy's config and identity, so it answers callers on the "
                f"control plane's own host only (loopback), and this request came from {request.remote}. Run "
                "meshctl on that host (in Kubernetes: kubectl -n mesh-system port-forward deploy/meshplane 15014), "
                "or start `meshctl serve --debug-from-anywhere` to open /debug/* to every address."
            },
            status=403,
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n") if ready() else web.Response(status=503, text="starting\n")

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(
            body=metrics.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def proxies(_: web.Request) -> web.Response:
        return _json(xds.describe())

    async def syncz(_: web.Request) -> web.Response:
        return _json(status.syncz(xds.describe(), name, dt.datetime.now(dt.UTC)))

    async def config(request: web.Request) -> web.Response:
        proxy_id = request.match_info["proxy_id"]
        sent = xds.sent_config(proxy_id)
        if sent is None:
            known = sorted({c.node.id for c in xds.connections.values()})
            return _json({"error": f"no connected proxy {proxy_id!r}", "connected": known}, status=404)
        return _json(sent)

    app = web.Application(middlewares=[loopback_debug])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/debug/proxies", proxies)
    app.router.add_get("/debug/syncz", syncz)
    app.router.add_get("/debug/config/{proxy_id}", config)
    return app
