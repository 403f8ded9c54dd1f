"""Operating the gateway: API keys, per-key limits, the metrics contract, body and time
limits, and errors in OpenAI's shape."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
import time

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import (
    FastOpenAI,
    Recorded,
    RecordedUpstream,
    fleet_state,
    lifespan,
    serve,
)

from reconciler.gateway.app import create_app
from reconciler.gateway.auth import ApiKeyError, ApiKeys

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
KEYS = ("sk-alpha-123", "sk-beta-456")
METRIC_NAMES = {
    "tensorforge_gateway_requests_total": ("counter", {"model", "backend", "status"}),
    "tensorforge_gateway_request_duration_seconds": ("histogram", {"model", "backend"}),
    "tensorforge_gateway_time_to_first_token_seconds": ("histogram", {"model", "backend"}),
    "tensorforge_gateway_tokens_total": ("counter", {"model", "backend", "type"}),
    "tensorforge_gateway_in_flight_requests": ("gauge", {"backend"}),
    "tensorforge_gateway_retries_total": ("counter", {"model", "backend"}),
    "tensorforge_gateway_circuit_open": ("gauge", {"backend"}),
    "tensorforge_gateway_backend_healthy": ("gauge", {"backend", "model"}),
    "tensorforge_gateway_rejected_total": ("counter", {"reason"}),
    "tensorforge_gateway_client_requests_total": ("counter", {"client", "model", "status"}),
    "tensorforge_gateway_client_tokens_total": ("counter", {"client", "model", "type"}),
}
# KEYS[0] is written as itself, unnamed: known by its digest's first 16 hex digits.
# KEYS[1] is written only as its digest, named "team-b".
CLIENTS = (hashlib.sha256(KEYS[0].encode()).hexdigest()[:16], "team-b")


@pytest.fixture(scope="module")
def upstream():
    port = free_port()
    fake = FastOpenAI(chunk_delay=0.05)
    with serve(fake, port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def keyed(upstream, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    digest = hashlib.sha256(KEYS[1].encode()).hexdigest()
    keys.write_text(f"# gateway keys\n{KEYS[0]}\n\n  sha256:{digest} team-b   # rotated 2026-11\n")
    port = free_port()
    state = fleet_state(
        {"up": upstream}, api_keys_file=str(keys), max_concurrency_per_key=1, max_body_bytes=4096
    )
    with serve(create_app(state), port):
        yield f"http://127.0.0.1:{port}"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_except_for_health(keyed):
    assert httpx.get(f"{keyed}/health").status_code == 200
    missing = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT)
    wrong = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=bearer("sk-nope"))
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed}/v1/models").status_code == 401
    assert httpx.get(f"{keyed}/api/tags").status_code == 401
    assert httpx.post(f"{keyed}/api/chat", json={"model": "m", "messages": []}).status_code == 401
    for key in KEYS:
        assert (
            httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=bearer(key)).status_code
            == 200
        )
    assert httpx.get(f"{keyed}/v1/models", headers=bearer(KEYS[0])).status_code == 200


def test_keys_live_only_as_hashes_and_are_never_logged(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text("sk-secret-value\n")
    with caplog.at_level(logging.DEBUG):
        keys = ApiKeys(str(path))
        assert keys.identify("Bearer sk-secret-value") is not None
        assert keys.identify("Bearer sk-secret-valuf") is None
        assert keys.identify("Basic sk-secret-value") is None
    assert [d for d, _ in keys._digests] == [hashlib.sha256(b"sk-secret-value").digest()]
    assert "sk-secret-value" not in caplog.text and "sk-secret-value" not in repr(vars(keys))


def test_keys_file_holds_digests_names_and_comments(tmp_path):
    """`KEY [NAME]` per line; KEY may be `sha256:<hex>` so the file holds no secret; keys
    with one name are one client (a rotated key and its successor share its limit)."""
    path = tmp_path / "keys"
    digest = hashlib.sha256(b"sk-new").hexdigest()
    path.write_text(
        f"# comment line\nsk-old alice  # until the rotation is done\nsha256:{digest.upper()} alice\n"
        "sk-with#hash\n"
    )  # fmt: skip
    keys = ApiKeys(str(path))
    assert keys.identify("Bearer sk-old") == keys.identify("Bearer sk-new") == "alice"
    assert keys.identify("Bearer sk-with#hash") == hashlib.sha256(b"sk-with#hash").hexdigest()[:16]
    assert keys.identify("Bearer sk-with") is None  # a '#' inside a key is not a comment
    assert keys.identify(f"Bearer sha256:{digest}") is None  # the digest is not the key


@pytest.mark.parametrize("line, problem", [
    ("sha256:abc123", "'sha256:' must be followed by 64 hex digits"),
    ("sk-key-one two three", "more than 'KEY [NAME]'"),
    ("sk-key-one ../etc", "a client name is 1-64 letters"),
])  # fmt: skip
def test_a_bad_keys_line_names_file_and_line_but_not_the_key(tmp_path, line, problem):
    path = tmp_path / "keys"
    path.write_text(f"sk-fine\n{line}\n")
    with pytest.raises(ApiKeyError) as error:
        ApiKeys(str(path))
    message = str(error.value)
    assert message.startswith(f"gateway.api_keys_file: {path} line 2: ") and problem in message
    assert line.split()[0] not in message


def test_an_edited_keys_file_takes_effect_without_a_restart(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-old\n")
    keys = ApiKeys(str(path))
    path.write_text("sk-new\n")
    keys.reload_if_changed()
    assert keys.identify("Bearer sk-new") and not keys.identify("Bearer sk-old")
    path.unlink()
    keys.reload_if_changed()  # a vanished file keeps the last keys rather than lock everyone out
    assert keys.identify("Bearer sk-new")
    path.write_text("sha256:nothex\n")
    keys.reload_if_changed()  # so does a bad edit: the error is logged, the last good keys stay
    assert keys.identify("Bearer sk-new")


def test_per_key_concurrency_limit_is_429_with_retry_after(keyed):
    url = f"{keyed}/v1/chat/completions"
    with httpx.stream(
        "POST", url, json={**CHAT, "stream": True}, headers=bearer(KEYS[0]), timeout=10
    ) as first:
        assert first.status_code == 200
        second = httpx.post(url, json=CHAT, headers=bearer(KEYS[0]))
        other_key = httpx.post(url, json=CHAT, headers=bearer(KEYS[1]))
        first.read()
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "key_concurrency_limit"
    assert other_key.status_code == 200
    assert httpx.post(url, json=CHAT, headers=bearer(KEYS[0])).status_code == 200


def test_body_limit_and_bad_requests_are_openai_errors(keyed):
    url = f"{keyed}/v1/chat/completions"
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    cases = [
        (httpx.post(url, json=big, headers=bearer(KEYS[0])), 413, "body_too_large"),
        (httpx.post(url, content=b"{nope", headers=bearer(KEYS[0])), 400, "invalid_json"),
        (httpx.post(url, json=[1], headers=bearer(KEYS[0])), 400, "invalid_request"),
        (httpx.post(url, json={"model": 3}, headers=bearer(KEYS[0])), 400, "missing_model"),
        (
            httpx.post(url, json={**CHAT, "model": "gpt-9"}, headers=bearer(KEYS[0])),
            404,
            "model_not_found",
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in response.text


def test_backend_errors_are_reshaped_as_json_and_other_statuses_pass_untouched():
    """A reshaped error keeps a text/plain content-type no client can parse; a 201 is no error at all."""
    upstream = RecordedUpstream({
        ("GET", "/health"): Recorded(body=b'{"status":"ok"}'),
        ("POST", "/v1/chat/completions"): Recorded(status=404, content_type="text/plain", body=b"Not Found"),
        ("POST", "/v1/completions"): Recorded(status=201, body=b'{"id":"x","choices":[{"text":"hi"}]}'),
    })  # fmt: skip
    up_port, port = free_port(), free_port()
    with (
        serve(upstream, up_port),
        serve(create_app(fleet_state({"up": f"http://127.0.0.1:{up_port}"})), port),
    ):
        base = f"http://127.0.0.1:{port}"
        error = httpx.post(f"{base}/v1/chat/completions", json=CHAT)
        assert error.status_code == 404 and error.headers["content-type"] == "application/json"
        assert error.json()["error"]["message"] == "Not Found"
        created = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "x"})
        assert (
            created.status_code == 201
            and created.content == b'{"id":"x","choices":[{"text":"hi"}]}'
        )


def test_metrics_have_exactly_the_contracted_names_and_labels(keyed):
    httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=bearer(KEYS[0]))
    httpx.post(f"{keyed}/v1/chat/completions", json=CHAT)  # a rejection
    text = httpx.get(f"{keyed}/metrics", headers=bearer(KEYS[1])).text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types == {n: k for n, (k, _) in METRIC_NAMES.items()}
    for name, (_kind, labels) in METRIC_NAMES.items():
        samples = re.findall(rf"^{name}(?:_bucket|_count|_sum)?\{{([^}}]*)\}}", text, re.M)
        assert samples or name == "tensorforge_gateway_retries_total", f"{name} has no samples"
        for sample in samples:
            assert set(re.findall(r'(\w+)="', sample)) - {"le"} == labels, (name, sample)
    assert 'tensorforge_gateway_tokens_total{backend="up",model="m",type="prompt"}' in text
    assert 'tensorforge_gateway_rejected_total{reason="invalid_api_key"}' in text
    # Who used what: by the key's client name, or its digest prefix when unnamed.
    assert (
        f'tensorforge_gateway_client_requests_total{{client="{CLIENTS[0]}",model="m",status="200"}}'
        in text
    )
    assert (
        f'tensorforge_gateway_client_tokens_total{{client="{CLIENTS[0]}",model="m",type="completion"}}'
        in text
    )
    httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=bearer(KEYS[1]))
    text = httpx.get(f"{keyed}/metrics", headers=bearer(KEYS[1])).text
    assert (
        'tensorforge_gateway_client_requests_total{client="team-b",model="m",status="200"}' in text
    )
    assert KEYS[0] not in text and KEYS[1] not in text
    assert 'tensorforge_gateway_backend_healthy{backend="up",model="m"} 1.0' in text


def test_first_byte_timeout_is_a_clean_504_and_no_circuit(upstream):
    """A timeout is this request's (issue 14: three timeouts used to open the circuit)."""
    port = free_port()
    slow_port = free_port()
    with serve(FastOpenAI(chunk_delay=2.0), slow_port):
        state = fleet_state({"slow": f"http://127.0.0.1:{slow_port}"}, first_byte_timeout=0.3)
        app = create_app(state)
        with serve(app, port):
            for _ in range(4):
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "stream": True}
                )
                assert response.status_code == 504
            assert not app.table.upstreams["slow"].circuit_open
    message = response.json()["error"]["message"]
    assert (
        "no answer within 0.3s (first_byte_timeout); the request was cancelled at the backend"
        in message
    )


