"""Admin HTTP (aiohttp): /healthz, /readyz, /metrics, /debug/proxies, /debug/config/<proxy-id>."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .metrics import Metrics
from .server import XdsServer


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=2, sort_keys=True))


def make_app(xds: XdsServer, metrics: Metrics, ready: Callable[[], bool]) -> web.Application:
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

    async def config(request: web.Request) -> web.Response:
        proxy_id = request.match_info["proxy_id"]
        sent = xds.sent_config(proxy_id)
        if sent is None:
            known = sorted({c.node.id for c in xds.connections.values()})
            return _json({"error": f"no connected proxy {proxy_id!r}", "connected": known}, status=404)
        return _json(sent)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/debug/proxies", proxies)
    app.router.add_get("/debug/config/{proxy_id}", config)
    return app
