"""Server-sent events and NDJSON, incrementally: backends hand us bytes cut anywhere."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

DONE = b"data: [DONE]\n\n"


def encode_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class EventParser:
    """Feed it raw bytes; get back the `data` payload of every complete event."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        *events, self._buffer = buffer.split(b"\n\n")
        payloads: list[str] = []
        for event in events:
            data = [
                line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
            ]
            if data:
                payloads.append(b"\n".join(data).decode())
        return payloads

    def flush(self) -> list[str]:
        """What is left when the stream ends without a final blank line."""
        rest, self._buffer = self._buffer, b""
        return self.feed(rest + b"\n\n") if rest.strip() else []


class LineParser:
    """NDJSON: one JSON document per line."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[dict]:
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def flush(self) -> list[dict]:
        rest, self._buffer = self._buffer, b""
        return [json.loads(rest)] if rest.strip() else []


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict]:
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