def test_becomes_healthy_fast(upstream):
    """Healthy (backend probed) within 1.5 s of the app being built; idle memory is measured
    on a real process by the soak test and bench/gateway_bench.py."""
    port = free_port()
    started = time.monotonic()
    with serve(create_app(fleet_state({"up": upstream})), port):
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        took = time.monotonic() - started
    assert health["backends_healthy"] == 1 and took < 1.5


class HangingUpstream:
    """Takes a request and never answers; notes when the gateway hangs up on it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.disconnected = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        while (await receive()).get("more_body"):
            pass
        self.started.set()
        if (await receive())["type"] == "http.disconnect":
            self.disconnected.set()


def test_client_hanging_up_before_the_first_byte_closes_the_backend_request():
    hanging, up_port, port = HangingUpstream(), free_port(), free_port()
    app = create_app(fleet_state({"hang": f"http://127.0.0.1:{up_port}"}))
    with serve(hanging, up_port), serve(app, port):
        payload = json.dumps(CHAT).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
            assert hanging.started.wait(5)
        hung_up = time.monotonic()
        assert hanging.disconnected.wait(2), "the gateway kept the backend request open"
        assert time.monotonic() - hung_up < 0.5
        deadline = time.monotonic() + 2
        while app.table.upstreams["hang"].in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.table.upstreams["hang"].in_flight == 0


def test_websocket_needs_a_key_too(keyed):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_url = keyed.replace("http", "ws") + "/v1/ws"
    try:
        with connect(ws_url) as ws:
            ws.recv(timeout=5)
        refused = False
    except InvalidStatus:
        refused = True
    except Exception as exc:  # closed with 4401 right after the handshake
        refused = "4401" in str(exc)
    assert refused
    with connect(ws_url, additional_headers=bearer(KEYS[1])) as ws:
        ws.send(json.dumps({"id": 7, "body": {**CHAT, "max_tokens": 2}}))
        kinds = []
        while not kinds or kinds[-1] not in ("done", "error"):
            message = json.loads(ws.recv(timeout=10))
            assert message["id"] == 7
            kinds.append(message["type"])
    assert kinds[-1] == "done" and kinds.count("chunk") == 3


def test_ollama_show_gives_the_context_a_request_gets(upstream):
    """Editors (Continue, Open WebUI) size prompts from `/api/show`; the ollama client parses it."""
    import ollama

    from reconciler.config.schema import DesiredState

    state = DesiredState.model_validate({
        "models": {"m": {"source": "pypi:x", "aliases": ["alias"]}},
        "backends": {"a": {"kind": "llamacpp", "model": "m", "url": upstream, "context_size": 8192, "parallel": 4}},
    })  # fmt: skip
    port = free_port()
    with serve(create_app(state), port):
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        shown = client.show("alias")
        assert shown.modelinfo["tensorforge.context_length"] == 2048  # 8192 over 4 slots
        assert shown.details.parent_model == "m" and "completion" in shown.capabilities
        with pytest.raises(ollama.ResponseError) as missing:
            client.show("gpt-9")
        assert missing.value.status_code == 404 and "alias" in missing.value.error
