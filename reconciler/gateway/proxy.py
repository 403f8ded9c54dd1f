"""Moving bytes between the client and a backend.

Retries and fallback happen only before the first byte reaches the client; after that, a
failing stream ends with an error event instead of a silent cut."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from reconciler.gateway.adapters import adapter_for
from reconciler.gateway.errors import error_response, sse_error_event
from reconciler.gateway.router import Router, Upstream

log = logging.getLogger(__name__)

# Hop-by-hop and length headers are the proxy's own business, never forwarded.
_DROP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


class UpstreamFailed(Exception):
    """The backend failed before answering: safe to try another one."""


@dataclass(frozen=True)
class ProxyCall:
    endpoint: str
    body: dict
    raw: bytes
    model: str  # canonical model name
    requested_model: str
    stream: bool
    affinity_key: str | None = None


class Proxy:
    def __init__(self, client: httpx.AsyncClient, router: Router, first_byte_timeout: float):
        self.client = client
        self.router = router
        self.first_byte_timeout = first_byte_timeout

    async def forward(self, call: ProxyCall) -> Response:
        candidates = self.router.candidates(call.model, call.affinity_key)
        if not candidates:
            return error_response(
                503,
                f"no healthy backend for model {call.requested_model!r}: "
                f"{self.router.unavailable_reason(call.model)}",
                "no_healthy_backend",
                headers={"Retry-After": "1"},
            )
        tried: list[str] = []
        for upstream in candidates:
            if upstream.in_flight >= upstream.max_concurrency:
                tried.append(f"{upstream.name}: at its concurrency limit")
                continue
            try:
                return await self._attempt(upstream, call)
            except UpstreamFailed as exc:
                upstream.record_failure(time.monotonic())
                tried.append(f"{upstream.name}: {exc}")
                log.warning("backend %s failed before the first byte: %s", upstream.name, exc)
        if all("concurrency limit" in t for t in tried):
            return error_response(
                429, "every backend for this model is at its concurrency limit; retry shortly",
                "backend_busy", headers={"Retry-After": "1"},
            )  # fmt: skip
        return error_response(502, "all backends failed: " + "; ".join(tried), "upstream_error")

    async def _attempt(self, upstream: Upstream, call: ProxyCall) -> Response:
        adapter = adapter_for(upstream.protocol)
        spec = adapter.build_request(call.endpoint, call.body, call.raw, upstream.model)
        request = self.client.build_request(
            spec.method, upstream.base_url + spec.path, content=spec.content, headers=spec.headers
        )
        upstream.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                upstream.in_flight -= 1

        try:
            response = await self._send(request)
            if response.status_code >= 500:
                await response.aread()
                await response.aclose()
                raise UpstreamFailed(f"answered {response.status_code}")
            headers = {
                k: v for k, v in response.headers.items() if k.lower() not in _DROP_HEADERS
            }
            headers["x-tensorforge-backend"] = upstream.name
            if not call.stream or response.status_code != 200:
                content = await self._read(response)
                if response.status_code == 200:
                    content = adapter.convert_response(call.endpoint, content, call.requested_model)
                upstream.record_success()
                release()
                return Response(content, response.status_code, headers=headers)
            chunks = adapter.convert_stream(call.endpoint, response.aiter_raw(), call.requested_model)
            first = await self._first_chunk(chunks, response)
        except BaseException:
            release()
            raise
        upstream.record_success()

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
            except (httpx.HTTPError, asyncio.TimeoutError) as exc:
                upstream.record_failure(time.monotonic())
                log.warning("stream from %s broke: %s", upstream.name, exc)
                yield sse_error_event(f"backend {upstream.name} failed mid-stream: {exc}")
            finally:
                await response.aclose()  # also what cancels the backend's work on disconnect
                release()

        return StreamingResponse(
            body(), status_code=200, headers=headers, background=BackgroundTask(release)
        )

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.client.send(request, stream=True)
        except httpx.RemoteProtocolError:
            # A keep-alive connection the backend closed right after a stream: try once more
            # on a fresh connection before calling the backend failed.
            try:
                return await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise UpstreamFailed(_describe(exc)) from exc
        except httpx.HTTPError as exc:
            raise UpstreamFailed(_describe(exc)) from exc

    async def _read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise UpstreamFailed(_describe(exc)) from exc
        finally:
            await response.aclose()

    async def _first_chunk(self, chunks: AsyncIterator[bytes], response: httpx.Response) -> bytes:
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                return await anext(chunks, b"")
        except (httpx.HTTPError, TimeoutError) as exc:
            await response.aclose()
            raise UpstreamFailed(_describe(exc)) from exc


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
