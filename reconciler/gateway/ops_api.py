"""The operations plane's HTTP surface: read-only status (`/status`, `/vram`, `/backends`,
`/models`, `/models/{name}`), the live feed (`/ws`, reconciler/gateway/telemetry.py), the page
(`/ui`, reconciler/gateway/ui.py) and a small write surface for operators.

Keys: with `gateway.api_keys_file` set, reading needs a user key or an admin key; the page
itself is public (it holds no data and asks for a key). Writing always needs a key from
`gateway.admin_keys_file` (kept apart from user keys); without that file the write surface is
off. A write never acts on a backend: it records a request for the reconciler
(reconciler/admin_requests.py), which drains or restarts through its own drain path."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from reconciler import __version__
from reconciler.admin_requests import AdminRequest, read_requests, withdraw, write_request
from reconciler.gateway.asgi import Scope
from reconciler.gateway.auth import ApiKeyError, ApiKeys
from reconciler.gateway.core import GatewayCore
from reconciler.gateway.errors import error_response
from reconciler.gateway.events import NatsEvents
from reconciler.gateway.ops_status import (
    ModelCatalog,
    OpsState,
    backends_document,
    gateway_counters,
    reconciler_section,
    vram_document,
)
from reconciler.gateway.telemetry import Telemetry, presented_key
from reconciler.gateway.ui import UI_PATHS, ui_routes

log = logging.getLogger(__name__)
READ_PATHS = ("/status", "/vram", "/backends", "/models")
KEYS_POLL_SECONDS = 1.0


class AdminKeys(ApiKeys):
    """Same file format as user keys; its errors name gateway.admin_keys_file."""

    def load(self) -> None:
        try:
            super().load()
        except ApiKeyError as exc:
            raise ApiKeyError(
                str(exc).replace("gateway.api_keys_file", "gateway.admin_keys_file")
            ) from None


class OpsSurface:
    def __init__(self, core: GatewayCore):
        self.core = core
        state = core.state
        self.ops = OpsState(core)
        self.status = self.ops.status
        self.requests_dir = self.ops.requests_dir
        self.admin_keys = AdminKeys(state.gateway.admin_keys_file)
        self.models = ModelCatalog(core)
        self.telemetry = Telemetry(core, self.ops, self.may_read)
        self.events = (
            NatsEvents(state.events, state.host, core.metrics.registry)
            if state.events.nats_url
            else None
        )
        core.proxy.observers.append(self.telemetry)
        if self.events is not None:
            core.proxy.observers.append(self.events)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/status", self.get_status, methods=["GET"]),
            Route("/vram", self.get_vram, methods=["GET"]),
            Route("/backends", self.get_backends, methods=["GET"]),
            Route("/backends/{name}/drain", self.drain, methods=["POST", "DELETE"]),
            Route("/backends/{name}/restart", self.restart, methods=["POST"]),
            Route("/models", self.get_models, methods=["GET"]),
            Route("/models/{name}", self.get_model, methods=["GET"]),
            WebSocketRoute("/ws", self.telemetry.endpoint),
            *ui_routes(self.core, self.ops),
        ]

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        """Coroutines the gateway runs for its lifetime."""
        work = [self.telemetry.run()]
        if self.events is not None:
            work.append(self.events.run())
        if self.admin_keys.enabled:
            work.append(self._watch_admin_keys())
        return work

    async def close(self) -> None:
        if self.events is not None:
            await self.events.close()

    async def _watch_admin_keys(self) -> None:
        while True:  # an added or revoked admin key works without a restart
            await asyncio.sleep(KEYS_POLL_SECONDS)
            self.admin_keys.reload_if_changed()

    # -- keys ---------------------------------------------------------------------------------
    def admits(self, scope: Scope) -> bool:
        """For the gateway's key check: let through what this surface checks itself (the
        public page; an admin key or a browser's subprotocol key on the operations paths)."""
        path = scope["path"]
        if path in UI_PATHS:
            return True
        if path != "/ws" and not path.startswith(READ_PATHS):
            return False
        if scope["type"] == "websocket":
            authorization, _ = presented_key(
                _header(scope, b"authorization"), scope.get("subprotocols") or []
            )
            return self.may_read(authorization)
        return self.admin_keys.identify(_header(scope, b"authorization")) is not None

    def may_read(self, authorization: str | None) -> bool:
        keys = self.core.keys
        if not keys.enabled:
            return True
        return (
            keys.identify(authorization) is not None
            or self.admin_keys.identify(authorization) is not None
        )

    def _refuse_read(self, request: Request) -> Response | None:
        if self.may_read(request.headers.get("authorization")):
            return None
        return error_response(
            401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "invalid_api_key"
        )

    def admin_requests(self) -> dict[str, AdminRequest]:
        return self.ops.admin_requests()

    def status_document(self) -> dict[str, Any]:
        core = self.core
        requests, problems = read_requests(self.requests_dir, core.state.backends)
        return {
            "host": core.state.host,
            "hostname": socket.gethostname(),
            "version": __version__,
            "time": time.time(),
            "reconciler": reconciler_section(self.status, requests, problems),
            "backends": backends_document(core, self.status, requests),
            "gateway": {
                **gateway_counters(core),
                "recent": self.telemetry.recent.summary(),
                "events": self.events.describe() if self.events else None,
            },  # fmt: skip
        }

    # -- reads --------------------------------------------------------------------------------
    async def get_status(self, request: Request) -> Response:
        return self._refuse_read(request) or JSONResponse(self.status_document())

    async def get_vram(self, request: Request) -> Response:
        return self._refuse_read(request) or JSONResponse(await vram_document(self.core, self.ops))

    async def get_backends(self, request: Request) -> Response:
        refusal = self._refuse_read(request)
        if refusal is not None:
            return refusal
        return JSONResponse(
            {"backends": backends_document(self.core, self.status, self.admin_requests())}
        )

    async def get_models(self, request: Request) -> Response:
        refusal = self._refuse_read(request)
        if refusal is not None:
            return refusal
        rows, problem = self.models.rows()
        return JSONResponse({"models": rows, **({"registry_problem": problem} if problem else {})})

    async def get_model(self, request: Request) -> Response:
        refusal = self._refuse_read(request)
        if refusal is not None:
            return refusal
        name = request.path_params["name"]
        model = self.core.router.resolve(name) or name  # an alias names its model
        rows, problem = self.models.rows(only=model)
        if not rows:
            known = ", ".join(sorted(self.core.state.models)) or "none"
            return error_response(
                404, f"model {name!r} is not declared; known models: {known}", "model_not_found"
            )
        return JSONResponse({**rows[0], **({"registry_problem": problem} if problem else {})})

    # -- writes -------------------------------------------------------------------------------
    def _admin(self, request: Request) -> tuple[str | None, Response | None]:
        """(the admin client's name, refusal)."""
        if not self.admin_keys.enabled:
            return None, error_response(
                403,
                "the admin API is off: set gateway.admin_keys_file to a file of admin keys",
                "admin_api_off",
            )
        client = self.admin_keys.identify(request.headers.get("authorization"))
        if client is None:
            return None, error_response(
                401, "this needs an admin key (gateway.admin_keys_file): send 'Authorization: Bearer <admin key>'",
                "invalid_admin_key",
            )  # fmt: skip
        return client, None

    def _backend(self, request: Request, action: str) -> tuple[str, Response | None]:
        name = request.path_params["name"]
        backend = self.core.state.backends.get(name)
        if backend is None:
            known = ", ".join(sorted(self.core.state.backends)) or "none"
            return name, error_response(404, f"no backend {name!r} in the desired state; known: {known}",
                                        "backend_not_found")  # fmt: skip
        if action == "restart" and not backend.managed:
            return name, error_response(
                409, f"backend {name!r} runs elsewhere ({backend.url}): this host's reconciler cannot restart it",
                "backend_not_managed",
            )  # fmt: skip
        return name, None

    async def drain(self, request: Request) -> Response:
        client, refusal = self._admin(request)
        name, missing = self._backend(request, "drain")
        if refusal or missing:
            return refusal or missing  # type: ignore[return-value]
        if request.method == "DELETE":
            if not withdraw(self.requests_dir, name, "drain"):
                return error_response(
                    404, f"no drain request for {name!r} to withdraw", "no_drain_request"
                )
            log.info("admin %s withdrew the drain of %s", client, name)
            return JSONResponse(
                {"backend": name, "message": "drain withdrawn: the reconciler routes to it again"}
            )
        return self._record(name, "drain", client)

    async def restart(self, request: Request) -> Response:
        client, refusal = self._admin(request)
        name, missing = self._backend(request, "restart")
        if refusal or missing:
            return refusal or missing  # type: ignore[return-value]
        return self._record(name, "restart", client)

    def _record(self, name: str, action: Any, client: str | None) -> Response:
        try:
            recorded = write_request(self.requests_dir, name, action, client or "admin")
        except OSError as exc:
            log.error("cannot record a %s request for %s: %s", action, name, exc)
            return error_response(503, f"cannot write the request to {self.requests_dir}: {exc.strerror}; "
                                  "the gateway needs write access there (TF_ADMIN_REQUESTS_DIR)", "request_not_recorded")  # fmt: skip
        log.info("admin %s asked to %s %s (request %s)", client, action, name, recorded.id)
        answer = {"backend": name, "action": action, "request_id": recorded.id,
                  "message": f"recorded: the reconciler will {action} {name} through its drain path on its next pass",
                  "requests_dir": str(self.requests_dir)}  # fmt: skip
        if not self.status.read():
            answer["warning"] = self.status.error  # nobody may be there to act on it
        return JSONResponse(answer, status_code=202)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
