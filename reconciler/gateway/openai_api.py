"""The OpenAI endpoints (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`), and
what backends serve beyond them (OpenAI Responses, Anthropic Messages, reranking, llama.cpp's
tokenizer and fill-in-the-middle), as a lean ASGI handler: this is the hot path, so it skips
the framework's request and response objects, and it watches for the client going away so
the backend's work stops at once."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from reconciler.gateway.proxy import Answer, ProxyCall, error_answer

if TYPE_CHECKING:
    from reconciler.gateway.app import Gateway

log = logging.getLogger(__name__)

# Routed by `model` like chat; each goes only to a backend kind that serves it.
PASS_THROUGH = ("/v1/responses", "/v1/messages", "/v1/rerank", "/rerank", "/tokenize", "/detokenize", "/infill")
OPENAI_ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings", *PASS_THROUGH))


class BodyTooLarge(Exception):
    pass


async def read_body(receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client went away while sending its request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_answer(send, answer: Answer) -> None:
    headers = [(b"content-type", answer.content_type)]
    if answer.backend:
        headers.append((b"x-tensorforge-backend", answer.backend.encode()))
    if answer.retry_after:
        headers.append((b"retry-after", answer.retry_after.encode()))
    headers += answer.headers
    if answer.stream is None:
        headers.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        return
    stream = answer.stream
    try:
        first = await anext(stream, b"")  # starts the stream, so closing it always cleans up
        headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await stream.aclose()


async def _watch_disconnect(receive, task: asyncio.Task, gone: list[bool]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.append(True)
            task.cancel()
            return


class OpenAIEndpoints:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def __call__(self, scope, receive, send) -> None:
        gateway = self.gateway
        headers = dict(scope["headers"])
        key, refusal = gateway.admit(headers.get(b"authorization"))  # X-API-Key is folded in already
        if refusal is not None:
            await send_answer(send, refusal)
            return
        try:
            try:
                async with asyncio.timeout(gateway.spec.idle_timeout):
                    raw = await read_body(receive, headers, gateway.spec.max_body_bytes)
            except BodyTooLarge:
                await send_answer(send, gateway.reject(
                    413, f"request body exceeds {gateway.spec.max_body_bytes} bytes "
                    "(gateway.max_body_bytes)", "body_too_large"))  # fmt: skip
                return
            except TimeoutError:
                await send_answer(send, gateway.reject(408, "request body not received in time", "body_timeout"))
                return
            except asyncio.CancelledError:
                return
            routed = await gateway.route(raw, scope["path"], headers)
            if isinstance(routed, Answer):
                _log_refusal(headers, routed)
                await send_answer(send, routed)
                return
            stream = routed.body.get("stream") is True
            if stream and scope["path"] == "/v1/embeddings":
                await send_answer(send, error_answer(400, "embeddings cannot stream", "invalid_request"))
                return
            affinity = headers.get(gateway.affinity_header)
            call = routed.call(stream, affinity.decode("latin-1") if affinity else None, key)
            await self._serve(call, routed.headers, receive, send)
        finally:
            gateway.release_key(key)

    async def _serve(self, call: ProxyCall, extra: list[tuple[bytes, bytes]], receive, send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone: list[bool] = []
        watcher = asyncio.ensure_future(_watch_disconnect(receive, task, gone))
        try:
            answer = await self.gateway.proxy.forward(call)
            if answer.status == 501:  # clients retry a 5xx: this one is the request's 400
                answer = not_implemented(answer, call, self.gateway)
            answer.headers += extra
            if answer.status >= 400:
                log.info("request %s: %s %s", dict(call.trace).get("x-request-id"), answer.status, answer.body[:300])
            await send_answer(send, answer)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # our own doing: the client left, and the backend call is closed
        except OSError:
            pass  # the client's socket broke while we wrote to it
        finally:
            watcher.cancel()  # not awaited: that would cost the request a loop turn


def not_implemented(answer: Answer, call: ProxyCall, gateway: Gateway) -> Answer:
    """A backend's 501 (llama.cpp's "start it with --embeddings") as a 400 that names the
    backend and what enables the endpoint there."""
    from reconciler.gateway.backend_info import lacks_hint

    upstream = gateway.table.upstreams.get(answer.backend)
    said = json.loads(answer.body).get("error", {}).get("message", "not implemented")
    hint = ""
    if upstream is not None and call.exchange.endpoint == "/v1/embeddings":
        hint = "; " + lacks_hint(upstream.name, upstream.info, managed=upstream.info.certain)
    fixed = error_answer(400, f"backend {answer.backend} does not serve {call.exchange.endpoint}: {said}{hint}",
                         "unsupported_by_backend")  # fmt: skip
    fixed.backend, fixed.headers = answer.backend, answer.headers
    return fixed


def _log_refusal(headers: dict[bytes, bytes], answer: Answer) -> None:
    request_id = headers.get(b"x-request-id", b"").decode("latin-1")
    log.info("request %s refused: %s %s", request_id, answer.status, answer.body[:300])


def parse_json(raw: bytes) -> dict | tuple[str, str]:
    """The request as a dict, or (what is wrong with it, error code)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"request body is not valid JSON: {exc}", "invalid_json"
    except RecursionError:  # [[[[…]]]] deeper than the parser goes: still the client's 400
        return "request body is nested too deeply", "invalid_json"
    if not isinstance(body, dict):
        return "request body must be a JSON object", "invalid_request"
    return body


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _strings(value, allow_tokens: bool = False) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list):
        return False
    for item in value:
        if isinstance(item, str):
            continue
        if not allow_tokens:
            return False
        tokens = item if isinstance(item, list) else [item]  # token ids, or lists of them
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return False
    return True


def _image_ok(part: dict) -> bool:
    if "image_url" not in part:
        return True
    image = part["image_url"]
    return isinstance(image, dict) and isinstance(image.get("url"), str)


def check_fields(endpoint: str, body: dict) -> tuple[str, str] | None:
    """(what is wrong, error code) for the fields the gateway or an adapter reads, else None.
    Everything else is the backend's to judge. A max_tokens larger than the context is not
    wrong: routing clamps it to what fits (selection.py)."""
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be true or false", "invalid_request"
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if value is not None and not _is_count(value):
            return f"'{field}' must be a positive integer", "invalid_max_tokens"
    if "n" in body and body["n"] is not None and not _is_count(body["n"]):
        return "'n' must be a positive integer", "invalid_request"
    # Read by the Ollama and TGI adapters, which translate them.
    if body.get("response_format") is not None and not isinstance(body["response_format"], dict):
        return "'response_format' must be an object", "invalid_request"
    if body.get("stop") is not None and not _strings(body["stop"]):
        return "'stop' must be a string or a list of strings", "invalid_request"
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):  # an empty list is the backend's to judge
            return "'messages' must be a list of messages", "invalid_messages"
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                return "each message must be an object with a string 'role'", "invalid_messages"
            content = message.get("content")
            parts_ok = isinstance(content, list) and all(isinstance(p, dict) for p in content)
            if content is not None and not isinstance(content, str) and not parts_ok:
                return "a message's 'content' must be a string, a list of parts or null", "invalid_messages"
            if parts_ok and not all(_image_ok(p) for p in content):
                return "a content part's 'image_url' must be an object with a string 'url'", "invalid_messages"
    elif endpoint == "/v1/completions":
        if not _strings(body.get("prompt"), allow_tokens=True):
            return "'prompt' must be a string or a list of strings", "invalid_prompt"
    elif endpoint == "/v1/embeddings":
        if not _strings(body.get("input"), allow_tokens=True):
            return "'input' must be a string or a list of strings", "invalid_input"
    return None
