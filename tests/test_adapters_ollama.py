"""Ollama adapter against Ollama's native API as documented: every upstream answer here is
recorded from Ollama's docs/api.md examples (see tests/fixtures/protocols/README.md) and
replayed by a small local fake upstream; the NDJSON streams become OpenAI SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import Recorded, RecordedUpstream, fleet_state, serve

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.adapters.ollama import OllamaAdapter
from reconciler.gateway.app import create_app

FIXTURES = Path(__file__).parent / "fixtures" / "protocols" / "ollama"


def lines(name: str) -> Recorded:
    data = (FIXTURES / name).read_bytes()
    return Recorded(
        content_type="application/x-ndjson", pieces=[p + b"\n" for p in data.split(b"\n") if p]
    )


def whole(name: str) -> Recorded:
    return Recorded(body=(FIXTURES / name).read_bytes())


@pytest.fixture(scope="module")
def ollama():
    upstream = RecordedUpstream({
        ("HEAD", "/"): Recorded(content_type="text/plain", body=b"Ollama is running"),
        ("GET", "/api/tags"): whole("tags.json"),
        ("GET", "/api/ps"): whole("ps.json"),
        ("POST", "/api/chat"): lines("chat_stream.ndjson"),
        ("POST", "/api/generate"): lines("generate_stream.ndjson"),
        ("POST", "/api/embed"): whole("embed.json"),
    })  # fmt: skip
    up_port, gw_port = free_port(), free_port()
    state = fleet_state(
        {"box": f"http://127.0.0.1:{up_port}"}, kind="ollama", source="ollama:llama3.2"
    )
    with serve(upstream, up_port), serve(create_app(state), gw_port):
        yield upstream, f"http://127.0.0.1:{gw_port}"


def sse(response: httpx.Response) -> list:
    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_liveness_is_head_root(ollama):
    _, gateway = ollama
    assert httpx.get(f"{gateway}/health").json()["backends"]["box"]["healthy"] is True


def test_chat_stream_becomes_openai_chunks(ollama):
    upstream, gateway = ollama
    body = {"model": "alias", "messages": [{"role": "user", "content": "why is the sky blue?"}],
            "stream": True, "max_tokens": 50, "temperature": 0.2, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body) as response:
        chunks = sse(response)
    sent = upstream.last("/api/chat")
    assert sent["model"] == "llama3.2" and sent["stream"] is True  # the Ollama tag
    assert sent["options"] == {"num_predict": 50, "temperature": 0.2}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "The sky"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 26,
        "completion_tokens": 282,
        "total_tokens": 308,
    }
    assert {c["model"] for c in chunks} == {"alias"}


def test_chat_non_streaming(ollama):
    upstream, gateway = ollama
    upstream.routes[("POST", "/api/chat")] = whole("chat.json")
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}
        answer = httpx.post(f"{gateway}/v1/chat/completions", json=body).json()
    finally:
        upstream.routes[("POST", "/api/chat")] = lines("chat_stream.ndjson")
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello! How are you today?",
    }
    assert answer["usage"]["completion_tokens"] == 298


def test_completion_stream_uses_raw_generate(ollama):
    upstream, gateway = ollama
    with httpx.stream(
        "POST", f"{gateway}/v1/completions", json={"model": "m", "prompt": "The", "stream": True}
    ) as r:
        chunks = sse(r)
    assert upstream.last("/api/generate")["raw"] is True
    assert "".join(c["choices"][0]["text"] for c in chunks) == "The"


def test_embeddings(ollama):
    upstream, gateway = ollama
    answer = httpx.post(f"{gateway}/v1/embeddings", json={"model": "m", "input": "hello"}).json()
    assert upstream.last("/api/embed") == {"model": "llama3.2", "input": "hello"}
    assert answer["data"][0]["embedding"][:2] == [0.010071029, -0.0017594862]
    assert answer["usage"] == {"prompt_tokens": 8, "total_tokens": 8}


def test_ps_says_which_models_are_in_memory():
    """Ollama's documented /api/ps answer lists `mistral:latest`; a bare name means `:latest`."""
    document = json.loads((FIXTURES / "ps.json").read_text())
    adapter = OllamaAdapter()
    assert adapter.holds_model(document, "mistral") is True
    assert adapter.holds_model(document, "mistral:latest") is True
    assert adapter.holds_model(document, "mistral:7b") is False
    assert adapter.holds_model(document, "llama3.2") is False
    assert adapter.holds_model({"models": []}, "mistral") is False
    assert adapter.holds_model({"error": "x"}, "mistral") is None  # not an /api/ps answer


