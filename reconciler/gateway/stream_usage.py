"""Token counts for streams whose client did not ask for usage.

OpenAI-style servers (vLLM, llama.cpp) report a stream's tokens only when asked with
`stream_options.include_usage`. The gateway asks on the client's behalf, counts the usage
event, and takes it out again, so the client sees the stream it asked for."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.adapters.shapes import wants_usage
from reconciler.gateway.sse import EventParser


def needs_usage_request(exchange: Exchange, stream: bool) -> bool:
    return stream and not wants_usage(exchange.body)


def request_usage(exchange: Exchange) -> tuple[Exchange, bytes]:
    """The exchange (and its raw body) with `include_usage` turned on, other options kept."""
    options = exchange.body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    body = {**exchange.body, "stream_options": {**options, "include_usage": True}}
    return replace(exchange, body=body), json.dumps(body).encode()


async def strip_usage(
    chunks: AsyncIterator[bytes], on_usage: Callable[[dict[str, Any]], None]
) -> AsyncIterator[bytes]:
    """Pass the stream on without its usage event: `on_usage` gets each usage object, the
    usage-only event (no choices) is dropped, every other event passes byte for byte. Chunks
    without "usage" that end on an event boundary are not parsed at all (the common case)."""
    parser: EventParser | None = None
    async for chunk in chunks:
        if parser is None and b'"usage"' not in chunk and chunk.endswith(b"\n\n"):
            yield chunk
            continue
        parser = parser or EventParser()
        out = b"".join(_without_usage(data, on_usage) for data in parser.feed(chunk))
        if out:
            yield out
    if parser is not None:
        out = b"".join(_without_usage(data, on_usage) for data in parser.flush())
        if out:
            yield out


def _without_usage(data: str, on_usage: Callable[[dict[str, Any]], None]) -> bytes:
    original = b"data: " + data.encode() + b"\n\n"
    if '"usage"' not in data:
        return original
    try:
        event = json.loads(data)
    except ValueError:
        return original
    usage = event.get("usage") if isinstance(event, dict) else None
    if not isinstance(usage, dict):
        return original  # "usage" inside the generated text, or OpenAI's "usage": null
    on_usage(usage)
    # The usage-only event the client did not ask for goes; usage on a content event stays
    # (llama.cpp's /v1/completions stream sends it there whether asked or not).
    return b"" if not event.get("choices") else original
