"""An Ollama-compatible surface (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
`/api/show`, `/api/tags`, `/api/ps`, `/api/version`, `HEAD /`), so Ollama clients can use the
gateway.
Requests become OpenAI calls routed like any other; answers and NDJSON streams are built from
the OpenAI ones."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from reconciler.gateway.openai_api import BodyTooLarge, read_body
from reconciler.gateway.proxy import Answer
from reconciler.gateway.sse import iter_events

if TYPE_CHECKING:
    from reconciler.gateway.app import Gateway

OLLAMA_VERSION = "0.6.0"  # what /api/version claims: clients only check it is there
# Ollama option -> OpenAI field.
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "num_predict": "max_tokens", "seed": "seed",
           "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}  # fmt: skip


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def openai_body(native: dict, chat: bool) -> dict:
    body: dict = {"model": native.get("model", ""), "stream": native.get("stream", True) is not False}
    for option, field in OPTIONS.items():
        value = (native.get("options") or {}).get(option)
        if value is not None and not (option == "num_predict" and value < 0):
            body[field] = value
    fmt = native.get("format")
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [openai_message(m) for m in native.get("messages") or []]
    elif native.get("raw"):
        body["prompt"] = native.get("prompt", "")
    else:  # Ollama applies the chat template unless raw: the chat endpoint does the same
        messages = [{"role": "system", "content": native["system"]}] if native.get("system") else []
        body["messages"] = [*messages, {"role": "user", "content": native.get("prompt", "")}]
    return body


def openai_message(message: dict) -> dict:
    images = message.get("images") or []
    if not images:
        return {"role": message.get("role", "user"), "content": message.get("content", "")}
    parts: list[dict] = [{"type": "text", "text": message.get("content", "")}]
    parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i}"}} for i in images]
    return {"role": message.get("role", "user"), "content": parts}


def final_fields(usage: dict | None, finish: str | None, started: float) -> dict:
    usage = usage or {}
    total = int((time.perf_counter() - started) * 1e9)
    return {
        "done": True, "done_reason": "length" if finish == "length" else "stop",
        "total_duration": total, "load_duration": 0,
        "prompt_eval_count": usage.get("prompt_tokens", 0), "prompt_eval_duration": 0,
        "eval_count": usage.get("completion_tokens", 0), "eval_duration": total,
    }  # fmt: skip


class OllamaSurface:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embed, methods=["POST"]),  # the older single-prompt form
            Route("/api/show", self.show, methods=["POST"]),
        ]

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    def _models(self, running: bool) -> list[dict]:
        g = self.gateway
        out = []
        for model in g.table.served_models():
            if running and not any(u.healthy for u in g.router.members(model)):
                continue
            names = [model] + sorted(a for a, m in g.table.names.items() if m == model and a != model)
            for name in names:
                entry = {"name": name, "model": name, "modified_at": now_iso(), "size": 0, "digest": "",
                         "details": {"format": "", "family": "", "families": None,
                                     "parameter_size": "", "quantization_level": ""}}  # fmt: skip
                if running:
                    entry.update({"expires_at": now_iso(), "size_vram": 0})
                out.append(entry)
        return out

    async def tags(self, request: Request) -> Response:
        _, refusal = self.gateway.admit(request.headers.get("authorization"), hold=False)
        if refusal is not None:
            return ollama_error(refusal)
        return JSONResponse({"models": self._models(running=False)})

    async def ps(self, request: Request) -> Response:
        _, refusal = self.gateway.admit(request.headers.get("authorization"), hold=False)
        if refusal is not None:
            return ollama_error(refusal)
        return JSONResponse({"models": self._models(running=True)})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def generate(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _read(self, request: Request) -> dict | Response:
        """The request's JSON object, read under the same size and time limits as the OpenAI
        endpoints; or the error to answer."""
        g = self.gateway
        try:
            async with asyncio.timeout(g.spec.idle_timeout):
                raw = await read_body(request.receive, dict(request.scope["headers"]), g.spec.max_body_bytes)
        except BodyTooLarge:
            return ollama_error(g.reject(413, f"request body exceeds {g.spec.max_body_bytes} bytes", "body_too_large"))
        except TimeoutError:
            return ollama_error(g.reject(408, "request body not received in time", "body_timeout"))
        try:
            native = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError included; too deep a nesting
            return ollama_error(g.reject(400, "request body is not valid JSON (UTF-8)", "invalid_json"))
        if not isinstance(native, dict):
            return ollama_error(g.reject(400, "request body must be a JSON object", "invalid_request"))
        return native

    async def show(self, request: Request) -> Response:
        """What the gateway knows of a model: editors (Continue, Open WebUI) ask for the
        context length here. Weights and templates live on the backends: left empty."""
        g = self.gateway
        _, refusal = g.admit(request.headers.get("authorization"), hold=False)
        if refusal is not None:
            return ollama_error(refusal)
        native = await self._read(request)
        if isinstance(native, Response):
            return native
        requested = native.get("model") or native.get("name")  # `name`: older clients
        model = g.router.resolve(requested) if isinstance(requested, str) else None
        if model is None:
            return ollama_error(g.unknown_model(requested))
        info = {"general.architecture": "tensorforge"}
        if model in g.context_limits:  # a request's share of the context, as the gateway enforces it
            info["tensorforge.context_length"] = g.context_limits[model]
        return JSONResponse({
            "modelfile": "", "parameters": "", "template": "", "modified_at": now_iso(),
            "details": {"parent_model": model if model != requested else "", "format": "", "family": "",
                        "families": None, "parameter_size": "", "quantization_level": ""},
            "model_info": info, "capabilities": ["completion"],
        })  # fmt: skip

    async def embed(self, request: Request) -> Response:
        """`/api/embed` {model, input: text or texts} -> {model, embeddings: [[...]]}, and the
        older `/api/embeddings` {model, prompt} -> {embedding: [...]}, through /v1/embeddings."""
        g = self.gateway
        started = time.perf_counter()
        native = await self._read(request)
        if isinstance(native, Response):
            return native
        legacy = request.url.path == "/api/embeddings"
        texts = native.get("prompt") if legacy else native.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            field = "prompt" if legacy else "input"
            kind = "a string" if legacy else "a string or a non-empty list of strings"
            return ollama_error(g.reject(400, f"'{field}' must be {kind}", "invalid_request"))
        body = {"model": native.get("model", ""), "input": texts}
        raw = json.dumps(body).encode()  # serialized once: checked, then sent as it is
        routed = await g.route(raw, "/v1/embeddings", dict(request.scope["headers"]))
        if isinstance(routed, Answer):
            return ollama_error(routed)
        key, refusal = g.admit(request.headers.get("authorization"))
        if refusal is not None:
            return ollama_error(refusal)
        try:
            call = routed.call(False, request.headers.get(g.spec.routing.affinity_header), key)
            answer = await g.proxy.forward(call)
        finally:
            g.release_key(key)
        if answer.status != 200:
            return ollama_error(answer)
        result = json.loads(answer.body)
        vectors = [d["embedding"] for d in sorted(result.get("data") or [], key=lambda d: d.get("index", 0))]
        if legacy:
            return JSONResponse({"embedding": vectors[0] if vectors else []})
        return JSONResponse({
            "model": native.get("model"), "embeddings": vectors,
            "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": (result.get("usage") or {}).get("prompt_tokens", 0),
        })  # fmt: skip

    async def _generate(self, request: Request, chat: bool) -> Response:
        g = self.gateway
        started = time.perf_counter()
        native = await self._read(request)
        if isinstance(native, Response):
            return native
        try:
            body = openai_body(native, chat)
        except (AttributeError, TypeError, KeyError) as exc:  # a field of the wrong shape
            return ollama_error(g.reject(400, f"malformed request: {exc}", "invalid_request"))
        endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        if chat and not body["messages"]:  # as with generate: loading the model, answered at once
            return JSONResponse({"model": body["model"], "created_at": now_iso(),
                                 "message": {"role": "assistant", "content": ""}, "done": True})  # fmt: skip
        if not chat and not native.get("prompt") and not native.get("raw"):
            # An empty generate request is Ollama's way to load a model: answer done at once.
            return JSONResponse({"model": body["model"], "created_at": now_iso(), "response": "", "done": True})
        raw = json.dumps(body).encode()  # serialized once: checked, then sent as it is
        # Routed as the OpenAI surface routes: `auto` and placeholders, num_predict clamped.
        routed = await g.route(raw, endpoint, dict(request.scope["headers"]))
        if isinstance(routed, Answer):
            return ollama_error(routed)
        native["model"] = routed.requested  # for `auto`, the answer names the model chosen
        key, refusal = g.admit(request.headers.get("authorization"))
        if refusal is not None:
            return ollama_error(refusal)
        affinity = request.headers.get(g.spec.routing.affinity_header)
        call = routed.call(routed.body["stream"], affinity, key)
        try:
            answer = await g.proxy.forward(call)
        except BaseException:
            g.release_key(key)
            raise
        if answer.stream is None:
            g.release_key(key)
            if answer.status != 200:
                return ollama_error(answer)
            return JSONResponse(self._whole(json.loads(answer.body), native, chat, started))
        lines = self._lines(answer, native, chat, started, key)
        await anext(lines)  # started: if the client leaves before streaming, closing cleans up
        return StreamingResponse(lines, media_type="application/x-ndjson")

    def _whole(self, result: dict, native: dict, chat: bool, started: float) -> dict:
        choice = (result.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        out = {"model": native.get("model"), "created_at": now_iso()}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        return {**out, **final_fields(result.get("usage"), choice.get("finish_reason"), started)}

    async def _lines(
        self, answer: Answer, native: dict, chat: bool, started: float, key: str | None
    ) -> AsyncIterator[bytes]:
        assert answer.stream is not None
        model = native.get("model")
        finish, usage = None, None
        try:
            yield b""  # the priming step (see _generate)
            async for event in iter_events(answer.stream):
                if "error" in event:
                    yield _line({"error": (event["error"] or {}).get("message", "backend failed")})
                    return
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if not text:
                        continue
                    piece = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
                    yield _line({"model": model, "created_at": now_iso(), **piece, "done": False})
            last = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            yield _line({"model": model, "created_at": now_iso(), **last, **final_fields(usage, finish, started)})
        finally:
            await answer.stream.aclose()
            self.gateway.release_key(key)


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def ollama_error(answer: Answer) -> Response:
    """An OpenAI-shaped error answer in Ollama's shape, with the same status."""
    message = json.loads(answer.body).get("error", {}).get("message", "request failed")
    headers = {"retry-after": answer.retry_after} if answer.retry_after else None
    return ollama_error_response(status=answer.status, message=message, headers=headers)


def ollama_error_response(status: int, message: str, headers: dict | None = None) -> Response:
    """Ollama's error shape: {"error": "message"}."""
    return JSONResponse({"error": message}, status, headers=headers)
