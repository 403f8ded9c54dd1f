"""A bounded load generator: `concurrency` workers send chat requests to a gateway for
`duration` seconds (or `count` requests) and print one JSON line per request.

Run: python -m tests.fakes.load_client URL --duration S --concurrency N [--stream]"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httpx


async def one(client: httpx.AsyncClient, url: str, stream: bool, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    started = time.monotonic()
    record: dict = {"t": started, "stream": stream}
    try:
        if stream:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                record["status"] = response.status_code
                record["backend"] = response.headers.get("x-tensorforge-backend")
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
                record["done"] = bool(lines) and lines[-1] == "data: [DONE]"
                record["error_event"] = any('"error"' in line for line in lines)
                record["end"] = time.monotonic()
        else:
            response = await client.post(url + "/v1/chat/completions", json=body)
            record["status"] = response.status_code
            record["backend"] = response.headers.get("x-tensorforge-backend")
            if response.status_code != 200:
                record["body"] = response.text[:300]
    except httpx.HTTPError as exc:
        record["status"] = 0
        record["body"] = f"{type(exc).__name__}: {exc}"
    record["latency"] = time.monotonic() - started
    return record


async def run(
    url: str, duration: float, count: int, concurrency: int, stream: bool, model: str
) -> None:
    deadline = time.monotonic() + duration
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < deadline and (count == 0 or sent < count):
            sent += 1
            print(json.dumps(await one(client, url, stream, model)), flush=True)

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--model", default="m")
    args = parser.parse_args()
    asyncio.run(
        run(
            args.url, min(args.duration, 120), args.count, args.concurrency, args.stream, args.model
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
