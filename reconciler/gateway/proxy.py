"""Moving bytes between the client and a backend.

Retries and fallback happen only before the first byte reaches the client; after that, a
failing stream ends with an error event instead of a silent cut. Every outcome is counted.

Every request has a deadline, first byte sent to last received (the backend's
request_timeout, shorter for a small max_tokens); past it, it is cancelled at the backend by
closing the connection, answered 504 (or its stream ends with an error event), and not
retried elsewhere (a request that wedges one backend would wedge the next). Only
unavailability (refused, reset before any byte while not loaded, a 502-504 answer) counts
toward a backend's circuit; a timeout or a drop under load does not."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from reconciler.gateway.adapters import Unsupported, adapter_for
from reconciler.gateway.answer_limits import read_whole
from reconciler.gateway.deadline import StreamDeadline
from reconciler.gateway.errors import GatewayError, backend_error, sse_error_event
from reconciler.gateway.metrics import GatewayMetrics
from reconciler.gateway.observers import ProxyObserver
from reconciler.gateway.proxy_call import ProxyCall
from reconciler.gateway.router import Router, Upstream
from reconciler.gateway.slots import SlotWatch
from reconciler.gateway.stream_usage import (
    UsageWatch,
    is_event_stream,
    needs_usage_request,
    request_usage,
)

log = logging.getLogger(__name__)

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"
# Errors of a connection that may have been stale (closed by the backend while idle in our
# pool): worth one more try on a fresh connection before calling the backend failed.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectTimeout, httpx.WriteError)
# After [DONE], how long a consumer that stopped reading waits for the backend's answer to
# end: a finished answer leaves its connection in the pool instead of closing it.
DRAIN_SECONDS = 0.5
DRAIN_CHUNKS = 8
# A connection dropped while the backend has this many other requests open (its slots'
# worth where known) is overload, not unavailability: tried elsewhere, not held against it.
LOADED_IN_FLIGHT = 8
QUEUE_SECONDS = 30.0  # longest a request waits in the gateway for room at a full backend


class Malformed(Exception):
    """The adapter could not translate the request: a field of a shape it did not expect."""


class UpstreamFailed(Exception):
    """The backend failed before answering: safe to try another one."""

    def __init__(self, message: str, busy: bool = False):
        super().__init__(message)
        self.busy = busy  # it said 429, or dropped us under load: full, not broken


class TimedOut(Exception):
    """This request's deadline passed at the backend: it was cancelled there (the connection
    closed). The request's fault or the backend's, it is not retried and opens no circuit."""


@dataclass
class Answer:
    """What goes back to the client: a whole body, or a stream the caller must drain or
    `aclose()` (closing it is what cancels the backend's work)."""

    status: int
    content_type: bytes = JSON
    backend: str = ""
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    retry_after: str | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # extra response headers
    error: GatewayError | None = None  # a backend's error answer (then `body` is empty)


class Proxy:
    def __init__(
        self,
        transports: dict[str, httpx.AsyncBaseTransport],
        timeout: httpx.Timeout,
        router: Router,
        metrics: GatewayMetrics,
        first_byte_timeout: float,
        slot_watch: SlotWatch | None = None,
    ):
        # Requests go straight to the transport, with httpx's Request and Response: a proxy
        # wants none of the client's cookie jar (it would carry one user's cookies to the
        # next), redirects or auth, and skipping them was a fifth of the measured CPU cost.
        self.transports = transports  # by URL scheme
        self.timeout = {**timeout.as_dict(), "first_byte": first_byte_timeout}
        self.router = router
        self.metrics = metrics
        self.first_byte_timeout = first_byte_timeout
        self.slot_watch = slot_watch
        self._urls: dict[str, httpx.URL] = {}
        self.observers: list[ProxyObserver] = []

    def _count(
        self,
        call: ProxyCall,
        backend: str,
        status: str,
        started: float,
        usage: dict[str, Any] | None = None,
    ) -> None:
        """Count one request's outcome, and tell the observers."""
        self.metrics.count(call.model, backend, status, call.client)
        for observer in self.observers:
            try:
                observer.completed(call, backend, status, time.perf_counter() - started, usage)
            except Exception:  # telemetry must never fail a request, nor skip its cleanup
                log.exception("observer %s failed", type(observer).__name__)

    async def forward(self, call: ProxyCall) -> Answer:
        for observer in self.observers:
            try:
                observer.requested(call)
            except Exception:  # as in _count
                log.exception("observer %s failed", type(observer).__name__)
        started = time.perf_counter()
        ordered = self.router.order(
            call.model, call.affinity_key, call.exchange.body, eligible=call.eligible
        )
        candidates = ordered.upstreams
        if ordered.prefix is not None:
            call = replace(call, prefix=ordered.prefix)
        if not candidates:
            self.metrics.rejected.labels("no_healthy_backend").inc()
            self._count(call, "none", "503", started)
            raise GatewayError(
                503,
                f"no healthy backend for model {call.exchange.requested_model!r}: "
                f"{self.router.unavailable_reason(call.model)}",
                "no_healthy_backend", retry_after="1",
            )  # fmt: skip
        if all(u.in_flight >= u.limit for u in candidates):
            await self._wait_for_room(candidates)
        tried: list[str] = []
        failed = False  # a backend failed (not merely full): 502 rather than 429
        pending = candidates
        for round_ in range(2):  # the second: full backends, after waiting for room at one
            full: list[Upstream] = []
            for upstream in pending:
                if upstream.in_flight >= upstream.limit:
                    full.append(upstream)
                    continue
                try:
                    return await self._attempt(upstream, call, started)
                except Unsupported as exc:
                    self._count(call, upstream.name, "400", started)
                    raise GatewayError(
                        400, str(exc), exc.code, param=getattr(exc, "param", None)
                    ) from None
                except Malformed as exc:
                    self._count(call, upstream.name, "400", started)
                    raise GatewayError(400, str(exc), "invalid_request") from None
                except TimedOut as exc:
                    self._count(call, upstream.name, "504", started)
                    log.warning("request to %s cancelled: %s", upstream.name, exc)
                    raise GatewayError(
                        504, f"backend {upstream.name}: {exc}", "upstream_timeout"
                    ) from None
                except UpstreamFailed as exc:
                    if not exc.busy:
                        failed = True
                        upstream.record_failure(time.monotonic())
                    tried.append(f"{upstream.name}: {exc}")
                    log.warning("backend %s failed before the first byte: %s", upstream.name, exc)
                    self.metrics.retries.labels(call.model, upstream.name).inc()
            if not full or round_ == 1 or not failed:
                tried += [f"{u.name}: at its concurrency limit ({u.limit})" for u in full]
                break
            # Those with room failed (one was killed, say): queue for one that is only full.
            await self._wait_for_room(full)
            pending = full
        if not failed:
            self.metrics.rejected.labels("backend_busy").inc()
            self._count(call, "none", "429", started)
            raise GatewayError(
                429, "every backend for this model is at its concurrency limit and its queue is full; "
                "retry shortly", "backend_busy", retry_after="1",
            )  # fmt: skip
        self._count(call, "none", "502", started)
        raise GatewayError(502, "all backends failed: " + "; ".join(tried), "upstream_error")

    async def _wait_for_room(self, candidates: list[Upstream]) -> None:
        """Every candidate is at its limit: wait, in the queue of the one with the shortest,
        until one has room (at most QUEUE_SECONDS); with every queue full, return at once."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(QUEUE_SECONDS, self.first_byte_timeout)
        while all(u.in_flight >= u.limit for u in candidates):
            open_queues = [u for u in candidates if len(u.waiters) < u.queue_limit]
            if not open_queues:
                return
            upstream = min(open_queues, key=lambda u: len(u.waiters))
            waiter = loop.create_future()
            upstream.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(give_up):
                    await waiter
            except TimeoutError:
                return
            finally:
                if not waiter.done():
                    waiter.cancel()
                    upstream.waiters.remove(waiter)

    def deadline(self, call: ProxyCall, upstream: Upstream) -> float:
        """Seconds this request may take at `upstream`, first byte to last: its
        request_timeout, or less when max_tokens (times n) at the slowest working generation
        speed, after the longest prefill, ends sooner."""
        seconds = upstream.request_timeout
        body = call.exchange.body
        tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        choices = body.get("n", 1)
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
            choices = (
                choices
                if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0
                else 1
            )
            budget = self.first_byte_timeout + tokens * choices / upstream.min_tokens_per_second
            seconds = min(seconds, budget)
        return seconds

    def _cancelled(self, upstream: Upstream) -> None:
        """A request was cut at `upstream` by its deadline: see that no slot stays busy."""
        if self.slot_watch is not None:
            self.slot_watch.after_cancel(upstream)

    async def _attempt(self, upstream: Upstream, call: ProxyCall, started: float) -> Answer:
        adapter = adapter_for(upstream.protocol)
        exchange, raw = call.exchange, call.raw
        hidden_usage = adapter.stream_usage_option and needs_usage_request(exchange, call.stream)
        if hidden_usage:  # counted, then stripped from what the client gets
            exchange, raw = request_usage(exchange, raw)
        try:
            spec = adapter.build_request(exchange, raw, upstream.served_name)
        except Unsupported:
            raise
        except Exception as exc:  # check_fields missed a shape: still the client's 400, not a 500
            log.debug("adapter %s could not build the request", upstream.protocol, exc_info=True)
            raise Malformed(
                f"malformed request for this backend: {type(exc).__name__}: {exc}"
            ) from exc
        passthrough = adapter.passes_through(call.exchange.endpoint)
        target = upstream.base_url + spec.path
        url = self._urls.get(target)
        if url is None:
            url = self._urls[target] = httpx.URL(target)
        headers = {**spec.headers, **upstream.headers} if upstream.headers else spec.headers
        if call.trace:
            headers = {**headers, **dict(call.trace)}
        allowed = self.deadline(call, upstream)
        deadline = asyncio.get_running_loop().time() + allowed
        first_wait = min(self.first_byte_timeout, allowed)
        timeout = (
            self.timeout
            if first_wait == self.first_byte_timeout
            else {**self.timeout, "first_byte": first_wait}
        )
        request = httpx.Request(
            spec.method, url, content=spec.content, headers=headers, extensions={"timeout": timeout}
        )
        others = upstream.in_flight
        upstream.in_flight += 1
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(first_wait):
                response = await self._send(request)
                status = response.status_code
                backend_id = response.headers.get("x-request-id")
                # 502/503/504 and 429 say the backend (or what fronts it) cannot serve now: try
                # another. A 500 is this request's answer: llama.cpp gives one for input it
                # cannot handle (a malformed tool, an image to a text model), so treating it as
                # a backend failure let any client open every replica's circuit with 3 requests.
                # A backend broken for every request fails its health check instead.
                if status >= 502 or status == 429:
                    await response.aclose()
                    raise UpstreamFailed(f"answered {status}", busy=status == 429)
                if not call.stream or status != 200:
                    content = await read_whole(response)  # capped: answer_limits.py
                    await response.aclose()
                    if status == 200 and not passthrough:
                        content = adapter.convert_response(call.exchange, content)
                    upstream.record_success()
                    upstream.release()
                    self._record(
                        call, upstream, status, started, content if status == 200 else None
                    )
                    if (
                        status >= 400
                    ):  # one error, each surface renders it; other statuses pass as they are
                        error = backend_error(content, status)
                        return Answer(
                            status,
                            JSON,
                            upstream.name,
                            error=error,
                            headers=_backend_id(backend_id, call),
                        )
                    ctype = response.headers.get("content-type", "application/json").encode()
                    return Answer(
                        status,
                        ctype,
                        upstream.name,
                        body=content,
                        headers=_backend_id(backend_id, call),
                    )
                upstream_chunks = response.aiter_raw()
                chunks = (
                    upstream_chunks
                    if passthrough
                    else adapter.convert_stream(exchange, upstream_chunks)
                )
                first = await anext(chunks, b"")
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            upstream.release()
            if response is not None:
                await response.aclose()
            if _timed_out(exc) and not upstream.healthy:
                # Its probe fails too: unreachable (a partition), not this request's doing.
                raise UpstreamFailed(
                    f"no answer, and its health probe fails: {upstream.health_detail}"
                ) from exc
            if _timed_out(exc):
                self._cancelled(upstream)
                limit = (
                    "request_timeout or max_tokens budget"
                    if first_wait < self.first_byte_timeout
                    else "first_byte_timeout"
                )
                raise TimedOut(
                    f"no answer within {first_wait:g}s ({limit}); the request was cancelled at the backend"
                ) from exc
            loaded = others >= (upstream.slots or LOADED_IN_FLIGHT)
            dropped = isinstance(
                exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
            )
            raise UpstreamFailed(_describe(exc), busy=loaded and dropped) from exc
        except BaseException as exc:
            upstream.release()
            if response is not None:
                await response.aclose()
            if isinstance(exc, asyncio.CancelledError):
                self._count(call, upstream.name, "499", started)
            raise
        upstream.record_success()
        self.metrics.child(self.metrics.ttft, call.model, upstream.name).observe(
            time.perf_counter() - started
        )
        watch = self._usage_watch(call, upstream, hidden_usage)
        stream = self._relay(first, chunks, response, upstream, call, (started, deadline), watch)
        await anext(stream)  # run it to its first yield: from here on, closing it cleans up
        return Answer(
            200, EVENT_STREAM, upstream.name, stream=stream, headers=_backend_id(backend_id, call)
        )

    async def _relay(
        self,
        first: bytes,
        chunks: AsyncIterator[bytes],
        response: httpx.Response,
        upstream: Upstream,
        call: ProxyCall,
        times: tuple[float, float],  # perf_counter at the start, loop time of the deadline
        watch: tuple[UsageWatch, dict[str, Any]] | None,  # finds (and strips) usage; what it found
    ) -> AsyncGenerator[bytes, None]:
        started, deadline = times
        status = "200"
        finished = False  # [DONE] went out: a consumer stopping now is not a disconnect
        timer = StreamDeadline(deadline)
        usage, tokens = watch if watch is not None else (None, None)
        try:
            yield b""  # the priming step (see _attempt); never reaches the client
            chunk: bytes | None = first
            while chunk is not None:
                if chunk:
                    finished = chunk.endswith(b"[DONE]\n\n")
                    out = usage.feed(chunk) if usage is not None else chunk
                    if out:
                        yield out
                timer.start_read()
                try:
                    chunk = await anext(chunks, None)
                except asyncio.CancelledError:
                    timer.raise_if_expired()
                    raise
                finally:
                    timer.reading = False
            if usage is not None and (rest := usage.flush()):
                yield rest
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            if _timed_out(exc):  # this request's deadline or silence: not the backend's health
                status = "504"
                self._cancelled(upstream)
                why = "its deadline passed" if isinstance(exc, TimeoutError) else _describe(exc)
                message = f"backend {upstream.name}: stream cancelled at the backend: {why}"
            else:
                status = "502"
                upstream.record_failure(time.monotonic())
                message = f"backend {upstream.name} failed mid-stream: {_describe(exc)}"
            log.warning("%s", message)
            yield sse_error_event(message)
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                status = "499"  # the client went away; closing the response stops the backend
            raise
        finally:
            timer.close()
            upstream.release()
            m = self.metrics
            self._count(call, upstream.name, status, started, tokens or None)
            m.child(m.duration, call.model, upstream.name).observe(time.perf_counter() - started)
            try:
                if finished and not response.is_closed:
                    await _drain(chunks)
            finally:
                await response.aclose()

    def _usage_watch(
        self, call: ProxyCall, upstream: Upstream, hidden: bool
    ) -> tuple[UsageWatch, dict[str, Any]] | None:
        """What finds the stream's token counts (for the metrics and the observers), taking
        out the usage event the gateway asked for (`hidden`); None for a stream that is not
        server-sent events."""
        if not is_event_stream(call.exchange):
            return None
        tokens: dict[str, Any] = {}

        def counted(usage: dict[str, Any]) -> None:
            self._usage_seen(call, upstream, usage)
            tokens.update(usage)

        return UsageWatch(counted, strip=hidden), tokens

    def _record(
        self,
        call: ProxyCall,
        upstream: Upstream,
        status: int,
        started: float,
        content: bytes | None,
    ) -> None:
        m = self.metrics
        elapsed = time.perf_counter() - started
        m.child(m.duration, call.model, upstream.name).observe(elapsed)
        m.child(m.ttft, call.model, upstream.name).observe(elapsed)
        usage = (
            self._count_usage(content, call, upstream)
            if content and b'"usage"' in content
            else None
        )
        self._count(call, upstream.name, str(status), started, usage)

    def _count_usage(
        self, document: str | bytes, call: ProxyCall, upstream: Upstream
    ) -> dict[str, Any] | None:
        """Tokens from an answer's (or a stream event's) OpenAI `usage` object, if it has one."""
        try:
            usage = json.loads(document).get("usage")
        except (ValueError, AttributeError):
            return None
        if not isinstance(usage, dict):
            return None
        self._usage_seen(call, upstream, usage)
        return usage

    def _usage_seen(self, call: ProxyCall, upstream: Upstream, usage: dict[str, Any]) -> None:
        """A backend's usage report: counted, and checked against what the routing expected
        of its cache."""
        self.metrics.record_tokens(call.model, upstream.name, usage, call.client)
        if call.prefix is not None:
            self.router.cache_reported(call.prefix, upstream, usage)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        transport = self.transports[request.url.scheme]
        try:
            return await transport.handle_async_request(request)
        except _STALE:  # one more try on a fresh connection; what that raises, _attempt sorts
            return await transport.handle_async_request(request)


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """The consumer stopped at [DONE] (WebSocket, Ollama's /api/chat): read what is left of
    the answer, briefly, so its connection can be reused; a backend that goes on is cut off."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            for _ in range(DRAIN_CHUNKS):
                if await anext(chunks, None) is None:
                    return
    except (httpx.HTTPError, TimeoutError, ValueError):
        pass


def _timed_out(exc: BaseException) -> bool:
    """A deadline or a silence, as opposed to a refused or broken connection. httpx-aiohttp
    reports a refused connection as ConnectTimeout: that one is unavailability."""
    if isinstance(exc, httpx.ConnectTimeout):
        return False
    return isinstance(exc, (TimeoutError, httpx.TimeoutException))


def _describe(exc: BaseException) -> str:
    # httpx-aiohttp maps some errors loosely (a refused connection becomes ConnectTimeout):
    # name the original error.
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    text = str(cause) or type(cause).__name__
    return f"{type(cause).__name__}: {text}"[:300]


def _backend_id(backend_id: str | None, call: ProxyCall) -> list[tuple[bytes, bytes]]:
    """The backend's own request id, when it is not the one we sent: kept for tracing."""
    if backend_id is None or (("x-request-id", backend_id) in call.trace):
        return []
    return [(b"x-backend-request-id", backend_id.encode("latin-1", "replace"))]
