"""The gateway application: an app factory, the small endpoints, admission (keys, limits),
and nothing at module level that a second gateway in the same process could trip over."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator

import httpx
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from reconciler.config.schema import DesiredState, GatewaySpec
from reconciler.drain import drain_dir
from reconciler.gateway.auth import ApiKeys, with_api_key_header
from reconciler.gateway.backend_info import request_context
from reconciler.gateway.cors import with_cors
from reconciler.gateway.errors import error_response
from reconciler.gateway.gpu_headroom import GpuHeadroom
from reconciler.gateway.health import HealthMonitor
from reconciler.gateway.limits import ConcurrencyLimiter
from reconciler.gateway.load import LoadScraper
from reconciler.gateway.metrics import GatewayMetrics
from reconciler.gateway.ollama_api import OllamaSurface, ollama_error_response
from reconciler.gateway.openai_api import (
    OPENAI_ENDPOINTS,
    OpenAIEndpoints,
    check_fields,
    parse_json,
)
from reconciler.gateway.openapi import openapi_document
from reconciler.gateway.ops_api import OpsSurface
from reconciler.gateway.proxy import Answer, Proxy, error_answer
from reconciler.gateway.reload import StateWatcher
from reconciler.gateway.request_id import with_request_id
from reconciler.gateway.routed import Routed, auto_model, route_request
from reconciler.gateway.router import Router, RoutingTable
from reconciler.gateway.slots import SlotWatch
from reconciler.gateway.transport import LeanTransport
from reconciler.gateway.websocket import websocket_endpoint
from reconciler.gpu.inventory import GpuInventory, NvmlInventory
from reconciler.monitoring.gpu_exporter import placement_from_state
from reconciler.paths import state_dir

log = logging.getLogger(__name__)
STARTUP_HEALTH_WAIT = 1.0  # serve after this long even if a backend's probe hangs
KEYS_POLL_SECONDS = 1.0
# Answered without a key even when keys are on: liveness, and Prometheus scraping (counters
# and backend names only; bind the gateway to 127.0.0.1 or firewall it, see docs/reliability.md).
PUBLIC_PATHS = frozenset(("/health",))  # /metrics too needs a key: Prometheus sends one


def upstream_timeout(spec: GatewaySpec) -> httpx.Timeout:
    return httpx.Timeout(
        connect=spec.connect_timeout, read=spec.idle_timeout, write=spec.idle_timeout, pool=spec.connect_timeout
    )


def make_transports(spec: GatewaySpec) -> dict[str, httpx.AsyncBaseTransport]:
    """Per URL scheme. Plain http (local and LAN backends) gets the lean transport; https gets
    httpx-aiohttp's, which stays fast with many connections (httpx's own pool was measured
    to degrade at concurrency 64). TF_GATEWAY_TRANSPORT=aiohttp uses it for http too."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256, keepalive_expiry=15)
    secure = AiohttpTransport(limits=limits)
    if os.environ.get("TF_GATEWAY_TRANSPORT") == "aiohttp":
        return {"http": secure, "https": secure}
    return {"http": LeanTransport(spec.connect_timeout), "https": secure}


