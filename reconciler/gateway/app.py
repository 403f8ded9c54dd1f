"""The gateway application: the core (core.py: admission, routing, proxy, watchers) with the
surfaces on top (OpenAI, Ollama, WebSocket, operations, and the small endpoints here), the
key check in front, an app factory; nothing at module level that a second gateway in the
same process could trip over. This module only assembles: nothing imports it but callers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from reconciler.config.schema import DesiredState
from reconciler.gateway.asgi import Receive, Scope, Send
from reconciler.gateway.auth import with_api_key_header
from reconciler.gateway.core import GatewayCore, context_limits, make_transports, upstream_timeout
from reconciler.gateway.cors import with_cors
from reconciler.gateway.errors import GatewayError, error_response
from reconciler.gateway.ollama_api import OllamaSurface, ollama_error, ollama_error_response
from reconciler.gateway.openai_api import OPENAI_ENDPOINTS, OpenAIEndpoints
from reconciler.gateway.openapi import openapi_document
from reconciler.gateway.ops_api import OpsSurface
from reconciler.gateway.reload import StateWatcher
from reconciler.gateway.request_id import with_request_id
from reconciler.gateway.websocket import WEBSOCKET_PATH, websocket_endpoint
from reconciler.gpu.inventory import GpuInventory

__all__ = ["Gateway", "context_limits", "create_app", "make_transports", "upstream_timeout"]
log = logging.getLogger(__name__)
STARTUP_HEALTH_WAIT = 1.0  # serve after this long even if a backend's probe hangs
KEYS_POLL_SECONDS = 1.0
# Answered without a key even when keys are on: liveness, and Prometheus scraping (counters
# and backend names only; bind the gateway to 127.0.0.1 or firewall it, see docs/reliability.md).
PUBLIC_PATHS = frozenset(("/health",))  # /metrics too needs a key: Prometheus sends one


class Gateway(GatewayCore):
    """Everything one gateway instance owns. It is itself the ASGI app: the OpenAI endpoints
    are dispatched directly, everything else goes through Starlette."""

    def __init__(
        self,
        state: DesiredState,
        transports: dict[str, httpx.AsyncBaseTransport] | None = None,
        config_path: str | None = None,
        gpus: GpuInventory | None = None,
    ):
        super().__init__(state, transports, gpus)
        self.watcher = StateWatcher(config_path, self.apply_state) if config_path else None
        self.openai = OpenAIEndpoints(self)
        self.ollama = OllamaSurface(self)
        self.ops = OpsSurface(
            self
        )  # /status, /vram, /backends, /models, /ws, /ui (docs/operations.md)
        self.app = Starlette(
            routes=[
                Route("/health", self.health_endpoint, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/v1/models", self.models_endpoint, methods=["GET"]),
                # Hub-style ids hold slashes (Qwen/Qwen3-235B): take the rest of the path.
                Route("/v1/models/{model:path}", self.model_endpoint, methods=["GET"]),
                Route("/openapi.json", self.openapi_endpoint, methods=["GET"]),
                WebSocketRoute(WEBSOCKET_PATH, websocket_endpoint(self)),
                *self.ollama.routes(),
                *self.ops.routes(),
            ],
            lifespan=self.lifespan,
            exception_handlers={404: route_error, 405: route_error},
        )
        self.app.state.gateway = self
        self._entry = with_cors(with_request_id(self._dispatch), self.spec.cors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys.enabled and scope["type"] in ("http", "websocket"):
            scope = with_api_key_header(scope)  # X-API-Key counts as 'Authorization: Bearer'
        if (
            scope["type"] == "http"
            and scope["path"] in OPENAI_ENDPOINTS
            and scope["method"] == "POST"
        ):
            await self.openai(scope, receive, send)  # admits (and holds) the key itself
            return
        if (self.keys.enabled and scope["type"] in ("http", "websocket") and scope["path"] not in PUBLIC_PATHS
                and not (scope["type"] == "websocket" and scope["path"] == WEBSOCKET_PATH)  # checks it itself
                and not self.ops.admits(scope)):  # fmt: skip
            # Every other path, known or not, needs a key: a route added later cannot be open
            # by accident, and an unknown path tells a stranger nothing.
            try:
                self.admission.identify(dict(scope["headers"]).get(b"authorization"))
            except GatewayError as refusal:
                if scope["type"] == "websocket":
                    await send(
                        {
                            "type": "websocket.close",
                            "code": 4401,
                            "reason": "missing or invalid API key",
                        }
                    )
                elif scope["path"].startswith("/api/"):
                    await ollama_error(refusal)(scope, receive, send)
                else:
                    await as_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def apply_state(self, state: DesiredState) -> None:
        """Swap in the routes of a new desired state; streams already open keep going."""
        super().apply_state(state)
        self._entry = with_cors(with_request_id(self._dispatch), self.spec.cors)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(self.health.run()), asyncio.create_task(self.load.run()),
                 asyncio.create_task(self.gpu_headroom.run())]  # fmt: skip
        if self.watcher is not None:
            tasks.append(asyncio.create_task(self.watcher.run()))
        if self.keys.enabled:
            tasks.append(asyncio.create_task(self._watch_keys()))
        tasks += [asyncio.create_task(work) for work in self.ops.tasks()]
        with contextlib.suppress(TimeoutError):  # route from the first request when we can
            await asyncio.wait_for(self.health.first_round.wait(), STARTUP_HEALTH_WAIT)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()
            await self.ops.close()  # publishes what NATS events are still queued

    async def _watch_keys(self) -> None:
        """Pick up an edited keys file (added or revoked keys) without a restart."""
        while True:
            await asyncio.sleep(KEYS_POLL_SECONDS)
            try:
                self.keys.reload_if_changed()
            except (
                Exception
            ):  # keep watching: a revoked key must stop working once the file is fixed
                log.exception("reading %s failed; keeping the last good keys", self.keys.path)

    # -- small endpoints -------------------------------------------------------------------
    async def health_endpoint(self, request: Request) -> Response:
        upstreams = list(self.upstreams())
        summary = {"status": "ok", "backends_healthy": sum(1 for u in upstreams if u.healthy),
                   "backends_total": len(upstreams)}  # fmt: skip
        if self.keys.enabled and not _trusted_for_detail(self, request):
            # /health stays open for load balancers; what is served, and how loaded, is for
            # callers with a key and for this host (the reconciler reads drain progress here).
            return JSONResponse(summary)
        backends = {
            u.name: {"model": u.model, "healthy": u.healthy, "detail": u.health_detail,
                     "circuit_open": u.circuit_open, "in_flight": u.in_flight, "limit": u.limit,
                     "gpu_free": u.gpu_free, "warm": u.warm, "wedged": u.wedged}
            for u in upstreams
        }  # fmt: skip
        return JSONResponse({**summary, "backends": backends})

    async def openapi_endpoint(self, request: Request) -> Response:
        return JSONResponse(openapi_document(list(self.table.names)))

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(
            self.metrics.render(self.upstreams()), media_type="text/plain; version=0.0.4"
        )

    async def models_endpoint(self, request: Request) -> Response:
        try:
            self.admission.identify(request.headers.get("authorization"))
        except GatewayError as refusal:
            return as_response(refusal)
        cards = [self._model_card(n) for n in self.table.served_models()]
        return JSONResponse({"object": "list", "data": cards, "routing": self.table.describe()})

    async def model_endpoint(self, request: Request) -> Response:
        """OpenAI's "retrieve model" (`client.models.retrieve`): a served name or an alias."""
        try:
            self.admission.identify(request.headers.get("authorization"))
        except GatewayError as refusal:
            return as_response(refusal)
        requested = request.path_params["model"]
        model = self.router.resolve(requested)
        if model is None:
            return as_response(self.routing.unknown_model(requested))
        return JSONResponse({**self._model_card(model), "id": requested, "root": model})

    def _model_card(self, name: str) -> dict[str, Any]:
        aliases = sorted(a for a, m in self.table.names.items() if m == name and a != name)
        return {"id": name, "object": "model", "created": int(self.started), "owned_by": "tensorforge",
                "aliases": aliases}  # fmt: skip


