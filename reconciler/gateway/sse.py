"""Server-sent events and NDJSON, incrementally: backends hand us bytes cut anywhere.

The parsers keep only the unterminated tail between feeds, as a list of pieces, and look for
terminators in the new bytes alone (plus the byte before them): feeding costs what was fed,
however the stream is cut. A single event or line longer than MAX_EVENT_BYTES is an error
(ValueError, which the proxy maps to a failed stream): a backend that never ends one must
not grow the gateway's memory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1 << 20  # one SSE event or NDJSON line, terminator excluded


def encode_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def event_too_long(what: str) -> ValueError:
    return ValueError(f"backend sent {what} longer than {MAX_EVENT_BYTES} bytes")


class EventParser:
    """Feed it raw bytes; get back the `data` payload of every complete event."""

    def __init__(self) -> None:
        self._tail: list[bytes] = []  # the unterminated event so far, CRLFs already made LFs
        self._size = 0
        self._cr = False  # the last byte fed was a CR, held back: it may start a CRLF

    def feed(self, chunk: bytes) -> list[str]:
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        chunk = chunk.replace(b"\r\n", b"\n")
        if chunk.endswith(b"\r"):
            chunk, self._cr = chunk[:-1], True
        if not chunk:
            return []
        joined = chunk[:1] == b"\n" and bool(self._tail) and self._tail[-1].endswith(b"\n")
        if b"\n\n" not in chunk and not joined:
            self._size += len(chunk)
            if self._size > MAX_EVENT_BYTES:
                self._drop()
                raise event_too_long("an event")
            self._tail.append(chunk)
            return []
        self._tail.append(chunk)
        *events, rest = b"".join(self._tail).split(b"\n\n")
        self._tail, self._size = ([rest], len(rest)) if rest else ([], 0)
        if self._size > MAX_EVENT_BYTES or any(len(event) > MAX_EVENT_BYTES for event in events):
            self._drop()
            raise event_too_long("an event")
        payloads: list[str] = []
        for event in events:
            data = [
                line[5:].removeprefix(b" ")
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                payloads.append(b"\n".join(data).decode())
        return payloads

    @property
    def idle(self) -> bool:
        """Nothing held back: what was fed ended on an event boundary."""
        return not self._tail and not self._cr

    def _drop(self) -> None:
        self._tail, self._size, self._cr = [], 0, False

    def flush(self) -> list[str]:
        """What is left when the stream ends without a final blank line."""
        rest = b"".join(self._tail) + (b"\r" if self._cr else b"")
        self._drop()
        return self.feed(rest + b"\n\n") if rest.strip() else []


class LineParser:
    """NDJSON: one JSON document per line."""

    def __init__(self) -> None:
        self._tail: list[bytes] = []  # the unterminated line so far
        self._size = 0

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        if b"\n" not in chunk:
            self._size += len(chunk)
            if self._size > MAX_EVENT_BYTES:
                self._tail, self._size = [], 0
                raise event_too_long("a line")
            if chunk:
                self._tail.append(chunk)
            return []
        self._tail.append(chunk)
        *lines, rest = b"".join(self._tail).split(b"\n")
        self._tail, self._size = ([rest], len(rest)) if rest else ([], 0)
        if self._size > MAX_EVENT_BYTES or any(len(line) > MAX_EVENT_BYTES for line in lines):
            self._tail, self._size = [], 0
            raise event_too_long("a line")
        return [json.loads(line) for line in lines if line.strip()]

    def flush(self) -> list[dict[str, Any]]:
        rest = b"".join(self._tail)
        self._tail, self._size = [], 0
        return [json.loads(rest)] if rest.strip() else []


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an OpenAI stream, up to `[DONE]` (error events included)."""
    parser = EventParser()
    async for chunk in chunks:
        for data in parser.feed(chunk):
            if data == "[DONE]":
                return
            yield json.loads(data)
    for data in parser.flush():
        if data != "[DONE]":
            yield json.loads(data)
