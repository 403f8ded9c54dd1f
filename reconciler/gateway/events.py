"""Inference events on the platform's NATS bus (`events.nats_url`), with the official nats-py
client: `inference.request.v1` when a request reaches the proxy, `inference.response.v1` when
it is answered. The platform keeps a JetStream stream on `inference.>`; each message carries a
`Nats-Msg-Id` header (request id and kind) so a stream deduplicates a resend.

    inference.request.v1:  {"request_id", "timestamp", "host", "model", "requested_model",
                            "endpoint", "stream", "client"}  (+ "messages"/"prompt" with include_text)
    inference.response.v1: {"request_id", "timestamp", "host", "model", "backend", "status",
                            "prompt_tokens", "completion_tokens", "total_tokens", "duration_ms"}

Publishing never delays or fails a request: the proxy's observer only appends to a bounded
queue, and a task of its own publishes. While NATS is down the queue fills, then the oldest
events are dropped; each drop is counted in tensorforge_gateway_events_dropped_total."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from reconciler.config.schema import EventsSpec
from reconciler.gateway.proxy_call import ProxyCall

log = logging.getLogger(__name__)
REQUEST_SUBJECT = "inference.request.v1"
RESPONSE_SUBJECT = "inference.response.v1"
# What nats-py itself may buffer while it reconnects; past it a publish fails (and is counted).
CLIENT_PENDING_BYTES = 1024 * 1024
CLOSE_FLUSH_SECONDS = 2.0
TEXT_FIELDS = ("messages", "prompt", "input", "system")


def _timestamp(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class NatsEvents:
    """The proxy's observer that publishes to NATS. `run()` is the publishing task."""

    def __init__(self, spec: EventsSpec, host: str, registry: CollectorRegistry):
        assert spec.nats_url is not None
        self.url = spec.nats_url
        self.include_text = spec.include_text
        self.host = host
        # (subject, request id, event): serialized by the publishing task, not in the request path.
        self.queue: collections.deque[tuple[str, str, dict[str, Any]]] = collections.deque(
            maxlen=spec.queue_size
        )
        self.wake = asyncio.Event()
        self.connected = False
        self.published = Counter(
            "tensorforge_gateway_events_published_total", "Inference events handed to NATS.", ["subject"],
            registry=registry,
        )  # fmt: skip
        self.dropped = Counter(
            "tensorforge_gateway_events_dropped_total",
            "Inference events not published (queue_full: NATS down or slow longer than the queue lasts; "
            "publish_failed: the client refused it).", ["reason"], registry=registry,
        )  # fmt: skip
        self._queue_full = self.dropped.labels("queue_full")
        self._publish_failed = self.dropped.labels("publish_failed")
        self._client: Any = None
        self._warned = False

    def describe(self) -> dict[str, Any]:
        return {"nats_url": self.url, "connected": self.connected, "queued": len(self.queue)}

    # -- the proxy's observer (called in the request path: append only) ---------------------
    def _enqueue(self, subject: str, request_id: str, event: dict[str, Any]) -> None:
        if len(self.queue) == self.queue.maxlen:
            self._queue_full.inc()  # deque(maxlen) pushes the oldest out
        self.queue.append((subject, request_id, event))
        self.wake.set()

    def requested(self, call: ProxyCall) -> None:
        body = call.exchange.body
        event = {
            "request_id": call.request_id, "timestamp": time.time(), "host": self.host, "model": call.model,
            "requested_model": call.exchange.requested_model, "endpoint": call.exchange.endpoint,
            "stream": call.stream, "client": call.client,
        }  # fmt: skip
        if self.include_text and isinstance(body, dict):
            event.update({k: body[k] for k in TEXT_FIELDS if k in body})
        self._enqueue(REQUEST_SUBJECT, call.request_id, event)

    def completed(
        self,
        call: ProxyCall,
        backend: str,
        status: str,
        seconds: float,
        usage: dict[str, Any] | None,
    ) -> None:
        usage = usage or {}
        self._enqueue(RESPONSE_SUBJECT, call.request_id, {
            "request_id": call.request_id, "timestamp": time.time(), "host": self.host, "model": call.model,
            "backend": None if backend == "none" else backend, "status": int(status),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"), "duration_ms": round(seconds * 1000, 2),
        })  # fmt: skip

    # -- publishing ----------------------------------------------------------------------------
    async def run(self) -> None:
        from nats.aio.client import Client  # nats.NATS

        client = self._client = Client()

        async def on_error(exc: Exception) -> None:  # once per outage, not once per retry
            if not self._warned:
                log.warning(
                    "NATS at %s: %s; events queue (up to %d) until it is back",
                    self.url,
                    exc,
                    self.queue.maxlen,
                )
                self._warned = True

        async def on_disconnect() -> None:
            self.connected = False

        async def on_reconnect() -> None:
            self.connected, self._warned = True, False
            log.info("NATS at %s reconnected", self.url)
            self.wake.set()

        # Reconnect forever (the first connection too): NATS may start after the gateway.
        await client.connect(
            self.url, max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=2,
            pending_size=CLIENT_PENDING_BYTES, error_cb=on_error, disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect, name="tensorforge-gateway",
        )  # fmt: skip
        self.connected, self._warned = True, False
        log.info("publishing inference events to NATS at %s", self.url)
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue and client.is_connected:
                subject, request_id, payload = self.queue.popleft()
                await self._publish(client, subject, request_id, payload)

    async def _publish(
        self, client: Any, subject: str, request_id: str, event: dict[str, Any]
    ) -> None:
        kind = "request" if subject == REQUEST_SUBJECT else "response"
        payload = json.dumps(
            {**event, "timestamp": _timestamp(event["timestamp"])}, separators=(",", ":")
        ).encode()
        try:
            await client.publish(subject, payload, headers={"Nats-Msg-Id": f"{request_id}.{kind}"})
            self.published.labels(subject).inc()
        except Exception as exc:  # nats.errors.*: connection lost mid-way, buffer full
            self._publish_failed.inc()
            log.debug("event %s for %s not published: %s", subject, request_id, exc)

    async def close(self) -> None:
        """Publish what is queued (briefly, if NATS is there), then close the connection."""
        client = self._client
        if client is None or client.is_closed:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_FLUSH_SECONDS):
                while self.queue and client.is_connected:
                    await self._publish(client, *self.queue.popleft())
                if client.is_connected:
                    await client.flush()
        with contextlib.suppress(Exception):
            await client.close()
