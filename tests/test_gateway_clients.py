"""The official `openai` and `ollama` Python clients, unmodified, and the WebSocket endpoint,
against the gateway in front of a real llama.cpp server (SmolLM2 on CPU); and a client that
hangs up mid-stream stops the backend's work at once."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import free_port, start_llama_server, stop_process, wait_http
from fakes.upstreams import fleet_state, serve

from reconciler.gateway.app import create_app

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
    answer = client.chat.completions.create(
        model="smol", messages=MESSAGES, max_tokens=8, temperature=0
    )
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
    streamed = list(
        client.generate(model="smollm2", prompt="Name one colour.", options=options, stream=True)
    )
    assert "".join(p.response for p in streamed).strip() == generated.response.strip()
    assert [m.model for m in client.list().models] == [
        "smollm2"
    ]  # one entry per model; aliases inside it


def test_websocket_streams_the_same_deltas_several_requests_per_connection(gateway):
    from websockets.sync.client import connect

    url, _ = gateway
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
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


STORY = [{"role": "user", "content": "Write a long story."}]


@pytest.mark.parametrize(("path", "body", "event"), [
    ("/v1/chat/completions", {"model": "smollm2", "messages": STORY, "max_tokens": 1000, "stream": True}, b"data: "),
    ("/api/chat", {"model": "smollm2", "messages": STORY, "options": {"num_predict": 1000}}, b'"done":false'),
], ids=["openai-sse", "ollama-ndjson"])  # fmt: skip
def test_client_disconnect_mid_stream_stops_the_backend(gateway, llama_server, path, body, event):
    """On both streaming surfaces. (A non-streaming request is cut the same way, but
    llama.cpp only notices a closed connection while streaming; test_gateway_operating checks
    that case on a fake.)"""
    url, app = gateway
    port = int(url.rsplit(":", 1)[1])
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))  # fmt: skip
        received = b""
        while received.count(event) < 3:
            received += sock.recv(65536)
        assert busy(llama_server)
    assert_backend_stops(llama_server, app)


def assert_backend_stops(llama_server: str, app) -> None:
    """The client is gone: the backend stops generating within a second."""
    hung_up = time.monotonic()
    while busy(llama_server) and time.monotonic() - hung_up < 5:
        time.sleep(0.05)
    took = time.monotonic() - hung_up
    assert not busy(llama_server) and took < 1.0, (
        f"backend still generating {took:.2f}s after the hang-up"
    )
    assert app.table.upstreams["cpu"].in_flight == 0


def busy(llama_server: str) -> bool:
    slots = httpx.get(f"{llama_server}/slots", timeout=5).json()
    return any(s.get("is_processing") for s in slots)


@pytest.fixture(scope="module")
def embedding_gateway(smollm2_path, tmp_path_factory):
    """A second real llama.cpp server, started as llama-server would be for embeddings
    (`--embeddings --pooling mean`: SmolLM2 is a decoder, its own pooling is none)."""
    port, gateway_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("embed") / "server.log"
    proc = start_llama_server(smollm2_path, port, log, "--embeddings", "--pooling", "mean")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        app = create_app(
            fleet_state({"cpu": f"http://127.0.0.1:{port}"}, model="smollm2", aliases=("smol",))
        )
        with serve(app, gateway_port):
            yield f"http://127.0.0.1:{gateway_port}"
    finally:
        stop_process(proc, grace=20)


def test_embeddings_through_openai_and_ollama_clients_agree(embedding_gateway):
    import math

    import ollama
    from openai import OpenAI

    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    openai_client = OpenAI(base_url=f"{embedding_gateway}/v1", api_key="unused")
    reference = [
        d.embedding for d in openai_client.embeddings.create(model="smollm2", input=texts).data
    ]
    assert len(reference) == 2 and len(reference[0]) == 576  # SmolLM2-135M's hidden size

    client = ollama.Client(host=embedding_gateway)
    embedded = client.embed(model="smol", input=texts)
    assert embedded.model == "smol" and embedded.prompt_eval_count > 0
    assert len(embedded.embeddings) == 2
    for ours, theirs in zip(embedded.embeddings, reference, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-6)  # same backend, same vectors, same order
    # One text alone: compared with the same request through the OpenAI client, since
    # llama.cpp's vector for a text can depend on what shares its batch.
    alone = [
        openai_client.embeddings.create(model="smollm2", input=t).data[0].embedding for t in texts
    ]
    single = client.embed(model="smollm2", input=texts[0]).embeddings
    assert len(single) == 1 and single[0] == pytest.approx(alone[0], abs=1e-6)
    legacy = client.embeddings(model="smollm2", prompt=texts[1]).embedding  # /api/embeddings
    assert list(legacy) == pytest.approx(alone[1], abs=1e-6)

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    assert cosine(reference[0], reference[0]) == pytest.approx(1.0)
    assert cosine(reference[0], reference[1]) < 0.999  # two different texts, two different vectors

    with pytest.raises(ollama.ResponseError) as missing:
        client.embed(model="gpt-9", input="x")
    assert missing.value.status_code == 404 and "smollm2" in missing.value.error
    bad = httpx.post(f"{embedding_gateway}/api/embed", json={"model": "smollm2", "input": []})
    assert bad.status_code == 400 and "'input' must be" in bad.json()["error"]


def test_closing_a_websocket_mid_stream_stops_the_backend(gateway, llama_server):
    from websockets.sync.client import connect

    url, app = gateway
    with connect(url.replace("http", "ws") + "/v1/ws") as ws:
        ws.send(
            json.dumps(
                {"id": "long", "body": {"model": "smollm2", "messages": STORY, "max_tokens": 1000}}
            )
        )
        for _ in range(3):
            assert json.loads(ws.recv(timeout=30))["type"] == "chunk"
        assert busy(llama_server)
    assert_backend_stops(llama_server, app)