def test_routing_prefers_the_replica_that_holds_the_model():
    """Two Ollama replicas of `mistral`: one lists it in /api/ps, the other would load it
    first. Least-load sends requests to the warm one until it is busier than a cold load."""

    def replica(ps: bytes) -> RecordedUpstream:
        return RecordedUpstream({
            ("HEAD", "/"): Recorded(content_type="text/plain", body=b"Ollama is running"),
            ("GET", "/api/ps"): Recorded(body=ps),
            ("POST", "/api/chat"): whole("chat.json"),
        })  # fmt: skip

    warm, cold = replica((FIXTURES / "ps.json").read_bytes()), replica(b'{"models": []}')
    ports = {"warm": free_port(), "cold": free_port()}
    state = fleet_state({n: f"http://127.0.0.1:{p}" for n, p in ports.items()}, kind="ollama",
                        source="ollama:mistral")  # fmt: skip
    gw_port = free_port()
    app = create_app(state)
    with serve(warm, ports["warm"]), serve(cold, ports["cold"]), serve(app, gw_port):
        gateway = f"http://127.0.0.1:{gw_port}"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            backends = httpx.get(f"{gateway}/health").json()["backends"]
            if backends["warm"]["warm"] is not None and backends["cold"]["warm"] is not None:
                break
            time.sleep(0.1)
        assert {n: b["warm"] for n, b in backends.items()} == {"warm": True, "cold": False}
        body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}
        answered = {httpx.post(f"{gateway}/v1/chat/completions", json=body).headers["x-tensorforge-backend"]
                    for _ in range(6)}  # fmt: skip
        assert answered == {"warm"}
        app.table.upstreams["warm"].reported_load = 20  # far busier than a cold load costs
        assert (
            httpx.post(f"{gateway}/v1/chat/completions", json=body).headers["x-tensorforge-backend"]
            == "cold"
        )


def _convert(adapter: OllamaAdapter, exchange: Exchange, data: bytes) -> list:
    async def pieces():
        for i in range(0, len(data), 50):  # cut anywhere, as a backend's chunks are
            yield data[i : i + 50]

    async def collect() -> bytes:
        return b"".join([c async for c in adapter.convert_stream(exchange, pieces())])

    events = [e.removeprefix(b"data: ") for e in asyncio.run(collect()).split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    return [
        {k: v for k, v in json.loads(e).items() if k not in ("id", "created")} for e in events[:-1]
    ]


def test_a_last_line_without_its_newline_still_finishes_the_stream():
    """The final NDJSON line carries finish, usage and [DONE]: a missing trailing newline lost them all."""
    adapter = OllamaAdapter()
    exchange = Exchange(
        "/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}, "m"
    )
    data = (FIXTURES / "chat_stream.ndjson").read_bytes()
    assert data.endswith(b"\n")
    chunks = _convert(adapter, exchange, data.rstrip(b"\n"))
    assert chunks == _convert(adapter, exchange, data)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 26,
        "completion_tokens": 282,
        "total_tokens": 308,
    }


def test_openai_tools_reach_ollama_and_its_call_comes_back(ollama):
    """OpenAI clients' tools and tool-call history to an Ollama backend, and its recorded
    "Chat request (with tools)" answer back as OpenAI tool calls, whole and streamed."""
    upstream, gateway = ollama
    tools = [
        {
            "type": "function",
            "function": {"name": "get_current_weather", "parameters": {"type": "object"}},
        }
    ]
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}]  # fmt: skip
    body = {
        "model": "m",
        "messages": history,
        "tools": tools,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    upstream.routes[("POST", "/api/chat")] = whole("chat_tools.json")
    try:
        answer = httpx.post(f"{gateway}/v1/chat/completions", json=body).json()
        sent = upstream.last("/api/chat")
        upstream.routes[("POST", "/api/chat")] = lines("chat_tools_stream.ndjson")
        with httpx.stream(
            "POST", f"{gateway}/v1/chat/completions", json={**body, "stream": True}
        ) as r:
            chunks = sse(r)
    finally:
        upstream.routes[("POST", "/api/chat")] = lines("chat_stream.ndjson")
    assert sent["tools"] == tools and sent["think"] is False
    assert sent["messages"][1]["tool_calls"] == [
        {"function": {"name": "get_current_weather", "arguments": {"location": "Paris"}}}
    ]
    assert sent["messages"][2] == {
        "role": "tool",
        "content": "22 C",
        "tool_name": "get_current_weather",
    }
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_current_weather" and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {
        "format": "celsius",
        "location": "Paris, FR",
    }
    streamed = [
        c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls", []) if ch["choices"]
    ]
    assert len(streamed) == 1 and streamed[0]["index"] == 0
    assert json.loads(streamed[0]["function"]["arguments"]) == {
        "format": "celsius",
        "location": "Paris, FR",
    }
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "tool_calls"
