"""Token counts from streams, including those whose client did not ask for usage.

OpenAI-style servers (vLLM, llama.cpp) report a stream's tokens only when asked with
`stream_options.include_usage`. The gateway asks on the client's behalf, counts the usage
event, and takes it out again, so the client sees the stream it asked for.

This runs on every chunk of every stream, so it parses as little as it can: only the last
events carry usage, and a chunk of whole events that does not mention it passes untouched."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.adapters.shapes import wants_usage
from reconciler.gateway.sse import EventParser

_USAGE = b'"usage"'
_EVENT_END = b"\n\n"


def is_event_stream(exchange: Exchange) -> bool:
    """The answer streams as OpenAI's server-sent events; Ollama's native API (`/api/…`,
    passed through to Ollama backends) streams NDJSON, which has no usage event to find."""
    return not exchange.endpoint.startswith("/api/")


# Where `stream_options.include_usage` is OpenAI's: the Responses and Anthropic Messages
# streams report usage in events of their own, with `event:` lines a re-encoded event loses.
USAGE_OPTION_ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions"))


def needs_usage_request(exchange: Exchange, stream: bool) -> bool:
    return stream and exchange.endpoint in USAGE_OPTION_ENDPOINTS and not wants_usage(exchange.body)


def request_usage(exchange: Exchange, raw: bytes) -> tuple[Exchange, bytes]:
    """The exchange and its raw body with `include_usage` turned on, other options kept. The
    common case (no stream_options at all) adds the field to the bytes as they are, instead
    of serializing the whole request again."""
    options = exchange.body.get("stream_options")
    body = {
        **exchange.body,
        "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
    }
    changed = Exchange(exchange.endpoint, body, exchange.requested_model)
    end = raw.rstrip()
    # A UTF-8 object with members and no stream_options (other encodings: serialized again).
    if (
        "stream_options" not in exchange.body
        and exchange.body
        and raw[:1] == b"{"
        and end[-1:] == b"}"
    ):
        return changed, end[:-1] + b',"stream_options":{"include_usage":true}}'
    return changed, json.dumps(body).encode()


class UsageWatch:
    """Finds the usage reports in a stream of server-sent events as its bytes pass:
    `on_usage` gets each usage object. With `strip`, the usage-only event (no choices), which
    the client did not ask for, is taken out; every other event passes byte for byte.

    Cheap in the common case: a chunk of whole events without "usage" is returned as it is,
    and in one that has it, the whole events before the first mention pass unparsed."""

    def __init__(self, on_usage: Callable[[dict[str, Any]], None], strip: bool) -> None:
        self.on_usage = on_usage
        self.strip = strip
        self._parser: EventParser | None = None  # made on the first chunk that needs it
        self._idle = True  # nothing held back: the last chunk ended on an event boundary

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` to pass on now (without `strip`: all of it, at once)."""
        if self._idle and chunk.endswith(_EVENT_END):
            at = chunk.find(_USAGE)  # one scan: at memory speed, a chunk's largest cost here
            if at < 0:
                return chunk
            if b"\r" not in chunk:  # whole LF events: only those that mention usage are read
                return self._whole_events(chunk, at)
        head, rest = b"", chunk
        if self._idle and b"\r" not in chunk:  # CRLF events: the parser finds their ends
            at = chunk.find(_USAGE)
            end = chunk.rfind(_EVENT_END, 0, at if at >= 0 else len(chunk))
            if end >= 0:  # whole events before the first mention: no need to parse them
                head, rest = chunk[: end + 2], chunk[end + 2 :]
        parser = self._parser = self._parser or EventParser()
        events = parser.feed(rest)
        self._idle = parser.idle
        return self._after(head, events, chunk)

    def _whole_events(self, chunk: bytes, at: int) -> bytes:
        """A chunk of whole events: each event that mentions usage is cut out at its event
        boundaries and read on its own; the bytes around it pass as they are. (The backend
        often sends a whole short stream in one chunk: parsing all of it for the one usage
        event near its end was the larger part of the gateway's CPU for such a stream.)"""
        kept: list[bytes] = []
        pos, cut = 0, False
        while at >= 0:  # `at`: the next mention of usage
            start = chunk.rfind(_EVENT_END, pos, at)
            start = pos if start < 0 else start + 2
            end = chunk.index(_EVENT_END, at) + 2  # the chunk ends with one
            data = b"\n".join(
                line[5:].removeprefix(b" ")
                for line in chunk[start:end].split(b"\n")
                if line.startswith(b"data:")
            )
            if self._count(data.decode()) and self.strip:
                kept.append(chunk[pos:start])  # the usage-only event the client did not ask for
                cut = True
            else:
                kept.append(chunk[pos:end])
            pos = end
            at = chunk.find(_USAGE, pos)
        if not cut:
            return chunk
        kept.append(chunk[pos:])
        return b"".join(kept)

    def flush(self) -> bytes:
        """The stream ended: what is left of an event it did not finish."""
        if self._parser is None or self._idle:
            return b""
        self._idle = True
        return self._after(b"", self._parser.flush(), b"")

    def _after(self, head: bytes, events: list[str], chunk: bytes) -> bytes:
        if not self.strip:
            for data in events:
                self._count(data)
            return chunk
        return head + b"".join(
            b"" if self._count(data) else b"data: " + data.encode() + b"\n\n" for data in events
        )

    def _count(self, data: str) -> bool:
        """Count the event's usage, if it has one; True when it is a usage-only event (the one
        the client did not ask for: `strip` takes it out). Usage on a content event stays
        (llama.cpp's /v1/completions stream sends it there, asked or not)."""
        if '"usage"' not in data:
            return False
        try:
            event = json.loads(data)
        except ValueError:
            return False
        usage = event.get("usage") if isinstance(event, dict) else None
        if not isinstance(usage, dict):
            return False  # "usage" inside the generated text, or OpenAI's "usage": null
        self.on_usage(usage)
        return not event.get("choices")
