"""The admin port: ``/healthz`` (the process answers), ``/readyz`` (config loaded, the one on
disk not rejected, CA usable), ``/metrics`` (Prometheus), ``/config`` (what is being served:
injections, hosts, rules, limits, Secret keys with a fingerprint of each value, the CA).
Never exposes a secret, a path or a header value."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keyhole_sidecar.metrics import Metrics

_indented = functools.partial(json.dumps, indent=2, ensure_ascii=False)


def admin_app(metrics: Metrics, readiness: Callable[[], str | None],
              described: Callable[[], dict]) -> web.Application:
    """``readiness`` returns None when ready, else the reason it is not; ``described`` is what
    ``/config`` answers (see :mod:`keyhole_sidecar.inventory`)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        problem = readiness()
        if problem:
            return web.Response(status=503, text=f"not ready: {problem}\n")
        return web.Response(text="ready\n")

    async def metrics_view(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def config(_: web.Request) -> web.Response:
        return web.json_response(described(), dumps=_indented)

    app = web.Application()
    app.router.add_get("/config", config)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
