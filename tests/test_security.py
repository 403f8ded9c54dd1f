"""Security: with keys on, every route but the public ones answers 401 (routes enumerated from
the app, so a new one cannot slip through); keys never reach the logs; comparison time does
not depend on which key matched; services listen on 127.0.0.1 by default; model names and
hub file names cannot escape the models directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, wait_http
from fakes.upstreams import FastOpenAI, fleet_state, serve
from pydantic import ValidationError
from starlette.routing import Route, WebSocketRoute

from reconciler.config.schema import BackendSpec, DesiredState, GatewaySpec, ModelSpec
from reconciler.gateway.app import PUBLIC_PATHS, create_app
from reconciler.gateway.auth import ApiKeyError, ApiKeys
from reconciler.gateway.openai_api import OPENAI_ENDPOINTS
from reconciler.gateway.ui import UI_PATHS

KEY = "sk-tf-very-secret-4242"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(KEY + "\n")
    up, port = free_port(), free_port()
    app = create_app(fleet_state({"up": f"http://127.0.0.1:{up}"}, api_keys_file=str(keys)))
    with serve(FastOpenAI(), up), serve(app, port):
        yield f"http://127.0.0.1:{port}", app


def all_routes(app) -> tuple[list[tuple[str, str]], list[str]]:
    """(method, path) of every HTTP route, and every WebSocket path, read from the app."""
    http = [("POST", path) for path in sorted(OPENAI_ENDPOINTS)]
    sockets = []
    for route in app.app.routes:
        if isinstance(route, WebSocketRoute):
            sockets.append(route.path)
        else:
            assert isinstance(route, Route), f"unknown route type {route!r}: add it to this test"
            http += [(method, route.path) for method in sorted(route.methods or ())]
    return http, sockets


def test_every_route_but_the_public_ones_needs_a_key(keyed):
    base, app = keyed
    http, sockets = all_routes(app)
    assert len(http) >= 12 and sockets
    public = set()
    with httpx.Client(base_url=base) as client:
        for method, path in [*http, ("GET", "/no/such/route"), ("POST", "/v1/responses")]:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}):
                response = client.request(method, path, json=CHAT, headers=headers)
                if path in PUBLIC_PATHS:
                    assert response.status_code == 200
                    public.add(path)
                    continue
                if path in UI_PATHS:  # the status page's static files: it asks for a key itself
                    assert response.status_code == 200
                    assert not any(
                        u.base_url in response.text for u in app.table.upstreams.values()
                    )
                    continue
                assert response.status_code == 401, (method, path, headers, response.status_code)
                if method != "HEAD":
                    assert "Traceback" not in response.text and "error" in response.json()
            with_key = client.request(
                method, path, json=CHAT, headers={"Authorization": f"Bearer {KEY}"}
            )
            assert with_key.status_code != 401, (method, path)
    assert public == set(PUBLIC_PATHS) == {"/health"}  # the issue: every endpoint but /health

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    for path in sockets:
        with pytest.raises(InvalidStatus):  # refused in the handshake, before any message
            with connect(base.replace("http", "ws") + path, open_timeout=5):
                pass
        with connect(
            base.replace("http", "ws") + path, additional_headers={"Authorization": f"Bearer {KEY}"}
        ):
            pass


def test_keys_never_reach_the_logs_even_at_debug(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# ops\n{KEY}\n")
    up, port = free_port(), free_port()
    config = tmp_path / "fleet.yaml"
    state = fleet_state({"up": f"http://127.0.0.1:{up}"}, api_keys_file=str(keys)).model_dump(
        mode="json"
    )
    state["gateway"]["port"] = port
    config.write_text(yaml.safe_dump(state))
    log = tmp_path / "gateway.log"
    with serve(FastOpenAI(), up), log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler.cli", "--log-level", "DEBUG", "gateway", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/health", timeout=20)
            good = {"Authorization": f"Bearer {KEY}"}
            assert (
                httpx.post(base + "/v1/chat/completions", json=CHAT, headers=good).status_code
                == 200
            )
            for bad in (KEY + "x", KEY[:-1], f"{KEY} {KEY}"):
                response = httpx.post(
                    base + "/v1/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {bad}"},
                )
                assert response.status_code == 401 and KEY not in response.text
            assert (
                httpx.get(
                    base + "/v1/models", headers={"Authorization": f"Basic {KEY}"}
                ).status_code
                == 401
            )
            keys.write_text(f"{KEY}\nsk-second-key\n")  # a reload is logged too
            time.sleep(1.5)
        finally:
            proc.terminate()
            proc.wait(10)
    text = log.read_text()
    assert "loaded 1 API key(s)" in text and "loaded 2 API key(s)" in text  # the log was captured
    assert KEY not in text and "sk-second-key" not in text and KEY[:12] not in text


def test_which_key_matches_does_not_change_the_work_the_check_does(tmp_path, monkeypatch):
    """Behavioural: every key's digest goes through hmac.compare_digest whichever key
    matches (first, last or none), so the check's timing says nothing about which key
    was presented. Counted, not timed: a wall-clock ratio of microsecond calls flaked
    on a loaded CI machine."""
    import reconciler.gateway.auth as auth

    keys = [f"sk-{i:04d}-{'z' * 40}" for i in range(300)]
    path = tmp_path / "keys"
    path.write_text("\n".join(keys) + "\n")
    api = ApiKeys(str(path))
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))

    def comparisons(header: str) -> int:
        calls.clear()
        api.identify(header)
        return len(calls)

    assert api.identify(f"Bearer {keys[0]}") != api.identify(f"Bearer {keys[-1]}")
    assert api.identify("Bearer sk-not-a-key") is None
    assert [comparisons(f"Bearer {k}") for k in (keys[0], keys[-1], "sk-not-a-key")] == [300] * 3


def test_services_listen_on_localhost_by_default():
    from reconciler.backends.commands import launch_for
    from reconciler.config.loader import load_desired_state

    assert GatewaySpec().host == "127.0.0.1"
    default, _ = load_desired_state(None)
    assert default.gateway.host == "127.0.0.1"
    for name, backend in default.backends.items():
        assert backend.host == "127.0.0.1", name
    for kind in ("llamacpp", "vllm", "tgi", "ollama"):
        backend = BackendSpec(kind=kind, model="m", port=9000)
        launch = launch_for("b", backend, "m", "/models/m.gguf", [])
        words = " ".join(launch.argv) + " " + " ".join(launch.env.values())
        assert "127.0.0.1" in words and "0.0.0.0" not in words, (kind, words)


def test_model_names_cannot_name_a_path():
    for name in ("../x", "a/b", "..", ".hidden", "a\nb"):
        with pytest.raises(ValidationError):
            DesiredState.model_validate({"models": {name: {"source": "pypi:x"}}})


def test_model_files_cannot_escape_the_models_directory(tmp_path):
    from reconciler.models.pull import PullError, contained_path, local_path

    root = tmp_path / "models"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "m").symlink_to(tmp_path / "outside")
    for parts in (
        ("m", "../../x.gguf"),
        ("/etc/passwd",),
        ("m", "x.gguf"),
    ):  # the last via the symlink
        with pytest.raises(PullError, match="escapes the models directory"):
            contained_path(root, *parts)
    with pytest.raises(ValidationError, match="without '..'"):
        ModelSpec(source="pypi:x", file="../../etc/passwd")
    with pytest.raises(PullError):  # had the schema let it through
        local_path("n", ModelSpec.model_construct(source="pypi:x", file="../../etc/passwd"), root)


@pytest.mark.parametrize(
    "hostile", ["../evil.gguf", "../other/evil.gguf", "sub/../../evil.gguf", "/tmp/evil.gguf"]
)
def test_a_hostile_hub_listing_cannot_write_outside(tmp_path, monkeypatch, hostile):
    from fakes.hub import FakeHub, point_hub_client_at

    from reconciler.models.pull import PullError, pull_model, registry_for

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("TF_REGISTRY_URL", raising=False)
    models = tmp_path / "area" / "models"
    hub = FakeHub("evil/repo", {hostile: b"GGUF" + b"\0" * 64})
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        with pytest.raises(PullError, match="escapes the models directory"):
            pull_model("tiny", ModelSpec(source="hf:evil/repo", pattern="*.gguf"), models)
    assert not [r for r in hub.requests if "/resolve/" in r.path], (
        "downloaded before checking the name"
    )
    assert not list(Path(tmp_path).rglob("evil.gguf"))
    assert not (models / "registry.sqlite3").exists() or registry_for(models).get("tiny") is None


class KeyedUpstream:
    """An OpenAI-compatible server behind a key (vLLM --api-key, a hosted API): 401 without
    `Authorization: Bearer <key>`, on /health too; otherwise FastOpenAI's answers."""

    def __init__(self, key: str):
        self.key = f"Bearer {key}".encode()
        self.inner = FastOpenAI()
        self.refused = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.key:
            self.refused += 1
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"error": "unauthorized"}'})
            return
        await self.inner(scope, receive, send)


