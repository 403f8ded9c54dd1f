"""TGI adapter against TGI's protocol as documented: every upstream answer here is recorded
from TGI's docs (docs/openapi.json examples, the streaming and Messages API pages), see
tests/fixtures/protocols/README.md, and replayed by a small local fake upstream."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import Recorded, RecordedUpstream, fleet_state, serve

from reconciler.gateway.adapters import Exchange, adapter_for
from reconciler.gateway.app import create_app

FIXTURES = Path(__file__).parent / "fixtures" / "protocols" / "tgi"


def recorded(name: str, ctype: str = "application/json") -> Recorded:
    data = (FIXTURES / name).read_bytes()
    if name.endswith(".sse"):  # one piece per event, as the server flushes them
        return Recorded(
            content_type="text/event-stream", pieces=[p + b"\n\n" for p in data.split(b"\n\n") if p]
        )
    return Recorded(content_type=ctype, body=data)


@pytest.fixture(scope="module")
def tgi():
    upstream = RecordedUpstream({
        ("GET", "/health"): Recorded(body=b""),
        ("GET", "/info"): recorded("info.json"),
        ("GET", "/metrics"): recorded("metrics.txt", "text/plain"),
        ("POST", "/generate"): recorded("generate.json"),
        ("POST", "/generate_stream"): recorded("generate_stream.sse"),
        ("POST", "/v1/chat/completions"): recorded("chat_completion.json"),
    })  # fmt: skip
    up_port, gw_port = free_port(), free_port()
    state = fleet_state(
        {"tgi": f"http://127.0.0.1:{up_port}"}, kind="tgi", max_concurrency_per_backend=500
    )
    with serve(upstream, up_port), serve(create_app(state), gw_port):
        yield upstream, f"http://127.0.0.1:{gw_port}"


def test_completion_becomes_generate_and_back(tgi):
    upstream, gateway = tgi
    body = {
        "model": "alias",
        "prompt": "What is Deep Learning?",
        "max_tokens": 20,
        "temperature": 0,
        "stop": "\n",
    }
    response = httpx.post(f"{gateway}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "text_completion" and answer["model"] == "alias"
    assert answer["choices"][0] == {
        "index": 0,
        "text": "test",
        "finish_reason": "length",
        "logprobs": None,
    }
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    sent = upstream.last("/generate")
    assert sent["inputs"] == "What is Deep Learning?"
    assert sent["parameters"]["max_new_tokens"] == 20 and sent["parameters"]["stop"] == ["\n"]
    assert "temperature" not in sent["parameters"]  # TGI rejects 0: greedy is its default


def test_generate_stream_becomes_openai_chunks(tgi):
    _, gateway = tgi
    body = {
        "model": "m",
        "prompt": "How do you make cheese?",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{gateway}/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "\nTo make."
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert {c["object"] for c in chunks} == {"text_completion"}


def test_chat_passes_through_to_messages_api(tgi):
    _, gateway = tgi
    body = {"model": "m", "messages": [{"role": "user", "content": "What is deep learning?"}]}
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body)
    assert response.content == (FIXTURES / "chat_completion.json").read_bytes()


def test_embeddings_are_refused_with_the_reason(tgi):
    _, gateway = tgi
    response = httpx.post(f"{gateway}/v1/embeddings", json={"model": "m", "input": "x"})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert (
        "backend tgi (tgi) does not serve embeddings" in message
        and "text-embeddings-inference" in message
    )


async def _pieces(*pieces: bytes):
    for piece in pieces:
        yield piece


def test_stream_error_event_and_split_events():
    adapter = adapter_for("tgi")
    exchange = Exchange("/v1/completions", {"stream": True}, "m")
    error = (FIXTURES / "generate_stream_error.sse").read_bytes()

    async def collect() -> bytes:
        return b"".join(
            [c async for c in adapter.convert_stream(exchange, _pieces(error[:20], error[20:]))]
        )

    out = asyncio.run(collect())
    event = json.loads(out.decode().removeprefix("data: "))
    assert event["error"]["message"] == "TGI: Request failed during generation"


def test_queue_metrics_are_load():
    load = adapter_for("tgi").parse_load((FIXTURES / "metrics.txt").read_text())
    assert load.requests == 5 and load.kv_usage is None


def test_info_caps_concurrency_at_the_backends_own_limit(tgi):
    _, gateway = tgi
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        backend = httpx.get(f"{gateway}/health").json()["backends"]["tgi"]
        if backend.get("limit") == 128:
            break
        time.sleep(0.1)
    assert backend["limit"] == 128  # /info's max_concurrent_requests, below our own 500


def test_a_last_event_without_its_blank_line_still_finishes_the_stream():
    """The final SSE event carries finish, usage and [DONE]: a missing trailing blank line lost them all."""
    adapter = adapter_for("tgi")
    exchange = Exchange(
        "/v1/completions", {"stream": True, "stream_options": {"include_usage": True}}, "m"
    )
    data = (FIXTURES / "generate_stream.sse").read_bytes()

    async def collect(raw: bytes) -> list:
        out = b"".join(
            [c async for c in adapter.convert_stream(exchange, _pieces(raw[:40], raw[40:]))]
        )
        events = [e.removeprefix(b"data: ") for e in out.split(b"\n\n") if e]
        assert events[-1] == b"[DONE]"
        return [
            {k: v for k, v in json.loads(e).items() if k not in ("id", "created")}
            for e in events[:-1]
        ]

    chunks = asyncio.run(collect(data.rstrip(b"\n")))
    assert chunks == asyncio.run(collect(data))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
