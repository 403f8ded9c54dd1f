"""The OpenAI endpoints (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`) as a
lean ASGI handler: this is the hot path, so it skips the framework's request and response
objects, and it watches for the client going away so the backend's work stops at once."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.proxy import Answer, ProxyCall, error_answer

if TYPE_CHECKING:
    from reconciler.gateway.app import Gateway

OPENAI_ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings"))


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
        key, refusal = gateway.admit(headers.get(b"authorization"))
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
            parsed = gateway.parse_request(raw)
            if isinstance(parsed, Answer):
                await send_answer(send, parsed)
                return
            body, model = parsed
            stream = body.get("stream") is True
            if stream and scope["path"] == "/v1/embeddings":
                await send_answer(send, error_answer(400, "embeddings cannot stream", "invalid_request"))
                return
            affinity = headers.get(gateway.affinity_header)
            call = ProxyCall(
                Exchange(scope["path"], body, body["model"]), raw, model, stream,
                affinity.decode("latin-1") if affinity else None,
            )  # fmt: skip
            await self._serve(call, receive, send)
        finally:
            gateway.release_key(key)

    async def _serve(self, call: ProxyCall, receive, send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone: list[bool] = []
        watcher = asyncio.ensure_future(_watch_disconnect(receive, task, gone))
        try:
            answer = await self.gateway.proxy.forward(call)
            await send_answer(send, answer)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # our own doing: the client left, and the backend call is closed
        except OSError:
            pass  # the client's socket broke while we wrote to it
        finally:
            watcher.cancel()  # not awaited: that would cost the request a loop turn


def parse_json(raw: bytes) -> dict | tuple[str, str]:
    """The request as a dict, or (what is wrong with it, error code)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"request body is not valid JSON: {exc}", "invalid_json"
    if not isinstance(body, dict):
        return "request body must be a JSON object", "invalid_request"
    return body