async def route_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods in the API's error shape, not Starlette's plain text."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    status, headers = exc.status_code, exc.headers
    if status == 404 and path in OPENAI_ENDPOINTS:  # routed before Starlette, for POST only
        status, headers = 405, {"Allow": "POST"}
    if status == 405:
        allowed = (headers or {}).get("Allow")
        message, code = (
            f"{request.method} is not allowed on {path} (allowed: {allowed})",
            "method_not_allowed",
        )
    else:
        message, code = f"no such endpoint: {request.method} {path}", "unknown_endpoint"
    if path.startswith("/api/"):  # Ollama's error shape
        return ollama_error_response(status, message, headers)
    return error_response(status, message, code, headers)


def _trusted_for_detail(gateway: Gateway, request: Request) -> bool:
    """A key holder, or a caller on this host: loopback (an IPv4 one seen by a `::` listener
    as ::ffff:127.0.0.1), or the very address it connected to (a local process calling the
    gateway's LAN address, as the reconciler does when gateway.host is one)."""
    client = request.client.host if request.client else ""
    server = (request.scope.get("server") or ("",))[0]
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        address = None
    if address is not None:
        address = getattr(address, "ipv4_mapped", None) or address
        if address.is_loopback or client == server:
            return True
    return gateway.keys.identify(request.headers.get("authorization")) is not None


def as_response(error: GatewayError) -> Response:
    headers = {"retry-after": error.retry_after} if error.retry_after else None
    return Response(
        error.openai_json(), error.status, headers=headers, media_type="application/json"
    )


def create_app(
    state: DesiredState,
    transports: dict[str, httpx.AsyncBaseTransport] | None = None,
    config_path: str | None = None,
    gpus: GpuInventory | None = None,
) -> Gateway:
    return Gateway(state, transports, config_path, gpus)
