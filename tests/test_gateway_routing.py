"""Routing on fake upstreams (127.0.0.1, free ports): strategies, the passive circuit,
retries only before the first byte, an error event after it, no lost requests when a replica
dies under load, per-backend limits, and reloading the routing table."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO, free_port, wait_http
from fakes.upstreams import (
    FastOpenAI,
    Recorded,
    RecordedUpstream,
    fleet_state,
    serve,
    stream_events,
)

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import create_app
from reconciler.gateway.router import CIRCUIT_FAILURES
from reconciler.gpu.inventory import GpuInfo, StaticInventory

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def start_upstream(name: str, chunk_delay: float = 0.0) -> tuple[subprocess.Popen, str]:
    """A fast OpenAI upstream in its own process, so a test can SIGKILL it."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.fakes.upstreams", "--port", str(port), "--name", name,
            "--chunk-delay", str(chunk_delay)]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", timeout=20)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def pair():
    """Two in-process upstreams named a and b."""
    ports = free_port(), free_port()
    with serve(FastOpenAI(name="a"), ports[0]), serve(FastOpenAI(name="b"), ports[1]):
        yield {"a": f"http://127.0.0.1:{ports[0]}", "b": f"http://127.0.0.1:{ports[1]}"}


@pytest.fixture
def reporting_pair():
    """Two upstreams whose /metrics report what the test sets (load, KV-cache use)."""
    upstreams = {"a": FastOpenAI(name="a"), "b": FastOpenAI(name="b")}
    ports = free_port(), free_port()
    with serve(upstreams["a"], ports[0]), serve(upstreams["b"], ports[1]):
        yield upstreams, {"a": f"http://127.0.0.1:{ports[0]}", "b": f"http://127.0.0.1:{ports[1]}"}


def wait_scraped(app, name: str, load: float, kv: float | None) -> None:
    upstream = app.table.upstreams[name]
    deadline = time.monotonic() + 30
    while (upstream.reported_load, upstream.kv_usage) != (load, kv):
        assert time.monotonic() < deadline, f"{name}'s /metrics never scraped"
        time.sleep(0.05)


def gateway_for(backends: dict[str, str], **gateway):
    port = free_port()
    app = create_app(fleet_state(backends, **gateway))
    return app, port


