"""The gateway's own CPU per request with no sockets: the ASGI app called directly, its
backend a canned transport (the same answers `FastOpenAI` gives), so what is measured is the
gateway's Python alone, which sockets and uvicorn dilute in `gateway_bench.py`.

    .venv/bin/python bench/gateway_inprocess.py [--baseline DIR] [--requests 3000] [--runs 4]

Each measurement runs in a fresh process pinned to core 1, alternating between this checkout
and `--baseline DIR` (another checkout, same venv; its `reconciler` comes first on the path);
the minimum over `--runs` is reported, the least disturbed by other load. `gc.freeze()`
after the app is built where the checkout's `tensorforge gateway` does it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = 1


def measure(mode: str, requests: int) -> float:
    """CPU seconds per request through this process's `reconciler` (run in a child)."""
    import gc

    import httpx
    from fakes.upstreams import CHAT_ANSWER, stream_events

    import reconciler.cli.host
    from reconciler.config.schema import DesiredState
    from reconciler.gateway.app import create_app

    answer = json.dumps(CHAT_ANSWER).encode()
    events = {usage: stream_events(32, usage) for usage in (False, True)}

    class Canned(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            if not body.get("stream"):
                return httpx.Response(
                    200, headers={"content-type": "application/json"}, content=answer
                )
            chosen = events[(body.get("stream_options") or {}).get("include_usage") is True]

            class Events(httpx.AsyncByteStream):
                async def __aiter__(self):
                    for event in chosen:
                        yield event

            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, stream=Events()
            )

    state = DesiredState.model_validate({
        "models": {"bench": {"source": "pypi:bench"}},
        "backends": {"up": {"kind": "llamacpp", "model": "bench", "port": 1, "url": "http://127.0.0.1:9"}},
        "gateway": {"host": "127.0.0.1", "port": 1, "max_concurrency_per_backend": 256},
    })  # fmt: skip
    canned = Canned()
    gateway = create_app(state, transports={"http": canned, "https": canned})
    for upstream in gateway.upstreams():
        upstream.healthy = True
    if "gc.freeze()" in Path(reconciler.cli.host.__file__).read_text():
        gc.freeze()
    payload = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say hello."}],
                          "max_tokens": 32, "stream": mode == "stream"}).encode()  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 1),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(payload)).encode())]}  # fmt: skip

    async def one() -> None:
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await asyncio.Event().wait()  # the client never leaves
            return {}

        statuses = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await gateway(dict(scope), receive, send)
        assert statuses == [200], statuses

    async def run() -> float:
        for _ in range(200):  # warm: first-use imports and caches
            await one()
        started = time.process_time()
        for _ in range(requests):
            await one()
        return (time.process_time() - started) / requests

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR", help="another checkout to compare with"
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.child[0], int(args.child[1])))
        return 0
    trees = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    for mode in ("json", "stream"):
        best: dict[str, float] = {}
        for _ in range(args.runs):
            for name, tree in trees.items():
                env = {
                    **os.environ,
                    "PYTHONPATH": f"{tree}{os.pathsep}{REPO / 'tests'}",
                }  # the fake upstream is ours
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(args.requests)],
                    cwd=tree, env=env, capture_output=True, text=True, check=True,
                    preexec_fn=lambda: os.sched_setaffinity(0, {CORE}),
                )  # fmt: skip
                best[name] = min(best.get(name, 1.0), float(out.stdout.split()[-1]))
        line = "  ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in best.items())
        ratio = f"  ratio {best['this'] / best['baseline']:.2f}" if "baseline" in best else ""
        print(f"{mode}: CPU per request (minimum of {args.runs} runs): {line}{ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
