"""Small upstreams for the gateway's tests and the benchmarks: a fast OpenAI-compatible
server, and a server that replays recorded protocol responses.

Run one standalone from the repository's root:
`python -m tests.fakes.upstreams --port N [--chunk-delay S]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn

from reconciler.config.schema import DesiredState

CHAT_ANSWER = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, friend."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
}  # fmt: skip
EMBEDDING = {"object": "list", "model": "bench", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
             "usage": {"prompt_tokens": 2, "total_tokens": 2}}  # fmt: skip


def _chunk(content: str | None, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = (
        []
        if usage
        else [
            {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}
        ]
    )
    obj = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
           "model": "bench", "choices": choices}  # fmt: skip
    if usage:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


FAKE_CONTEXT = 8192  # tokens: the most events one fake stream sends


def stream_events(chunks: int, usage: bool = False, cached: int | None = None) -> list[bytes]:
    """`chunks` content chunks, a finish chunk, a usage chunk if asked for, and [DONE].
    `cached`: the prompt tokens the usage says came from the cache (llama.cpp says it)."""
    events = [_chunk(f"tok{i} ") for i in range(chunks)]
    events.append(_chunk(None, "stop"))
    if usage:
        events.append(_chunk(None, usage=_usage(9 if cached is None else 100, chunks, cached)))
    events.append(b"data: [DONE]\n\n")
    return events


def _usage(prompt: int, completion: int, cached: int | None) -> dict:
    usage: dict = {"prompt_tokens": prompt, "completion_tokens": completion,
                   "total_tokens": prompt + completion}  # fmt: skip
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


class FastOpenAI:
    """An OpenAI-compatible upstream that answers at once (or with `chunk_delay` between
    stream chunks); the stream length comes from the request's `max_tokens` (default 32)."""

    def __init__(self, chunk_delay: float = 0.0, name: str = "fast"):
        self.chunk_delay = chunk_delay
        self.name = name
        self.requests = 0
        self.open_streams = 0
        self.extra_load = 0.0  # requests it reports beyond its own streams (other clients)
        self.kv_usage: float | None = None  # reported as llamacpp:kv_cache_usage_ratio
        # Of a 100-token prompt, how many its usage says came from its cache (as llama.cpp
        # reports in usage.prompt_tokens_details); None: not reported.
        self.cached_tokens: int | None = None
        self.peers: set[tuple] = set()  # client addresses: how many connections were used
        self._answer = json.dumps(CHAT_ANSWER).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        path = scope["path"]
        if scope["method"] == "GET":
            body = {
                "/health": b'{"status":"ok"}',
                "/v1/models": b'{"object":"list","data":[{"id":"bench"}]}',
            }.get(path)
            if path == "/metrics":
                text = f"llamacpp:requests_processing {self.open_streams + self.extra_load}\n"
                if self.kv_usage is not None:
                    text += f"llamacpp:kv_cache_usage_ratio {self.kv_usage}\n"
                text = text.encode()
                await _respond(send, 200, b"text/plain", text)
            else:
                await _respond(send, 200 if body else 404, b"application/json", body or b"{}")
            return
        raw = await read_body(receive)
        self.requests += 1
        self.peers.add(tuple(scope.get("client") or ()))
        request = json.loads(raw or b"{}")
        headers = [(b"x-upstream", self.name.encode())]
        if path == "/v1/embeddings":
            await _respond(send, 200, b"application/json", json.dumps(EMBEDDING).encode(), headers)
            return
        if not request.get("stream"):
            answer = self._answer
            if self.cached_tokens is not None:
                usage = _usage(100, 5, self.cached_tokens)
                answer = json.dumps({**CHAT_ANSWER, "usage": usage}).encode()
            await _respond(send, 200, b"application/json", answer, headers)
            return
        start = [(b"content-type", b"text/event-stream"), *headers]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        self.open_streams += 1
        try:
            usage = (request.get("stream_options") or {}).get("include_usage") is True
            # A real server stops at its context, whatever max_tokens says; so does this one,
            # so a request the gateway failed to clamp cannot grow the test process unbounded.
            asked = request.get("max_tokens")
            count = min(asked, FAKE_CONTEXT) if isinstance(asked, int) and asked > 0 else 32
            for event in stream_events(count, usage, self.cached_tokens):
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.open_streams -= 1


async def lifespan(receive, send) -> None:
    """Answer an ASGI lifespan scope: start at once, stop when told."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive) -> bytes:
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            return raw


async def _respond(send, status: int, ctype: bytes, body: bytes, extra: list | None = None) -> None:
    headers = [
        (b"content-type", ctype),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Recorded:
    """One recorded answer: a whole body, or stream pieces sent with `delay` between them."""

    status: int = 200
    content_type: str = "application/json"
    body: bytes = b""
    pieces: list[bytes] = field(default_factory=list)
    delay: float = 0.0


class RecordedUpstream:
    """Replays recorded responses by (method, path) and keeps every request it received."""

    def __init__(self, routes: dict[tuple[str, str], Recorded]):
        self.routes = routes
        self.received: list[tuple[str, str, dict | None]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        raw = await read_body(receive)
        self.received.append((scope["method"], scope["path"], json.loads(raw) if raw else None))
        answer = self.routes.get((scope["method"], scope["path"]))
        if answer is None:
            await _respond(send, 404, b"application/json", b'{"error":"not recorded"}')
            return
        if not answer.pieces:
            await _respond(send, answer.status, answer.content_type.encode(), answer.body)
            return
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [(b"content-type", answer.content_type.encode())]})  # fmt: skip
        for piece in answer.pieces:
            await asyncio.sleep(answer.delay)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def last(self, path: str) -> dict | None:
        return next(body for method, p, body in reversed(self.received) if p == path)


@contextmanager
def serve(app, port: int, host: str = "127.0.0.1", http="auto") -> Iterator[uvicorn.Server]:
    """Serve an ASGI app on a thread of its own for the duration of the block (`http`: a
    uvicorn protocol, e.g. `server.header_timeout_protocol(...)`)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
        http=http,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"test server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


def fleet_state(
    backends: dict[str, str],
    kind: str = "llamacpp",
    model: str = "m",
    source: str = "pypi:x",
    aliases: tuple[str, ...] = ("alias",),
    **gateway,
) -> DesiredState:
    """A desired state whose backends (name -> URL) all serve one model, running elsewhere."""
    return DesiredState.model_validate({
        "models": {model: {"source": source, "aliases": list(aliases)}},
        "backends": {n: {"kind": kind, "model": model, "port": 1, "url": u} for n, u in backends.items()},
        "gateway": {"health_interval": 0.5, **gateway},
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--name", default="fast")
    args = parser.parse_args()
    uvicorn.run(FastOpenAI(args.chunk_delay, args.name), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()
