"""The gateway's Starlette application: an app factory, the OpenAI endpoints, and nothing
at module level that a second app in the same process could trip over."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reconciler.config.schema import DesiredState, GatewaySpec
from reconciler.gateway.errors import error_response
from reconciler.gateway.health import HealthMonitor
from reconciler.gateway.proxy import Proxy, ProxyCall
from reconciler.gateway.router import Router, RoutingTable

OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class BodyTooLarge(Exception):
    pass


def make_client(spec: GatewaySpec) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=spec.connect_timeout, read=spec.idle_timeout, write=spec.idle_timeout, pool=spec.connect_timeout
    )
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


class Gateway:
    """Everything one gateway instance owns; the Starlette app hangs off it."""

    def __init__(self, state: DesiredState, client: httpx.AsyncClient | None = None):
        self.state = state
        self.spec = state.gateway
        self._own_client = client is None
        self.client = client or make_client(self.spec)
        self.table = RoutingTable.from_state(state)
        self.router = Router(self.table, self.spec.routing.strategy)
        self.proxy = Proxy(self.client, self.router, self.spec.first_byte_timeout)
        self.health = HealthMonitor(self.client, self.spec.health_interval)
        self.health.upstreams = list(self.table.upstreams.values())
        self.started = time.time()
        self.app = Starlette(
            routes=[
                Route("/health", self.health_endpoint, methods=["GET"]),
                Route("/v1/models", self.models_endpoint, methods=["GET"]),
                *(Route(p, self.openai_endpoint, methods=["POST"]) for p in OPENAI_ENDPOINTS),
            ],
            lifespan=self.lifespan,
        )
        self.app.state.gateway = self

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.health.check_all()  # route from the first request, not after an interval
        task = asyncio.create_task(self.health.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self._own_client:
                await self.client.aclose()

    # -- endpoints -----------------------------------------------------------------------
    async def health_endpoint(self, request: Request) -> Response:
        backends = {
            u.name: {"model": u.model, "healthy": u.healthy, "detail": u.health_detail}
            for u in self.table.upstreams.values()
        }
        healthy = sum(1 for b in backends.values() if b["healthy"])
        return JSONResponse(
            {"status": "ok", "backends_healthy": healthy, "backends_total": len(backends), "backends": backends}
        )

    async def models_endpoint(self, request: Request) -> Response:
        data = []
        for name in self.table.served_models():
            aliases = sorted(a for a, m in self.table.names.items() if m == name and a != name)
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": int(self.started),
                    "owned_by": "tensorforge",
                    "aliases": aliases,
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def openai_endpoint(self, request: Request) -> Response:
        try:
            raw = await self._read_body(request)
        except BodyTooLarge:
            return error_response(
                413, f"request body exceeds {self.spec.max_body_bytes} bytes", "body_too_large"
            )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(400, f"request body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", "invalid_request")
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            return error_response(400, "'model' is required and must be a string", "missing_model")
        model = self.router.resolve(requested)
        if model is None:
            known = ", ".join(sorted(self.table.names)) or "none"
            return error_response(
                404, f"model {requested!r} not found; known models: {known}", "model_not_found"
            )
        call = ProxyCall(
            endpoint=request.url.path,
            body=body,
            raw=raw,
            model=model,
            requested_model=requested,
            stream=body.get("stream") is True,
            affinity_key=request.headers.get(self.spec.routing.affinity_header),
        )
        return await self.proxy.forward(call)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.spec.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)


def create_app(state: DesiredState, client: httpx.AsyncClient | None = None) -> Starlette:
    return Gateway(state, client).app