class Gateway:
    """Everything one gateway instance owns. It is itself the ASGI app: the OpenAI endpoints
    are dispatched directly, everything else goes through Starlette."""

    def __init__(
        self,
        state: DesiredState,
        transports: dict[str, httpx.AsyncBaseTransport] | None = None,
        config_path: str | None = None,
        gpus: GpuInventory | None = None,
    ):
        self.state = state
        self.spec = state.gateway
        self.context_limits = context_limits(state)
        self.affinity_header = self.spec.routing.affinity_header.lower().encode()
        self.metrics = GatewayMetrics()
        self.keys = ApiKeys(self.spec.api_keys_file)
        self.key_limits = ConcurrencyLimiter(self.spec.max_concurrency_per_key)
        self.router = Router(
            RoutingTable.from_state(state), self.spec.routing.strategy, self.spec.routing.load_threshold
        )
        self.transports = transports or make_transports(self.spec)
        # Probes get a plain httpx client of their own: exact error types ("connection
        # refused"), and no competition with requests for the proxy's connections.
        self.probe_client = httpx.AsyncClient(timeout=upstream_timeout(self.spec))
        self.slot_watch = SlotWatch(self.probe_client)  # slots left busy by cancelled requests
        self.proxy = Proxy(
            self.transports, upstream_timeout(self.spec), self.router, self.metrics, self.spec.first_byte_timeout,
            self.slot_watch,
        )  # fmt: skip
        self.health = HealthMonitor(
            self.probe_client, self.spec.health_interval, self.upstreams,
            drain_dir=drain_dir(state_dir(state.state_dir)),  # see reconciler/drain.py
        )  # fmt: skip
        self.load = LoadScraper(self.probe_client, self.spec.health_interval, self.upstreams)
        self.status_file = state_dir(state.state_dir) / "status.json"
        self.gpu_headroom = GpuHeadroom(
            gpus if gpus is not None else NvmlInventory(), self.local_placement, self.spec.health_interval, self.upstreams
        )
        self.watcher = StateWatcher(config_path, self.apply_state) if config_path else None
        self.openai = OpenAIEndpoints(self)
        self.ollama = OllamaSurface(self)
        self.ops = OpsSurface(self)  # /status, /vram, /backends, /models, /ws, /ui (docs/operations.md)
        self.started = time.time()
        self.app = Starlette(
            routes=[
                Route("/health", self.health_endpoint, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/v1/models", self.models_endpoint, methods=["GET"]),
                # Hub-style ids hold slashes (Qwen/Qwen3-235B): take the rest of the path.
                Route("/v1/models/{model:path}", self.model_endpoint, methods=["GET"]),
                Route("/openapi.json", self.openapi_endpoint, methods=["GET"]),
                WebSocketRoute("/v1/ws", websocket_endpoint(self)),
                *self.ollama.routes(),
                *self.ops.routes(),
            ],
            lifespan=self.lifespan,
            exception_handlers={404: route_error, 405: route_error},
        )
        self.app.state.gateway = self
        self._entry = with_cors(with_request_id(self._dispatch), self.spec.cors)

    async def __call__(self, scope, receive, send) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope, receive, send) -> None:
        if self.keys.enabled and scope["type"] in ("http", "websocket"):
            scope = with_api_key_header(scope)  # X-API-Key counts as 'Authorization: Bearer'
        if scope["type"] == "http" and scope["path"] in OPENAI_ENDPOINTS and scope["method"] == "POST":
            await self.openai(scope, receive, send)  # admits (and holds) the key itself
            return
        if (self.keys.enabled and scope["type"] in ("http", "websocket") and scope["path"] not in PUBLIC_PATHS
                and not self.ops.admits(scope)):  # fmt: skip
            # Every other path, known or not, needs a key: a route added later cannot be open
            # by accident, and an unknown path tells a stranger nothing.
            _, refusal = self.admit(dict(scope["headers"]).get(b"authorization"), hold=False)
            if refusal is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 4401, "reason": "missing or invalid API key"})
                    return
                if scope["path"].startswith("/api/"):  # Ollama's error shape
                    refusal.body = json.dumps({"error": json.loads(refusal.body)["error"]["message"]}).encode()
                await as_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def local_placement(self) -> dict[int, list[str]]:
        """GPU index -> backends this host runs on it (the reconciler's status file, pinned
        `gpu_ids`); a backend declared by URL runs elsewhere, on GPUs this host cannot see."""
        local = {name for name, b in self.state.backends.items() if b.managed}
        placed = placement_from_state(self.state, self.status_file)()
        return {index: [n for n in names if n in local] for index, names in placed.items()}

    @property
    def table(self) -> RoutingTable:
        return self.router.table

    def upstreams(self):
        return self.router.table.upstreams.values()

    def apply_state(self, state: DesiredState) -> None:
        """Swap in the routes of a new desired state; streams already open keep going."""
        self.router.table = RoutingTable.from_state(state, previous=self.router.table)
        self.router.strategy = state.gateway.routing.strategy
        self.router.load_threshold = state.gateway.routing.load_threshold
        self.context_limits = context_limits(state)
        self.state = state
        self.spec = state.gateway
        self._entry = with_cors(with_request_id(self._dispatch), self.spec.cors)
        asyncio.get_running_loop().create_task(self.health.check_all())

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
            await self.slot_watch.close()
            await self.probe_client.aclose()
            for transport in set(self.transports.values()):
                await transport.aclose()
            await self.ops.close()  # publishes what NATS events are still queued

    async def _watch_keys(self) -> None:
        """Pick up an edited keys file (added or revoked keys) without a restart."""
        while True:
            await asyncio.sleep(KEYS_POLL_SECONDS)
            try:
                self.keys.reload_if_changed()
            except Exception:  # keep watching: a revoked key must stop working once the file is fixed
                log.exception("reading %s failed; keeping the last good keys", self.keys.path)

    # -- admission -------------------------------------------------------------------------
    def reject(self, status: int, message: str, code: str, retry_after: str | None = None) -> Answer:
        self.metrics.rejected.labels(code).inc()
        return error_answer(status, message, code, retry_after)

    def unknown_model(self, requested: object) -> Answer:
        """404 naming what is served, so the client can fix the name."""
        known = ", ".join(sorted(self.table.names)) or "none"
        return self.reject(404, f"model {requested!r} not found; known models: {known}", "model_not_found")

    def admit(
        self, authorization: bytes | str | None, hold: bool = True
    ) -> tuple[str | None, Answer | None]:
        """(key identity to release later, refusal or None); `hold` takes one of the key's
        concurrent-request slots."""
        if not self.keys.enabled:
            return None, None
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        key = self.keys.identify(authorization)
        if key is None:
            return None, self.reject(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                "invalid_api_key",
            )
        if hold and not self.key_limits.try_acquire(key):
            return None, self.reject(
                429, f"this API key already has {self.key_limits.limit} requests open; retry shortly",
                "key_concurrency_limit", retry_after="1",
            )  # fmt: skip
        return (key if hold else None), None

    def release_key(self, key: str | None) -> None:
        if key is not None:
            self.key_limits.release(key)

    async def route(self, raw: bytes, endpoint: str, headers: dict[bytes, bytes]) -> Routed | Answer:
        """The request checked, its backends chosen (by name, or by its needs for `auto` and
        the names mapped to it) and its max_tokens clamped to what fits; or the error answer."""
        return await route_request(self, raw, endpoint, headers)

    def parse_request(self, raw: bytes, endpoint: str | None = None) -> tuple[dict, str] | Answer:
        """(body, canonical model) or the error answer for a bad request. With `endpoint`,
        the fields the gateway and its adapters read are checked too: a malformed request is
        the client's 400, never a backend failure. `auto` and placeholders choose by the
        estimate only (no tokenizer call, no clamping): `route` is the full path."""
        body = parse_json(raw)
        if isinstance(body, tuple):
            return self.reject(400, *body)
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            return self.reject(400, "'model' is required and must be a string", "missing_model")
        resolution = self.table.resolve_request(requested)
        if resolution is None:
            return self.unknown_model(requested)
        model = resolution.model or auto_model(self.table, endpoint or "/v1/chat/completions", body)
        if model is None:
            return self.reject(503, f"auto ({requested!r}): no backend can answer this request", "no_healthy_backend")
        if endpoint is not None:
            problem = check_fields(endpoint, body)
            if problem is not None:
                return self.reject(400, *problem)
        return body, model

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
        return Response(self.metrics.render(self.upstreams()), media_type="text/plain; version=0.0.4")

    async def models_endpoint(self, request: Request) -> Response:
        _, refusal = self.admit(request.headers.get("authorization"), hold=False)
        if refusal is not None:
            return as_response(refusal)
        cards = [self._model_card(n) for n in self.table.served_models()]
        return JSONResponse({"object": "list", "data": cards, "routing": self.table.describe()})

    async def model_endpoint(self, request: Request) -> Response:
        """OpenAI's "retrieve model" (`client.models.retrieve`): a served name or an alias."""
        _, refusal = self.admit(request.headers.get("authorization"), hold=False)
        if refusal is not None:
            return as_response(refusal)
        requested = request.path_params["model"]
        model = self.router.resolve(requested)
        if model is None:
            return as_response(self.unknown_model(requested))
        return JSONResponse({**self._model_card(model), "id": requested, "root": model})

    def _model_card(self, name: str) -> dict:
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
        message, code = f"{request.method} is not allowed on {path} (allowed: {allowed})", "method_not_allowed"
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


def as_response(answer: Answer) -> Response:
    headers = {"retry-after": answer.retry_after} if answer.retry_after else None
    return Response(answer.body, answer.status, headers=headers, media_type=answer.content_type.decode())


def context_limits(state: DesiredState) -> dict[str, int]:
    """Per model, the most tokens one request can have (backend_info.request_context: each
    kind's own rule), the largest among the model's backends. A backend running elsewhere
    (`url`) without a declared context_size makes the model's limit unknown (the backend judges)."""
    limits: dict[str, int] = {}
    unknown: set[str] = set()
    for backend in state.backends.values():
        per_request = request_context(backend)
        if per_request is None:
            unknown.add(backend.model)
            continue
        limits[backend.model] = max(limits.get(backend.model, 0), per_request)
    return {model: limit for model, limit in limits.items() if model not in unknown}


def create_app(
    state: DesiredState,
    transports: dict[str, httpx.AsyncBaseTransport] | None = None,
    config_path: str | None = None,
    gpus: GpuInventory | None = None,
) -> Gateway:
    return Gateway(state, transports, config_path, gpus)
