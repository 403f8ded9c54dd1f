"""vLLM adapter against vLLM's OpenAI-compatible server as documented: the upstream answers
are recorded from vLLM's docs (OpenAI-compatible server page, metrics), see
tests/fixtures/protocols/README.md, and replayed by a small local fake upstream."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from reconciler.gateway.adapters import adapter_for
from reconciler.gateway.app import create_app
from reconciler.gateway.testing import Recorded, RecordedUpstream, fleet_state, serve

FIXTURES = Path(__file__).parent / "fixtures" / "protocols" / "vllm"


@pytest.fixture(scope="module")
def vllm():
    stream = (FIXTURES / "chat_stream.sse").read_bytes()
    upstream = RecordedUpstream({
        ("GET", "/health"): Recorded(body=b""),
        ("GET", "/metrics"): Recorded(content_type="text/plain", body=(FIXTURES / "metrics.txt").read_bytes()),
        ("POST", "/v1/chat/completions"): Recorded(body=(FIXTURES / "chat_completion.json").read_bytes()),
    })  # fmt: skip
    upstream.stream = stream
    up_port, gw_port = free_port(), free_port()
    state = fleet_state({"gpu": f"http://127.0.0.1:{up_port}"}, kind="vllm", model="llama3", aliases=("smol",))
    with serve(upstream, up_port), serve(create_app(state), gw_port):
        yield upstream, f"http://127.0.0.1:{gw_port}"


def test_alias_is_rewritten_to_the_served_model_name(vllm):
    upstream, gateway = vllm
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hello!"}]}
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.content == (FIXTURES / "chat_completion.json").read_bytes()  # untouched
    assert upstream.last("/v1/chat/completions")["model"] == "llama3"  # --served-model-name


def test_stream_passes_through_byte_for_byte(vllm):
    upstream, gateway = vllm
    pieces = [p + b"\n\n" for p in upstream.stream.split(b"\n\n") if p]
    upstream.routes[("POST", "/v1/chat/completions")] = Recorded(content_type="text/event-stream", pieces=pieces)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    before = completion_tokens(gateway)
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        assert response.read() == upstream.stream
    assert completion_tokens(gateway) == before + 2  # counted from the stream's usage chunk


def completion_tokens(gateway: str) -> float:
    series = 'tensorforge_gateway_tokens_total{backend="gpu",model="llama3",type="completion"} '
    for line in httpx.get(f"{gateway}/metrics").text.splitlines():
        if line.startswith(series):
            return float(line[len(series):])
    return 0.0


def test_client_errors_are_passed_on_not_retried(vllm):
    upstream, gateway = vllm
    upstream.routes[("POST", "/v1/chat/completions")] = Recorded(
        status=404, body=(FIXTURES / "model_not_found.json").read_bytes()
    )
    response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "llama3", "messages": []})
    assert response.status_code == 404
    assert json.loads(response.content)["type"] == "NotFoundError"


def test_running_and_waiting_are_load_and_cache_usage_is_headroom():
    load = adapter_for("vllm").parse_load((FIXTURES / "metrics.txt").read_text())
    assert load.requests == 7.0 and load.kv_usage == pytest.approx(0.42)