def test_a_backend_behind_a_key_gets_it_and_nobody_sees_it(tmp_path, caplog):
    key = "sk-backend-" + "q" * 24
    key_file = tmp_path / "backend-key"
    key_file.write_text(key + "\n")
    up, port = free_port(), free_port()
    # "bench": the name FastOpenAI lists on /v1/models, which a vLLM's health checks.
    state = DesiredState.model_validate({
        "models": {"bench": {"source": "pypi:x"}},
        "backends": {"remote": {"kind": "vllm", "model": "bench", "url": f"http://127.0.0.1:{up}",
                                "api_key_file": str(key_file)}},
        "gateway": {"port": port, "health_interval": 0.3},
    })  # fmt: skip
    upstream = KeyedUpstream(key)
    app = create_app(state)
    with caplog.at_level("DEBUG"), serve(upstream, up), serve(app, port):
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", timeout=5)
        deadline = time.monotonic() + 5  # the health probe carries the key too
        while (
            not httpx.get(base + "/health").json()["backends"]["remote"]["healthy"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        answer = httpx.post(
            base + "/v1/chat/completions",
            json={"model": "bench", "messages": [{"role": "user", "content": "hi"}]},
        )
        health = httpx.get(base + "/health").text
        metrics = httpx.get(base + "/metrics").text
    assert answer.status_code == 200 and upstream.refused == 0
    for text in (health, metrics, caplog.text, repr(app.table.upstreams["remote"])):
        assert key not in text and key[:12] not in text


def test_an_unreadable_backend_key_file_is_named(tmp_path):
    state = DesiredState.model_validate({
        "models": {"m": {"source": "pypi:x"}},
        "backends": {"remote": {"kind": "vllm", "model": "m", "url": "http://127.0.0.1:9",
                                "api_key_file": str(tmp_path / "missing")}},
    })  # fmt: skip
    with pytest.raises(
        ValueError, match=rf"^backends.remote.api_key_file: cannot read {tmp_path / 'missing'}: "
    ):
        create_app(state)


def test_credentials_in_a_backend_url_are_refused():
    with pytest.raises(ValidationError, match="no user or password in the URL"):
        BackendSpec.model_validate(
            {"kind": "vllm", "model": "m", "url": "http://user:pw@far:8000/v1"}
        )


def test_health_detail_is_for_key_holders_and_this_host(tmp_path):
    """/health stays open (load balancers), but which models are served and how loaded is
    for callers with a key, or on this host (the reconciler reads drain progress there)."""
    from starlette.testclient import TestClient

    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    up, port = free_port(), free_port()
    with serve(FastOpenAI(), up):
        app = create_app(fleet_state({"b1": f"http://127.0.0.1:{up}"}, api_keys_file=str(keys)))
        with TestClient(app) as remote:  # its client address is "testclient", not loopback
            anonymous = remote.get("/health").json()
            keyed = remote.get("/health", headers={"Authorization": f"Bearer {KEY}"}).json()
        with serve(app, port):
            local = httpx.get(f"http://127.0.0.1:{port}/health").json()
    assert set(anonymous) == {"status", "backends_healthy", "backends_total"}
    assert "b1" in keyed["backends"] and "b1" in local["backends"]


def test_json_nested_past_the_parser_is_a_400_not_a_500():
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    up, port = free_port(), free_port()
    with (
        serve(FastOpenAI(), up),
        serve(create_app(fleet_state({"b": f"http://127.0.0.1:{up}"})), port),
    ):
        for path in ("/v1/chat/completions", "/api/chat"):
            response = httpx.post(f"http://127.0.0.1:{port}{path}", content=deep,
                                  headers={"content-type": "application/json"})  # fmt: skip
            assert response.status_code == 400, (path, response.text)
            assert "Traceback" not in response.text and "error" in response.json()


def test_websocket_messages_are_held_to_max_body_bytes():
    """An HTTP body over gateway.max_body_bytes is a 413; a WebSocket message used to be
    forwarded whatever its size (uvicorn allows 16 MiB, eight queued per connection)."""
    from websockets.sync.client import connect

    up, port = free_port(), free_port()
    app = create_app(fleet_state({"b": f"http://127.0.0.1:{up}"}, max_body_bytes=2000))
    with serve(FastOpenAI(), up), serve(app, port), connect(f"ws://127.0.0.1:{port}/v1/ws") as ws:
        big = {
            "id": "big",
            "body": {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]},
        }
        ws.send(json.dumps(big))
        refused = json.loads(ws.recv(timeout=5))
        assert refused["type"] == "error" and refused["status"] == 413
        ws.send(
            json.dumps(
                {
                    "id": "ok",
                    "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                }
            )
        )
        # The session goes on: the next request is answered in full. (Read to the end: a
        # client that closes mid-stream waits out its 10 s close timeout here.)
        answer = [json.loads(ws.recv(timeout=5))]
        while answer[-1]["type"] == "chunk":
            answer.append(json.loads(ws.recv(timeout=5)))
        assert answer[0]["type"] == "chunk" and answer[-1] == {"id": "ok", "type": "done"}


def test_this_host_is_trusted_however_it_reaches_the_gateway():
    """A `::` listener sees an IPv4 loopback caller as ::ffff:127.0.0.1, and a local process
    calling the gateway's LAN address arrives from that address: both are this host (the
    reconciler reads drain progress from /health), a remote peer is not."""
    from starlette.requests import Request

    from reconciler.gateway.app import _trusted_for_detail

    class Keys:
        def identify(self, header):
            return None

    class Gateway:
        keys = Keys()

    def trusted(client: str, server: str) -> bool:
        scope = {"type": "http", "client": (client, 40000), "server": (server, 8000), "headers": []}
        return _trusted_for_detail(Gateway(), Request(scope))

    assert trusted("::ffff:127.0.0.1", "::ffff:127.0.0.1") and trusted("::1", "::1")
    assert trusted("10.0.0.5", "10.0.0.5")  # this host, through its own LAN address
    assert not trusted("10.0.0.9", "10.0.0.5") and not trusted("::ffff:10.0.0.9", "::")


def test_a_health_summary_without_detail_never_counts_as_drained():
    from reconciler.drain import gateway_ready_to_stop

    summary = {"status": "ok", "backends_healthy": 2, "backends_total": 2}
    assert gateway_ready_to_stop(summary, "a", ["b"]) is False


def test_a_keys_file_that_is_not_utf8_is_named_and_a_bom_is_not_part_of_a_key(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes(b"sk-fine\nsk-caf\xe9\n")
    with pytest.raises(
        ApiKeyError, match=rf"^gateway.api_keys_file: {path} line 2: not UTF-8 text"
    ):
        ApiKeys(str(path))
    path.write_bytes(b"\xef\xbb\xbfsk-first\n")
    assert ApiKeys(str(path)).identify("Bearer sk-first") is not None


def test_websocket_budget_counts_bytes_not_characters():
    """Three-byte characters: a message of 1,000 of them is 3,000 bytes, over a 2,000-byte
    limit, although it is 1,000 characters long."""
    from websockets.sync.client import connect

    up, port = free_port(), free_port()
    app = create_app(fleet_state({"b": f"http://127.0.0.1:{up}"}, max_body_bytes=2000))
    with serve(FastOpenAI(), up), serve(app, port), connect(f"ws://127.0.0.1:{port}/v1/ws") as ws:
        ws.send(json.dumps({"id": "wide", "body": {"model": "m", "messages": [
            {"role": "user", "content": "€" * 1000}]}}, ensure_ascii=False))  # fmt: skip
        refused = json.loads(ws.recv(timeout=5))
        assert refused["type"] == "error" and refused["status"] == 413


def test_tensorforge_health_probes_a_keyed_backend_with_its_key(tmp_path):
    from reconciler.pipeline.health import backend_states

    key = "sk-backend-" + "h" * 20
    (tmp_path / "k").write_text(key)
    up = free_port()
    state = DesiredState.model_validate({
        "models": {"bench": {"source": "pypi:x"}},  # the name FastOpenAI lists on /v1/models
        "backends": {"remote": {"kind": "vllm", "model": "bench", "url": f"http://127.0.0.1:{up}",
                                "api_key_file": str(tmp_path / "k")}},
    })  # fmt: skip
    with serve(KeyedUpstream(key), up):
        [remote] = backend_states(state, {"reachable": False}, {})
    assert remote.state == "healthy", remote