def test_session_affinity_keeps_a_session_on_one_backend(pair):
    app, port = gateway_for(pair, routing={"strategy": "session-affinity"})
    with serve(app, port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        placed = {}
        for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
            seen = {httpx.post(url, json=CHAT, headers={"x-session-id": session}).headers["x-tensorforge-backend"]
                    for _ in range(4)}  # fmt: skip
            assert len(seen) == 1, f"session {session} moved between {seen}"
            placed[session] = seen.pop()
        assert set(placed.values()) == {"a", "b"}  # sessions still spread over both


def test_round_robin_alternates(pair):
    app, port = gateway_for(pair, routing={"strategy": "round-robin"})
    with serve(app, port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        backends = [httpx.post(url, json=CHAT).headers["x-tensorforge-backend"] for _ in range(6)]
    assert Counter(backends) == {"a": 3, "b": 3}


def test_least_load_avoids_the_backend_reporting_load(reporting_pair):
    # The load comes through each backend's own /metrics, as in production: setting the
    # routing state directly raced the scraper, which rewrites it every health interval.
    upstreams, urls = reporting_pair
    app, port = gateway_for(urls, health_interval=0.2)
    with serve(app, port):
        upstreams["a"].extra_load = 5
        wait_scraped(app, "a", 5.0, None)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert {httpx.post(url, json=CHAT).headers["x-tensorforge-backend"] for _ in range(4)} == {
            "b"
        }
        upstreams["a"].extra_load = 0
        upstreams["b"].kv_usage = 0.99  # b's KV cache (VRAM) is full
        wait_scraped(app, "a", 0.0, None)
        wait_scraped(app, "b", 0.0, 0.99)
        assert {httpx.post(url, json=CHAT).headers["x-tensorforge-backend"] for _ in range(4)} == {
            "a"
        }


def test_least_load_avoids_the_backend_whose_gpu_is_nearly_full(pair, tmp_path, monkeypatch):
    """VRAM headroom from NVML, here a GPU inventory injected through the same interface; the
    gateway reads where the reconciler placed each backend from its status file."""
    monkeypatch.setenv("TF_STATE_DIR", str(tmp_path))
    (tmp_path / "status.json").write_text(json.dumps(
        {"units": [{"unit": "backend-a", "gpus": [0]}, {"unit": "backend-b", "gpus": [1]}]}
    ))  # fmt: skip
    gib = 1024**3
    full = GpuInfo(
        0, "GPU-0", "NVIDIA B200", 192 * gib, 191 * gib, 1 * gib
    )  # an Ollama model too many
    half = GpuInfo(1, "GPU-1", "NVIDIA B200", 192 * gib, 96 * gib, 96 * gib)
    # Run here (declared by port, as the reconciler would start them), not elsewhere by URL.
    ports = {name: int(url.rsplit(":", 1)[1]) for name, url in pair.items()}
    state = DesiredState.model_validate({
        "models": {"m": {"source": "pypi:x"}},
        "backends": {n: {"kind": "llamacpp", "model": "m", "port": p} for n, p in ports.items()},
        "gateway": {"port": free_port(), "health_interval": 0.5},
    })  # fmt: skip
    port = state.gateway.port
    app = create_app(state, gpus=StaticInventory([full, half]))
    # The same backends declared by URL run on another host: this host's GPUs say nothing of them.
    elsewhere = create_app(fleet_state(pair), gpus=StaticInventory([full, half]))
    elsewhere.gpu_headroom.refresh()
    assert {u.gpu_free for u in elsewhere.upstreams()} == {None}

    def gpu_free() -> dict:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            backends = httpx.get(f"http://127.0.0.1:{port}/health").json()["backends"]
            if all(b["gpu_free"] is not None for b in backends.values()):
                return {name: b["gpu_free"] for name, b in backends.items()}
            time.sleep(0.1)
        raise AssertionError("no GPU headroom after 5 s")

    with serve(app, port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert gpu_free() == {"a": pytest.approx(1 / 192), "b": 0.5}
        assert {httpx.post(url, json=CHAT).headers["x-tensorforge-backend"] for _ in range(4)} == {
            "b"
        }
        # The model on GPU 0 unloads: both are routed to again.
        app.gpu_headroom.inventory = StaticInventory(
            [half, GpuInfo(0, "GPU-0", "NVIDIA B200", 192 * gib, 96 * gib, 96 * gib)]
        )
        deadline = time.monotonic() + 5
        while gpu_free()["a"] != 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        app.router.strategy = "round-robin"  # equal headroom: show both take requests
        assert {httpx.post(url, json=CHAT).headers["x-tensorforge-backend"] for _ in range(4)} == {
            "a",
            "b",
        }


def test_load_is_scraped_from_backend_metrics(pair):
    app, port = gateway_for(pair)
    with serve(app, port):
        upstream = app.table.upstreams["a"]
        upstream.reported_load = 42
        deadline = time.monotonic() + 3
        while upstream.reported_load == 42 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert upstream.reported_load == 0  # FastOpenAI reports llamacpp:requests_processing 0


def test_failure_before_first_byte_retries_elsewhere_and_opens_the_circuit(pair):
    dead = f"http://127.0.0.1:{free_port()}"
    app, port = gateway_for({"dead": dead, **pair}, routing={"strategy": "round-robin"})
    with serve(app, port):
        app.table.upstreams["dead"].healthy = True  # health says yes, the backend says no
        url = f"http://127.0.0.1:{port}"
        for _ in range(CIRCUIT_FAILURES * 3):
            response = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
            assert response.status_code == 200  # never seen by the client
            app.table.upstreams["dead"].healthy = True
        assert app.table.upstreams["dead"].circuit_open
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tensorforge_gateway_circuit_open{backend="dead"} 1.0' in metrics
        assert (
            f'tensorforge_gateway_retries_total{{backend="dead",model="m"}} {CIRCUIT_FAILURES:.1f}'
            in metrics
        )


def test_backend_killed_mid_stream_ends_with_an_error_event():
    proc, upstream = start_upstream("slow", chunk_delay=0.05)
    try:
        app, port = gateway_for({"slow": upstream})
        with serve(app, port):
            body = {**CHAT, "stream": True}
            events = []
            with httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            proc.send_signal(signal.SIGKILL)
    finally:
        stop(proc)
    assert len(events) >= 3 and events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["type"] == "upstream_error" and "mid-stream" in error["message"]


def test_killing_one_of_two_replicas_under_load_loses_no_request():
    procs = [start_upstream(n) for n in ("r1", "r2")]
    try:
        app, port = gateway_for(
            {"r1": procs[0][1], "r2": procs[1][1]}, routing={"strategy": "round-robin"}
        )
        with serve(app, port):
            url = f"http://127.0.0.1:{port}/v1/chat/completions"

            async def load() -> list[int]:
                statuses: list[int] = []
                async with httpx.AsyncClient(timeout=10) as client:

                    async def worker() -> None:
                        for _ in range(40):
                            statuses.append((await client.post(url, json=CHAT)).status_code)

                    async def killer() -> None:
                        await asyncio.sleep(0.3)
                        procs[0][0].kill()

                    await asyncio.gather(*(worker() for _ in range(8)), killer())
                return statuses

            statuses = asyncio.run(load())
    finally:
        for proc, _ in procs:
            stop(proc)
    assert len(statuses) == 320 and set(statuses) == {200}


def test_backend_concurrency_limit_refuses_with_retry_after():
    proc, upstream = start_upstream("slow", chunk_delay=0.2)
    try:
        app, port = gateway_for({"slow": upstream}, max_concurrency_per_backend=1)
        with serve(app, port):
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            with httpx.stream("POST", url, json={**CHAT, "stream": True}, timeout=10) as first:
                assert first.status_code == 200
                second = httpx.post(url, json=CHAT)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert second.json()["error"]["code"] == "backend_busy"
            assert httpx.post(url, json=CHAT).status_code == 200  # the slot was released
    finally:
        stop(proc)


def test_reload_on_file_change_keeps_open_streams(tmp_path: Path):
    proc, slow = start_upstream("slow", chunk_delay=0.03)
    port_b = free_port()
    try:
        with serve(FastOpenAI(name="b"), port_b):
            config = tmp_path / "fleet.yaml"
            state = fleet_state({"slow": slow})
            config.write_text(yaml.safe_dump(state.model_dump(mode="json", exclude_none=True)))
            port = free_port()
            app = create_app(state, config_path=str(config))
            app.watcher.interval = 0.1
            with serve(app, port):
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                with httpx.stream(
                    "POST", url, json={**CHAT, "stream": True}, timeout=10
                ) as open_stream:
                    new = fleet_state({"b": f"http://127.0.0.1:{port_b}"})
                    config.write_text(
                        yaml.safe_dump(new.model_dump(mode="json", exclude_none=True))
                    )
                    os.utime(config, (time.time() + 5, time.time() + 5))  # mtime granularity
                    deadline = time.monotonic() + 5
                    while "b" not in app.table.upstreams and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert list(app.table.upstreams) == ["b"]
                    events = [
                        line for line in open_stream.iter_lines() if line.startswith("data: ")
                    ]
                assert (
                    events[-1] == "data: [DONE]" and len(events) == 34
                )  # the open stream finished
                deadline = time.monotonic() + 3
                while not app.table.upstreams["b"].healthy and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert httpx.post(url, json=CHAT).headers["x-tensorforge-backend"] == "b"
    finally:
        stop(proc)


def test_backend_connections_are_kept_alive_and_reused():
    fake, up_port = FastOpenAI(), free_port()
    with serve(fake, up_port):
        app, port = gateway_for({"up": f"http://127.0.0.1:{up_port}"})
        with serve(app, port), httpx.Client() as client:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for stream in (False, True, False, True):
                for _ in range(5):
                    assert (
                        client.post(
                            url, json={**CHAT, "stream": stream, "max_tokens": 3}
                        ).status_code
                        == 200
                    )
    assert fake.requests == 20 and len(fake.peers) == 1


def test_connections_are_reused_when_the_consumer_stops_at_done():
    """The WebSocket and Ollama's /api/chat stop reading at [DONE]: that closed a connection per request."""
    from websockets.sync.client import connect

    fake, up_port = FastOpenAI(), free_port()
    with serve(fake, up_port):
        app, port = gateway_for({"up": f"http://127.0.0.1:{up_port}"})
        with serve(app, port), httpx.Client() as client:
            for _ in range(5):
                answer = client.post(
                    f"http://127.0.0.1:{port}/api/chat",
                    json={**CHAT, "options": {"num_predict": 3}},
                )
                assert answer.status_code == 200 and answer.text.count("\n") == 4
            assert fake.requests == 5 and len(fake.peers) == 1
            fake.peers.clear()
            with connect(f"ws://127.0.0.1:{port}/v1/ws", open_timeout=5) as ws:
                for i in range(5):
                    ws.send(json.dumps({"id": i, "body": {**CHAT, "max_tokens": 3}}))
                    while json.loads(ws.recv(timeout=5))["type"] != "done":
                        pass
            assert fake.requests == 10 and len(fake.peers) == 1


class CloseDelimitedBackend:
    """An HTTP/1.0-style backend: its answers carry no Content-Length and end when it closes
    the connection (RFC 9112 §6.3); only the health probe gets a Content-Length."""

    STREAM = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\ndata: [DONE]\n\n'
    ANSWER = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}'

    def __init__(self, port: int):
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET"):
            writer.write(
                b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{"status":"ok"}'
            )
        else:
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            stream = json.loads(await reader.readexactly(length)).get("stream")
            ctype, body = (
                (b"text/event-stream", self.STREAM)
                if stream
                else (b"application/json", self.ANSWER)
            )
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: %s\r\n\r\n%s" % (ctype, body))
        await writer.drain()
        writer.close()

    def __enter__(self) -> str:
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self.loop
        )
        self.thread.start()
        self.server.result(5)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.server.result().close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_a_body_delimited_by_the_connection_closing_is_a_whole_answer():
    """HTTP/1.0 backends end a body by closing: the lean transport called that a broken answer."""
    with CloseDelimitedBackend(free_port()) as url:
        app, port = gateway_for({"old": url})
        with serve(app, port):
            deadline = time.monotonic() + 3
            while not app.table.upstreams["old"].healthy and time.monotonic() < deadline:
                time.sleep(0.05)
            chat = f"http://127.0.0.1:{port}/v1/chat/completions"
            for _ in range(2):  # a second time: the closed connection is not taken from the pool
                whole = httpx.post(chat, json=CHAT)
                assert (
                    whole.status_code == 200
                    and whole.json()["choices"][0]["message"]["content"] == "hi"
                )
                streamed = httpx.post(chat, json={**CHAT, "stream": True})
                assert (
                    streamed.status_code == 200 and streamed.content == CloseDelimitedBackend.STREAM
                )
            assert app.table.upstreams["old"].consecutive_failures == 0


@pytest.mark.parametrize("cut", [3, 12], ids=["inside-the-usage-key", "after-the-usage-key"])
def test_a_usage_event_split_across_chunks_is_counted(cut):
    """Backends' chunks fall anywhere: a usage event cut in two must still count its tokens."""
    events = b"".join(stream_events(2, usage=True))
    at = events.index(b'"usage"') + cut
    upstream = RecordedUpstream({
        ("GET", "/health"): Recorded(body=b'{"status":"ok"}'),
        ("POST", "/v1/chat/completions"): Recorded(content_type="text/event-stream", pieces=[events[:at], events[at:]],
                                                   delay=0.02),
    })  # fmt: skip
    up_port = free_port()
    with serve(upstream, up_port):
        app, port = gateway_for({"up": f"http://127.0.0.1:{up_port}"})
        with serve(app, port):
            body = {
                **CHAT,
                "stream": True,
                "stream_options": {"include_usage": True},
            }  # passed as is
            response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
            assert response.status_code == 200 and response.content == events
    metrics = app.metrics.render(app.upstreams()).decode()
    assert 'tensorforge_gateway_tokens_total{backend="up",model="m",type="prompt"} 9.0' in metrics
    assert (
        'tensorforge_gateway_tokens_total{backend="up",model="m",type="completion"} 2.0' in metrics
    )


def test_fallback_model_group_serves_when_the_model_has_no_healthy_backend(pair):
    from reconciler.config.schema import DesiredState

    state = DesiredState.model_validate({
        "models": {"big": {"source": "pypi:x"}, "small": {"source": "pypi:y"}},
        "backends": {
            "big-1": {"kind": "llamacpp", "model": "big", "port": 1, "url": f"http://127.0.0.1:{free_port()}"},
            "small-1": {"kind": "llamacpp", "model": "small", "port": 1, "url": pair["a"]},
        },
        "gateway": {"health_interval": 0.5, "routing": {"fallbacks": {"big": ["small"]}}},
    })  # fmt: skip
    port = free_port()
    with serve(create_app(state), port):
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "model": "big"}
        )
    assert response.status_code == 200 and response.headers["x-tensorforge-backend"] == "small-1"
