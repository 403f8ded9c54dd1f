"""Live telemetry over `GET /ws`: after the key check the gateway pushes JSON events,

    {"type": "vram_update", "time": 1764670000.1, "data": <the /vram body>}       every 2 s
    {"type": "backend_status", "time": …, "data": <one /backends row>}             on a health or state change
    {"type": "reconcile", "time": …, "data": <the /status "reconciler" section>}   a pass that changed something
    {"type": "inference_complete", "time": …, "data": {request_id, model, backend, status,
                                                       prompt_tokens, completion_tokens, duration_seconds}}

never prompt or answer text. A client may send {"subscribe": ["vram_update", …]} to narrow what
it gets (answered with {"type": "subscribed", …}). Each connection has a bounded queue: a slow
client loses its oldest events (and is told how many with {"type": "dropped", "count": n}),
never gateway memory.

Browsers cannot set headers on a WebSocket, so besides `Authorization: Bearer KEY` the key may
come as the subprotocol `bearer.<base64url of KEY>` (Kubernetes' convention)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from reconciler.gateway.core import GatewayCore
from reconciler.gateway.ops_status import (
    OpsState,
    backends_document,
    reconciler_section,
    vram_document,
)
from reconciler.gateway.proxy_call import ProxyCall

log = logging.getLogger(__name__)
EVENT_TYPES = ("vram_update", "backend_status", "reconcile", "inference_complete")
VRAM_INTERVAL = 2.0
WATCH_INTERVAL = 0.25  # how often backend states and the reconciler's status file are compared
QUEUE_EVENTS = 256  # per connection; beyond it the oldest are dropped
# Without the global WebSocket limits of /v1/ws (reliability's work, not on main yet) this
# endpoint keeps its own ceiling.
MAX_CONNECTIONS = 64
RECENT_SECONDS = 60.0
SUBPROTOCOL_PREFIX = "bearer."


class RecentRequests:
    """Completed requests of the last minute: rate and latency for /status and the page."""

    def __init__(self, window: float = RECENT_SECONDS):
        self.window = window
        self.done: collections.deque[tuple[float, float, bool]] = collections.deque()

    def add(self, seconds: float, ok: bool) -> None:
        self.done.append((time.monotonic(), seconds, ok))
        self._trim()

    def _trim(self) -> None:
        horizon = time.monotonic() - self.window
        while self.done and self.done[0][0] < horizon:
            self.done.popleft()

    def summary(self) -> dict[str, Any]:
        self._trim()
        durations = sorted(d for _, d, _ in self.done)

        def quantile(q: float) -> float | None:
            return (
                round(durations[min(len(durations) - 1, int(q * len(durations)))], 4)
                if durations
                else None
            )

        return {"window_seconds": self.window, "requests": len(durations),
                "per_second": round(len(durations) / self.window, 3),
                "errors": sum(1 for _, _, ok in self.done if not ok),
                "latency_p50_seconds": quantile(0.5), "latency_p95_seconds": quantile(0.95)}  # fmt: skip


class Subscriber:
    """One connection's bounded queue and the event types it wants."""

    def __init__(self, size: int = QUEUE_EVENTS):
        self.queue: collections.deque[str] = collections.deque(maxlen=size)
        self.wanted = set(EVENT_TYPES)
        self.dropped = 0
        self.ready = asyncio.Event()

    def offer(self, kind: str, message: str) -> None:
        if kind not in self.wanted:
            return
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1  # deque(maxlen) pushes the oldest out
        self.queue.append(message)
        self.ready.set()


