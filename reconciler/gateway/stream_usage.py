"""Token counts from streams, including those whose client did not ask for usage.

OpenAI-style servers (vLLM, llama.cpp) report a stream's tokens only when asked with
`stream_options.include_usage`. The gateway asks on the client's behalf, counts the usage
event, and takes it out again, so the client sees the stream it asked for.

This runs on every chunk of every stream, so it reads as little as it can (see UsageWatch)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.adapters.shapes import wants_usage
from reconciler.gateway.sse import MAX_EVENT_BYTES, EventParser, event_too_long

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

    This runs on every chunk of every stream, so it reads as little as it can. Events end
    with a blank line ("\\n\\n"): the bytes of an event not yet ended are held (with `strip`;
    without, they pass at once and are kept only to be counted), and of the whole events, only
    those that mention usage are cut out and read. A chunk of whole events without "usage",
    the common one, is returned as it is. Streams with CRLF line ends (none of the backends
    we run sends them) go through the general parser."""

    def __init__(self, on_usage: Callable[[dict[str, Any]], None], strip: bool) -> None:
        self.on_usage = on_usage
        self.strip = strip
        self._held: list[bytes] = []  # the start of an event not yet ended, in pieces
        self._held_size = 0
        self._parser: EventParser | None = None  # once a CR is seen: the general parser

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` to pass on now (without `strip`: all of it, at once)."""
        if self._parser is not None or b"\r" in chunk:
            return self._feed_parsed(chunk)
        if not self._held:
            if chunk.endswith(_EVENT_END):  # whole events: the common chunk
                at = chunk.find(_USAGE)  # one scan, at memory speed: this path's main cost
                return chunk if at < 0 else self._whole_events(chunk, at)
        elif not (b"\n\n" in chunk or (chunk[:1] == b"\n" and self._held[-1].endswith(b"\n"))):
            return self._hold(chunk)  # still inside the same event
        data = b"".join([*self._held, chunk]) if self._held else chunk
        end = data.rfind(_EVENT_END) + 2  # 1: no event ends in it
        self._held, self._held_size = [], 0
        if end == 1:
            return self._hold(data)
        whole = data[:end]
        if end < len(data):
            self._hold(data[end:])
        at = whole.find(_USAGE)
        if at >= 0:
            whole = self._whole_events(whole, at)
        return whole if self.strip else chunk

    def flush(self) -> bytes:
        """The stream ended: what is left of an event it did not finish."""
        if self._parser is not None:
            return self._after(b"", self._parser.flush(), b"")
        if not self._held:
            return b""
        rest = b"".join(self._held)
        self._held, self._held_size = [], 0
        at = rest.find(_USAGE)
        if at >= 0:
            rest = self._whole_events(rest + _EVENT_END, at)
            rest = rest[:-2] if rest.endswith(_EVENT_END) else rest
        return rest if self.strip else b""

    def _hold(self, piece: bytes) -> bytes:
        """Keep `piece` of an event not yet ended; what passes now: nothing with `strip`."""
        self._held.append(piece)
        self._held_size += len(piece)
        if self._held_size > MAX_EVENT_BYTES:  # a backend that never ends an event
            self._held, self._held_size = [], 0
            raise event_too_long("an event")
        return b"" if self.strip else piece

    def _whole_events(self, chunk: bytes, at: int) -> bytes:
        """`chunk`, whole events, with usage first mentioned at `at`: each event that
        mentions it is cut out at its event boundaries and read on its own; the bytes around
        it pass as they are. (Parsing everything from the first mention on cost five times
        as much for a short stream that arrived in a few chunks.)"""
        kept: list[bytes] = []
        pos, cut = 0, False
        while at >= 0:
            start = chunk.rfind(_EVENT_END, pos, at)
            start = pos if start < 0 else start + 2
            end = chunk.find(_EVENT_END, at)
            end = len(chunk) if end < 0 else end + 2
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

    def _feed_parsed(self, chunk: bytes) -> bytes:
        """CRLF streams: the general parser, events passed on re-encoded."""
        if self._parser is None:
            self._parser = EventParser()
            if self._held:  # an LF-looking start, held: the parser takes it first
                chunk, self._held, self._held_size = b"".join([*self._held, chunk]), [], 0
        return self._after(b"", self._parser.feed(chunk), chunk)

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
