"""CORS for browser clients: `gateway.cors.allow_origins` (none by default). Preflights are
answered for the API paths only; `/metrics` never gets CORS headers, so a web page cannot
read it. Starlette's own middleware does the work."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware

from reconciler.config.schema import CorsSpec
from reconciler.gateway.asgi import ASGIApp, Receive, Scope, Send

NOT_FOR_BROWSERS = frozenset(("/metrics",))
# Headers a browser client may read: what the gateway chose and why, and the request id.
EXPOSED = ["x-tensorforge-backend", "x-tensorforge-route", "x-tensorforge-max-tokens", "x-request-id",
           "x-backend-request-id", "retry-after"]  # fmt: skip


def with_cors(app: ASGIApp, spec: CorsSpec) -> ASGIApp:
    """`app` wrapped for `spec`; `app` itself when no origin is allowed (no cost per request)."""
    if not spec.allow_origins:
        return app
    cors = CORSMiddleware(
        app, allow_origins=list(spec.allow_origins), allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
        allow_headers=["*"], expose_headers=EXPOSED, max_age=600,
    )  # fmt: skip

    async def entry(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in NOT_FOR_BROWSERS:
            await cors(scope, receive, send)
        else:
            await app(scope, receive, send)

    return entry
