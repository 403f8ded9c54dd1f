"""The OpenAI endpoints (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`), and
what backends serve beyond them (OpenAI Responses, Anthropic Messages, reranking, llama.cpp's
tokenizer and fill-in-the-middle), as a lean ASGI handler: this is the hot path, so it skips
the framework's request and response objects, and it watches for the client going away so
the backend's work stops at once."""

from __future__ import annotations

import asyncio
import logging

from reconciler.gateway.asgi import Receive, Scope, Send
from reconciler.gateway.backend_info import lacks_hint
from reconciler.gateway.core import GatewayCore
from reconciler.gateway.errors import GatewayError
from reconciler.gateway.proxy import JSON, Answer
from reconciler.gateway.proxy_call import ProxyCall
from reconciler.gateway.request_body import OPENAI_ENDPOINTS, PASS_THROUGH, BodyTooLarge, read_body

__all__ = ["OPENAI_ENDPOINTS", "PASS_THROUGH", "OpenAIEndpoints", "send_answer", "send_error"]
log = logging.getLogger(__name__)


async def send_error(
    send: Send, error: GatewayError, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A gateway error in OpenAI's shape."""
    await send_answer(send, Answer(error.status, body=error.openai_json(), retry_after=error.retry_after,
                                   headers=extra or []))  # fmt: skip


async def send_answer(send: Send, answer: Answer) -> None:
    if answer.error is not None:  # a backend's error, in OpenAI's shape
        answer.body, answer.content_type = answer.error.openai_json(), JSON
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


async def _watch_disconnect(receive: Receive, task: asyncio.Task[None], gone: list[bool]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.append(True)
            task.cancel()
            return


class OpenAIEndpoints:
    def __init__(self, core: GatewayCore):
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        core = self.core
        headers = dict(scope["headers"])
        try:
            key = core.admission.admit(
                headers.get(b"authorization")
            )  # X-API-Key is folded in already
        except GatewayError as refusal:
            await send_error(send, refusal)
            return
        try:
            try:
                async with asyncio.timeout(core.spec.idle_timeout):
                    raw = await read_body(receive, headers, core.spec.max_body_bytes)
            except BodyTooLarge:
                await send_error(send, core.metrics.refused(
                    413, f"request body exceeds {core.spec.max_body_bytes} bytes "
                    "(gateway.max_body_bytes)", "body_too_large"))  # fmt: skip
                return
            except TimeoutError:
                await send_error(
                    send,
                    core.metrics.refused(408, "request body not received in time", "body_timeout"),
                )
                return
            except asyncio.CancelledError:
                return
            try:
                routed = await core.routing.route(raw, scope["path"], headers)
            except GatewayError as refusal:
                _log_refusal(headers, refusal)
                await send_error(send, refusal)
                return
            stream = routed.body.get("stream") is True
            if stream and scope["path"] == "/v1/embeddings":
                await send_error(
                    send, GatewayError(400, "embeddings cannot stream", "invalid_request")
                )
                return
            affinity = headers.get(core.affinity_header)
            call = routed.call(stream, affinity.decode("latin-1") if affinity else None, key)
            await self._serve(call, routed.headers, receive, send)
        finally:
            core.admission.release(key)

    async def _serve(
        self, call: ProxyCall, extra: list[tuple[bytes, bytes]], receive: Receive, send: Send
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone: list[bool] = []
        watcher = asyncio.ensure_future(_watch_disconnect(receive, task, gone))
        try:
            try:
                answer = await self.core.proxy.forward(call)
            except GatewayError as error:
                log.info(
                    "request %s: %s %s",
                    dict(call.trace).get("x-request-id"),
                    error.status,
                    error.message[:300],
                )
                await send_error(send, error, extra)
                return
            if (
                answer.status == 501 and answer.error is not None
            ):  # clients retry a 5xx: this one is the request's 400
                answer = not_implemented(answer, answer.error, call, self.core)
            answer.headers += extra
            if answer.error is not None:
                log.info("request %s: %s %s", dict(call.trace).get("x-request-id"), answer.status,
                         answer.error.message[:300])  # fmt: skip
            await send_answer(send, answer)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # our own doing: the client left, and the backend call is closed
        except OSError:
            pass  # the client's socket broke while we wrote to it
        finally:
            watcher.cancel()  # not awaited: that would cost the request a loop turn


def not_implemented(
    answer: Answer, error: GatewayError, call: ProxyCall, core: GatewayCore
) -> Answer:
    """A backend's 501 (llama.cpp's "start it with --embeddings") as a 400 that names the
    backend and what enables the endpoint there."""
    upstream = core.table.upstreams.get(answer.backend)
    hint = ""
    if upstream is not None and call.exchange.endpoint == "/v1/embeddings":
        hint = "; " + lacks_hint(upstream.name, upstream.info, managed=upstream.info.certain)
    message = (
        f"backend {answer.backend} does not serve {call.exchange.endpoint}: {error.message}{hint}"
    )
    return Answer(400, backend=answer.backend, headers=answer.headers,
                  error=GatewayError(400, message, "unsupported_by_backend"))  # fmt: skip


def _log_refusal(headers: dict[bytes, bytes], error: GatewayError) -> None:
    request_id = headers.get(b"x-request-id", b"").decode("latin-1")
    log.info("request %s refused: %s %s", request_id, error.status, error.message[:300])
