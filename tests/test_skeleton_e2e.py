"""The whole request path on real parts: the gateway in front of a real llama.cpp server
(xllamacpp) serving SmolLM2 on CPU, spoken to with httpx and the official openai client."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import free_port, smollm2_config

pytestmark = pytest.mark.slow


@pytest.fixture
def gateway(llama_server, run_gateway) -> str:
    return run_gateway(smollm2_config(llama_server, free_port()))


def chat(model="smollm2", **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Name one colour."}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def test_chat_non_streaming(gateway):
    response = httpx.post(f"{gateway}/v1/chat/completions", json=chat(), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] > 0
    assert response.headers["x-tensorforge-backend"] == "cpu"


def test_alias_routes_to_model(gateway):
    response = httpx.post(f"{gateway}/v1/chat/completions", json=chat("smol"), timeout=60)
    assert response.status_code == 200, response.text


def test_chat_streaming_is_server_sent_events(gateway):
    events = []
    with httpx.stream(
        "POST", f"{gateway}/v1/chat/completions", json=chat(stream=True), timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2  # streamed piece by piece, not one buffered answer
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text.strip()


def test_completions_endpoint(gateway):
    body = {"model": "smollm2", "prompt": "The sky is", "max_tokens": 5}
    response = httpx.post(f"{gateway}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


def test_models_and_health(gateway):
    models = httpx.get(f"{gateway}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smollm2"]
    assert models["data"][0]["aliases"] == ["smol"]
    health = httpx.get(f"{gateway}/health").json()
    assert health["backends"]["cpu"]["healthy"] is True


def test_openai_errors(gateway):
    unknown = httpx.post(f"{gateway}/v1/chat/completions", json=chat("gpt-9"))
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "model_not_found" and "smollm2" in error["message"]
    assert set(error) >= {"message", "type", "code"}
    bad = httpx.post(f"{gateway}/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    # No model at all is chosen automatically now (test_clients_real.py); a model that is not
    # a name is still the client's 400.
    not_a_name = httpx.post(f"{gateway}/v1/chat/completions", json={"model": 5, "messages": []})
    assert not_a_name.status_code == 400 and not_a_name.json()["error"]["code"] == "missing_model"


def test_no_healthy_backend_is_503_with_reason(run_gateway):
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = run_gateway(smollm2_config(dead, free_port()))
    response = httpx.post(f"{gateway}/v1/chat/completions", json=chat())
    assert response.status_code == 503
    assert "cpu: connection refused" in response.json()["error"]["message"]


def test_official_openai_client_unmodified(gateway):
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway}/v1", api_key="unused")
    answer = client.chat.completions.create(**chat())
    assert answer.choices[0].message.content
    stream = client.chat.completions.create(**chat(stream=True))
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip()
    assert [m.id for m in client.models.list()] == ["smollm2"]
    assert client.models.retrieve("smol").id == "smol"  # an alias is a model id too
    import openai

    with pytest.raises(openai.NotFoundError, match="smollm2"):  # the error names what exists
        client.models.retrieve("gpt-9")