class Telemetry:
    """The hub: watches the gateway, fans events out to subscribers, and is the proxy's
    observer for `inference_complete`."""

    def __init__(
        self,
        core: GatewayCore,
        ops: OpsState,
        may_read: Callable[[str | None], bool],
        queue_events: int = QUEUE_EVENTS,
    ):
        self.core = core
        self.ops = ops
        self.may_read = may_read  # the operations API's read check (user or admin key)
        self.queue_events = queue_events
        self.subscribers: set[Subscriber] = set()
        self.recent = RecentRequests()
        self._states: dict[str, tuple[Any, ...]] = {}
        self._pass: Any = None

    # -- publishing ------------------------------------------------------------------------
    def publish(self, kind: str, data: Any) -> None:
        if not self.subscribers:
            return
        message = json.dumps(
            {"type": kind, "time": time.time(), "data": data}, separators=(",", ":")
        )
        for subscriber in self.subscribers:
            subscriber.offer(kind, message)

    def requested(self, call: ProxyCall) -> None:
        pass

    def completed(
        self,
        call: ProxyCall,
        backend: str,
        status: str,
        seconds: float,
        usage: dict[str, Any] | None,
    ) -> None:
        self.recent.add(seconds, status.startswith("2"))
        if self.subscribers:
            usage = usage or {}
            self.publish("inference_complete", {
                "request_id": call.request_id, "model": call.model, "backend": backend, "status": int(status),
                "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                "duration_seconds": round(seconds, 4),
            })  # fmt: skip

    # -- watching ---------------------------------------------------------------------------
    def backend_changes(self) -> list[dict[str, Any]]:
        """Rows of backends whose health, routing or reconciler state changed since last call."""
        ops = self.ops
        changed = []
        rows = backends_document(self.core, ops.status, ops.admin_requests())
        for row in rows:
            key = (row["health"]["healthy"], row["health"]["detail"], row["state"], row["draining"],
                   row["circuit"]["open"], row["pid"], row["admin_request"])  # fmt: skip
            if self._states.get(row["name"]) != key:
                self._states[row["name"]] = key
                changed.append(row)
        for gone in set(self._states) - {r["name"] for r in rows}:
            del self._states[gone]
        return changed

    def reconcile_change(self) -> dict[str, Any] | None:
        """The reconciler section when a pass changed what the status file says."""
        ops = self.ops
        data = ops.status.read()
        seen = json.dumps(
            {"units": data.get("units"), "last_pass": data.get("last_pass")}, sort_keys=True
        )
        if self._pass is None:
            self._pass = seen  # the state at start is no change
            return None
        if seen == self._pass:
            return None
        self._pass = seen
        requests = ops.admin_requests()
        return reconciler_section(ops.status, requests, [])

    async def run(self) -> None:
        """Watch for changes; push VRAM every VRAM_INTERVAL (only while someone listens)."""
        next_vram = 0.0
        while True:
            try:
                for row in self.backend_changes():
                    self.publish("backend_status", row)
                change = self.reconcile_change()
                if change is not None:
                    self.publish("reconcile", change)
                if self.subscribers and time.monotonic() >= next_vram:
                    next_vram = time.monotonic() + VRAM_INTERVAL
                    self.publish("vram_update", await vram_document(self.core, self.ops))
            except Exception:  # keep watching whatever one round did
                log.exception("telemetry round failed")
            await asyncio.sleep(WATCH_INTERVAL)

    # -- the endpoint -----------------------------------------------------------------------
    async def endpoint(self, websocket: WebSocket) -> None:
        authorization, subprotocol = presented_key(
            websocket.headers.get("authorization"), websocket.scope.get("subprotocols") or []
        )
        if not self.may_read(authorization):
            await websocket.close(code=4401, reason="missing or invalid API key")
            return
        if len(self.subscribers) >= MAX_CONNECTIONS:
            await websocket.close(
                code=1013, reason=f"more than {MAX_CONNECTIONS} telemetry connections; retry later"
            )
            return
        await websocket.accept(subprotocol=subprotocol)
        subscriber = Subscriber(self.queue_events)
        self.subscribers.add(subscriber)
        await self._greet(subscriber)
        reader = asyncio.create_task(self._read(websocket, subscriber))
        try:
            await pump(subscriber, websocket.send_text, reader)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away mid-send
        finally:
            self.subscribers.discard(subscriber)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await reader

    async def _greet(self, subscriber: Subscriber) -> None:
        """A new client gets the current state at once instead of waiting for changes."""
        ops = self.ops
        now = time.time()
        for row in backends_document(self.core, ops.status, ops.admin_requests()):
            subscriber.offer(
                "backend_status", json.dumps({"type": "backend_status", "time": now, "data": row})
            )
        vram = await vram_document(self.core, self.ops)
        subscriber.offer(
            "vram_update", json.dumps({"type": "vram_update", "time": now, "data": vram})
        )

    async def _read(self, websocket: WebSocket, subscriber: Subscriber) -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            answer = subscribe(subscriber, message.get("text"))
            subscriber.queue.append(json.dumps(answer))  # an answer is never dropped for telemetry
            subscriber.ready.set()


async def pump(
    subscriber: Subscriber, send: Callable[[str], Awaitable[None]], reader: asyncio.Task[Any]
) -> None:
    """Send what the subscriber's queue holds, as fast as the client takes it, until `reader`
    ends (the client left). While a send waits on a slow client, new events replace the oldest
    queued; the client is told how many it lost before the next ones."""
    while not reader.done():
        waiter = asyncio.ensure_future(subscriber.ready.wait())
        await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        subscriber.ready.clear()
        while subscriber.queue or subscriber.dropped:
            if subscriber.dropped:
                count, subscriber.dropped = subscriber.dropped, 0
                await send(json.dumps({"type": "dropped", "count": count}))
                continue
            await send(subscriber.queue.popleft())


def subscribe(subscriber: Subscriber, text: str | None) -> dict[str, Any]:
    """Apply a {"subscribe": [...]} message; the answer says what is now sent, or what was wrong."""
    try:
        message = json.loads(text or "")
        wanted = message["subscribe"]
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return {"type": "error", "error": 'send {"subscribe": [event types]} in a text frame; '
                f"event types: {', '.join(EVENT_TYPES)}"}  # fmt: skip
    unknown = sorted(set(wanted) - set(EVENT_TYPES))
    if unknown:
        return {
            "type": "error",
            "error": f"unknown event types {unknown}; known: {', '.join(EVENT_TYPES)}",
        }
    subscriber.wanted = set(wanted)
    # What is queued of the types no longer wanted stays: it was current when queued.
    return {"type": "subscribed", "events": sorted(subscriber.wanted)}


def presented_key(
    authorization: str | None, subprotocols: list[str]
) -> tuple[str | None, str | None]:
    """(Authorization value, subprotocol to accept) from the header or a `bearer.<base64url
    key>` subprotocol."""
    if authorization:
        return authorization, None
    for protocol in subprotocols:
        if protocol.startswith(SUBPROTOCOL_PREFIX):
            encoded = protocol[len(SUBPROTOCOL_PREFIX) :]
            try:
                key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None, None
            return f"Bearer {key}", protocol
    return None, None
