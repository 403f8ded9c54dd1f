"""A WebSocket endpoint streaming the same deltas as SSE, as JSON messages, with several
requests per connection (answered one after another, in order).

Client sends: {"id": "1", "endpoint": "/v1/chat/completions", "body": {...}}
  ("endpoint" defaults to chat; without "body", the message itself is the body).
Gateway sends: {"id": "1", "type": "chunk", "data": <OpenAI chunk>} ... {"id": "1", "type": "done"},
  or {"id": "1", "type": "response", "data": ...} for embeddings,
  or {"id": "1", "type": "error", "status": 4xx/5xx, "error": {...}}."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.core import GatewayCore
from reconciler.gateway.errors import GatewayError
from reconciler.gateway.proxy_call import ProxyCall
from reconciler.gateway.request_body import OPENAI_ENDPOINTS
from reconciler.gateway.sse import iter_events

log = logging.getLogger(__name__)
WEBSOCKET_PATH = "/v1/ws"
MAX_PENDING = 8  # requests a client may queue on one connection before being refused
# Bytes of queued messages one connection may hold, in request bodies (gateway.max_body_bytes):
# eight full-size messages per connection were 32 MiB of gateway memory a client could pin.
PENDING_BODIES = 2
TRY_AGAIN_LATER = 1013  # RFC 6455 close code: the server is overloaded


class Ceilings:
    """Gateway-wide WebSocket limits (issue 14: 40 connections of one key pinned +490 MiB):
    open connections per key (per client address without keys) and in total, and the bytes
    of messages queued on all connections together."""

    def __init__(self, per_key: int, total: int, queued_bytes: int):
        self.per_key, self.total, self.queued_limit = per_key, total, queued_bytes
        self.open: dict[str, int] = {}
        self.queued = 0

    def enter(self, who: str) -> str | None:
        """Count a new connection of `who`; else the reason it is refused."""
        if sum(self.open.values()) >= self.total:
            return f"the gateway holds its most WebSocket connections ({self.total}); retry later"
        if self.open.get(who, 0) >= self.per_key:
            return f"this key already has {self.per_key} WebSocket connections open; close one"
        self.open[who] = self.open.get(who, 0) + 1
        return None

    def leave(self, who: str) -> None:
        if self.open.get(who, 0) > 1:
            self.open[who] -= 1
        else:
            self.open.pop(who, None)

    def reserve(self, size: int) -> bool:
        if self.queued + size > self.queued_limit:
            return False
        self.queued += size
        return True

    def release(self, size: int) -> None:
        self.queued -= size


def websocket_endpoint(core: GatewayCore) -> Callable[[WebSocket], Awaitable[None]]:
    spec = core.spec
    ceilings = Ceilings(
        spec.max_websockets_per_key, spec.max_websockets, spec.max_websocket_queued_bytes
    )

    async def endpoint(websocket: WebSocket) -> None:
        # The key is checked here, once per connection (the front door leaves this path to
        # us); each message then only takes one of that key's concurrent-request slots.
        try:
            key = core.admission.identify(websocket.headers.get("authorization"))
        except GatewayError:
            await websocket.close(code=4401, reason="missing or invalid API key")
            return
        who = (
            f"key:{key}" if key else f"address:{websocket.client.host if websocket.client else ''}"
        )
        if (reason := ceilings.enter(who)) is not None:
            core.metrics.rejected.labels("websocket_limit").inc()
            await websocket.close(code=TRY_AGAIN_LATER, reason=reason)
            return
        try:
            await websocket.accept()
            await Session(core, websocket, ceilings, key).run()
        finally:
            ceilings.leave(who)

    return endpoint


class Session:
    def __init__(
        self, core: GatewayCore, websocket: WebSocket, ceilings: Ceilings, key: str | None
    ):
        self.core = core
        self.ws = websocket
        self.ceilings = ceilings
        self.key = key  # the connection's client, identified once
        self.keys_seen = core.keys.generation  # a reloaded keys file: check the key again
        self.pending: asyncio.Queue[Any] = asyncio.Queue(MAX_PENDING)
        self.limit = core.spec.max_body_bytes
        self.queued_bytes = 0

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            while True:
                message = await self.pending.get()
                if message is None:  # the client went away
                    return
                message, size = message
                self.queued_bytes -= size
                self.ceilings.release(size)
                work = asyncio.ensure_future(self._handle(message))
                done, _ = await asyncio.wait({work, reader}, return_when=asyncio.FIRST_COMPLETED)
                if (
                    work not in done
                ):  # disconnected mid-request: closing the stream stops the backend
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                        await work
                    return
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                    work.result()
        finally:
            reader.cancel()
            self.ceilings.release(self.queued_bytes)  # queued, never answered: no longer held
            self.queued_bytes = 0

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                # A binary frame is queued too: it is answered in its turn, with an error.
                data = message.get("text")
                item = data if data is not None else message.get("bytes") or b""
                size = len(data.encode()) if data is not None else len(item)
                if size > self.limit:
                    await self._send_error(
                        None, 413, f"message exceeds {self.limit} bytes (gateway.max_body_bytes)", "body_too_large"
                    )  # fmt: skip
                    continue
                if self.queued_bytes + size > PENDING_BODIES * self.limit:
                    await self._send_error(None, 429, "too much queued on this connection; wait for answers",
                                           "too_many_pending")  # fmt: skip
                    continue
                if self.pending.full():
                    await self._send_error(
                        None, 429, f"more than {MAX_PENDING} requests queued", "too_many_pending"
                    )
                    continue
                if not self.ceilings.reserve(size):
                    await self._send_error(None, 429, "the gateway's WebSocket queues are full; wait for answers",
                                           "too_many_pending")  # fmt: skip
                    continue
                self.pending.put_nowait((item, size))
                self.queued_bytes += size
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:  # whatever ended the reading, the session must not wait for more
            with contextlib.suppress(asyncio.QueueFull):
                self.pending.put_nowait(None)

    async def _send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(obj, separators=(",", ":")))

    async def _send_error(self, rid: Any, status: int, message: str, code: str) -> None:
        await self._send({"id": rid, "type": "error", "status": status,
                          "error": {"message": message, "type": "invalid_request_error", "code": code}})  # fmt: skip

    async def _send_gateway_error(self, rid: Any, error: GatewayError) -> None:
        await self._send(
            {"id": rid, "type": "error", "status": error.status, "error": error.openai()}
        )

    async def _handle(self, text: str | bytes) -> None:
        if not isinstance(text, str):
            await self._send_error(
                None,
                400,
                "binary frames are not accepted: send JSON in text frames",
                "invalid_request",
            )
            return
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            await self._send_error(
                None, 400, f"message is not valid JSON: {type(exc).__name__}", "invalid_json"
            )
            return
        if not isinstance(message, dict):
            await self._send_error(None, 400, "message must be a JSON object", "invalid_request")
            return
        rid = message.get("id")
        try:
            await self._request(rid, message)
        except (WebSocketDisconnect, RuntimeError):
            raise  # the connection is gone: nobody to answer
        except Exception as exc:  # one request's failure, not the session's
            log.exception("WebSocket request %r failed", rid)
            failure = GatewayError(
                500, f"the gateway failed on this request: {type(exc).__name__}", "internal_error"
            )
            await self._send_gateway_error(rid, failure)

    async def _request(self, rid: Any, message: dict[str, Any]) -> None:
        endpoint = message.get("endpoint", "/v1/chat/completions")
        if not isinstance(endpoint, str) or endpoint not in OPENAI_ENDPOINTS:
            await self._send_error(rid, 404, f"unknown endpoint {endpoint!r}", "unknown_endpoint")
            return
        body = message.get("body")
        if body is None:
            body = {k: v for k, v in message.items() if k not in ("id", "endpoint")}
        body = {**body, "stream": endpoint != "/v1/embeddings"} if isinstance(body, dict) else body
        raw = json.dumps(body).encode()
        core = self.core
        if len(raw) > self.limit:  # the same limit as an HTTP request body
            await self._send_error(rid, 413, f"request body exceeds {self.limit} bytes (gateway.max_body_bytes)",
                                   "body_too_large")  # fmt: skip
            return
        try:
            body, model = core.routing.parse(raw, endpoint)
            key = core.admission.hold(self._current_key())
        except GatewayError as refusal:
            await self._send_gateway_error(rid, refusal)
            return
        try:
            affinity = self.ws.headers.get(core.spec.routing.affinity_header)
            call = ProxyCall(
                Exchange(endpoint, body, body["model"]), raw, model, body["stream"], affinity, key
            )
            try:
                answer = await core.proxy.forward(call)
            except GatewayError as error:
                await self._send_gateway_error(rid, error)
                return
            if answer.stream is None:
                if answer.error is not None:
                    await self._send_gateway_error(rid, answer.error)
                elif answer.status != 200:  # not an error, not an answer a message can hold
                    await self._send({"id": rid, "type": "error", "status": answer.status,
                                      "error": {"message": answer.body.decode("utf-8", "replace")[:300]}})  # fmt: skip
                else:
                    await self._send(
                        {"id": rid, "type": "response", "data": json.loads(answer.body)}
                    )
                return
            try:
                async for event in iter_events(answer.stream):
                    if "error" in event:
                        await self._send(
                            {"id": rid, "type": "error", "status": 502, "error": event["error"]}
                        )
                        return
                    await self._send({"id": rid, "type": "chunk", "data": event})
                await self._send({"id": rid, "type": "done"})
            finally:
                await answer.stream.aclose()
        finally:
            core.admission.release(key)

    def _current_key(self) -> str | None:
        """The connection's client; checked again only when the keys file was reloaded since
        (a revoked key stops working on open connections too)."""
        keys = self.core.keys
        if keys.enabled and keys.generation != self.keys_seen:
            generation = keys.generation
            self.key = self.core.admission.identify(
                self.ws.headers.get("authorization")
            )  # raises if revoked
            self.keys_seen = generation  # only once it passed: a revoked key stays refused
        return self.key
