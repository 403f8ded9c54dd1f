"""An Ollama-compatible surface (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
`/api/show`, `/api/tags`, `/api/ps`, `/api/version`, `/api/pull`, `/api/delete`, and 501 for
copy/create/push), so Ollama clients can use the gateway.

A model served by Ollama backends gets the request as it is. Any other model gets it
translated (`ollama/request.py`) to OpenAI's API (with llama.cpp's sampling fields) or to
llama.cpp's `/infill`, routed like any other request; answers and streams come back in
Ollama's shapes (`ollama/response.py`). Metadata comes from the registry and the model file
(`ollama/metadata.py`), model management from TensorForge's pull (`ollama/management.py`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from reconciler.gateway.core import GatewayCore
from reconciler.gateway.errors import GatewayError
from reconciler.gateway.ollama import management, metadata
from reconciler.gateway.ollama.listing import ModelListing
from reconciler.gateway.ollama.options import Refused, clamp_num_ctx, clamp_num_predict
from reconciler.gateway.ollama.request import Translated, check_keep_alive, embed_body, translate
from reconciler.gateway.ollama.response import (
    Stats,
    StreamTranslator,
    infill_answer,
    ndjson_lines,
    now_iso,
    relay_lines,
    whole_answer,
)
from reconciler.gateway.proxy import Answer
from reconciler.gateway.request_body import BodyTooLarge, read_body
from reconciler.gateway.routed import auto_model


class OllamaSurface:
    def __init__(self, core: GatewayCore):
        self.core = core
        self.listing = ModelListing(core)

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.listing.tags, methods=["GET"]),
            Route("/api/ps", self.listing.ps, methods=["GET"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embed, methods=["POST"]),  # the older single-prompt form
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/pull", self.pull, methods=["POST"]),
            Route("/api/delete", self.delete, methods=["DELETE"]),
            *[
                Route(f"/api/{verb}", self.not_here, methods=["POST"])
                for verb in management.NOT_HERE
            ],
        ]

    # -- helpers ---------------------------------------------------------------------------
    def resolve(self, requested: object) -> str | None:
        """The canonical model for a name; `name:latest` is `name`, as in Ollama."""
        if not isinstance(requested, str) or not requested:
            return None
        router = self.core.router
        return router.resolve(requested) or (
            router.resolve(requested[:-7]) if requested.endswith(":latest") else None
        )

    def protocols(self, model: str) -> set[str]:
        """Wire protocols of every backend a request for `model` may reach (fallbacks too)."""
        table = self.core.table
        models = [model, *table.fallbacks.get(model, [])]
        return {u.protocol for u in table.upstreams.values() if u.model in models}

    def _refuse(self, status: int, message: str, code: str) -> Response:
        return ollama_error(self.core.metrics.refused(status, message, code))

    async def _read(self, request: Request) -> dict[str, Any] | Response:
        """The request's JSON object, read under the same size and time limits as the OpenAI
        endpoints; or the error to answer."""
        g = self.core
        try:
            async with asyncio.timeout(g.spec.idle_timeout):
                raw = await read_body(
                    request.receive, dict(request.scope["headers"]), g.spec.max_body_bytes
                )
        except BodyTooLarge:
            return self._refuse(
                413, f"request body exceeds {g.spec.max_body_bytes} bytes", "body_too_large"
            )
        except TimeoutError:
            return self._refuse(408, "request body not received in time", "body_timeout")
        try:
            native = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):  # UnicodeDecodeError included; too deep a nesting
            return self._refuse(400, "request body is not valid JSON (UTF-8)", "invalid_json")
        if not isinstance(native, dict):
            return self._refuse(400, "request body must be a JSON object", "invalid_request")
        return native

    async def _model(
        self, request: Request, key: str = "model"
    ) -> tuple[dict[str, Any], str, str] | Response:
        """(body, requested name, canonical model) of a request naming a served model."""
        native = await self._read(request)
        if isinstance(native, Response):
            return native
        requested = native.get(key) or native.get("name")  # `name`: older clients
        if not isinstance(requested, str) or not requested:
            return self._refuse(
                400, f"'{key}' is required and must be a model name", "missing_model"
            )
        model = self.resolve(requested)
        if model is None:
            chosen = self.choose(requested, native)
            if chosen is None:
                return ollama_error(self.core.routing.unknown_model(requested))
            if isinstance(chosen, GatewayError):
                return ollama_error(chosen)
            # `auto`, a placeholder or an operator's alias: the answer names the model chosen.
            requested = model = chosen
        return native, requested, model

    def choose(self, requested: str, native: dict[str, Any]) -> str | GatewayError | None:
        """The model for a name only the routing table maps (`auto`, the placeholders,
        model_aliases), chosen by the request's estimated needs; None: an unknown name."""
        g = self.core
        resolution = g.table.resolve_request(requested)
        if resolution is None:
            return None
        if resolution.model is not None:
            return resolution.model
        endpoint = "/v1/chat/completions" if "messages" in native else "/v1/completions"
        model = auto_model(g.table, endpoint, native)
        if model is None:
            return g.metrics.refused(
                503,
                f"auto ({requested!r}): no backend can answer this request",
                "no_healthy_backend",
            )
        return model

    # -- small endpoints -------------------------------------------------------------------
    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": metadata.package_version()})

    async def show(self, request: Request) -> Response:
        """What editors (Continue, Open WebUI) read: context length, capabilities, template.
        A model Ollama holds is described by Ollama itself."""
        found = await self._model(request)
        if isinstance(found, Response):
            return found
        native, requested, model = found
        if self.protocols(model) == {"ollama"}:
            name = requested if self.core.router.resolve(requested) else model
            forwarded = await self._forward(
                request, Translated("/api/show", {**native, "model": name}, None), False
            )
            if isinstance(forwarded, Response):
                return forwarded
            answer, _ = forwarded
            if answer.status != 200:
                return _failed(answer)
            return Response(answer.body, media_type="application/json")
        facts = await self.listing.facts(model)
        return JSONResponse(
            metadata.show(model, requested, facts, self.core.context_limits.get(model))
        )

    async def not_here(self, request: Request) -> Response:
        verb = request.url.path.rsplit("/", 1)[-1]
        return ollama_error_response(
            501, f"/api/{verb} is not available on TensorForge: {management.NOT_HERE[verb]}"
        )

    async def _named(self, request: Request) -> tuple[dict[str, Any], str] | Response:
        """(body, model name) of a request that names a model, registered or not (pull, delete)."""
        native = await self._read(request)
        if isinstance(native, Response):
            return native
        requested = native.get("model") or native.get("name")
        if not isinstance(requested, str) or not requested:
            return self._refuse(
                400, "'model' is required and must be a model name", "missing_model"
            )
        return native, requested

    async def pull(self, request: Request) -> Response:
        named = await self._named(request)
        if isinstance(named, Response):
            return named
        native, requested = named
        try:
            name, spec = management.pull_target(self.core.state, requested)
        except management.NotFound as exc:
            return self._refuse(404, str(exc), "model_not_found")
        except management.Conflict as exc:
            return self._refuse(400, str(exc), "invalid_request")
        lines = management.pull_progress(self.core.state, name, spec)
        if native.get("stream", True) is not False:
            return StreamingResponse(lines, media_type="application/x-ndjson")
        last: dict[str, Any] = {}
        async for line in lines:
            last = json.loads(line)
        if "error" in last:
            return ollama_error_response(500, last["error"])
        return JSONResponse(last)

    async def delete(self, request: Request) -> Response:
        named = await self._named(request)
        if isinstance(named, Response):
            return named
        _, requested = named
        try:
            await asyncio.to_thread(management.delete_model, self.core.state, requested)
        except management.NotFound as exc:
            return self._refuse(404, str(exc), "model_not_found")
        except management.Conflict as exc:
            return self._refuse(409, str(exc), "model_in_use")
        return Response(status_code=200)

    # -- embeddings ------------------------------------------------------------------------
    async def embed(self, request: Request) -> Response:
        """`/api/embed` {model, input: text or texts} -> {model, embeddings: [[...]]}, and the
        older `/api/embeddings` {model, prompt} -> {embedding: [...]}, through /v1/embeddings."""
        g = self.core
        stats = Stats()
        found = await self._model(request)
        if isinstance(found, Response):
            return found
        native, requested, model = found
        legacy = request.url.path == "/api/embeddings"
        texts = native.get("prompt") if legacy else native.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            field = "prompt" if legacy else "input"
            kind = "a string" if legacy else "a string or a non-empty list of strings"
            return self._refuse(400, f"'{field}' must be {kind}", "invalid_request")
        name = requested if g.router.resolve(requested) else model
        protocols = self.protocols(model)
        if protocols == {"ollama"}:  # Ollama's own request, options and all
            translated = Translated(request.url.path, {**native, "model": name}, None)
        else:
            try:
                translated = Translated(
                    "/v1/embeddings", embed_body(native, name, texts, protocols), None
                )
            except Refused as exc:
                return self._refuse(400, str(exc), "invalid_request")
        forwarded = await self._forward(request, translated, stream=False)
        if isinstance(forwarded, Response):
            return forwarded
        answer, _ = forwarded
        if answer.status != 200:
            return _failed(answer)
        result = json.loads(answer.body)
        if protocols == {"ollama"}:
            return JSONResponse({**result, "model": requested} if not legacy else result)
        vectors = [
            d["embedding"]
            for d in sorted(result.get("data") or [], key=lambda d: d.get("index", 0))
        ]
        if legacy:
            return JSONResponse({"embedding": vectors[0] if vectors else []})
        final = stats.final()
        return JSONResponse({
            "model": requested, "embeddings": vectors, "total_duration": final["total_duration"],
            "load_duration": 0, "prompt_eval_count": (result.get("usage") or {}).get("prompt_tokens", 0),
        })  # fmt: skip

    # -- chat and generate -----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def generate(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        g = self.core
        stats = Stats()
        found = await self._model(request)
        if isinstance(found, Response):
            return found
        native, requested, model = found
        name = requested if g.router.resolve(requested) else model  # what the router knows
        protocols = self.protocols(model)
        native_ollama = protocols == {"ollama"}
        if not native_ollama and native.get("keep_alive") is not None:
            try:
                check_keep_alive(native)
            except Refused as exc:
                return self._refuse(400, str(exc), "invalid_request")
        empty = (
            not native.get("messages")
            if chat
            else not (native.get("prompt") or native.get("suffix"))
        )
        if empty and not native_ollama:  # an Ollama backend loads (or unloads) on its own
            # Ollama's way to load a model: a declared model is loaded already, answered at once.
            piece = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            return JSONResponse(
                {
                    "model": requested,
                    "created_at": now_iso(),
                    **piece,
                    "done_reason": "load",
                    "done": True,
                }
            )
        if native_ollama:  # Ollama backends take Ollama's request as it is
            if "stream" in native and not isinstance(native["stream"], bool):
                return self._refuse(400, "'stream' must be true or false", "invalid_request")
            path = "/api/chat" if chat else "/api/generate"
            translated = Translated(path, {**native, "model": name}, None)
        else:
            try:
                translated = translate({**native, "model": name}, chat, protocols)
            except Refused as exc:
                return self._refuse(400, str(exc), "invalid_request")
            missing = self._missing_capability(model, translated, native)
            if missing:
                return self._refuse(
                    400, f"{requested} does not support {missing}", "unsupported_capability"
                )
            clamp_num_predict(translated.body, g.context_limits.get(model))
        stream = translated.body.get("stream", True) is not False
        forwarded = await self._forward(request, translated, stream)
        if isinstance(forwarded, Response):
            return forwarded
        answer, key = forwarded
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in answer.headers}
        # The backend's context is fixed at launch: say what a larger num_ctx became.
        if (clamped := clamp_num_ctx(translated.num_ctx, g.context_limits.get(model))) is not None:
            headers["x-tensorforge-num-ctx"] = str(clamped)
        if answer.stream is None:
            if answer.status != 200:
                return _failed(answer)
            result = json.loads(answer.body)
            if native_ollama:
                out = {**result, "model": requested}
            elif translated.endpoint == "/infill":
                out = infill_answer(result, requested, stats)
            else:
                out = whole_answer(result, requested, chat, stats, translated.conversation)
            return JSONResponse(out, headers=headers)
        if native_ollama:
            lines = relay_lines(answer.stream, lambda: g.admission.release(key))
        else:
            translator = StreamTranslator(
                requested, chat, translated.endpoint == "/infill", translated.conversation
            )
            translator.stats = stats
            lines = ndjson_lines(answer.stream, translator, lambda: g.admission.release(key))
        await anext(lines)  # started: if the client leaves before streaming, closing cleans up
        return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)

    def _missing_capability(
        self, model: str, translated: Translated, native: dict[str, Any]
    ) -> str | None:
        """The first capability the request needs that the model file says it lacks (Ollama
        answers such a request with 400); None when all are there or nothing is known (yet:
        until the file is read, in the background, the backend judges)."""
        facts = self.listing.known_facts(model)
        if facts is None or not facts.metadata:
            return None  # no model file here (a backend elsewhere, safetensors): the backend judges
        body = translated.body
        images = bool(native.get("images")) or any(
            m.get("images") for m in native.get("messages") or [] if isinstance(m, dict)
        )
        needs = [("completion", True), ("tools", bool(body.get("tools"))), ("insert", translated.endpoint == "/infill"),
                 ("vision", images), ("thinking", bool(native.get("think")))]  # fmt: skip
        return next(
            (cap for cap, needed in needs if needed and cap not in facts.capabilities), None
        )

    async def _forward(
        self, request: Request, translated: Translated, stream: bool
    ) -> tuple[Answer, str | None] | Response:
        """Check, admit (API key) and send the backend request; the key is held while a
        stream is open (released by `_lines`/`_relay`), else released here."""
        g = self.core
        raw = json.dumps(translated.body).encode()  # serialized once: checked, then sent as it is
        # Routed as the OpenAI surface routes: fields checked, num_predict clamped to what
        # fits, trace headers passed on; what was chosen comes back in the answer's headers.
        try:
            routed = await g.routing.route(raw, translated.endpoint, dict(request.scope["headers"]))
            key = g.admission.admit(request.headers.get("authorization"))
        except GatewayError as refusal:
            return ollama_error(refusal)
        affinity = request.headers.get(g.spec.routing.affinity_header)
        try:
            answer = await g.proxy.forward(routed.call(stream, affinity, key))
        except GatewayError as error:
            g.admission.release(key)
            return ollama_error(error)
        except BaseException:
            g.admission.release(key)
            raise
        answer.headers = [*routed.headers, *answer.headers]
        if answer.stream is None:
            g.admission.release(key)
            key = None
        return answer, key


def ollama_error(error: GatewayError) -> Response:
    """A gateway error in Ollama's shape, with the same status."""
    headers = {"retry-after": error.retry_after} if error.retry_after else None
    return ollama_error_response(status=error.status, message=error.message, headers=headers)


def _failed(answer: Answer) -> Response:
    """A backend's answer other than 200, in Ollama's error shape."""
    if answer.error is not None:
        return ollama_error(answer.error)
    return ollama_error_response(answer.status, "request failed")


def ollama_error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """Ollama's error shape: {"error": "message"}."""
    return JSONResponse({"error": message}, status, headers=headers)
