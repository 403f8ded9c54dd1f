"""A fast OpenAI-compatible upstream for reliability tests: /health, /v1/models and
/v1/chat/completions (JSON, or `stream: true` as N SSE chunks), optionally slowed down.

Run: python -m tests.fakes.openai_upstream --host H --port P --name NAME [--chunk-delay S]"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def build_app(name: str, chunks: int, chunk_delay: float, delay: float) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def chat(request: Request):
        body = await request.json()
        if delay:
            await asyncio.sleep(delay)
        if body.get("stream"):

            async def events():
                for i in range(chunks):
                    delta = {"content": f"{name}-{i} "}
                    chunk = {"id": "c", "object": "chat.completion.chunk", "model": body["model"],
                             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    if chunk_delay:
                        await asyncio.sleep(chunk_delay)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({
            "id": "c", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"answer from {name}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        })  # fmt: skip

    return Starlette(routes=[
        Route("/health", health), Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    app = build_app(args.name, args.chunks, args.chunk_delay, args.delay)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
