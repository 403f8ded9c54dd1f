"""llama.cpp adapter against a real llama.cpp server (xllamacpp, SmolLM2 on CPU): requests
and answers pass through byte for byte, and its /metrics feed the least-load scoring."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import fleet_state, serve

from reconciler.gateway.adapters import adapter_for
from reconciler.gateway.app import create_app
from reconciler.gateway.load import LoadScraper
from reconciler.gateway.router import Upstream

pytestmark = pytest.mark.slow
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Name one colour."}],
        "max_tokens": 8, "temperature": 0, "seed": 1}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(llama_server):
    port = free_port()
    with serve(create_app(fleet_state({"cpu": llama_server}, model="smollm2")), port):
        yield f"http://127.0.0.1:{port}"


def test_answer_passes_through_unchanged(gateway, llama_server):
    through = httpx.post(f"{gateway}/v1/chat/completions", json=CHAT, timeout=60).json()
    direct = httpx.post(f"{llama_server}/v1/chat/completions", json=CHAT, timeout=60).json()
    assert through["choices"] == direct["choices"]  # same greedy answer, same shape
    assert set(through) == set(direct)


def test_stream_with_usage_passes_through(gateway):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=60) as response:
        raw = response.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and b'"usage"' in events[-2]
    metrics = httpx.get(f"{gateway}/metrics").text
    assert (
        'tensorforge_gateway_tokens_total{backend="cpu",model="smollm2",type="completion"}'
        in metrics
    )


def test_load_is_read_from_the_real_metrics_endpoint(llama_server):
    upstream = Upstream("cpu", "smollm2", llama_server, "llamacpp", healthy=True)

    async def scrape() -> None:
        client = httpx.AsyncClient()
        try:
            upstream.reported_load = 99
            await LoadScraper(client, 1.0, lambda: [upstream]).scrape(upstream)
        finally:
            await client.aclose()

    asyncio.run(scrape())
    assert upstream.reported_load == 0  # idle server: llamacpp:requests_processing 0
    text = httpx.get(f"{llama_server}/metrics").text
    assert "llamacpp:requests_processing" in text
    assert adapter_for("llamacpp").parse_load(text).requests == 0
