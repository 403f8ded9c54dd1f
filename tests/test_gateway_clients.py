"""The official `openai` and `ollama` Python clients, unmodified, and the WebSocket endpoint,
against the gateway in front of a real llama.cpp server (SmolLM2 on CPU); and a client that
hangs up mid-stream stops the backend's work at once."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import free_port

from reconciler.gateway.app import create_app
from reconciler.gateway.testing import fleet_state, serve

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Name one colour."}]


@pytest.fixture(scope="module")
def gateway(llama_server):
    port = free_port()
    app = create_app(fleet_state({"cpu": llama_server}, model="smollm2", aliases=("smol",)))
    with serve(app, port):
        yield f"http://127.0.0.1:{port}", app


def test_openai_client(gateway):
    from openai import OpenAI

    url, _ = gateway
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    answer = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens > 0
    text = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4)
    assert text.choices[0].text
    assert [m.id for m in client.models.list()] == ["smollm2"]


def test_ollama_client(gateway):
    import ollama

    url, _ = gateway
    client = ollama.Client(host=url)
    options = {"num_predict": 8, "temperature": 0}
    answer = client.chat(model="smollm2", messages=MESSAGES, options=options)
    assert answer.message.content.strip() and answer.done and answer.eval_count > 0
    parts = list(client.chat(model="smol", messages=MESSAGES, options=options, stream=True))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert "".join(p.message.content for p in parts).strip() == answer.message.content.strip()
    generated = client.generate(model="smollm2", prompt="Name one colour.", options=options)
    assert generated.response.strip()
    streamed = list(client.generate(model="smollm2", prompt="Name one colour.", options=options, stream=True))
    assert "".join(p.response for p in streamed).strip() == generated.response.strip()
    assert {m.model for m in client.list().models} == {"smollm2", "smol"}


def test_websocket_streams_the_same_deltas_several_requests_per_connection(gateway):
    from websockets.sync.client import connect

    url, _ = gateway
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        sse = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    sse_deltas = [c["choices"][0]["delta"].get("content") for c in sse if c["choices"]]
    with connect(url.replace("http", "ws") + "/v1/ws") as ws:
        for rid in ("first", "second", "third"):
            ws.send(json.dumps({"id": rid, "body": body}))
            deltas = []
            while True:
                message = json.loads(ws.recv(timeout=60))
                assert message["id"] == rid
                if message["type"] == "done":
                    break
                assert message["type"] == "chunk", message
                if message["data"]["choices"]:
                    deltas.append(message["data"]["choices"][0]["delta"].get("content"))
            assert deltas == sse_deltas
        ws.send(json.dumps({"id": "bad", "body": {**body, "model": "gpt-9"}}))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["status"] == 404


def test_client_disconnect_mid_stream_stops_the_backend(gateway, llama_server):
    """(A non-streaming request is cut the same way, but llama.cpp only notices a closed
    connection while streaming; test_gateway_operating checks that case on a fake.)"""
    url, app = gateway
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 1000, "stream": True}  # fmt: skip
    port = int(url.rsplit(":", 1)[1])
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(65536)
        assert busy(llama_server)
    hung_up = time.monotonic()
    while busy(llama_server) and time.monotonic() - hung_up < 5:
        time.sleep(0.05)
    took = time.monotonic() - hung_up
    assert not busy(llama_server) and took < 1.0, f"backend still generating {took:.2f}s after the hang-up"
    assert app.table.upstreams["cpu"].in_flight == 0


def busy(llama_server: str) -> bool:
    slots = httpx.get(f"{llama_server}/slots", timeout=5).json()
    return any(s.get("is_processing") for s in slots)
