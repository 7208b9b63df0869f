"""Per-route request counts and latencies for Prometheus (route templates, not raw paths, as labels)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("shotcache_http_requests_total", "HTTP requests.", ["method", "route", "status"])
LATENCY = Histogram(
    "shotcache_http_request_seconds",
    "HTTP request latency.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class HttpMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def _route(self, scope: Scope) -> str:
        # The router records the route it dispatched to. FastAPI >= 0.16x includes routers lazily, so
        # the app's top-level routes are router objects without a `path`: the fallback below only
        # serves requests that never reached the router (e.g. refused for their size).
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        for route in scope["app"].router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", "other"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = self._route(scope)
            REQUESTS.labels(scope["method"], route, str(status[0])).inc()
            LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)
