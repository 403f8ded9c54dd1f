"""One error type (reconciler/gateway/errors.py GatewayError), rendered by each surface in its
own shape: a backend's error and the gateway's own refusal reach an OpenAI client as OpenAI's
error object (vLLM's integer code kept as an integer, its param kept), an Ollama client as
{"error": message}, a WebSocket client as an error message holding the same object. The
backend's answer is vLLM's recorded "context too long" error (tests/fixtures/protocols/vllm,
taken from its documentation and a real vLLM)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import Recorded, RecordedUpstream, fleet_state, serve

from reconciler.gateway.app import create_app
from reconciler.gateway.auth import ApiKeys

FIXTURES = Path(__file__).parent / "fixtures/protocols/vllm"
RECORDED = json.loads((FIXTURES / "context_too_long.json").read_text())
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gateway(tmp_path):
    """A gateway with API keys in front of one vLLM backend answering every chat with the
    recorded 400; yields (base URL, headers with a valid key)."""
    upstream = RecordedUpstream({
        ("GET", "/health"): Recorded(body=b""),
        ("GET", "/v1/models"): Recorded(body=(FIXTURES / "models.json").read_bytes()),
        ("POST", "/v1/chat/completions"): Recorded(400, body=json.dumps(RECORDED).encode()),
    })  # fmt: skip
    up, port = free_port(), free_port()
    keys = tmp_path / "keys"
    keys.write_text("sk-test alice\n")
    state = fleet_state({"v": f"http://127.0.0.1:{up}"}, kind="vllm", model="smollm2", aliases=("smol",),
                        api_keys_file=str(keys))  # fmt: skip
    with serve(upstream, up), serve(create_app(state), port):
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            if httpx.get(base + "/health").json()["backends_healthy"] == 1:
                break
            time.sleep(0.1)
        yield base, {"Authorization": "Bearer sk-test"}, keys


def test_a_backend_error_in_each_surfaces_shape(gateway):
    base, auth, _ = gateway
    expected = RECORDED["error"]
    openai = httpx.post(
        f"{base}/v1/chat/completions", json={"model": "smollm2", "messages": MESSAGES}, headers=auth
    )
    assert openai.status_code == 400
    assert openai.json() == {"error": expected}  # integer code, type and param as vLLM sent them
    ollama = httpx.post(
        f"{base}/api/chat",
        json={"model": "smollm2", "messages": MESSAGES, "stream": False},
        headers=auth,
    )
    assert (ollama.status_code, ollama.json()) == (400, {"error": expected["message"]})
    from websockets.sync.client import connect

    with connect(base.replace("http", "ws") + "/v1/ws", additional_headers=auth) as ws:
        ws.send(json.dumps({"id": "1", "body": {"model": "smollm2", "messages": MESSAGES}}))
        message = json.loads(ws.recv(timeout=10))
    assert message == {"id": "1", "type": "error", "status": 400, "error": expected}


def test_the_gateways_own_refusal_in_each_surfaces_shape(gateway):
    base, auth, _ = gateway
    openai = httpx.post(
        f"{base}/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES}, headers=auth
    )
    error = openai.json()["error"]
    assert (
        openai.status_code == 404
        and error["code"] == "model_not_found"
        and "known models: smol, smollm2" in error["message"]
    )
    ollama = httpx.post(
        f"{base}/api/chat", json={"model": "gpt-9", "messages": MESSAGES}, headers=auth
    )
    assert (ollama.status_code, ollama.json()) == (404, {"error": error["message"]})
    from websockets.sync.client import connect

    with connect(base.replace("http", "ws") + "/v1/ws", additional_headers=auth) as ws:
        ws.send(json.dumps({"id": "2", "body": {"model": "gpt-9", "messages": MESSAGES}}))
        message = json.loads(ws.recv(timeout=10))
    assert message == {"id": "2", "type": "error", "status": 404, "error": error}
    no_key = httpx.post(f"{base}/api/chat", json={"model": "smollm2", "messages": MESSAGES})
    assert no_key.status_code == 401 and no_key.json()["error"].startswith(
        "missing or invalid API key"
    )


def test_a_websocket_connection_checks_its_key_once(gateway, monkeypatch):
    """The key is checked when the connection opens, not again per message (it was three
    times for one connection and one message); a reloaded keys file is the exception, so a
    revoked key stops working on a connection already open."""
    base, auth, keys = gateway
    checked = []
    identify = ApiKeys.identify

    def counting(self, authorization):
        checked.append(authorization)
        return identify(self, authorization)

    monkeypatch.setattr(ApiKeys, "identify", counting)
    from websockets.sync.client import connect

    with connect(base.replace("http", "ws") + "/v1/ws", additional_headers=auth) as ws:
        for rid in ("a", "b", "c"):
            ws.send(json.dumps({"id": rid, "body": {"model": "smollm2", "messages": MESSAGES}}))
            assert json.loads(ws.recv(timeout=10))["status"] == 400  # reached the backend
        assert checked == ["Bearer sk-test"]
        keys.write_text("sk-other bob\n")  # revoked; the gateway rereads the file within a second
        for attempt in range(50):
            ws.send(json.dumps({"id": attempt, "body": {"model": "smollm2", "messages": MESSAGES}}))
            answer = json.loads(ws.recv(timeout=10))
            if answer["status"] == 401:
                break
            time.sleep(0.2)
        assert answer["error"]["code"] == "invalid_api_key"
        ws.send(json.dumps({"id": "again", "body": {"model": "smollm2", "messages": MESSAGES}}))
        assert json.loads(ws.recv(timeout=10))["status"] == 401  # and stays refused
