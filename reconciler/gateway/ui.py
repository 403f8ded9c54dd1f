"""The status page, `GET /ui`: one server-rendered HTML page plus a little JavaScript and CSS,
all served by the gateway from package data (no build step, no CDN). With keys off the first
render already shows the backends; with keys on it shows nothing until the key is given (the
page is public, so it must hold no data), which the script keeps in the tab (sessionStorage)
only. The script then follows /status and the /ws feed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from jinja2 import Environment, Template
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from reconciler.gateway.core import GatewayCore
from reconciler.gateway.ops_status import OpsState, backends_document

ASSETS = {"/ui/app.js": ("app.js", "text/javascript"), "/ui/style.css": ("style.css", "text/css")}
UI_PATHS = frozenset(("/ui", *ASSETS))
# The page runs only its own script and style, and talks only to this gateway.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@cache
def _asset(name: str) -> str:
    return (
        resources.files("reconciler.gateway").joinpath("static", name).read_text(encoding="utf-8")
    )


@cache
def _template() -> Template:
    return Environment(autoescape=True).from_string(_asset("index.html"))


def page(core: GatewayCore, ops: OpsState) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        keyed = core.keys.enabled
        rows = [] if keyed else backends_document(core, ops.status, ops.admin_requests())
        # With keys on, not even the host's name: the page is public.
        html = _template().render(host="" if keyed else core.state.host, keyed=keyed, backends=rows)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    return endpoint


async def asset(request: Request) -> Response:
    name, media_type = ASSETS[request.url.path]
    return Response(_asset(name), media_type=media_type, headers=SECURITY_HEADERS)


def ui_routes(core: GatewayCore, ops: OpsState) -> list[Route]:
    return [
        Route("/ui", page(core, ops), methods=["GET"]),
        *(Route(path, asset, methods=["GET"]) for path in ASSETS),
    ]
